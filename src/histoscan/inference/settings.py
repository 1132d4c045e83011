"""How a command runs a model, and the other options of the inference commands.

``PredictorSettings``: how a command runs a model (backend, device, precision, batch size, threads, TTA); and the
other options of the inference commands (``PredictSettings``, ``ExportSettings``, ``EnsembleSettings``).

Every command that runs a model (predict, evaluate, calibrate, slide, slide evaluate's scan, explain, serve, and
train --folds for its out-of-fold predictions) takes its model options from this one dataclass, so ``--device`` or ``--precision`` has one spelling, one
type and one help text everywhere. A field left None is "not given": the command's own default applies
(for TTA, the default views for the command's use; see ``histoscan.inference.tta.default_views``), so the
settings change nothing until the user sets them.

The value types (``Backend``, ``Precision``) are the vocabularies of ``histoscan.enums``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoscan.enums import Backend, Precision
from histoscan.errors import ConfigError
from histoscan.options import WORKERS_HELP, check_choices, doc

if TYPE_CHECKING:
    from histoscan.inference.predictor import Predictor


PREDICTOR_FIELDS = ("backend", "device", "precision", "batch_size", "threads", "tta")


@dataclass(frozen=True)
class PredictorSettings:
    """How a model is run; None everywhere means each command's (and the bundle's) own choice."""

    backend: Backend | None = doc("Inference backend: torch, onnx, or auto (onnx when model.onnx exists).", None)
    device: str | None = doc("Torch device: cpu, cuda, cuda:1 or mps (default: cpu).", None)
    precision: Precision | None = doc(
        "Torch numerics: auto (bf16 where the CPU or GPU has it natively), fp32, bf16 or fp16.", None
    )
    batch_size: int | None = doc("Images (or tiles) per forward pass.", None)
    threads: int | None = doc("CPU threads for the model (default: all cores).", None)
    tta: bool | None = doc(
        "Average the 8 flips/rotations; adds an uncertainty (default: the model's TTA policy for this command).",
        None,
        flags="--tta/--no-tta",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")

    def given(self) -> dict[str, Any]:
        """The fields the user set (not None)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def apply(self, settings: Any) -> Any:
        """A command's settings with these predictor options applied.

        A copy of a command's settings dataclass (``ScanSettings``, ``ExplainSettings``, ``ServeSettings``)
        with the predictor options given here; fields that settings class lacks are left out.
        """
        names = {f.name for f in dataclasses.fields(settings)}
        return dataclasses.replace(settings, **{k: v for k, v in self.given().items() if k in names})

    def predictor_kwargs(self, **defaults: Any) -> dict[str, Any]:
        """Keyword arguments for ``Predictor`` (everything but TTA): given values over ``defaults``."""
        out = {k: v for k, v in defaults.items() if k in PREDICTOR_FIELDS and k != "tta"}
        out.update({k: v for k, v in self.given().items() if k != "tta"})
        return out

    def predictor(self, run_dir: str | Path, **defaults: Any) -> Predictor:
        """The ``Predictor`` of ``run_dir`` under these settings (``defaults``: the command's own choices)."""
        from histoscan.inference.predictor import Predictor

        return Predictor(run_dir, **self.predictor_kwargs(**defaults))


def predictor_settings(values: dict[str, Any], only: tuple[str, ...] = PREDICTOR_FIELDS) -> PredictorSettings:
    """The ``PredictorSettings`` among a command's parsed option values.

    The ``PredictorSettings`` among a command's parsed option values (removed from ``values``); ``only``: the
    model options this command takes (others of the same name, e.g. train's ``batch_size``, are the command's).
    """
    return PredictorSettings(**{k: values.pop(k) for k in only if k in values})


@dataclass(frozen=True)
class PredictSettings:
    """``histoscan predict``: what to predict and where the CSVs go (the model options: ``PredictorSettings``)."""

    run: Path = doc("A run folder (the model bundle).", argument=True)
    input: Path = doc(
        "An image, a folder of images (recursive), a Kaggle test folder, a store, or PCam HDF5.",
        argument=True,
    )
    out: Path = doc(
        "CSV to write: id, prob_<class>..., predicted, answer, quality[, uncertainty].", Path("predictions.csv")
    )
    submission: Path | None = doc(
        "A Kaggle sample_submission.csv: also write submission.csv (id, tumour probability) in its order.", None
    )
    submission_out: Path = doc("Where the submission goes.", Path("submission.csv"))
    workers: int | None = doc(WORKERS_HELP, None)
    force: bool = doc("Replace an existing --out / --submission-out (never an input).", False)


@dataclass(frozen=True)
class ExportSettings:
    """``histoscan export``: a run's model as ONNX, checked against PyTorch."""

    run: Path = doc("A run folder.", argument=True)
    opset: int = doc("ONNX opset.", 18)
    data: Path | None = doc("Store whose patches verify the export (default: the training store).", None)


@dataclass(frozen=True)
class EnsembleSettings:
    """``histoscan ensemble``: average runs into one ensemble bundle."""

    runs: list[Path] = doc("Two or more run folders (e.g. the fold-<i>/ folders of a CV).", argument=True)
    out: Path = doc("Folder for the ensemble bundle (model.json, split.csv).")
    copy: bool = doc("Copy the members into OUT/members/ (default: refer to them).", False, flags="--copy")
    member_weights: str | None = doc("Comma-separated member weights, e.g. 1,1,2 (default: equal).", None)
    oof: Path | None = doc(
        "An oof.csv of 'train --folds' to choose the threshold on (default: computed from the members).", None
    )
    threshold_rule: str = doc("youden, sensitivity (0.95) or none (keep 0.5).", "youden")
    force: bool = doc("Replace an ensemble already in OUT.", False)
