"""The Predictor: the one inference path for predict, evaluate, calibrate and serve.

It reads preprocessing, temperature and threshold from the run's ``model.json`` and runs
either backend, optionally with test-time augmentation over the dihedral group.

An ensemble's folder (``kind: ensemble``) is taken unchanged: with the torch backend the Predictor
holds one member Predictor per member, each feeding the fitted uint8 batch through its own stored
preprocessing; with the ONNX backend one graph (``histoscan export ENS``) runs every member. Either
way the views (members x TTA elements) are averaged with the members' weights, the ensemble's own
temperature applies to the average, and the uncertainty is the spread across all views.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from histoscan.bundle import EnsembleBundle, ModelBundle, read_bundle
from histoscan.data.store import PatchStore
from histoscan.errors import ConfigError
from histoscan.inference.backends import Backend, OnnxBackend, TorchBackend, resolve_backend
from histoscan.inference.inputs import store_input_batches
from histoscan.inference.probabilities import logits_of, probabilities
from histoscan.inference.tta import default_views, tta_views
from histoscan.inference.tta import parse_tta as parse_tta  # re-exported: callers and tests import it from here
from histoscan.preprocessing import Groups, Preprocessing, dihedral_k
from histoscan.rules.answers import UNCHECKED, answer_images
from histoscan.rules.ood import FEATURE_SCORES, OodArrays, check_views, load_arrays, score_of, with_ood
from histoscan.rules.provenance import check_fitted, fitted_notices
from histoscan.rules.tissue import judge, tissue_features
from histoscan.runfolder import MODEL_FILE, FittedUnder, OodDetector


@dataclass
class Prediction:
    """What the Predictor returns for a batch of images.

    Per-image class probabilities (N x C), predicted class index, and the spread across views when there are
    several (TTA elements, ensemble members, or both): the standard deviation of P(positive) for binary models,
    of the predicted class's probability otherwise; None for one view. ``answers``: what each image is
    answered (a class name, ``refer``, ``not tissue`` or ``out of distribution``), with its tissue-check
    ``quality`` flag (``ok``, what is wrong, or ``unchecked``), and the out-of-distribution detector's score
    ``ood`` when the run has one (``trust.ood``).
    """

    probabilities: np.ndarray
    predicted: np.ndarray
    uncertainty: np.ndarray | None = None
    answers: list[str] | None = None
    quality: list[str] | None = None
    ood: np.ndarray | None = None  # the stored out-of-distribution detector's score (None: the run has none)

    def __len__(self) -> int:
        return int(self.probabilities.shape[0])

    @staticmethod
    def concat(parts: Sequence[Prediction], num_classes: int) -> Prediction:
        """Join predictions of consecutive batches into one."""
        if not parts:
            return Prediction(np.zeros((0, num_classes), np.float32), np.zeros(0, np.int64))
        unc = [p.uncertainty for p in parts if p.uncertainty is not None]
        answers = [p.answers for p in parts if p.answers is not None]
        quality = [p.quality for p in parts if p.quality is not None]
        ood = [p.ood for p in parts if p.ood is not None]
        return Prediction(
            np.concatenate([p.probabilities for p in parts]),
            np.concatenate([p.predicted for p in parts]),
            np.concatenate(unc) if len(unc) == len(parts) else None,
            [a for part in answers for a in part] if len(answers) == len(parts) else None,
            [q for part in quality for q in part] if len(quality) == len(parts) else None,
            np.concatenate(ood) if len(ood) == len(parts) else None,
        )


class Prepared:
    """One batch fitted to the model's size, and stain-normalised once per distinct member preprocessing.

    Built by ``Predictor.prepare``; every TTA view, every member sharing a preprocessing and the tissue
    check read the same prepared tensor (``get``), so the stain normaliser runs once per image.
    """

    def __init__(self, fitted: np.ndarray, device: torch.device, groups: Groups | None = None) -> None:
        self.fitted = fitted
        self.device = device
        self.groups = groups
        self._by_key: dict[str, torch.Tensor] = {}
        # the first view's raw logits and pooled features, kept by the pass that predicts (trust.ood reads them)
        self.first_logits: np.ndarray | None = None
        self.features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.fitted)

    def get(self, pre: Preprocessing) -> torch.Tensor:
        """The batch after ``pre``'s stages 1-2 (fit, stain), computed on first use and kept."""
        key = pre.stage2_key()
        if key not in self._by_key:
            self._by_key[key] = pre.prepare(self.fitted, self.device, self.groups)
        return self._by_key[key]


