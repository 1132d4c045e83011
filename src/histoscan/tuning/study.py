"""``histoscan tune``: an Optuna study whose every trial is a normal run folder.

Reads top-down: ``tune`` -> ``open_study`` -> ``optimize`` (``objective`` + ``PruneOnValidation``)
-> ``report`` (trials table, plots, best config) -> optional ``retrain_best``.
The study lives in SQLite inside the study folder (or any Optuna RDB URL), so a stopped study
resumes where it was, and many workers on many machines can share one study.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import pandas as pd
import yaml

from histoscan.errors import ConfigError, HistoscanError
from histoscan.runfolder import CONFIG_FILE, SPLIT_FILE
from histoscan.training.callbacks import MONITOR
from histoscan.training.config import TrainConfig
from histoscan.training.fit import train
from histoscan.tuning.settings import TuneSettings
from histoscan.tuning.space import SearchSpace, load_space

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
STUDY_DB = "study.db"
TRIALS_DIR = "trials"


@dataclass
class TuneResult:
    """The study folder and what it holds."""

    study_dir: Path
    study_name: str
    table: pd.DataFrame
    best_value: float | None
    best_params: dict[str, Any]
    best_config: Path | None
    best_run: Path | None
    plots: dict[str, Path]
    counts: dict[str, int]
    retrained: Path | None = None

    def display_table(self) -> pd.DataFrame:
        """The trials table as shown to a person: no paths or error texts, parameters by their short names."""
        shown = self.table.drop(columns=["run_dir", "error"], errors="ignore")
        shown.columns = [c.replace("param:", "").replace("model_args.", "") for c in shown.columns]
        return shown

    def title(self) -> str:
        """One line: the study and how its trials ended."""
        c = self.counts
        return f"study {self.study_name}: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed"

    def summary_lines(self) -> list[str]:
        """Where the trials and plots are, the best value and config, and the retrained run."""
        plots = ", ".join(str(p) for p in self.plots.values()) or "none yet"
        lines = [f"trials: {self.study_dir / 'trials.csv'}; plots: {plots}"]
        if self.best_config is not None and self.best_value is not None:
            lines.append(
                f"best val AUROC {self.best_value:.4f}; config: {self.best_config} "
                f"(histoscan train --config {self.best_config} --data ...)"
            )
        if self.retrained is not None:
            lines.append(f"retrained on train+val: {self.retrained}")
        return lines


class PruneOnValidation(L.Callback):
    """Reports validation AUROC to the trial after every epoch; asks training to stop when Optuna prunes."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report the validation AUROC to Optuna and prune the trial when it says so."""
        value = trainer.callback_metrics.get(MONITOR)
        if trainer.sanity_checking or value is None:
            return
        epoch = trainer.current_epoch
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            trainer.should_stop = True


def tune(settings: TuneSettings, printer: Callable[[str], None] = print) -> TuneResult:
    """Run (or resume, or join) a study until it holds ``settings.trials`` finished trials or time runs out."""
    space = load_space(settings.space)
    name = settings.study or space.name
    study_dir = Path(settings.out) / name
    study = open_study(settings, name, study_dir)
    optimize(study, space, settings, study_dir, printer)
    result = report(study, study_dir)
    if settings.retrain_best and result.best_config is not None and result.best_run is not None:
        result.retrained = retrain_best(
            result.best_run, result.best_config, study_dir, settings.retrain_epochs, printer
        )
    return result


def storage_url(settings: TuneSettings, study_dir: Path) -> str:
    """The study's storage: the shared URL, else a SQLite file in the study folder."""
    return settings.storage or f"sqlite:///{(study_dir / STUDY_DB).resolve()}"


# the DB-API driver of each database SQLAlchemy may map a bare URL to, in the order tried: the first importable one
# is written into the URL (SQLAlchemy 2.1 maps postgresql:// to psycopg 3, 2.0 to psycopg2: either works here)
_DRIVERS = {
    "postgresql": (("psycopg", "psycopg"), ("psycopg2", "psycopg2")),
    "mysql": (("mysqldb", "MySQLdb"), ("pymysql", "pymysql")),
}
_INSTALL = {
    "postgresql": "pip install 'histoscan[postgres]' (psycopg2-binary)",
    "mysql": "pip install pymysql",
}


