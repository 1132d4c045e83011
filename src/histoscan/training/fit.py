"""Train a model: set up the run folder, data and model, fit with Lightning, and leave a model bundle.

Reads top-down: ``train`` -> ``setup_run`` -> ``build_data`` -> ``build_model`` -> ``build_trainer`` -> fit -> ``finish``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from histoscan.bundle import ModelBundle, read_bundle
from histoscan.data.splits import split_store
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError, DataError
from histoscan.models import create_model
from histoscan.models.backbones import timm_data_config
from histoscan.models.factory import count_parameters, list_models
from histoscan.preprocessing import Preprocessing, channel_stats
from histoscan.runfolder import CONFIG_FILE, LAST_CKPT, MODEL_FILE, SPLIT_FILE, WEIGHTS_FILE
from histoscan.stain.sources import stain_summary, training_stain
from histoscan.system import available_cores, native_bf16_cpu
from histoscan.training.callbacks import MONITOR, EpochSummary, LastCheckpoint
from histoscan.training.config import TrainConfig
from histoscan.training.data import make_loader
from histoscan.training.module import PatchClassifier

RUN_NAME_ENV = "HISTOSCAN_RUN_NAME"


@dataclass
class TrainResult:
    """Where the run is and how it went."""

    run_dir: Path
    best_val_auroc: float
    best_epoch: int
    epochs: int
    seconds: float

    def summary_lines(self) -> list[str]:
        """What a person wants to know: the best validation AUROC (or that there was no validation), where the run is."""
        best = (
            f"best val AUROC {self.best_val_auroc:.4f} at epoch {self.best_epoch}"
            if not math.isnan(self.best_val_auroc)
            else "no validation split: kept the last epoch's weights"
        )
        return [f"{best}; {self.epochs} epochs in {self.seconds:.0f} s", f"run folder: {self.run_dir}"]


def train(cfg: TrainConfig, printer: Callable[[str], None] = print, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` and write the run folder (config, metrics, weights, model.json).

    ``callbacks`` are extra Lightning callbacks (the tuner's pruning hook). A split file with no
    validation patches (train on train+val) trains for ``max_epochs`` and keeps the last weights.
    """
    started = time.perf_counter()
    _quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _set_threads(cfg)
    run_dir, cfg = setup_run(cfg)
    store, parts, split_path = build_data(cfg)
    pre = _geometry(cfg, store, printer if _global_rank() == 0 else lambda _: None)
    pre.stain = training_stain(cfg.stain_norm, cfg.stain_target, parts["train"], cfg.seed, cfg.stain_granularity)
    groups = pre.estimate_store_groups(store)  # per-group models: every group's stain, once (train and val alike)
    model = create_model(
        cfg.model,
        store.num_classes,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        input_size=pre.input_size,
        **cfg.model_args,
    )
    pre.mean, pre.std = _normalisation(cfg, model, parts["train"], pre, groups)
    run_dir.mkdir(parents=True, exist_ok=True)
    module = PatchClassifier(model, cfg, pre, store.num_classes)
    if _global_rank() == 0:
        cfg.to_yaml(run_dir / CONFIG_FILE)
        if split_path.resolve() != (run_dir / SPLIT_FILE).resolve():
            shutil.copy(split_path, run_dir / SPLIT_FILE)
        bundle = _bundle(cfg, store, pre, parts, model)
        if not cfg.resume or not (run_dir / MODEL_FILE).is_file():
            bundle.save(run_dir)
    validate = len(parts["val"]) > 0
    trainer, summary = build_trainer(cfg, run_dir, printer, [module.plan, *callbacks], validate)
    module.channels_last = cfg.channels_last is not False  # faster convolutions on GPU and, with oneDNN, on CPU
    if module.channels_last:
        module.model.to(memory_format=torch.channels_last)
        if module.ema is not None:
            module.ema.to(memory_format=torch.channels_last)
    if cfg.compile:
        module.model = torch.compile(module.model)  # type: ignore[assignment]
    world = _world(trainer)
    if _global_rank() == 0:
        printer(
            f"run {run_dir}: {cfg.model} on {len(parts['train'])} training / {len(parts['val'])} validation patches, "
            f"input {pre.input_size} px, {trainer.world_size} process(es), precision {trainer.precision} "
            f"({precision_reason(cfg, _on_cuda(trainer))}), "
            f"{'channels-last' if module.channels_last else 'contiguous'}"
            + (f", weight average (EMA {cfg.ema_decay})" if module.ema is not None else "")
            + (f", time budget {cfg.max_time}: schedule re-planned each epoch" if cfg.max_time else "")
        )
        _record_numerics(run_dir, str(trainer.precision), module.channels_last, cfg.ema_decay)
    loaders = [
        make_loader(
            parts[s],
            cfg.batch_size,
            train=s == "train",
            seed=cfg.seed,
            num_workers=_workers(cfg, trainer),
            balanced=cfg.balanced_sampler and s == "train",
            groups=groups[parts[s].indices] if groups is not None else None,
            rank=world[0],
            world_size=world[1],
        )
        for s in (("train", "val") if validate else ("train",))
    ]
    ckpt = run_dir / LAST_CKPT if cfg.resume else None
    os.environ[RUN_NAME_ENV] = run_dir.name  # DDP children re-run this command: same run folder
    trainer.fit(module, loaders[0], loaders[1] if validate else None, ckpt_path=str(ckpt) if ckpt else None)
    if pre.stain is not None and _global_rank() == 0:
        printer(stain_summary(pre.stain_counts()))
    result = finish(cfg, run_dir, summary, trainer, started)
    if _global_rank() == 0:
        from histoscan.trust.tissue import MIN_PATCHES, save_tissue_check

        if len(parts["train"]) >= MIN_PATCHES:
            save_tissue_check(run_dir, parts["train"])  # every new run can tell tissue from anything else
        else:
            printer(
                f"tissue check not fitted: {len(parts['train'])} training patches, it needs {MIN_PATCHES} "
                "(predictions report quality 'unchecked')"
            )
    return result


