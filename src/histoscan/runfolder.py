"""The run folder: its file names, the ``model.json`` schema, and the readers and writers of a run's files.

A run folder is what ``histoscan train`` (or ``histoscan baselines``) leaves behind::

    model.json          what the model is (schema below)
    best.safetensors    the best weights (safetensors: no pickle)
    last.ckpt           Lightning's checkpoint, for --resume
    config.yaml         the resolved training config
    metrics.csv         one row per epoch (``METRIC_COLUMNS``)
    split.csv           ``id,split`` over the store it trained on
    model.onnx          the exported graph (``histoscan export``)
    ood.safetensors     the out-of-distribution detector's arrays (``histoscan calibrate --ood``; trust.ood)
    baseline.json       a classical baseline's card (instead of model.json and weights)
    eval/               the evaluation of its own test split: metrics.json, figures/, report.html

No other module spells these names: they ask ``RunFolder``.

``model.json`` (schema version 2) is validated with pydantic whenever a run is read, so a file
that lies (classes as a string, a temperature of 0, a missing mean) is one ``ConfigError`` line
naming the file and the field. Files written before the schema had a version (no
``schema_version``) are version 1 and are upgraded in memory when read. ``kind`` tells a single
model (``"model"``) from an ensemble of runs (``"ensemble"``: ``histoscan ensemble`` writes one;
``histoscan.bundle.read_bundle`` reads it with its members).

Where later fields go (each is an optional slot of the schema, not a free-form ``extra``):
physical resolution ``preprocessing.mpp``; stain target ``preprocessing.stain``; label geometry
``preprocessing.label_size``; numeric precision and the default TTA ``inference.precision`` /
``inference.tta``; referral rule and tissue check ``trust.referral`` / ``trust.tissue_check`` (both documents).
A new field is added here, with a default, and ``SCHEMA_VERSION`` goes up only when an old file
would be read differently (how to add that version step: the comment above ``_UPGRADES``).

This schema is the one description of ``model.json``: ``histoscan.bundle.ModelBundle`` and
``histoscan.preprocessing.Preprocessing`` are the objects built from it (their conversions go field by field
by name, and tests fail when a field of the schema has no home there); ``histoscan.bundle_schema.json_schema``
exports it as JSON Schema for the documentation.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from histoscan.data.store import PatchStore
from histoscan.enums import (
    FitPolicy,
    ReferBy,
    ReferralAsk,
    ReferralMethod,
    StainGranularity,
    StainMethod,
    StoredPrecision,
)
from histoscan.errors import ConfigError, DataError

MODEL_FILE = "model.json"
WEIGHTS_FILE = "best.safetensors"
LAST_CKPT = "last.ckpt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
SPLIT_FILE = "split.csv"
ONNX_FILE = "model.onnx"
BASELINE_FILE = "baseline.json"
EVAL_DIR = "eval"
# inside an evaluation folder (eval/ or any --out of 'histoscan evaluate')
METRICS_JSON = "metrics.json"
REPORT_HTML = "report.html"
FIGURES_DIR = "figures"

MODEL_FORMAT: Final = "histoscan-model"
SCHEMA_VERSION: Final = 3
# model.onnx carries only this marker in its metadata (never a copy of model.json, which 'calibrate' would make stale)
ONNX_CONTRACT_KEY = "histoscan_onnx_contract"
ONNX_CONTRACT_VERSION = "1"

METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "train_auroc",
    "train_acc",
    "val_loss",
    "val_auroc",
    "val_acc",
    "val_f1",
    "lr",
    "images_per_s",
    "epoch_time_s",
    "best_val_auroc",
    "val_auroc_ema",  # the weight average's validation AUROC (empty without one)
    "best_weights",  # which weights best.safetensors holds: model or ema
    "planned_epochs",  # the schedule's plan after this epoch (re-planned each epoch under a time budget)
    "time_left_s",  # the time budget left after this epoch (empty without one)
]

# ---- the model.json schema -------------------------------------------------------------------
# strict: no "0.5" for 0.5, no true for 1, no string for a list; extra="forbid": a misspelt field is an error
_STRICT = ConfigDict(strict=True, extra="forbid")
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Side = Annotated[int, Field(gt=0)]
Name = Annotated[str, Field(min_length=1)]


def _unique(classes: list[str]) -> list[str]:
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names repeat: {classes}")
    return classes


ClassNames = Annotated[list[Name], Field(min_length=2), AfterValidator(_unique)]


class StainSpec(BaseModel):
    """``preprocessing.stain``: a fitted stain normalisation target (``histoscan.stain.normalise.StainTarget``)."""

    model_config = _STRICT
    method: StainMethod
    granularity: StainGranularity = "patch"  # group: one estimate per patient / slide
    stain_matrix: list[Annotated[list[Finite], Field(min_length=3, max_length=3)]] | None = Field(
        default=None, min_length=2, max_length=2
    )
    max_concentrations: list[Positive] | None = Field(default=None, min_length=2, max_length=2)
    lab_mean: list[Finite] | None = Field(default=None, min_length=3, max_length=3)
    lab_std: list[Positive] | None = Field(default=None, min_length=3, max_length=3)
    fitted_from: str = "images"
    patches: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _target_of_its_method(self) -> StainSpec:
        need = ("stain_matrix", "max_concentrations") if self.method == "macenko" else ("lab_mean", "lab_std")
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"a {self.method} stain target needs {', '.join(missing)}")
        return self


class PreprocessingSpec(BaseModel):
    """``preprocessing``: the fields of ``histoscan.preprocessing.Preprocessing``, checked."""

    model_config = _STRICT
    image_size: list[Side] = Field(min_length=2, max_length=2)
    fit: FitPolicy = "resize"
    crop: Side | None = None
    resize: Side | None = None
    mean: list[Finite] = Field(min_length=3, max_length=3)
    std: list[Positive] = Field(min_length=3, max_length=3)
    mpp: Positive | None = None
    label_size: Side | None = None
    stain: StainSpec | None = None

    @model_validator(mode="after")
    def _inside_the_image(self) -> PreprocessingSpec:
        side = min(self.image_size)
        for name in ("crop", "label_size"):
            value = getattr(self, name)
            if value is not None and value > side:
                raise ValueError(f"{name} {value} is larger than the image ({self.image_size[0]}x{self.image_size[1]})")
        return self


class Calibration(BaseModel):
    """``calibration``: temperature scaling fitted by ``histoscan calibrate``."""

    model_config = _STRICT
    temperature: Positive = 1.0


class BackendSpeed(BaseModel):
    """``inference.backend_speed``: both backends timed side by side at export, on the machine that exported.

    ``hardware`` names what the figures hold for (``histoscan.system.hardware_id``); ``backend: auto`` follows
    ``faster`` only on matching hardware.
    """

    model_config = _STRICT
    torch: Annotated[float, Field(gt=0, allow_inf_nan=False)]  # images/s, one view, batch of ``batch``
    onnx: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    faster: Literal["torch", "onnx"]
    hardware: Name
    batch: Annotated[int, Field(ge=1)]


class InferencePolicy(BaseModel):
    """``inference``: how the model is meant to be run (slots for later issues; None = the caller decides)."""

    model_config = _STRICT
    precision: StoredPrecision | None = None
    tta: list[Annotated[int, Field(ge=0, le=7)]] | None = None  # dihedral elements averaged by default
    backend_speed: BackendSpeed | None = None  # measured by ``histoscan export``; what ``backend: auto`` reads


class ReferralRule(BaseModel):
    """``trust.referral``: which answers are referred to a pathologist instead of given (``histoscan calibrate``).

    ``by: probability`` refers a binary model's images whose P(positive) lies in ``band`` (a multi-class
    model's whose top probability is below ``band[1]``, ``band[0]`` being 0); ``by: uncertainty`` refers
    images whose uncertainty (spread over TTA views or members) is above ``max_uncertainty``. ``tta`` is the
    policy it was fitted under: the Predictor predicts with it whenever the rule is applied (``fitted.referral``
    records the whole predictor and the rows).

    The guarantee (``histoscan.trust.guarantee``; absent from rules fitted before it): ``method`` says how the
    limit was chosen (``empirical``: the quantile reaching a coverage; ``learn-then-test``: a target certified
    at confidence 1 - ``delta``); ``bound`` is a lower confidence bound, at 1 - ``delta``, on the asked quantity
    for new images like the ``count`` fitting rows (a target: the target itself, certified; a coverage: the
    fitted coverage less the Dvoretzky-Kiefer-Wolfowitz margin); ``p_value`` is the test's at the chosen limit.
    """

    model_config = _STRICT
    by: ReferBy
    band: list[Probability] | None = Field(default=None, min_length=2, max_length=2)
    max_uncertainty: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    tta: list[Annotated[int, Field(ge=0, le=7)]] = Field(min_length=1)
    asked: ReferralAsk
    target: Probability  # the coverage or the accuracy asked for
    fitted_on: Name = "val"  # which predictions it was chosen on
    count: Annotated[int, Field(ge=1)]
    coverage: Probability  # achieved on the fitting predictions
    accuracy: Probability  # of the answered images there
    error_auroc: dict[str, Finite] = Field(default_factory=dict)  # each candidate score's error-detection AUROC
    margin: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None  # binary by probability: in logits
    sensitivity: Probability | None = None  # among the answered tumour images of the fitting rows (binary)
    method: ReferralMethod | None = None  # None: fitted before the guarantee was recorded
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None = None
    bound: Probability | None = None
    p_value: Probability | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> ReferralRule:
        if self.by == "probability" and (self.band is None or self.max_uncertainty is not None):
            raise ValueError("a referral by probability needs band (and no max_uncertainty)")
        if self.by == "uncertainty" and (self.max_uncertainty is None or self.band is not None):
            raise ValueError("a referral by uncertainty needs max_uncertainty (and no band)")
        if self.band is not None and self.band[0] > self.band[1]:
            raise ValueError(f"the band's low end {self.band[0]} is above its high end {self.band[1]}")
        if self.by == "uncertainty" and len(self.tta) < 2:
            raise ValueError("a referral by uncertainty needs a TTA policy of at least 2 views")
        return self


class TissueCheck(BaseModel):
    """``trust.tissue_check``: the acceptance region of colour/texture statistics (applied by ``histoscan.rules.tissue``, fitted by ``histoscan.trust.tissue``)."""

    model_config = _STRICT
    features: list[Name] = Field(min_length=1)
    mean: list[Finite]
    covariance: list[list[Finite]]
    threshold: Positive  # largest accepted Mahalanobis distance
    quantile: Probability
    margin: Positive
    count: Annotated[int, Field(ge=1)]  # training patches it was fitted on

    @model_validator(mode="after")
    def _square(self) -> TissueCheck:
        k = len(self.features)
        if len(self.mean) != k or len(self.covariance) != k or any(len(row) != k for row in self.covariance):
            raise ValueError(f"mean and covariance must be {k} and {k}x{k} for {k} features")
        return self


OOD_FILE = "ood.safetensors"  # the out-of-distribution detector's fitted arrays (trust.ood)
OodScore = Literal["msp", "energy", "spread", "mahalanobis", "knn"]


class OodDetector(BaseModel):
    """``trust.ood``: the out-of-distribution detector (fitted by ``histoscan.trust.ood``, applied by ``histoscan.rules.ood``).

    Its arrays (class means and shared precision of the training split's pooled features, and the normalised
    feature bank for kNN) lie in the side file ``file``, checked against ``sha256`` whenever the run is loaded.
    An image whose ``score`` exceeds ``threshold`` (the ``quantile`` of the score on ``fitted_on`` rows,
    ``rows`` of them) is answered ``out of distribution``. ``tta``: the views the scores were fitted under
    (only the ``spread`` score depends on them; the others read the first view).
    """

    model_config = _STRICT
    score: OodScore
    threshold: Finite
    quantile: Probability
    file: Name = OOD_FILE
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    features: Annotated[int, Field(ge=1)]  # width of the pooled features
    k: Annotated[int, Field(ge=1)] = 10  # the kNN score's neighbour
    train_rows: Annotated[int, Field(ge=1)]  # training patches the arrays were fitted on
    fitted_on: Name = "val"
    rows: Annotated[int, Field(ge=1)]
    tta: list[Annotated[int, Field(ge=0, le=7)]] = Field(min_length=1)


class TrustPolicy(BaseModel):
    """``trust``: when to refer an image, which images are not tissue at all, and which are out of distribution (all optional)."""

    model_config = _STRICT
    referral: ReferralRule | None = None
    tissue_check: TissueCheck | None = None
    ood: OodDetector | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_slot(cls, data: Any) -> Any:
        """Runs written before the trust issue hold an empty ``referral_band`` slot: it means no referral."""
        if isinstance(data, dict) and "referral_band" in data and data["referral_band"] is None:
            data = {k: v for k, v in data.items() if k != "referral_band"}
        return data


class FittedUnder(BaseModel):
    """The predictor a fitted quantity was fitted under: the settings that must answer for it to hold."""

    model_config = _STRICT
    tta: list[Annotated[int, Field(ge=0, le=7)]] = Field(min_length=1)  # the dihedral views averaged
    members: Annotated[int, Field(ge=1)] = 1  # 1 for a single model; an ensemble's member count
    precision: StoredPrecision | None = None  # the torch backend's numerics (None: not recorded)


class FitRecord(BaseModel):
    """How a quantity of ``model.json`` was fitted: under which predictor, on which rows."""

    model_config = _STRICT
    under: FittedUnder
    split: Name  # calibration, val (the rows the run early-stopped on), oof (out-of-fold), ...
    rows: Annotated[int, Field(ge=1)]


class FittedRecords(BaseModel):
    """``fitted``: the provenance of each fitted quantity (None: not fitted, or fitted before it was recorded)."""

    model_config = _STRICT
    threshold: FitRecord | None = None
    temperature: FitRecord | None = None
    referral: FitRecord | None = None


class VersionedDocument(BaseModel):
    """What every ``model.json`` starts with: the format marker and the schema version it was written in."""

    model_config = _STRICT
    format: Literal["histoscan-model"] = MODEL_FORMAT
    schema_version: Literal[3] = SCHEMA_VERSION  # = SCHEMA_VERSION (a type needs the number written out)


class ModelDocument(VersionedDocument):
    """``model.json`` of a single model (``kind: "model"``)."""

    model_config = _STRICT
    kind: Literal["model"] = "model"
    architecture: Name
    model_args: dict[str, Any] = Field(default_factory=dict)
    classes: ClassNames
    preprocessing: PreprocessingSpec
    threshold: Probability = 0.5
    calibration: Calibration = Field(default_factory=Calibration)
    inference: InferencePolicy = Field(default_factory=InferencePolicy)
    trust: TrustPolicy = Field(default_factory=TrustPolicy)
    best_metric: dict[str, Any] = Field(default_factory=dict)
    split: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)  # what it trained on and how long: a record, not read back
    fitted: FittedRecords = Field(default_factory=FittedRecords)
    histoscan_version: str = "unknown"

    @field_validator("training")
    @classmethod
    def _store_is_a_path(cls, training: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(training.get("store", ""), str):
            raise ValueError("training.store must be the path of the store, a string")
        return training


class EnsembleMember(BaseModel):
    """One run of an ensemble: its folder (relative to the ensemble's folder, or absolute) and weight."""

    model_config = _STRICT
    run: Name
    weight: Positive = 1.0


class EnsembleDocument(VersionedDocument):
    """``model.json`` of an ensemble (``kind: "ensemble"``): member runs whose probabilities are averaged.

    Each member keeps its own ``model.json`` (architecture, preprocessing, temperature); the ensemble adds
    how they are combined (``combine``: the weighted mean of the members' probabilities), its own threshold
    and temperature (applied to the averaged probabilities), and which predictions those were fitted on
    (``fitted_on``: ``calibration``, the calibration rows of its split that no member trained or validated on,
    scored by the ensemble itself, ``fitted_rows`` of them; ``oof`` when the members are the folds of one
    cross-validation without calibration rows, an approximation from single-member out-of-fold scores;
    ``validation``, the first member's validation split, only in ensembles written before calibration rows).
    """

    model_config = _STRICT
    kind: Literal["ensemble"] = "ensemble"
    members: list[EnsembleMember] = Field(min_length=2)
    classes: ClassNames
    combine: Literal["mean"] = "mean"
    threshold: Probability = 0.5
    threshold_rule: str | None = None  # how the threshold was chosen (e.g. "youden on oof"); None: the default 0.5
    fitted_on: Literal["calibration", "oof", "validation"] = "validation"
    fitted_rows: int | None = Field(default=None, ge=1)  # how many calibration rows (fitted_on: calibration)
    calibration: Calibration = Field(default_factory=Calibration)
    inference: InferencePolicy = Field(default_factory=InferencePolicy)
    trust: TrustPolicy = Field(default_factory=TrustPolicy)
    fitted: FittedRecords = Field(default_factory=FittedRecords)
    histoscan_version: str = "unknown"


Document = Annotated[ModelDocument | EnsembleDocument, Field(discriminator="kind")]
DOCUMENT: TypeAdapter[ModelDocument | EnsembleDocument] = TypeAdapter(Document)


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (no ``schema_version``) -> 2: drop the derived copies, add ``kind`` and ``preprocessing.fit``."""
    out = {k: v for k, v in data.items() if k not in ("task", "num_outputs")}  # both follow from classes
    pre = out.get("preprocessing")
    if isinstance(pre, dict):
        pre = {k: v for k, v in pre.items() if k != "input_size"}  # follows from image_size, crop and resize
        # version-1 runs trained on stores whose ingest white-padded short edge patches (imageio.fit_to_size)
        pre.setdefault("fit", "pad-edges")
        out["preprocessing"] = pre
    out.setdefault("kind", "model")
    out["schema_version"] = 2
    return out


# The migration chain: schema version N -> the function that turns a version-N document into version N + 1.
# ``parse_document`` applies the steps in turn, so a file of any older version reads as the newest.
# To add a step (a change under which an old file would read differently):
#   1. write ``_upgrade_vN(data) -> data``: pure (a new dict; never mutate ``data``), sets "schema_version": N + 1
#      and only what version N + 1 changed; it may assume a version-N document but must not fail on one;
#   2. register it here as ``N: _upgrade_vN``;
#   3. raise ``SCHEMA_VERSION`` to N + 1 and ``VersionedDocument.schema_version`` to ``Literal[N + 1]``;
#   4. add a version-N example to ``tests/fixtures/`` (``model-vN.json``): ``tests/test_bundle_schema.py``
#      checks that every older version has a step, an example, and migrates to a valid newest document.
def _upgrade_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 -> 3: add ``fitted``, the record of how each fitted quantity was fitted.

    A version-2 file recorded none, so its fitted quantities are of unknown provenance (an empty ``fitted``).
    """
    return {**data, "fitted": {}, "schema_version": 3}


_UPGRADES = {1: _upgrade_v1, 2: _upgrade_v2}


def migrate(data: dict[str, Any], version: int) -> dict[str, Any]:
    """A decoded ``model.json`` of ``version`` (1 .. SCHEMA_VERSION) upgraded step by step to ``SCHEMA_VERSION``."""
    while version < SCHEMA_VERSION:
        data = _UPGRADES[version](data)
        version = data["schema_version"]
    return data


def _where(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the document"


def _one_line(source: str, exc: ValidationError) -> ConfigError:
    """The first schema violation as one line naming the file and the field."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = first["loc"][1:] if first["loc"] and first["loc"][0] in ("model", "ensemble") else first["loc"]
    if first["type"] in ("union_tag_not_found", "union_tag_invalid"):
        loc, problem = ("kind",), f'must be "model" or "ensemble" (got {first.get("input", {}).get("kind")!r})'
    elif first["type"] == "missing":
        problem = "missing"
    elif first["type"] == "extra_forbidden":
        problem = "not a field of this schema"
    elif first["type"] == "value_error":  # our own validators: the message already shows the values
        problem = first["msg"].removeprefix("Value error, ")
    else:
        problem = f"{first['msg'].replace(' after validation', '')} (got {repr(first.get('input'))[:60]})"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return ConfigError(f"{source}: {_where(tuple(loc))}: {problem}{more}")


def parse_document(data: object, source: str = MODEL_FILE) -> ModelDocument | EnsembleDocument:
    """Validate a decoded ``model.json`` (upgrading older schema versions); ConfigError names ``source`` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the document is a JSON {type(data).__name__}, not an object")
    if data.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{source}: not a histoscan model file (format {data.get('format')!r}, not {MODEL_FORMAT!r})")
    version = data.get("schema_version", 1)  # files written before the schema had a version are version 1
    if type(version) is not int or version < 1:
        raise ConfigError(f"{source}: schema_version: not a positive whole number (got {version!r})")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: schema_version {version} was written by a newer histoscan; this one reads 1 to {SCHEMA_VERSION}"
        )
    data = migrate(data, version)
    try:
        return DOCUMENT.validate_python(data)
    except ValidationError as exc:
        raise _one_line(source, exc) from None


def parse_model(data: object, source: str = MODEL_FILE) -> ModelDocument:
    """``parse_document`` where a single model is needed: an ensemble is a clear error."""
    return single_model(parse_document(data, source), source)


def single_model(doc: ModelDocument | EnsembleDocument, source: str = MODEL_FILE) -> ModelDocument:
    """``doc`` itself when it describes one model; ConfigError for an ensemble."""
    if isinstance(doc, EnsembleDocument):
        raise ConfigError(
            f"{source}: kind: an ensemble of {len(doc.members)} runs, but a single model is needed here "
            "(use one member's run folder; model.json lists them)"
        )
    return doc


def member_dir(ensemble_dir: str | Path, run: str) -> Path:
    """An ensemble member's run folder: ``run`` as written in model.json, relative to the ensemble's folder."""
    p = Path(run)
    return p if p.is_absolute() else Path(ensemble_dir) / p


def training_store(training: Mapping[str, Any]) -> Path | None:
    """The store a run trained on, from model.json's ``training`` record (None when it names none)."""
    store = training.get("store")
    return Path(store) if store else None


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it: readers see the old file or the new one."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


# ---- the folder ------------------------------------------------------------------------------
class RunFolder:
    """One run folder: where each file is, and how to read and write them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ---- where things are
    @property
    def model_json(self) -> Path:
        """Path of model.json."""
        return self.path / MODEL_FILE

    @property
    def weights_path(self) -> Path:
        """Path of the best weights (safetensors)."""
        return self.path / WEIGHTS_FILE

    @property
    def onnx_path(self) -> Path:
        """Path of the exported ONNX model."""
        return self.path / ONNX_FILE

    @property
    def last_ckpt(self) -> Path:
        """Path of the last checkpoint (for ``--resume``)."""
        return self.path / LAST_CKPT

    @property
    def config_path(self) -> Path:
        """Path of the run's config.yaml."""
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        """Path of the per-epoch metrics.csv."""
        return self.path / METRICS_FILE

    @property
    def split_path(self) -> Path:
        """Path of the run's split.csv."""
        return self.path / SPLIT_FILE

    @property
    def baseline_path(self) -> Path:
        """Path of a baseline's baseline.json."""
        return self.path / BASELINE_FILE

    @property
    def is_model(self) -> bool:
        """A trained model's run (it has model.json)."""
        return self.model_json.is_file()

    @property
    def is_baseline(self) -> bool:
        """A classical baseline's run (it has baseline.json)."""
        return self.baseline_path.is_file()

    def eval_dir(self, store: str | Path | None = None, split: str = "test", tta: bool = False) -> Path:
        """The folder an evaluation is written to.

        Where an evaluation goes: ``eval/`` for the run's own test split without TTA, else
        ``eval-<store>-<split>[-tta]``. ``store`` None means the store the run trained on.
        """
        own_test = split == "test" and not tta
        if own_test and store is None:
            return self.path / EVAL_DIR  # without reading model.json: a baseline's folder has none
        own_store = self.training_store() if self.is_model else None
        if own_test and own_store is not None and Path(str(store)).resolve() == own_store.resolve():
            return self.path / EVAL_DIR
        name = Path(store).name if store is not None else own_store.name if own_store else "store"
        return self.path / (f"eval-{name}-{split}" + ("-tta" if tta else ""))

    # ---- model.json
    def read_document(self) -> ModelDocument | EnsembleDocument:
        """``model.json``, validated (and upgraded from older schema versions)."""
        path = self.model_json
        if not path.is_file():
            raise ConfigError(f"{self.path}: not a histoscan run (no {MODEL_FILE})")
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigError(f"{path}: not readable JSON ({exc})") from None
        return parse_document(data, str(path))

    def read_model_json(self) -> ModelDocument:
        """``model.json`` of a single model (an ensemble is a ConfigError)."""
        return single_model(self.read_document(), str(self.model_json))

    def write_model_json(self, doc: ModelDocument | EnsembleDocument | Mapping[str, Any]) -> Path:
        """Validate and write ``model.json`` atomically (a document that would not read back is never written)."""
        data = doc.model_dump(mode="json") if isinstance(doc, BaseModel) else dict(doc)
        checked = parse_document(json.loads(json.dumps(data)), str(self.model_json))
        return atomic_write_text(self.model_json, json.dumps(checked.model_dump(mode="json"), indent=2) + "\n")

    def training_store(self) -> Path | None:
        """The store this run trained on, as model.json records it (an ensemble: its first member's)."""
        doc = self.read_document()
        if isinstance(doc, EnsembleDocument):
            return RunFolder(member_dir(self.path, doc.members[0].run)).training_store()
        return training_store(doc.training)

    def data_store(self, data: str | Path | None = None) -> Path:
        """``data`` when given, else the store the run trained on (DataError when model.json names none)."""
        if data:
            return Path(data)
        store = self.training_store()
        if store is None:
            raise DataError(f"{self.model_json}: training.store names no store; give the store to use (--data)")
        return store

    # ---- metrics.csv
    def read_metrics(self) -> list[dict[str, str]]:
        """The rows of ``metrics.csv`` (empty when there is none yet)."""
        if not self.metrics_path.is_file():
            return []
        with self.metrics_path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def append_metrics(self, row: Mapping[str, Any]) -> Path:
        """Add one epoch's row, replacing rows of that epoch and later (a resumed run redoes them); atomic."""
        unknown = set(row) - set(METRIC_COLUMNS)
        if unknown:
            raise ValueError(f"not columns of {METRICS_FILE}: {sorted(unknown)}")
        rows: list[Mapping[str, Any]] = [r for r in self.read_metrics() if int(r["epoch"]) < int(row["epoch"])]
        rows.append(row)
        tmp = self.metrics_path.with_name(f".{METRICS_FILE}.{os.getpid()}.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.metrics_path)
        return self.metrics_path

    # ---- baseline.json
    def read_baseline(self) -> dict[str, Any]:
        """A classical baseline's card."""
        try:
            card = json.loads(self.baseline_path.read_text())
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{self.baseline_path}: not readable JSON ({exc})") from None
        if not isinstance(card, dict):
            raise ConfigError(f"{self.baseline_path}: the document is a JSON {type(card).__name__}, not an object")
        return card

    def write_baseline(self, card: Mapping[str, Any]) -> Path:
        """Write a classical baseline's card atomically."""
        return atomic_write_text(self.baseline_path, json.dumps(dict(card), indent=2) + "\n")

    # ---- split.csv
    def select_patches(self, store_path: str | Path, split: str | None) -> tuple[PatchStore, str]:
        """The patches of ``split`` in a store, and the split's name.

        On the store the run trained on, splits come from the run's ``split.csv`` (default ``test``);
        on another store, from the store's own source splits (PCam's ``test``), or the whole store
        (``all``, the default there).
        """
        from histoscan.data.splits import read_split  # brings scikit-learn: imported when needed

        store = PatchStore(store_path)
        trained_on = self.training_store()
        own = trained_on is not None and trained_on.resolve() == store.path.resolve()
        split = split or ("test" if own else "all")
        if split == "all":
            return store, split
        if own:
            if not self.split_path.is_file():
                raise DataError(f"{self.path}: no {SPLIT_FILE}; cannot tell which patches are {split!r}")
            assignment = read_split(self.split_path, store)
        elif store.source_splits is not None:
            assignment = np.asarray(store.source_splits, dtype=object)
        else:
            raise DataError(
                f"{store.path}: not the store {self.path} trained on and it has no splits of its own; "
                "use --split all to score every patch"
            )
        part = store.subset(np.flatnonzero(assignment == split))
        if len(part) == 0:
            raise DataError(f"{store.path}: the {split!r} split is empty")
        return part, split
