"""The Predictor: the one inference path for predict, evaluate, calibrate and serve.

It reads preprocessing, temperature and threshold from the run's ``model.json`` and runs
either backend, optionally with test-time augmentation over the dihedral group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histoscan.bundle import ModelBundle, read_bundle
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError
from histoscan.inference.backends import Backend, OnnxBackend, TorchBackend, resolve_backend
from histoscan.inference.inputs import store_input_batches
from histoscan.inference.probabilities import probabilities
from histoscan.trust.answers import UNCHECKED, answer_images
from histoscan.trust.tissue import check_images


@dataclass
class Prediction:
    """Per-image class probabilities (N x C), predicted class index, spread over views when there are several,
    and what each image is answered (``answers``: a class name, ``refer``, ``not tissue`` or ``out of
    distribution``) with its tissue-check ``quality`` flag (``ok``, what is wrong, or ``unchecked``)."""

    probabilities: np.ndarray
    predicted: np.ndarray
    uncertainty: np.ndarray | None = None
    answers: list[str] | None = None
    quality: list[str] | None = None

    def __len__(self) -> int:
        return int(self.probabilities.shape[0])

    @staticmethod
    def concat(parts: Sequence[Prediction], num_classes: int) -> Prediction:
        if not parts:
            return Prediction(np.zeros((0, num_classes), np.float32), np.zeros(0, np.int64))
        unc = [p.uncertainty for p in parts if p.uncertainty is not None]
        answers = [p.answers for p in parts if p.answers is not None]
        quality = [p.quality for p in parts if p.quality is not None]
        return Prediction(
            np.concatenate([p.probabilities for p in parts]),
            np.concatenate([p.predicted for p in parts]),
            np.concatenate(unc) if len(unc) == len(parts) else None,
            [a for part in answers for a in part] if len(answers) == len(parts) else None,
            [q for part in quality for q in part] if len(quality) == len(parts) else None,
        )


def default_tta(bundle: ModelBundle) -> list[int]:
    """The TTA a model is evaluated and submitted with by default: the referral rule's policy when it has one,
    else model.json's ``inference.tta`` when set, else all 8 dihedral elements for binary patch models (cheap
    for small models) and none otherwise."""
    if bundle.trust.referral is not None:
        return list(bundle.trust.referral.tta)
    if bundle.inference.tta is not None:
        return parse_tta(bundle.inference.tta)
    return parse_tta(bundle.task == "binary")


def submission_tta(predictor: Predictor, tta: bool | None, submission: object | None) -> bool | list[int]:
    """``predict``'s TTA: as asked, else the model's default when writing a Kaggle submission or when the model
    refers doubtful images (its referral rule's policy), else none."""
    if tta is not None:
        return tta
    return default_tta(predictor.bundle) if submission or predictor.bundle.trust.referral is not None else False


def parse_tta(tta: bool | Sequence[int] | None) -> list[int]:
    """The dihedral elements to average: [0] without TTA, all 8 with ``True``, or a chosen subset."""
    if not tta:
        return [0]
    if tta is True:
        return list(range(8))
    ks = sorted({int(k) for k in tta})
    if not ks or any(k < 0 or k > 7 for k in ks):
        raise ConfigError(f"TTA elements must be in 0..7, got {list(tta)}")
    return ks


class Predictor:
    """Probabilities for uint8 RGB images of any size, from a run folder.

    Args:
        run_dir: a training run (the model bundle).
        backend: ``torch``, ``onnx``, or ``auto`` (ONNX when ``model.onnx`` exists, else torch).
        device: torch device for the torch backend.
        batch_size: images per forward pass.
        threads: CPU threads for either backend (default: all cores).
        precision: torch backend only: ``auto`` (bf16 where the hardware has it natively, see
            ``resolve_precision``), ``fp32``, ``bf16`` or ``fp16``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        backend: str = "auto",
        device: str = "cpu",
        batch_size: int = 256,
        threads: int | None = None,
        precision: str = "auto",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.bundle: ModelBundle = read_bundle(run_dir)
        backend = resolve_backend(run_dir, backend, device)
        if threads:
            torch.set_num_threads(threads)
        if backend == "torch":
            self.backend: Backend = TorchBackend(run_dir, device, precision)
        elif backend == "onnx":
            self.backend = OnnxBackend(run_dir, threads)
        else:
            raise ConfigError(f"backend {backend!r} is not one of torch, onnx, auto")
        self.batch_size = batch_size
        self.device = torch.device(device if backend == "torch" else "cpu")

    # ---- what the model is ---------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def threshold(self) -> float:
        return self.bundle.threshold

    # ---- the core: one batch -----------------------------------------------------------
    def _to_batch(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """A uint8 NHWC batch at the model's stored image size, fitted by its stored ``fit`` policy."""
        return self.bundle.preprocessing.fit_batch(images)

    def probabilities_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """Apply the stored temperature; binary logits become [P(neg), P(pos)]."""
        return probabilities(logits, self.bundle.temperature)

    def classify(self, probabilities: np.ndarray) -> np.ndarray:
        """Class index: P(positive) >= threshold for binary tasks, argmax otherwise."""
        if self.bundle.task == "binary":
            return (probabilities[:, 1] >= self.threshold).astype(np.int64)
        return probabilities.argmax(axis=1)

    def logits(self, images: np.ndarray | Sequence[np.ndarray], k: int = 0) -> np.ndarray:
        """Raw logits of one batch under dihedral element ``k``."""
        return self.backend.logits(self.bundle.preprocessing(self._to_batch(images), self.device, k))

    def views(self, tta: bool | Sequence[int] | None) -> list[int]:
        """The dihedral elements a prediction runs: as asked, or with None the referral rule's policy (else none)."""
        if tta is None and self.bundle.trust.referral is not None:
            return list(self.bundle.trust.referral.tta)
        return parse_tta(tta)

    def quality(self, images: np.ndarray | Sequence[np.ndarray]) -> list[str]:
        """The tissue check's flag per image (``unchecked`` when model.json has no check)."""
        check = self.bundle.trust.tissue_check
        if check is None:
            return [UNCHECKED] * len(images)
        return check_images(check, self.bundle.preprocessing, images).quality

    def predict_batch(
        self, images: np.ndarray | Sequence[np.ndarray], tta: bool | Sequence[int] | None = None
    ) -> Prediction:
        """Predict one batch (any length; split internally by ``batch_size``).

        ``tta`` None runs the referral rule's TTA policy when model.json has one (else no TTA). Every
        image is answered (``Prediction.answers``): a flagged one by the tissue check, ``refer`` where the
        referral rule applies (only under its own TTA policy), else its class.
        """
        ks = self.views(tta)
        parts = []
        n = len(images)
        for start in range(0, n, self.batch_size):
            chunk = images[start : start + self.batch_size]
            probs = np.stack([self.probabilities_from_logits(self.logits(chunk, k)) for k in ks])
            mean = probs.mean(axis=0)
            unc = None
            if len(ks) > 1:
                pred = self.classify(mean)
                unc = (
                    probs[:, np.arange(len(pred)), pred].std(axis=0)
                    if self.bundle.task != "binary"
                    else probs[:, :, 1].std(axis=0)
                )
            predicted = self.classify(mean)
            quality = self.quality(chunk)
            answers = answer_images(self.bundle.trust, self.classes, mean, predicted, unc, quality, ks)
            parts.append(Prediction(mean, predicted, unc, answers, quality))
        return Prediction.concat(parts, len(self.classes))

    def predict_batches(
        self, batches: Iterable[np.ndarray | Sequence[np.ndarray]], tta: bool | Sequence[int] | None = None
    ) -> Prediction:
        """Predict a stream of batches."""
        return Prediction.concat([self.predict_batch(b, tta) for b in batches], len(self.classes))

    # ---- inputs ------------------------------------------------------------------------
    def predict_store(self, store: PatchStore, tta: bool | Sequence[int] | None = None) -> Prediction:
        """Every image of a PatchStore (or view), in order."""
        return self.predict_batches((b.images for b in store_input_batches(store, self.batch_size)), tta)
