"""The training configuration: one dataclass, every field documented (the text becomes ``--help``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from histoscan.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "onecycle", "plateau", "constant")


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with its help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


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
    split_file: str | None = doc("An id,split CSV to use instead of making a split.", None)
    batch_size: int = doc("Images per training step (per device).", 128)
    max_epochs: int = doc("Maximum epochs.", 10)
    max_time: float | None = doc("Wall-clock limit in minutes; training stops after the epoch in progress.", None)
    optimizer: str = doc("adamw, adam or sgd.", "adamw")
    lr: float = doc("Peak learning rate.", 1e-3)
    weight_decay: float = doc("Weight decay.", 1e-4)
    momentum: float = doc("SGD momentum.", 0.9)
    schedule: str = doc("cosine (with warmup), onecycle, plateau or constant.", "cosine")
    warmup_epochs: float = doc("Linear warmup length in epochs (cosine).", 0.0)
    label_smoothing: float = doc("Label smoothing (0 = off).", 0.0)
    class_weights: list | None = doc("Loss weight per class, e.g. [1.0, 1.5] (seeds: tumour 1.5).", None)
    balanced_sampler: bool = doc("Sample classes equally often instead of weighting the loss.", False)
    grad_clip: float | None = doc("Clip gradient norm to this value.", None)
    augment: str = doc("Augmentation preset: none, flips, light or strong.", "light")
    augment_strength: float = doc("Scale of colour / stain jitter.", 1.0)
    crop: int | None = doc("Centre crop side before the network (e.g. 32: the labelled centre only).", None)
    resize: int | None = doc("Resize side before the network (e.g. 192 to upscale 96 px patches).", None)
    mpp: float | None = doc("Micrometres per pixel of the training patches (default: what the store recorded).", None)
    freeze_epochs: int = doc("Train only the classifier for this many epochs, then unfreeze (transfer learning).", 0)
    backbone_lr_mult: float = doc("Backbone learning rate as a fraction of lr (discriminative learning rates).", 1.0)
    early_stopping: int | None = doc("Stop after this many epochs without a better validation AUROC (None: off).", 5)
    precision: str = doc("auto (bf16-mixed on GPU, 32 on CPU), 32, bf16-mixed or 16-mixed.", "auto")
    channels_last: bool | None = doc("Channels-last memory format (default: on GPU only).", None)
    compile: bool = doc("torch.compile the model.", False)
    accelerator: str = doc("auto, cpu, gpu or mps.", "auto")
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
        self._check_types()
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is not one of {list(SCHEDULES)}")
        from histoscan.data.transforms import AUGMENTATION_PRESETS

        if self.augment not in AUGMENTATION_PRESETS:
            raise ConfigError(f"augment {self.augment!r} is not one of {list(AUGMENTATION_PRESETS)}")
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.pretrained and self.weights:
            raise ConfigError("give either pretrained (timm hub) or weights (local file), not both")
        if self.balanced_sampler and self.class_weights:
            raise ConfigError("balanced_sampler and class_weights both correct imbalance; choose one")
        if self.crop is not None and self.crop < 8:
            raise ConfigError(f"crop must be at least 8 px, got {self.crop}")
        if self.freeze_epochs < 0:
            raise ConfigError("freeze_epochs cannot be negative")

    def _check_types(self) -> None:
        """Each value has its field's type (a YAML 'None' string or a quoted number is caught here, not mid-training)."""
        kinds = {
            "int": (int,),
            "float": (int, float),
            "str": (str,),
            "bool": (bool,),
            "list": (list, tuple),
            "dict": (dict,),
        }
        for f in fields(self):
            value = getattr(self, f.name)
            names = [t.strip() for t in str(f.type).split("|")]
            if value is None and "None" in names:
                continue
            if "float" in names and isinstance(value, str):
                try:  # PyYAML reads 1e-3 (no dot) as a string
                    value = float(value)
                    setattr(self, f.name, value)
                except ValueError:
                    pass
            allowed = tuple(t for n in names for t in kinds.get(n, ()))
            if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
                want = " or ".join(n if n != "None" else "null" for n in names)
                raise ConfigError(f"{f.name}: expected {want}, got {value!r}")

    # ---- (de)serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return p

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
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

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def structured_fields() -> set[str]:
    """Fields whose values are lists or mappings (given as YAML on the command line)."""
    return {f.name for f in fields(TrainConfig) if str(f.type).startswith(("dict", "list"))}


def field_help() -> dict[str, str]:
    """Help text per field (for the CLI)."""
    return {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}


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