# ---- set-up -----------------------------------------------------------------------
def setup_run(cfg: TrainConfig) -> tuple[Path, TrainConfig]:
    """Name the run folder (created once data and model are known to be good); never overwrite a finished run."""
    if not cfg.data:
        raise ConfigError("no training data: give --data STORE (or 'data:' in the config)")
    name = cfg.name or os.environ.get(RUN_NAME_ENV) if _global_rank() != 0 else cfg.name
    if name is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("under torchrun every process must agree on the run folder: give --name")
        name = f"{cfg.model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    cfg = cfg.replace(name=name)
    run_dir = Path(cfg.out) / name
    if cfg.resume:
        if not (run_dir / LAST_CKPT).is_file():
            raise ConfigError(f"{run_dir}: nothing to resume (no {LAST_CKPT})")
    elif _global_rank() == 0 and (run_dir / MODEL_FILE).exists():
        raise ConfigError(
            f"{run_dir}: a run with this name exists; pass --resume to continue it or choose another --name"
        )
    return run_dir, cfg


def build_data(cfg: TrainConfig) -> tuple[PatchStore, dict[str, PatchStore], Path]:
    """Open the store and split it (reusing a saved split of the same recipe)."""
    store = PatchStore(cfg.data)
    if not store.labelled:
        raise DataError(f"{cfg.data}: the store has no labels; training needs a labelled store")
    split_file = cfg.split_file
    if cfg.resume and split_file is None:
        saved = Path(cfg.out) / str(cfg.name) / SPLIT_FILE
        split_file = str(saved) if saved.is_file() else None
    parts, path = split_store(
        store,
        val=cfg.val,
        test=cfg.test,
        seed=cfg.seed,
        split_file=split_file,
        fold=cfg.fold,
        calibration=cfg.calibration,
    )
    if len(parts["train"]) == 0:
        raise DataError(f"{cfg.data}: the train split is empty (val={cfg.val}, test={cfg.test})")
    if len(parts["val"]) == 0:
        if split_file is None:
            raise DataError(f"{cfg.data}: the val split is empty (val={cfg.val}, test={cfg.test})")
        if cfg.early_stopping or cfg.schedule == "plateau":
            raise ConfigError(
                f"{split_file}: no validation patches, so early stopping and the plateau schedule cannot run; "
                "set early_stopping: null and another schedule to train on train+val"
            )
    return store, parts, path