def database_url(url: str) -> str:
    """A storage URL with its database driver made explicit: the one installed, or a ConfigError naming the one to install.

    ``postgresql://`` (or ``postgres://``) becomes ``postgresql+psycopg://`` when psycopg 3 is importable, else
    ``postgresql+psycopg2://``; ``mysql://`` becomes ``mysql+mysqldb://`` or ``mysql+pymysql://``. A URL that
    names its driver keeps it, and a driver that is not installed is named in the error. SQLite needs none.
    """
    import importlib.util

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")  # the spelling many hosts print
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"--storage {url}: not a database URL ({exc})") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in _DRIVERS:
        return url
    shown = parsed.render_as_string(hide_password=True)
    if driver:
        module = dict(_DRIVERS[backend]).get(driver, driver)
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--storage {shown}: the {driver} driver is not installed; {_INSTALL[backend]}")
        return url
    for name, module in _DRIVERS[backend]:
        if importlib.util.find_spec(module) is not None:
            return parsed.set(drivername=f"{backend}+{name}").render_as_string(hide_password=False)
    raise ConfigError(f"--storage {shown}: no {backend} driver is installed; {_INSTALL[backend]}")


def open_study(settings: TuneSettings, name: str, study_dir: Path) -> optuna.Study:
    """Create the study, or load it with ``resume`` (a shared storage URL is joined as it is)."""
    url = database_url(storage_url(settings, study_dir))
    local = settings.storage is None
    if local:
        study_dir.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            # a trial whose worker died (no heartbeat for settings.heartbeat s) is marked failed and retried once
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=max(1, settings.heartbeat // 3),
                grace_period=settings.heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except Exception as exc:  # bad URL, unreachable server, wrong password
        shown = _hide_password(url)
        raise ConfigError(f"--storage {shown}: cannot open the study storage ({exc})".replace(url, shown)) from exc
    exists = name in optuna.study.get_all_study_names(storage)
    if exists and not settings.resume:
        raise ConfigError(
            f"study {name!r} already exists in {_hide_password(url)}; pass --resume to continue it (or join it from "
            "another worker), or choose another --study"
        )
    sampler = (
        optuna.samplers.TPESampler(seed=_worker_seed(settings.seed), n_startup_trials=5)
        if settings.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=_worker_seed(settings.seed))
    )
    pruner = (
        settings.pruner
        if not isinstance(settings.pruner, str)
        else {
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3),
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "none": lambda: optuna.pruners.NopPruner(),
        }[settings.pruner]()
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, pruner=pruner, direction="maximize", load_if_exists=True
    )
    study.set_user_attr("space", settings.space)
    study.set_user_attr("data", str(Path(settings.data).resolve()))
    return study


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide
        return url


def _worker_seed(seed: int) -> int:
    """Workers of one study must not propose the same configurations: mix the process id into the sampler seed."""
    return (seed * 1_000_003 + os.getpid()) % (2**31)


def optimize(
    study: optuna.Study, space: SearchSpace, settings: TuneSettings, study_dir: Path, printer: Callable[[str], None]
) -> None:
    """Run trials until the study holds ``settings.trials`` finished ones (or this worker's time is up)."""
    done = _count(study)
    if done >= settings.trials:
        printer(
            f"study {study.study_name!r} already has {done} finished trials (asked for {settings.trials}); nothing to run"
        )
        return
    trials_dir = study_dir / TRIALS_DIR
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        overrides = {**space.suggest(trial), **settings.overrides}
        name = f"trial-{trial.number:04d}"
        cfg = TrainConfig.from_dict(
            {
                **overrides,
                "data": settings.data,
                "out": str(trials_dir),
                "name": name,
                "seed": settings.seed,
                "progress": False,
            },
            source=f"trial {trial.number}",
        )
        trial.set_user_attr("run_dir", str((trials_dir / name).resolve()))
        trial.set_user_attr("worker", worker)
        hook = PruneOnValidation(trial)
        try:
            result = train(cfg, printer=lambda *_: None, callbacks=[hook])
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise
        trial.set_user_attr("epochs", result.epochs)
        if hook.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {hook.pruned_at}")
        return result.best_val_auroc

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        try:
            best = f"{study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "-"
        value = (
            f"{trial.value:.4f}"
            if trial.value is not None
            else (f"{max(trial.intermediate_values.values()):.4f}" if trial.intermediate_values else "-")
        )
        why = f"  {trial.user_attrs.get('error', '')}" if trial.state == optuna.trial.TrialState.FAIL else ""
        printer(
            f"trial {trial.number:4d}  {trial.state.name.lower():8s}  val_auroc {value}  "
            f"epochs {len(trial.intermediate_values):2d}  {trial.duration.total_seconds() if trial.duration else 0:6.0f} s  "
            f"best {best}{why}"
        )

    pruner = settings.pruner if isinstance(settings.pruner, str) else type(settings.pruner).__name__
    printer(
        f"study {study.study_name!r}: {done} finished trials, running up to {settings.trials - done} more "
        f"({settings.sampler} sampler, {pruner} pruner) in {study_dir}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        study.optimize(
            objective,
            n_trials=None,
            timeout=settings.timeout_seconds,
            catch=(HistoscanError, RuntimeError, ValueError, MemoryError),
            callbacks=[optuna.study.MaxTrialsCallback(settings.trials, states=FINISHED), progress],
        )


