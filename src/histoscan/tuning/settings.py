"""What ``histoscan tune`` is asked to do: one documented dataclass (its fields are the command's options).

Kept apart from ``study`` so that the command line can build its options without importing Optuna or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from histoscan.duration import DURATION_HELP, parse_duration
from histoscan.enums import Pruner, Sampler
from histoscan.errors import ConfigError
from histoscan.options import check_choices, doc, parse_yaml

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
else:
    BasePruner = object  # resolved at run time without importing Optuna (see the module docstring)


@dataclass
class TuneSettings:
    """What ``histoscan tune`` was asked to do (each field's help text is its ``--help``)."""

    data: str = doc("Labelled packed store to tune on.")
    space: str = doc("Search space: a shipped name (nas, hparams, backbone) or a YAML file.", "nas")
    trials: int = doc("Finished trials the study should hold (a resumed study runs only the rest).", 20)
    timeout: str | None = doc(f"Stop this worker after this long, {DURATION_HELP}.", None, metavar="DURATION")
    study: str | None = doc("Study name (default: the space's name).", None)
    out: str = doc("Folder holding study folders (trials, study.db, plots, best.yaml).", "studies")
    storage: str | None = doc("Optuna RDB URL shared by many workers (default: SQLite in the study folder).", None)
    heartbeat: int = doc(
        "Seconds without a heartbeat after which a worker's running trial counts as dead (its worker was killed or "
        "lost): any worker of the study then marks it failed and runs its parameters once more.",
        60,
    )
    sampler: Sampler = doc("Optuna sampler.", "tpe")
    pruner: Pruner | BasePruner = doc("Optuna pruner (from Python, any Optuna pruner object).", "hyperband")
    seed: int = doc("Split seed of every trial, and the sampler's seed.", 0)
    resume: bool = doc("Continue an existing study (or join it as another worker).", False)
    overrides: dict[str, Any] = doc("Training options fixed for every trial (--set KEY=YAML).", {}, cli=False)
    retrain_best: bool = doc("At the end, train the best configuration on train+val.", False)
    retrain_epochs: int | None = doc("Epochs for --retrain-best (default: 1.5x the trials' max_epochs).", None)

    def __post_init__(self) -> None:
        if isinstance(self.timeout, (int, float)) and not isinstance(self.timeout, bool):
            self.timeout = str(self.timeout)  # refused by parse_duration with a message asking for a unit
        check_choices(self)
        if self.timeout is not None:
            parse_duration(self.timeout, "timeout")
        if self.trials < 1:
            raise ConfigError(f"trials must be at least 1, got {self.trials}")
        if self.heartbeat < 3:
            raise ConfigError(f"heartbeat must be at least 3 seconds, got {self.heartbeat}")

    @property
    def timeout_seconds(self) -> float | None:
        """This worker's time limit in seconds (None: no limit)."""
        return parse_duration(self.timeout, "timeout") if self.timeout is not None else None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=YAML`` strings (``--set max_epochs=4``) as training-option overrides."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_yaml(value, "set")
    return out
