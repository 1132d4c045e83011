"""Search spaces: small YAML files of fixed training options (``base``) and searched parameters (``params``).

A parameter is named like a training option (``lr``, ``batch_size``) or a model argument
(``model_args.num_blocks``) and declares one of::

    lr: {float: [1.0e-5, 1.0e-3], log: true}        # optional: log, step
    model_args.num_blocks: {int: [3, 5]}             # optional: log, step
    model_args.filter_mult: {choice: [1, 2, 4]}      # any YAML values, lists included
    model_args.kernel_sizes: {choice: [3, 5], per: model_args.num_blocks}   # one choice per block

``per`` makes a list with one choice per unit of an int parameter (Optuna sees ``name[0]``, ``name[1]``, ...).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from histoscan.errors import ConfigError
from histoscan.training.config import TrainConfig

KINDS = ("int", "float", "choice")
OPTIONS = {"int": {"log", "step"}, "float": {"log", "step"}, "choice": {"per"}}


@dataclass
class Param:
    """One searched parameter."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: list[Any] = field(default_factory=list)
    log: bool = False
    step: float | None = None
    per: str | None = None

    def suggest(self, trial: Any, values: dict[str, Any]) -> Any:
        """Ask the Optuna trial for a value (``values`` holds the parameters suggested before this one)."""
        if self.per is not None:
            return [self._one(trial, f"{self.name}[{i}]") for i in range(int(values[self.per]))]
        return self._one(trial, self.name)

    def _one(self, trial: Any, name: str) -> Any:
        if self.kind in ("int", "float"):
            if self.low is None or self.high is None:
                raise ConfigError(f"parameter {self.name}: a {self.kind} range needs [low, high]")
            if self.kind == "int":
                return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
            return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)
        if all(isinstance(c, (bool, int, float, str)) or c is None for c in self.choices):
            return trial.suggest_categorical(name, self.choices)
        labels = [yaml.safe_dump(c, default_flow_style=True).strip() for c in self.choices]  # Optuna wants scalars
        return self.choices[labels.index(trial.suggest_categorical(name, labels))]


@dataclass
class SearchSpace:
    """Fixed options and searched parameters, read from a space file."""

    name: str
    base: dict[str, Any]
    params: list[Param]
    description: str = ""

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Training-option overrides for one trial (``model_args.*`` merged into ``model_args``)."""
        values: dict[str, Any] = {}
        for p in self.params:
            values[p.name] = p.suggest(trial, values)
        return to_overrides(self.base, values)


def to_overrides(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by flat ``values`` whose ``model_args.x`` keys go into ``model_args``."""
    out = {**base, "model_args": dict(base.get("model_args") or {})}
    for name, v in values.items():
        if name.startswith("model_args."):
            out["model_args"][name.split(".", 1)[1]] = v
        else:
            out[name] = v
    return out


def shipped_spaces() -> dict[str, Path]:
    """The search spaces that ship with histoscan, by name."""
    folder = Path(__file__).resolve().parents[1] / "configs" / "tune"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Read and check a space file (a path, or a shipped name: hparams, nas, backbone)."""
    p = Path(name_or_path)
    if not p.is_file():
        shipped = shipped_spaces()
        if str(name_or_path) not in shipped:
            raise ConfigError(f"{name_or_path}: no such space file, and not a shipped space ({', '.join(shipped)})")
        p = shipped[str(name_or_path)]
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict) or not doc["params"]:
        raise ConfigError(f"{p}: a space file needs a 'params' mapping of parameter: spec")
    unknown = sorted(set(doc) - {"description", "base", "params"})
    if unknown:
        raise ConfigError(f"{p}: unknown top-level key(s) {unknown}; use description, base, params")
    base = doc.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{p}: 'base' must be a mapping of training options")
    try:
        TrainConfig.from_dict({k: v for k, v in base.items()}, source=f"{p}: base")
    except ConfigError as exc:
        raise ConfigError(str(exc)) from exc
    params = [_param(p, name, spec) for name, spec in doc["params"].items()]
    _check_names(p, base, params)
    return SearchSpace(p.stem, base, params, str(doc.get("description", "")))


def _param(path: Path, name: str, spec: Any) -> Param:
    where = f"{path}: parameter {name!r}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{float: [1.0e-5, 1.0e-3], log: true}}")
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of {list(KINDS)}, got {sorted(spec)}")
    kind = kinds[0]
    extra = sorted(set(spec) - {kind} - OPTIONS[kind])
    if extra:
        raise ConfigError(
            f"{where}: unknown option(s) {extra} for a {kind} parameter (allowed: {sorted(OPTIONS[kind])})"
        )
    value = spec[kind]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: 'choice' needs a non-empty list")
        return Param(name, kind, choices=value, per=spec.get("per"))
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"{where}: '{kind}' needs a range [low, high] of numbers, got {value!r}")
    low, high = value
    if kind == "int" and not all(float(v).is_integer() for v in value):
        raise ConfigError(f"{where}: an int range needs whole numbers, got {value}")
    if not low < high:
        raise ConfigError(f"{where}: bad range [{low}, {high}]: low must be below high")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range must be positive, got [{low}, {high}]")
    step = spec.get("step")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
        raise ConfigError(f"{where}: step must be a positive number and cannot combine with log")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _check_names(path: Path, base: dict[str, Any], params: list[Param]) -> None:
    """Every name is a training option or an argument of the space's model; ``per`` names an earlier int parameter."""
    options = {f.name for f in fields(TrainConfig)}
    seen: dict[str, Param] = {}
    model_args = _model_arguments(str(base.get("model", TrainConfig.model)))
    searched_model = any(p.name == "model" for p in params)
    for p in params:
        if p.name.startswith("model_args."):
            arg = p.name.split(".", 1)[1]
            if model_args is not None and not searched_model and arg not in model_args:
                raise ConfigError(
                    f"{path}: parameter {p.name!r}: model {base.get('model')!r} has no argument {arg!r} "
                    f"(it takes {sorted(model_args)})"
                )
        elif p.name not in options or p.name in ("data", "out", "name", "resume"):
            raise ConfigError(
                f"{path}: unknown parameter {p.name!r}: not a training option (see 'histoscan train --help')"
            )
        if p.per is not None:
            ref = seen.get(p.per)
            if ref is None or ref.kind != "int":
                raise ConfigError(
                    f"{path}: parameter {p.name!r}: 'per' must name an int parameter listed before it, got {p.per!r}"
                )
        seen[p.name] = p


def _model_arguments(model: str) -> set[str] | None:
    """Argument names of a histoscan model's builder (None for timm models, which take many)."""
    from histoscan.models.registry import registered  # the package's __init__ has registered the built-in CNNs

    fn = registered(model)
    if fn is None:
        return None
    return set(inspect.signature(fn).parameters) - {"num_outputs", "input_size"}