def _geometry(cfg: TrainConfig, store: PatchStore, printer: Callable[[str], None] = print) -> Preprocessing:
    """The stored preprocessing's geometry: the store's size, fit policy, label geometry and resolution, and the crop.

    A centre crop applies only where the label is about the centre (the store records a
    ``label_size``). Where the label describes the whole image (``label_size`` None: LC25000,
    IDC, class folders), a centre crop would cut labelled tissue away, so the crop side becomes
    a resize to that side instead: the network sees the whole image at the input size the
    config chose (e.g. the cpu-default's 64 px), and a note says so.
    """
    h, w = store.image_size
    crop, size = cfg.crop, cfg.resize
    label = store.label_size
    if crop and label is None:
        printer(
            f"note: {cfg.data} records no labelled centre (its labels describe whole images), so the centre "
            f"crop {crop} is not applied; the whole image is resized to {size or crop} px instead"
            + (
                " (and random_crop, which keeps a labelled centre in view, is not applied either)"
                if cfg.random_crop
                else ""
            )
        )
        crop, size = None, size or crop
    if crop and crop > min(h, w):
        raise ConfigError(f"crop {crop} is larger than the store's images ({h}x{w})")
    if crop and label and crop < label:
        raise ConfigError(f"crop {crop} would cut into the labelled centre ({label} px) of {cfg.data}'s patches")
    mpp = cfg.mpp if cfg.mpp is not None else store.mpp
    if mpp is not None and not mpp > 0:
        raise ConfigError(f"mpp must be a positive number of micrometres per pixel, got {mpp}")
    return Preprocessing(image_size=[h, w], fit=store.fit, crop=crop, resize=size, mpp=mpp, label_size=label)


def _normalisation(
    cfg: TrainConfig, model: torch.nn.Module, train: PatchStore, pre: Preprocessing, groups: np.ndarray | None
) -> tuple[list[float], list[float]]:
    """ImageNet statistics for timm models (their weights expect them), the training split's for ours.

    The split's statistics are taken after stain normalisation (stage 2), as the model will see the patches
    (``groups``: per-group stain models' group names of the whole store).
    """
    if cfg.model not in list_models():
        dc = timm_data_config(model)
        return [float(v) for v in dc["mean"]], [float(v) for v in dc["std"]]
    positions = sorted(range(0, len(train), max(1, len(train) // 2000)))
    names = groups[train.indices[positions]] if groups is not None else None
    stained = pre.normalise_stain(torch.from_numpy(train.batch(positions)), names).numpy()
    if pre.stain_normaliser is not None:
        pre.stain_normaliser.reset_counts()  # the counts logged after training are the training patches'
    return channel_stats(stained)


def _bundle(
    cfg: TrainConfig, store: PatchStore, pre: Preprocessing, parts: dict[str, PatchStore], model: torch.nn.Module
) -> ModelBundle:
    return ModelBundle(
        architecture=cfg.model,
        classes=store.class_names,
        preprocessing=pre,
        model_args=dict(cfg.model_args),
        split={
            "file": SPLIT_FILE,
            "sizes": {k: len(v) for k, v in parts.items()},
            "seed": cfg.seed,
            "val": cfg.val,
            "test": cfg.test,
            **({"calibration": cfg.calibration} if cfg.calibration else {}),
        },
        training={"store": str(Path(cfg.data).resolve()), "parameters": count_parameters(model)},
    )


def build_trainer(
    cfg: TrainConfig,
    run_dir: Path,
    printer: Callable[[str], None],
    extra: Sequence[Callback] = (),
    validate: bool = True,
) -> tuple[L.Trainer, EpochSummary]:
    """A Lightning Trainer with histoscan's callbacks (plus ``extra``) and loggers."""
    summary = EpochSummary(run_dir, printer, validate)
    callbacks: list[Any] = [
        summary,
        LastCheckpoint(run_dir),
        *extra,
    ]  # summary first: its best value goes into last.ckpt
    if cfg.early_stopping:
        callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.early_stopping))
    if cfg.progress:
        callbacks.append(RichProgressBar(leave=False))
    cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    precision = choose_precision(cfg, cuda)
    budget = cfg.max_time_seconds
    devices: Any = cfg.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    limit = cfg.limit_train_batches
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=cfg.max_epochs,
        # the schedule plan stops the run at an epoch boundary; this is only a net for an epoch far slower than measured
        max_time=timedelta(seconds=budget * 1.25 + 60) if budget else None,
        accelerator=cfg.accelerator,
        devices=devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cast(Any, precision),  # one of Lightning's precision names (checked by TrainConfig's Literal)
        gradient_clip_val=cfg.grad_clip,
        callbacks=callbacks,
        logger=TensorBoardLogger(str(run_dir), name="tensorboard", version=""),
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        limit_train_batches=(int(limit) if limit and limit >= 1 else limit) if limit else None,
    )
    return trainer, summary


