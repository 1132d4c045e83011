"""The training configuration: one dataclass, every field documented (the text becomes ``--help``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from histoscan.duration import DURATION_HELP, parse_duration
from histoscan.enums import (
    Accelerator,
    AugmentPreset,
    Optimizer,
    Schedule,
    StainChoice,
    StainGranularity,
    TrainPrecision,
)
from histoscan.errors import ConfigError, HistoscanError
from histoscan.options import check_choices, doc, field_type

# the vocabularies live in histoscan.enums (named here as the fields have always been typed)
StainMethod = StainChoice
Precision = TrainPrecision


@dataclass
class TrainConfig:
    """Everything a training run needs; saved resolved as the run's ``config.yaml``."""

    data: str = doc("Packed store to train on (from 'histoscan ingest').", "")
    model: str = doc(
        "Model name: a histoscan CNN (simple_cnn, custom_cnn, nas_cnn, ...) or any timm model.", "simple_cnn"
    )
    model_args: dict = doc("Architecture arguments of the model (e.g. nas_cnn's num_blocks).", {})
    pretrained: bool = doc("Start from ImageNet weights through timm (needs the Hugging Face hub).", False)
    weights: str | None = doc("Local weights file (.safetensors, .pth, .pt) to start from.", None)
    out: str = doc("Folder that holds run folders.", "runs")
    name: str | None = doc("Run folder name (default: <model>-<time>).", None)
    seed: int = doc("Random seed for split, initialisation, sampling and augmentation.", 0)
    val: float = doc("Validation fraction of the split.", 0.1)
    test: float = doc("Test fraction of the split.", 0.1)
    calibration: float = doc(
        "Calibration fraction of the split (as 'histoscan split --calibration'): rows no run or fold trains or "
        "validates on, where ensembles and 'calibrate' fit thresholds and temperatures.",
        0.0,
    )
    split_file: str | None = doc(
        "A split CSV to use instead of the recipe: id,split (train/val/test), or id,fold from "
        "'histoscan split --folds K' together with --fold.",
        None,
    )
    fold: int | None = doc(
        "With a folds file as --split-file: this fold is validation, the other folds train. "
        "With --folds: train only this fold.",
        None,
    )
    folds: int | None = doc(
        "Cross-validate: train K runs into OUT/NAME/fold-<i>/ on K stratified (grouped) folds of the non-test rows, "
        "then write oof.csv, cv.json and an ensemble of the folds (finished folds are reused, never retrained).",
        None,
    )
    batch_size: int = doc("Images per training step (per device).", 128)
    max_epochs: int = doc("Maximum epochs.", 10)
    max_time: str | None = doc(
        f"Wall-clock budget {DURATION_HELP}: at each epoch boundary the schedule is re-planned from the measured "
        "epoch time (training and validation) so that it ends annealed at the deadline; training stops when the "
        "next epoch would not fit.",
        None,
        metavar="DURATION",
    )
    optimizer: Optimizer = doc("Optimizer.", "adamw")
    lr: float = doc("Peak learning rate.", 1e-3)
    weight_decay: float = doc("Weight decay.", 1e-4)
    momentum: float = doc("SGD momentum.", 0.9)
    schedule: Schedule = doc("Learning-rate schedule (cosine has a linear warmup).", "cosine")
    warmup_epochs: float = doc("Linear warmup length in epochs (cosine).", 0.0)
    label_smoothing: float = doc("Label smoothing (0 = off).", 0.0)
    mixup: float = doc(
        "Mixup: blend each training batch with a shuffled copy of itself, weight drawn from Beta(a, a) "
        "(0: off; 0.2 is usual). With cutmix too, each batch uses one of the two at random.",
        0.0,
    )
    cutmix: float = doc(
        "CutMix: paste a box (area drawn from Beta(a, a)) of a shuffled copy into each training batch (0: off; "
        "1.0 is usual). The mixed label is the share of the labelled region (the store's centre label_size, "
        "else the whole image) each patch contributes.",
        0.0,
    )
    class_weights: list | None = doc(
        "Loss weight per class, e.g. [1.0, 1.5] (the reference notebooks' transfer recipe weights tumour 1.5).", None
    )
    balanced_sampler: bool = doc("Sample classes equally often instead of weighting the loss.", False)
    grad_clip: float | None = doc("Clip gradient norm to this value.", None)
    augment: AugmentPreset = doc("Augmentation preset.", "light")
    augment_strength: float = doc("Scale of colour / stain jitter.", 1.0)
    stain_augment_p: float = doc(
        "Fraction of patches a stain-* preset re-stains (HED jitter and stain-matrix perturbation together); the "
        "others keep their colours. Flips and colour jitter apply to every patch.",
        1.0,
    )
    stain_augment_until: float = doc(
        "Fraction of the learning-rate plan (its cosine progress, re-planned with --max-time) during which a "
        "stain-* preset re-stains; after it only the preset's flips and colour jitter go on, so the last, "
        "low-learning-rate epochs fit clean colours. 1: re-stain to the end.",
        1.0,
    )
    stain_matrix_noise: float | None = doc(
        "Standard deviation of the noise a stain-* preset adds to each patch's unit stain vectors, replacing the "
        "preset's (histoscan.stain.augment.STAIN_STRENGTHS; scaled by augment_strength). None: the preset's.",
        None,
    )
    stain_consistency: float = doc(
        "Weight of a stain-consistency term (0: off). With a stain-* preset, each training patch is seen twice "
        "per step, with the preset's flips and colour jitter and then also re-stained by its stain ops; the loss "
        "is the classification loss on the first view plus this weight times the Jensen-Shannon divergence "
        "between the two views' predicted class distributions (as AugMix does), so the model learns to ignore "
        "the stain without being trained to classify re-stained patches. Doubles the cost of a training step.",
        0.0,
    )
    stain_norm: StainMethod = doc(
        "Stain normalisation, fitted from the training split (or --stain-target) and stored in model.json.",
        "none",
    )
    stain_granularity: StainGranularity = doc(
        "Estimate the stain per patch, or once per group (patient / slide) of the store from a sample of its "
        "patches, mapping all of a group's patches with that one transform (needs a store with groups).",
        "patch",
    )
    stain_target: str | None = doc(
        "A target.json from 'histoscan stain fit' to normalise to (needs --stain-norm).", None
    )
    crop: int | None = doc("Centre crop side before the network (e.g. 32: the labelled centre only).", None)
    random_crop: bool = doc(
        "Training only: take the crop at a random offset that keeps the labelled centre in view (CentreSafeCrop) "
        "instead of centred; validation and prediction stay centred. Needs crop smaller than the images.",
        False,
    )
    resize: int | None = doc("Resize side before the network (e.g. 192 to upscale 96 px patches).", None)
    mpp: float | None = doc("Micrometres per pixel of the training patches (default: what the store recorded).", None)
    freeze_epochs: int = doc("Train only the classifier for this many epochs, then unfreeze (transfer learning).", 0)
    backbone_lr_mult: float = doc("Backbone learning rate as a fraction of lr (discriminative learning rates).", 1.0)
    early_stopping: int | None = doc("Stop after this many epochs without a better validation AUROC (None: off).", 5)
    precision: Precision = doc(
        "Training numerics (Lightning's); auto: bf16-mixed on GPU and on CPUs with native bf16 (AVX512-BF16 or AMX), "
        "else 32.",
        "auto",
        flags="--train-precision",  # --precision is the inference option's (PredictorSettings)
    )
    channels_last: bool | None = doc("Channels-last memory format (default: on, GPU and CPU).", None)
    ema_decay: float | None = doc(
        "Keep an exponential moving average of the weights with this decay per step (None: off); "
        "it is validated every epoch and saved as the best model when it scores better.",
        0.999,
    )
    compile: bool = doc("torch.compile the model.", False)
    accelerator: Accelerator = doc("Hardware to train on.", "auto")
    devices: str = doc("Devices per node: auto, a count, or a list like 0,1.", "auto")
    num_nodes: int = doc("Nodes for multi-node DDP.", 1)
    strategy: str = doc("Lightning strategy: auto, ddp, ddp_spawn, ...", "auto")
    num_workers: int | None = doc("DataLoader workers (default: 0 on CPU, one per core up to 8 on GPU).", None)
    threads: int | None = doc("Torch CPU threads (default: one per core).", None)
    resume: bool = doc("Resume the named run from its last.ckpt.", False)
    limit_train_batches: float | None = doc(
        "Use only this many (int) or this fraction (float) of training batches per epoch.", None
    )
    progress: bool = doc("Show a progress bar.", True)

    def __post_init__(self) -> None:
        if isinstance(self.max_time, (int, float)) and not isinstance(self.max_time, bool):
            self.max_time = str(self.max_time)  # refused below with a message asking for a unit
        self._check_types()
        check_choices(self)
        if self.max_time is not None:
            parse_duration(self.max_time, "max_time")
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be between 0 and 1 (or null for no average), got {self.ema_decay}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 < self.stain_augment_p <= 1:
            raise ConfigError(f"stain_augment_p must be in (0, 1], got {self.stain_augment_p}")
        if self.stain_augment_p < 1 and not self.augment.startswith("stain-"):
            raise ConfigError(f"stain_augment_p applies to the stain-* presets only, not augment {self.augment!r}")
        if not 0 < self.stain_augment_until <= 1:
            raise ConfigError(f"stain_augment_until must be in (0, 1], got {self.stain_augment_until}")
        if self.stain_augment_until < 1 and not self.augment.startswith("stain-"):
            raise ConfigError(f"stain_augment_until applies to the stain-* presets only, not augment {self.augment!r}")
        if self.stain_matrix_noise is not None and (
            self.stain_matrix_noise < 0 or not self.augment.startswith("stain-")
        ):
            raise ConfigError(
                f"stain_matrix_noise must be at least 0 and applies to the stain-* presets only "
                f"(got {self.stain_matrix_noise} with augment {self.augment!r})"
            )
        if self.stain_consistency < 0 or (self.stain_consistency > 0 and not self.augment.startswith("stain-")):
            raise ConfigError(
                f"stain_consistency must be at least 0 and applies to the stain-* presets only "
                f"(got {self.stain_consistency} with augment {self.augment!r})"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError(f"mixup and cutmix must be at least 0 (0: off), got {self.mixup} and {self.cutmix}")
        if (self.mixup or self.cutmix) and self.stain_consistency:
            raise ConfigError("mixup / cutmix and stain_consistency cannot be combined (choose one)")
        if self.random_crop and self.crop is None:
            raise ConfigError("random_crop needs crop (the side of the crop taken at a random offset)")
        if self.pretrained and self.weights:
            raise ConfigError("give either pretrained (timm hub) or weights (local file), not both")
        if self.balanced_sampler and self.class_weights:
            raise ConfigError("balanced_sampler and class_weights both correct imbalance; choose one")
        if self.crop is not None and self.crop < 8:
            raise ConfigError(f"crop must be at least 8 px, got {self.crop}")
        if self.freeze_epochs < 0:
            raise ConfigError("freeze_epochs cannot be negative")
        if self.stain_target is not None and self.stain_norm == "none":
            raise ConfigError("stain_target needs stain_norm (reinhard or macenko)")
        if self.stain_granularity == "group" and self.stain_norm == "none":
            raise ConfigError("stain_granularity group needs stain_norm (reinhard or macenko)")
        if self.folds is not None and (self.folds < 2 or self.split_file is not None or self.resume):
            raise ConfigError(
                f"folds must be at least 2 (got {self.folds}) and makes its own folds file and run names: "
                "no split_file or resume with it (finished folds are reused, unfinished ones named in the error)"
            )
        if self.fold is not None and ((self.split_file is None and self.folds is None) or self.fold < 0):
            raise ConfigError(
                "fold needs a folds file as split_file (from 'histoscan split --folds K'), or folds K, and fold >= 0"
            )

    @property
    def max_time_seconds(self) -> float | None:
        """The wall-clock limit in seconds (None: no limit)."""
        return parse_duration(self.max_time, "max_time") if self.max_time is not None else None

    def _check_types(self) -> None:
        """Each value has its field's type (a YAML 'None' string or a quoted number is caught here, not mid-training)."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            kind = field_type(hints[f.name])
            if value is None and kind.optional:
                continue
            if kind.choices:
                if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in kind.choices:
                    setattr(self, f.name, str(value))  # YAML reads precision: 32 as a number
                continue  # the allowed values are checked by check_choices
            if kind.scalar is float and isinstance(value, str):
                try:  # PyYAML reads 1e-3 (no dot) as a string
                    value = float(value)
                    setattr(self, f.name, value)
                except ValueError:
                    pass
            allowed = _ALLOWED[kind.scalar] if not kind.structured else (list, tuple, dict)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                want = f"{kind.scalar.__name__ if not kind.structured else 'a list or mapping'}"
                raise ConfigError(f"{f.name}: expected {want}{' or null' if kind.optional else ''}, got {value!r}")

    # ---- (de)serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> Path:
        """Write the config as YAML (``histoscan train --config`` reads it back)."""
        p = Path(path)
        p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return p

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; ``source`` names where it came from in errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a YAML config; ``overrides`` (e.g. from the command line) win."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({exc})") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: expected a mapping of option: value")
        values.update(overrides or {})
        return cls.from_dict(values, source=str(p))

    @classmethod
    def load(cls, config: str | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """A config file or shipped config name with ``overrides`` on top, or the overrides alone."""
        if config:
            return cls.from_yaml(resolve_config_path(config), overrides)
        return cls.from_dict(overrides or {}, "options")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)


_ALLOWED: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


WHOLE_TILE_CONFIG = "cpu-wholetile"


def load_for_store(
    config: str | None, overrides: dict[str, Any], printer: Callable[[str], None] = print
) -> TrainConfig:
    """``TrainConfig.load``, choosing the shipped config by the store's label geometry when none is named.

    With neither a config nor a model given, a store whose labels describe whole images (it records no
    labelled centre: LC25000, IDC, class folders) trains with ``cpu-wholetile``, and ``printer`` says so;
    any other store keeps the built-in defaults. Options given on top still win.
    """
    if config is None and "model" not in overrides and overrides.get("data"):
        from histoscan.data.store import PatchStore

        try:
            whole_tile = PatchStore(overrides["data"]).label_size is None
        except HistoscanError:  # not a store: training reports that itself, after the options are checked
            whole_tile = False
        if whole_tile:
            printer(
                f"note: {overrides['data']} labels whole images (no labelled centre), so the shipped config "
                f"{WHOLE_TILE_CONFIG} is used (the whole image resized, no centre crop); --config or --model "
                "chooses another"
            )
            config = WHOLE_TILE_CONFIG
    return TrainConfig.load(config, overrides)


def shipped_configs() -> dict[str, Path]:
    """The training configs that ship with histoscan, by name."""
    folder = Path(__file__).resolve().parents[1] / "configs" / "train"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config_path(name_or_path: str) -> Path:
    """A config path as given, or a shipped config by name (``cpu-default``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(f"{name_or_path}: no such config file, and not a shipped config ({', '.join(shipped)})")
