"""The model bundle: a run folder that every consumer loads (``model.json`` + ``best.safetensors``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoscan import __version__
from histoscan.errors import ConfigError
from histoscan.preprocessing import Preprocessing

MODEL_FILE = "model.json"
WEIGHTS_FILE = "best.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
LAST_CKPT = "last.ckpt"
SPLIT_FILE = "split.csv"
BUNDLE_FORMAT = "histoscan-model"


@dataclass
class ModelBundle:
    """What ``model.json`` says about a trained model."""

    architecture: str
    classes: list[str]
    preprocessing: Preprocessing
    model_args: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5
    temperature: float = 1.0
    best_metric: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    histoscan_version: str = __version__

    @property
    def task(self) -> str:
        return "binary" if len(self.classes) == 2 else "multiclass"

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "binary" else len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return {
            "format": BUNDLE_FORMAT,
            "task": self.task,
            "num_outputs": self.num_outputs,
            "calibration": {"temperature": self.temperature},
            **{k: v for k, v in d.items() if k != "temperature"},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelBundle:
        return cls(
            architecture=d["architecture"],
            classes=list(d["classes"]),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            model_args=d.get("model_args", {}),
            threshold=float(d.get("threshold", 0.5)),
            temperature=float(d.get("calibration", {}).get("temperature", 1.0)),
            best_metric=d.get("best_metric", {}),
            split=d.get("split", {}),
            training=d.get("training", {}),
            histoscan_version=d.get("histoscan_version", "unknown"),
        )

    def save(self, run_dir: str | Path) -> Path:
        """Write ``model.json`` atomically."""
        path = Path(run_dir) / MODEL_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path


def read_bundle(run_dir: str | Path) -> ModelBundle:
    """Read ``model.json`` of a run folder."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a histoscan run (no {MODEL_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from exc
    if data.get("format") != BUNDLE_FORMAT:
        raise ConfigError(f"{path}: not a histoscan model file")
    try:
        return ModelBundle.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: missing or malformed field {exc}") from exc


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Weights only, as safetensors (no pickle), written atomically."""
    from safetensors.torch import save_file

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt", "histoscan_version": __version__})
    os.replace(tmp, p)
    return p


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelBundle]:
    """Rebuild the model of a run folder from the folder alone, in eval mode."""
    from safetensors.torch import load_file

    from histoscan.models import create_model

    bundle = read_bundle(run_dir)
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{run_dir}: no {WEIGHTS_FILE} (did training finish an epoch?)")
    model = create_model(
        bundle.architecture, len(bundle.classes), input_size=bundle.preprocessing.input_size, **bundle.model_args
    )
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval(), bundle