def choose_precision(cfg: TrainConfig, cuda: bool) -> str:
    """``cfg.precision``, or for ``auto``: bf16 mixed precision where the hardware computes bf16 natively, else fp32.

    On CPUs without AVX512-BF16 / AMX, bf16 is emulated and slower than fp32; CUDA cards before compute
    capability 8.0 (pre-Ampere) have no bf16 units and train in fp16 mixed precision instead.
    """
    if cfg.precision != "auto":
        return cfg.precision
    if cuda:
        return "bf16-mixed" if torch.cuda.get_device_capability()[0] >= 8 else "16-mixed"
    return "bf16-mixed" if cfg.accelerator in ("auto", "cpu") and native_bf16_cpu() else "32-true"


def precision_reason(cfg: TrainConfig, cuda: bool) -> str:
    """Why the precision was chosen, in a few words for the run's first line."""
    if cfg.precision != "auto":
        return "--train-precision"
    if cuda:
        native = torch.cuda.get_device_capability()[0] >= 8
        return "auto: GPU with native bf16" if native else "auto: GPU without native bf16 (compute capability < 8.0)"
    return "auto: CPU with native bf16" if native_bf16_cpu() else "auto: CPU without native bf16"


def _on_cuda(trainer: L.Trainer) -> bool:
    return trainer.accelerator.__class__.__name__ == "CUDAAccelerator"


def _record_numerics(run_dir: Path, precision: str, channels_last: bool, ema_decay: float | None) -> None:
    """The numeric choices of this run, in model.json's training record."""
    bundle = read_bundle(run_dir)
    bundle.training.update({"precision": precision, "channels_last": channels_last, "ema_decay": ema_decay})
    bundle.save(run_dir)


def finish(cfg: TrainConfig, run_dir: Path, summary: EpochSummary, trainer: L.Trainer, started: float) -> TrainResult:
    """Record the best metric and training time in model.json."""
    seconds = time.perf_counter() - started
    epochs = trainer.current_epoch
    if trainer.is_global_zero:
        if not (run_dir / WEIGHTS_FILE).is_file():
            raise ConfigError(f"{run_dir}: training ended before any validation; no weights were saved")
        bundle = read_bundle(run_dir)
        bundle.best_metric = (
            {"name": MONITOR, "value": summary.best, "epoch": summary.best_epoch, "weights": summary.best_weights}
            if summary.validate
            else {
                "name": "none (no validation split: the last epoch's weights)",
                "value": None,
                "epoch": summary.best_epoch,
            }
        )
        bundle.training.update({"epochs": epochs, "seconds": round(seconds + bundle.training.get("seconds", 0.0), 1)})
        if summary.diverged:
            bundle.training["stopped"] = summary.diverged
        bundle.save(run_dir)
    return TrainResult(run_dir, summary.best if summary.validate else float("nan"), summary.best_epoch, epochs, seconds)


# ---- environment ------------------------------------------------------------------------
def _global_rank() -> int:
    """0 on the main process; non-zero in DDP children (Lightning's launcher, torchrun or SLURM)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return int(os.environ.get("LOCAL_RANK", "0")) + int(os.environ.get("NODE_RANK", "0"))


def _world(trainer: L.Trainer) -> tuple[int, int]:
    return trainer.global_rank, trainer.world_size


def _workers(cfg: TrainConfig, trainer: L.Trainer) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    if _on_cuda(trainer):
        return min(8, available_cores())
    return 0


def _quiet_lightning() -> None:
    """Keep Lightning's start-up chatter and known-harmless warnings out of the user's terminal."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
    warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no `val_dataloader`")


def _set_threads(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()


def keep_freed_memory() -> None:
    """Ask glibc to keep freed activation buffers (up to 32 MB each) instead of returning them to the OS.

    Without this, every training step re-faults its large buffers and a third of CPU time goes
    to the kernel (measured on 2 cores). No effect, and no error, off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or os.name != "posix":
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: the largest value glibc accepts
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