def _count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, epochs, duration, parameters, error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "val_auroc": t.value,
                "epochs": len(t.intermediate_values),
                "seconds": round(t.duration.total_seconds(), 1) if t.duration else None,
                **{f"param:{k}": v for k, v in t.params.items()},
                "error": t.user_attrs.get("error", ""),
                "run_dir": t.user_attrs.get("run_dir", ""),
            }
        )
    return pd.DataFrame(rows)


def report(study: optuna.Study, study_dir: Path) -> TuneResult:
    """Write ``trials.csv``, the history and importance plots, and ``best.yaml``; return the summary."""
    study_dir.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    table.to_csv(study_dir / "trials.csv", index=False)
    counts = {
        s: int((table["state"] == s).sum()) if len(table) else 0 for s in ("complete", "pruned", "fail", "running")
    }
    plots = _plots(study, study_dir)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return TuneResult(study_dir, study.study_name, table, None, {}, None, None, plots, counts)
    best = study.best_trial
    best_run = Path(best.user_attrs["run_dir"])
    best_config = write_best_config(best_run, study_dir / "best.yaml")
    return TuneResult(
        study_dir, study.study_name, table, best.value, dict(best.params), best_config, best_run, plots, counts
    )


def write_best_config(run_dir: Path, path: Path) -> Path:
    """The best trial's resolved config as a training config ('histoscan train --config' accepts it)."""
    values = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    values.update({"name": None, "out": "runs", "resume": False, "progress": True})
    TrainConfig.from_dict(values, source=str(path))  # still a valid config
    path.write_text(f"# best trial of the study: {run_dir}\n" + yaml.safe_dump(values, sort_keys=False))
    return path


def _plots(study: optuna.Study, study_dir: Path) -> dict[str, Path]:
    """Optuna's optimisation history and parameter importance (when enough trials completed), as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out: dict[str, Path] = {}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    makers: dict[str, Callable[[optuna.Study], Any]] = {
        "history": ovm.plot_optimization_history,
        "importance": ovm.plot_param_importances,
        "intermediate": ovm.plot_intermediate_values,
    }
    for name, make in makers.items():
        if name == "importance" and len(complete) < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = make(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                plt.close("all")
                continue  # e.g. no parameter varies yet
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        path = study_dir / f"{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        out[name] = path
    return out


def retrain_best(
    best_run: Path, best_config: Path, study_dir: Path, epochs: int | None, printer: Callable[[str], None]
) -> Path:
    """Train the best configuration on train+val (the test split stays held out) for 1.5x its epochs (or ``epochs``)."""
    values = yaml.safe_load(best_config.read_text())
    split = pd.read_csv(best_run / SPLIT_FILE, dtype=str, keep_default_na=False)
    split["split"] = split["split"].replace({"val": "train"})
    merged = study_dir / "train+val-split.csv"
    split.to_csv(merged, index=False)
    max_epochs = epochs or math.ceil(values["max_epochs"] * 1.5)
    values.update(
        {
            "out": str(study_dir),
            "name": "best-retrained",
            "split_file": str(merged.resolve()),
            "max_epochs": max_epochs,
            "early_stopping": None,
            "schedule": "cosine" if values.get("schedule") == "plateau" else values.get("schedule"),
            "progress": False,
        }
    )
    cfg = TrainConfig.from_dict(values, source=str(best_config))
    if (study_dir / "best-retrained").exists():
        shutil.rmtree(study_dir / "best-retrained")
    printer(f"retraining the best configuration on train+val for {max_epochs} epochs")
    started = time.perf_counter()
    result = train(cfg, printer=printer)
    printer(f"retrained in {time.perf_counter() - started:.0f} s: {result.run_dir}")
    return result.run_dir