class MemberBackend:
    """The torch backend of an ensemble: its member Predictors (each runs its own preprocessing)."""

    name = "torch"

    def __init__(self, members: Sequence[Predictor]) -> None:
        self.members = list(members)

    def logits(self, x: torch.Tensor) -> np.ndarray:
        """Refuse: an ensemble's members preprocess their images themselves."""
        raise ConfigError(
            "an ensemble's members each preprocess the images themselves: use Predictor.views or predict_batch"
        )


def default_tta(bundle: ModelBundle) -> list[int]:
    """The model's own TTA policy (``default_views(bundle, "evaluate")``; kept for callers of this name)."""
    return default_views(bundle, "evaluate")


def submission_tta(predictor: Predictor, tta: bool | None, submission: object | None) -> list[int]:
    """``predict``'s views: as asked, else the default for a Kaggle submission or for plain prediction."""
    return tta_views(predictor.bundle, tta, "submission" if submission else "predict")


class Predictor:
    """Probabilities for uint8 RGB images of any size, from a run folder.

    Args:
        run_dir: a training run (the model bundle).
        backend: ``torch``, ``onnx``, or ``auto`` (whichever ``histoscan export`` timed faster on this hardware, else torch).
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
        self.members: list[Predictor] = []  # an ensemble on the torch backend: one Predictor per member
        self.weights = np.ones(1)
        if isinstance(self.bundle, EnsembleBundle):
            self.weights = np.asarray(self.bundle.weights, dtype=np.float64)
        if backend == "torch" and isinstance(self.bundle, EnsembleBundle):
            self.members = [Predictor(d, "torch", device, batch_size, None, precision) for d in self.bundle.member_dirs]
            self.backend: Backend = MemberBackend(self.members)
        elif backend == "torch":
            self.backend = TorchBackend(run_dir, device, precision)
        elif backend == "onnx":
            self.backend = OnnxBackend(run_dir, threads)
        else:
            raise ConfigError(f"backend {backend!r} is not one of torch, onnx, auto")
        self.batch_size = batch_size
        self.threads = threads  # also the tissue check's (None: every core)
        self.device = torch.device(device if backend == "torch" else "cpu")
        check_fitted(self.bundle.fitted, self.member_count, str(self.run_dir / MODEL_FILE))
        self.ood_arrays: OodArrays | None = None  # the out-of-distribution detector's fitted arrays (trust.ood)
        self.keep_features = False  # also read the first view's pooled features (set when trust.ood needs them)
        if self.bundle.trust.ood is not None:
            self._load_ood(self.bundle.trust.ood)

    def _load_ood(self, spec: OodDetector) -> None:
        """Check and load ``trust.ood``'s side file; refuse a backend that cannot give its score's features."""
        where = self.run_dir / MODEL_FILE
        if isinstance(self.bundle, EnsembleBundle):
            raise ConfigError(f"{where}: trust.ood is fitted per single model; an ensemble's document cannot hold one")
        self.ood_arrays = load_arrays(self.run_dir, spec)
        if spec.score in FEATURE_SCORES:
            if not isinstance(self.backend, TorchBackend):
                raise ConfigError(
                    f"{where}: trust.ood scores the network's pooled features ({spec.score}), which the ONNX graph "
                    "does not output; predict with --backend torch"
                )
            self.keep_features = True

    # ---- the predictor it is, against what was fitted -------------------------------------
    @property
    def member_count(self) -> int:
        """How many models answer: an ensemble's members, else 1."""
        return len(self.bundle.member_dirs) if isinstance(self.bundle, EnsembleBundle) else 1

    @property
    def precision(self) -> str:
        """The numerics the network runs in: the torch backend's resolved precision, fp32 for ONNX Runtime."""
        backend = self.members[0].backend if self.members else self.backend
        return str(getattr(backend, "precision", "fp32"))

    def under(self, ks: Sequence[int]) -> FittedUnder:
        """This predictor under TTA views ``ks``, as ``model.json``'s ``fitted`` records describe one."""
        return FittedUnder(tta=sorted({int(k) for k in ks}), members=self.member_count, precision=self.precision)  # type: ignore[arg-type]

    def fitted_notices(self, ks: Sequence[int]) -> list[str]:
        """Lines naming each fitted quantity fitted under other settings than these.

        One line per threshold, temperature or referral rule fitted under another predictor, or of unknown
        provenance (``histoscan.rules.provenance``).
        """
        b = self.bundle
        return fitted_notices(
            b.fitted,
            self.under(ks),
            threshold=b.threshold,
            temperature=b.temperature,
            has_referral=b.trust.referral is not None,
            source=str(self.run_dir / MODEL_FILE),
        )

    def settings_record(self, ks: Sequence[int]) -> dict[str, object]:
        """What produced a prediction: the run, backend, device, precision, TTA views, members, threshold."""
        return {
            "run": str(self.run_dir),
            "backend": self.backend.name,
            "device": str(self.device),
            "precision": self.precision,
            "tta": self.under(ks).tta,
            "members": self.member_count,
            "threshold": self.threshold,
            "temperature": self.bundle.temperature,
            "fitted": self.bundle.fitted.model_dump(mode="json"),
        }

    # ---- what the model is ---------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """The model's class names."""
        return self.bundle.classes

    @property
    def threshold(self) -> float:
        """The model's decision threshold."""
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

    def logits(self, images: np.ndarray | Sequence[np.ndarray], k: int = 0, groups: Groups | None = None) -> np.ndarray:
        """Raw logits of one batch under one dihedral view.

        Raw logits of one batch under dihedral element ``k`` (``groups``: see ``predict_batch``; an ensemble:
        the logits of its members' weighted mean probability, before the ensemble's own temperature).
        """
        if isinstance(self.bundle, EnsembleBundle):
            views = self.views(images, [k], groups)
            return logits_of(np.tensordot(self.weights / self.weights.sum(), views, axes=1))
        return self.backend.logits(self.bundle.preprocessing(self._to_batch(images), self.device, k, groups))

    def prepare(self, images: np.ndarray | Sequence[np.ndarray], groups: Groups | None = None) -> Prepared:
        """Fit and stain-normalise one batch once for every view, member and the tissue check (``Prepared``)."""
        return Prepared(self._to_batch(images), self.device, groups)

    def views(
        self,
        images: np.ndarray | Sequence[np.ndarray] | Prepared,
        ks: Sequence[int],
        groups: Groups | None = None,
    ) -> np.ndarray:
        """Class probabilities of every view of one batch: (members x TTA elements) x N x C, member-major.

        A single model has one member; each member's probabilities carry its own temperature. Each image is
        fitted and stain-normalised once per distinct member preprocessing; the TTA views are dihedral
        transforms of the network input built from that (``Preprocessing.network_input``).
        """
        prepared = images if isinstance(images, Prepared) else self.prepare(images, groups)
        fmt = self.memory_format
        if not isinstance(self.bundle, EnsembleBundle):
            x = self.bundle.preprocessing.network_input(prepared.get(self.bundle.preprocessing), memory_format=fmt)
            return np.stack(
                [self.probabilities_from_logits(self._logits(prepared, x, k, i == 0)) for i, k in enumerate(ks)]
            )
        if self.members:
            per_member = [m.views(prepared, ks) for m in self.members]  # each: K x N x C
            return np.concatenate(per_member)
        # the ensemble's ONNX graph: its second output holds each member's probabilities, N x M x C
        onnx = cast(OnnxBackend, self.backend)
        x = self.bundle.preprocessing.network_input(prepared.get(self.bundle.preprocessing), memory_format=fmt)
        n = len(prepared.fitted)
        by_k = [onnx.outputs(dihedral_k(x, k, fmt))[1] for k in ks]
        return np.stack(by_k, axis=2).transpose(1, 2, 0, 3).reshape(-1, n, len(self.classes))

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout this predictor's backend reads without a copy: NCHW for ONNX Runtime, else channels-last."""
        return torch.contiguous_format if isinstance(self.backend, OnnxBackend) else torch.channels_last

    def _logits(self, prepared: Prepared, x: torch.Tensor, k: int, first: bool) -> np.ndarray:
        """Logits of view ``k``; the first view's are kept on ``prepared``, with its pooled features when wanted."""
        view = dihedral_k(x, k, self.memory_format)
        if first and self.keep_features and isinstance(self.backend, TorchBackend):
            logits, prepared.features = self.backend.logits_and_features(view)
        else:
            logits = self.backend.logits(view)
        if first:
            prepared.first_logits = logits
        return logits

    def ood_score(
        self, spec: OodDetector, prepared: Prepared, probs: np.ndarray, spread: np.ndarray | None
    ) -> np.ndarray:
        """The stored detector's score of a batch the Predictor has just run (``views`` on ``prepared``)."""
        logits = prepared.first_logits if prepared.first_logits is not None else logits_of(probs[0])
        t = self.bundle.temperature
        return score_of(spec.score, self.ood_arrays, spec.k, probs[0], logits, spread, prepared.features, t)

    def tta_views(self, tta: bool | Sequence[int] | None) -> list[int]:
        """The dihedral elements a prediction runs: as asked, or with None the default for ``predict``."""
        return tta_views(self.bundle, tta, "predict")

    def quality(self, images: np.ndarray | Sequence[np.ndarray] | Prepared) -> list[str]:
        """The tissue check's flag per image (``unchecked`` when model.json has no check).

        The check reads the images as the model sees them (fitted and stain-normalised): from ``Prepared``
        when the prediction already made them, so nothing is normalised twice.
        """
        check = self.bundle.trust.tissue_check
        if check is None:
            return [UNCHECKED] * len(images)
        prepared = images if isinstance(images, Prepared) else self.prepare(images)
        pre = self.bundle.preprocessing
        return judge(check, tissue_features(prepared.get(pre), self.threads)).quality  # the prepared uint8 batch

    def predict_batch(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        tta: bool | Sequence[int] | None = None,
        groups: Groups | None = None,
    ) -> Prediction:
        """Predict one batch (any length; split internally by ``batch_size``).

        ``groups``: for a per-group stain model, each image's stain group, estimated before
        (``bundle.preprocessing.estimate_stain_groups``); without it each image is its own group.
        ``tta`` None runs the referral rule's TTA policy when model.json has one (else no TTA). Every
        image is answered (``Prediction.answers``): a flagged one by the tissue check, ``refer`` where the
        referral rule applies (only under its own TTA policy), else its class.
        """
        ks = self.tta_views(tta)
        view_weights = np.repeat(self.weights / self.weights.sum(), len(ks)) / len(ks)
        ensemble = isinstance(self.bundle, EnsembleBundle)
        parts = []
        n = len(images)
        for start in range(0, n, self.batch_size):
            chunk = images[start : start + self.batch_size]
            g = groups[start : start + self.batch_size] if groups is not None else None
            prepared = self.prepare(chunk, g)
            probs = self.views(prepared, ks)
            mean = np.tensordot(view_weights, probs, axes=1).astype(np.float32)
            unc = None
            if len(probs) > 1:
                pred = self.classify(mean)
                picked = probs[:, np.arange(len(pred)), pred] if self.bundle.task != "binary" else probs[:, :, 1]
                spread = np.tensordot(view_weights, (picked - np.tensordot(view_weights, picked, axes=1)) ** 2, axes=1)
                unc = np.sqrt(spread).astype(np.float32)
            if ensemble and self.bundle.temperature != 1.0:
                mean = self.probabilities_from_logits(logits_of(mean))
            predicted = self.classify(mean)
            quality = self.quality(prepared)
            ood = None
            if self.bundle.trust.ood is not None:
                spec = self.bundle.trust.ood
                check_views(spec, ks, str(self.run_dir / MODEL_FILE))
                ood = self.ood_score(spec, prepared, probs, unc)
                quality = with_ood(quality, ood > spec.threshold)
            answers = answer_images(self.bundle.trust, self.classes, mean, predicted, unc, quality, ks)
            parts.append(Prediction(mean, predicted, unc, answers, quality, ood))
        return Prediction.concat(parts, len(self.classes))

    def predict_batches(
        self, batches: Iterable[np.ndarray | Sequence[np.ndarray]], tta: bool | Sequence[int] | None = None
    ) -> Prediction:
        """Predict a stream of batches."""
        return Prediction.concat([self.predict_batch(b, tta) for b in batches], len(self.classes))

    # ---- inputs ------------------------------------------------------------------------
    def predict_store(self, store: PatchStore, tta: bool | Sequence[int] | None = None) -> Prediction:
        """Every image of a PatchStore (or view), in order; a per-group stain model maps each patch by its group's stain."""
        groups = self.bundle.preprocessing.estimate_store_groups(store)
        parts, start = [], 0
        for b in store_input_batches(store, self.batch_size):
            g = groups[start : start + len(b.ids)] if groups is not None else None
            parts.append(self.predict_batch(b.images, tta, g))
            start += len(b.ids)
        return Prediction.concat(parts, len(self.classes))
