"""The LightningModule that trains any model of the factory: loss, metrics, optimisers, schedules."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from histoscan.data.transforms import Augment
from histoscan.inference.probabilities import probabilities
from histoscan.models.factory import classifier_parameters
from histoscan.preprocessing import Preprocessing
from histoscan.stain.augment import build_augmentation, build_restain
from histoscan.training.config import TrainConfig
from histoscan.training.mixing import MixedBatch, label_region, mix_batch
from histoscan.training.schedule import SchedulePlan


def task_metrics(num_classes: int, prefix: str) -> torchmetrics.MetricCollection:
    """AUROC (macro one-vs-rest for multi-class), accuracy and F1."""
    m: dict[str, torchmetrics.Metric | torchmetrics.MetricCollection]
    if num_classes == 2:
        m = {
            "auroc": _auroc(num_classes),
            "acc": torchmetrics.Accuracy(task="binary"),
            "f1": torchmetrics.F1Score(task="binary"),
        }
    else:
        m = {
            "auroc": _auroc(num_classes),
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes),
            "f1": torchmetrics.F1Score(task="multiclass", num_classes=num_classes, average="macro"),
        }
    return torchmetrics.MetricCollection(m, prefix=prefix)


def _auroc(num_classes: int) -> torchmetrics.Metric:
    """The AUROC of ``task_metrics`` alone (binary, or macro one-vs-rest)."""
    if num_classes == 2:
        return torchmetrics.AUROC(task="binary")
    return torchmetrics.AUROC(task="multiclass", num_classes=num_classes, average="macro")


def _unpack(batch: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """(images, labels[, stain group names]) from a loader batch."""
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)


class PatchClassifier(L.LightningModule):
    """Wraps a model with its preprocessing, augmentation, loss and optimiser set-up."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, preprocessing: Preprocessing, num_classes: int) -> None:
        super().__init__()
        self.model, self.cfg, self.pre, self.num_classes = model, cfg, preprocessing, num_classes
        self.binary = num_classes == 2
        # random crop offsets (training only): CentreSafeCrop to the stored crop side, keeping the labelled centre
        crop = preprocessing.crop if cfg.random_crop else None
        self.augment = build_augmentation(
            cfg.augment,
            cfg.augment_strength,
            crop=crop,
            keep=preprocessing.label_size,
            stain_p=cfg.stain_augment_p,
            matrix_noise=cfg.stain_matrix_noise,
        )
        # after stain_augment_until of the plan: the preset without its stain ops (flips + colour jitter)
        self.augment_late = build_augmentation(
            cfg.augment, cfg.augment_strength, crop=crop, keep=preprocessing.label_size, restain=False
        )
        # stain consistency: the stain ops alone, applied to a copy of the base-augmented batch
        self.restain = build_restain(cfg.augment, cfg.augment_strength, cfg.stain_augment_p, cfg.stain_matrix_noise)
        weights = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights else None
        if weights is not None and len(weights) != num_classes:
            from histoscan.errors import ConfigError

            raise ConfigError(f"class_weights has {len(weights)} values for {num_classes} classes")
        self.class_weights: torch.Tensor
        self.register_buffer(
            "class_weights", weights if weights is not None else torch.ones(num_classes), persistent=False
        )
        self.val_metrics = task_metrics(num_classes, "val_")
        # the weights' exponential moving average, BatchNorm buffers included: a submodule, so last.ckpt keeps it
        self.ema: AveragedModel | None = None
        if cfg.ema_decay:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
            self.val_ema_auroc = _auroc(num_classes)
        # the learning-rate plan (cosine): re-planned from measured epoch time when the run has a time budget
        self.plan = SchedulePlan(cfg.max_epochs, cfg.warmup_epochs, cfg.max_time_seconds)
        self.train_metrics = task_metrics(num_classes, "train_")
        self._epoch_start = self._last_batch_end = 0.0
        self._seen = 0
        self.channels_last = False

    # ---- forward and loss ------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a preprocessed batch."""
        return self.model(x)

    def _inputs(self, images: torch.Tensor, train: bool, groups: np.ndarray | None = None) -> torch.Tensor:
        """uint8 NHWC batch -> model input through the model's stored ``Preprocessing``.

        Without augmentation this is the Predictor's own call; with it, the augmentation runs
        between the stored stages, on the fitted, stain-normalised full patch (``to_float``) and
        before the crop / resize and mean / std (``finish``). ``groups``: the patches' stain groups
        (per-group stain normalisation).
        """
        with torch.autocast(images.device.type, enabled=False):  # preprocessing in fp32, as the Predictor runs it
            x = self._preprocess(images, train, groups)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def training_augment(self) -> Augment:
        """The augmentation of the current step: the preset, or its base once the plan passes ``stain_augment_until``.

        The plan's cosine progress never decreases (a re-plan spreads what is left), so the switch happens once.
        """
        until = self.cfg.stain_augment_until
        return self.augment_late if until < 1 and self.plan.cosine_progress(self.global_step) >= until else self.augment

    def consistency_active(self) -> bool:
        """Whether this step trains on two views (stain consistency on, and the plan still re-staining)."""
        return self.cfg.stain_consistency > 0 and self.training_augment() is self.augment

    def _preprocess(self, images: torch.Tensor, train: bool, groups: np.ndarray | None = None) -> torch.Tensor:
        augment = self.training_augment() if train else self.augment
        if train and augment.ops:
            gen = torch.Generator().manual_seed(
                int(self.cfg.seed * 1_000_003 + self.current_epoch * 10_007 + self.global_step)
            )
            x = self.pre.to_float(images, groups=groups)
            if self.consistency_active():
                # two views of each patch: the base augmentation, and the same patch re-stained on top of it
                base = self.augment_late(x, gen)
                return self.pre.finish(torch.cat([base, self.restain(base, gen)]))
            return self.pre.finish(augment(x, gen))
        return self.pre(images, groups=groups)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Classification loss with label smoothing and class weights."""
        eps = self.cfg.label_smoothing
        if self.binary:
            target = y.float() * (1 - eps) + 0.5 * eps
            pos_weight = self.class_weights[1] / self.class_weights[0]
            return (
                F.binary_cross_entropy_with_logits(logits.squeeze(1), target, pos_weight=pos_weight)
                * self.class_weights[0]
            )
        return F.cross_entropy(logits, y, weight=self.class_weights, label_smoothing=eps)

    def consistency(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean Jensen-Shannon divergence between the class distributions of two views' logits.

        In log space throughout: a confident view's probability of 0 or 1 (a sigmoid saturates in float32
        beyond a logit of about 17) would otherwise give an infinite log and a NaN gradient.
        """
        if self.binary:
            la, lb = (
                torch.stack([F.logsigmoid(-t), F.logsigmoid(t)], 1)
                for t in (a.float().squeeze(1), b.float().squeeze(1))
            )
        else:
            la, lb = F.log_softmax(a.float(), 1), F.log_softmax(b.float(), 1)
        log_m = torch.logaddexp(la, lb) - math.log(2)
        kl_a, kl_b = ((lp.exp() * (lp - log_m)).sum(1) for lp in (la, lb))
        return ((kl_a + kl_b) / 2).mean()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """P(tumour) for binary tasks, class probabilities for multi-class."""
        p = probabilities(logits)
        return p[:, 1] if self.binary else p

    # ---- steps -----------------------------------------------------------------
    def training_step(self, batch: tuple[Any, ...], batch_idx: int) -> torch.Tensor:
        """Loss of one training batch (plus the stain-consistency term when set)."""
        images, y, groups = _unpack(batch)
        x = self._inputs(images, train=True, groups=groups)
        mixed = self._mix(x)
        logits = self(mixed.x if mixed is not None else x)
        if self.consistency_active():  # two views (_preprocess): the base views, then the re-stained ones
            logits, restained = logits.chunk(2)
            loss = self.loss(logits, y) + self.cfg.stain_consistency * self.consistency(logits, restained)
        elif mixed is not None:  # the loss is linear in the target: mix the two labels' losses
            loss = mixed.lam * self.loss(logits, y) + (1 - mixed.lam) * self.loss(logits, y[mixed.perm])
        else:
            loss = self.loss(logits, y)
        self.train_metrics.update(self.probabilities(logits.detach()), y)
        self._seen += y.shape[0]
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=y.shape[0], sync_dist=False)
        return loss

    def _mix(self, x: torch.Tensor) -> MixedBatch | None:
        """Mixup / CutMix of a training batch of network inputs (None when both are off)."""
        cfg = self.cfg
        if not (cfg.mixup or cfg.cutmix):
            return None
        rng = np.random.default_rng([cfg.seed, self.current_epoch, self.global_step])  # same after a resume
        pre = self.pre
        source = pre.crop or min(pre.image_size)
        keep = label_region(x.shape[-1], pre.label_size, source)
        return mix_batch(x, cfg.mixup, cfg.cutmix, keep, rng)

    def validation_step(self, batch: tuple[Any, ...], batch_idx: int) -> None:
        """Score one validation batch."""
        images, y, groups = _unpack(batch)
        logits = self(self._inputs(images, train=False, groups=groups))
        self.log("val_loss", self.loss(logits, y), on_epoch=True, batch_size=y.shape[0], sync_dist=True)
        self.val_metrics.update(self.probabilities(logits), y)
        if self.ema is not None:
            self.val_ema_auroc.update(self.probabilities(self.ema(self._inputs(images, train=False, groups=groups))), y)

    def on_train_epoch_start(self) -> None:
        """Seed dropout for the epoch and freeze or unfreeze the backbone."""
        torch.manual_seed(self.cfg.seed * 1009 + self.current_epoch)  # dropout: same after a resume
        self._set_frozen(self.current_epoch < self.cfg.freeze_epochs)
        self._epoch_start, self._seen = time.perf_counter(), 0
        self._last_batch_end = self._epoch_start

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the weight average."""
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training metrics."""
        self.log_dict(self.train_metrics.compute(), sync_dist=True)
        self.train_metrics.reset()
        elapsed = max(self._last_batch_end - self._epoch_start, 1e-9)  # training steps only, not validation
        self.log("images_per_s", self._seen * self.trainer.world_size / elapsed, sync_dist=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[-1]["lr"])

    def on_validation_epoch_end(self) -> None:
        """Log the epoch's validation metrics (model and weight average)."""
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()
        if self.ema is not None:
            self.log("val_auroc_ema", self.val_ema_auroc.compute(), sync_dist=True)
            self.val_ema_auroc.reset()

    # ---- transfer learning -----------------------------------------------------
    def _set_frozen(self, frozen: bool) -> None:
        if self.cfg.freeze_epochs <= 0:
            return
        head = {id(p) for p in classifier_parameters(self.model)}
        for p in self.model.parameters():
            if id(p) not in head:
                p.requires_grad_(not frozen)

    # ---- optimisation ----------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """The optimizer and learning-rate schedule of the config."""
        cfg = self.cfg
        head_ids = {id(p) for p in classifier_parameters(self.model)} if cfg.backbone_lr_mult != 1.0 else set()
        head = [p for p in self.model.parameters() if id(p) in head_ids]
        body = [p for p in self.model.parameters() if id(p) not in head_ids]
        groups = [{"params": body, "lr": cfg.lr * cfg.backbone_lr_mult}]
        if head:
            groups.append({"params": head, "lr": cfg.lr})
        if cfg.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
            )
        if cfg.schedule == "constant":
            return opt
        if cfg.schedule == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=2)
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": plateau, "monitor": "val_auroc", "interval": "epoch"},
            }
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched: torch.optim.lr_scheduler.LRScheduler
        if cfg.schedule == "onecycle":
            max_lr = [cfg.lr * cfg.backbone_lr_mult] + ([cfg.lr] if head else [])  # one per parameter group
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total)
        else:
            plan = self.plan
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: plan.factor(step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
