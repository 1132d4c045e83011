"""``histoscan compare``: a leaderboard across run folders (CNN runs and classical baselines) and model selection."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from histoscan.bundle import read_bundle
from histoscan.errors import ConfigError, HistoscanError
from histoscan.evaluation.evaluate import evaluate_run
from histoscan.reports.html import HtmlReport
from histoscan.runfolder import BASELINE_FILE, EVAL_DIR, METRICS_JSON, MODEL_FILE, RunFolder

# metric name -> (column, higher is better)
RANK_METRICS: dict[str, tuple[str, bool]] = {
    "auroc": ("auroc", True),
    "average_precision": ("average_precision", True),
    "accuracy": ("accuracy", True),
    "balanced_accuracy": ("balanced_accuracy", True),
    "f1": ("f1", True),
    "brier": ("brier", False),
    "ece": ("ece", False),
}
COLUMNS = [
    "run",
    "kind",
    "model",
    "evaluated_on",
    "patches",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "average_precision",
    "accuracy",
    "balanced_accuracy",
    "f1",
    "brier",
    "ece",
    "parameters",
    "weights_mb",
    "train_seconds",
    "inference_images_per_s",
    "path",
]


@dataclass
class Leaderboard:
    """One row per run, sorted best first by ``metric``."""

    table: pd.DataFrame
    metric: str
    comparable: bool
    skipped: dict[str, str] = field(default_factory=dict)  # run folder -> why it is not in the table

    def write(self, out: str | Path) -> dict[str, Path]:
        """``leaderboard.csv``, ``leaderboard.md`` and ``leaderboard.html`` in ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "leaderboard.csv", "md": out / "leaderboard.md", "html": out / "leaderboard.html"}
        self.table.to_csv(paths["csv"], index=False)
        shown = self.display_rows()
        md = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
        md += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
        paths["md"].write_text("\n".join(md) + "\n")
        rep = HtmlReport("histoscan leaderboard", subtitle=f"sorted by {self.metric}")
        if not self.comparable:
            rep.paragraph(self.warning(), note=True)
        for run, why in self.skipped.items():
            rep.paragraph(f"left out {run}: {why}", note=True)
        rep.table(list(shown.columns), shown.values.tolist())
        rep.write(paths["html"])
        return paths

    def display_rows(self) -> pd.DataFrame:
        """Rounded, human-readable columns (the terminal, Markdown and HTML tables)."""
        t = self.table
        return pd.DataFrame(
            {
                "rank": range(1, len(t) + 1),
                "run": t["run"],
                "model": t["model"],
                "AUROC [95% CI]": [
                    f"{a:.4f} [{lo:.4f}, {hi:.4f}]" for a, lo, hi in zip(t["auroc"], t["auroc_lo"], t["auroc_hi"])
                ],
                "accuracy": t["accuracy"].map("{:.4f}".format),
                "F1": t["f1"].map("{:.4f}".format),
                "parameters": t["parameters"].map(_count),
                "weights MB": t["weights_mb"].map("{:.2f}".format),
                "train s": t["train_seconds"].map("{:.0f}".format),
                "infer img/s": t["inference_images_per_s"].map("{:.0f}".format),
                "evaluated on": t["evaluated_on"],
            }
        )

    def warning(self) -> str:
        """A warning that the runs were scored on different patches."""
        return (
            "runs were evaluated on different patches ("
            + "; ".join(sorted(set(self.table["evaluated_on"])))
            + "): their metrics are not directly comparable"
        )

    def select(self, out: str | Path | None = None) -> dict[str, Any]:
        """Name the best run and say why; written to ``out/selection.json`` when ``out`` is given."""
        t = self.table
        col, higher = RANK_METRICS[self.metric]
        best = t.iloc[0]
        reason = [
            f"{best['run']} has the {'highest' if higher else 'lowest'} {self.metric} ({best[col]:.4f}) "
            f"of {len(t)} runs on {best['evaluated_on']}"
        ]
        close: list[str] = []
        if self.metric == "auroc":
            close = [r["run"] for _, r in t.iloc[1:].iterrows() if r["auroc_hi"] >= best["auroc_lo"]]
            if close:
                reason.append(
                    f"its 95% interval [{best['auroc_lo']:.4f}, {best['auroc_hi']:.4f}] overlaps those of "
                    f"{', '.join(close)}: the difference may be noise; prefer the simpler or faster of them "
                    "if that matters more"
                )
            else:
                reason.append("its 95% interval lies above every other run's")
        if len(t) > 1:
            second = t.iloc[1]
            reason.append(f"runner-up {second['run']} ({second[col]:.4f})")
        if not self.comparable:
            reason.append("warning: " + self.warning())
        selection = {
            "best_run": str(best["run"]),
            "path": str(best["path"]),
            "model": str(best["model"]),
            "metric": self.metric,
            "value": float(best[col]),
            "auroc_ci95": [float(best["auroc_lo"]), float(best["auroc_hi"])],
            "within_interval": close,
            "comparable": self.comparable,
            "reason": "; ".join(reason) + ".",
        }
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "selection.json").write_text(json.dumps(selection, indent=2))
        return selection


def _count(n: Any) -> str:
    if pd.isna(n):
        return "-"
    n = float(n)
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{n:.0f}"


def run_row(
    run_dir: str | Path, evaluate_missing: bool = True, printer: Callable[[str], None] = print
) -> dict[str, Any]:
    """The leaderboard row of one run folder, evaluating a CNN run on its test split when it has no ``eval/``."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    metrics_path = run.eval_dir() / METRICS_JSON
    is_model = run.is_model
    if not is_model and not run.is_baseline:
        raise ConfigError(f"{run_dir}: not a run folder (no {MODEL_FILE} or {BASELINE_FILE})")
    if not metrics_path.is_file():
        if not (is_model and evaluate_missing):
            raise ConfigError(
                f"{run_dir}: not evaluated yet (no {EVAL_DIR}/{METRICS_JSON}); run 'histoscan evaluate {run_dir}'"
            )
        printer(f"evaluating {run_dir} on its test split")
        evaluate_run(run_dir)
    record = json.loads(metrics_path.read_text())
    m = record["metrics"]
    if is_model:
        bundle = read_bundle(run_dir)
        weights = run.weights_path
        params, size = bundle.training.get("parameters"), weights.stat().st_size if weights.is_file() else float("nan")
        seconds, model = bundle.training.get("seconds"), bundle.architecture
    else:
        card = run.read_baseline()
        params, size, seconds, model = card["parameters"], card["model_bytes"], card["seconds"], card["model"]
    lo, hi = m["auroc_ci95"]
    return {
        "run": run_dir.name,
        "kind": "cnn" if is_model else "baseline",
        "model": model,
        "evaluated_on": f"{Path(record['store']).name}:{record['split']}",
        "patches": m["count"],
        "auroc": m["auroc"],
        "auroc_lo": lo,
        "auroc_hi": hi,
        "average_precision": m["average_precision"],
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "f1": m["f1"],
        "brier": m["brier"],
        "ece": m["ece"],
        "parameters": params,
        "weights_mb": size / 1e6 if size == size else size,
        "train_seconds": seconds,
        "inference_images_per_s": record.get("inference_images_per_s"),
        "path": str(run_dir.resolve()),
    }


def expand_runs(paths: Sequence[str | Path]) -> list[tuple[Path, bool]]:
    """(run folder, named explicitly) for each run given and each run inside a folder of runs (``runs/``, a study)."""
    found: list[tuple[Path, bool]] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"{p}: no such folder")
        if RunFolder(p).is_model or RunFolder(p).is_baseline:
            found.append((p.resolve(), True))
        else:
            inner = sorted(
                q.parent
                for q in [*p.glob(f"*/{MODEL_FILE}"), *p.glob(f"*/{BASELINE_FILE}"), *p.glob(f"*/*/{MODEL_FILE}")]
            )
            if not inner:
                raise ConfigError(f"{p}: not a run folder and holds no run folders")
            found.extend((q.resolve(), False) for q in inner)
    return list(dict.fromkeys(found))


def build_leaderboard(
    runs: Sequence[str | Path],
    metric: str = "auroc",
    evaluate_missing: bool = True,
    printer: Callable[[str], None] = print,
) -> Leaderboard:
    """Rows for every run (folders of runs are expanded), sorted best first by ``metric``."""
    if metric not in RANK_METRICS:
        raise ConfigError(f"--metric {metric!r} is not one of {list(RANK_METRICS)}")
    rows, skipped = [], {}
    for run, explicit in expand_runs(runs):
        try:
            rows.append(run_row(run, evaluate_missing, printer))
        except HistoscanError as exc:
            if explicit:
                raise
            skipped[str(run)] = str(exc)  # e.g. a trial that failed before its first epoch
            printer(f"left out {run}: {exc}")
    if not rows:
        raise ConfigError("no run could be ranked: " + "; ".join(skipped.values()))
    col, higher = RANK_METRICS[metric]
    tie = "accuracy" if col != "accuracy" else "auroc"  # ties (common at AUROC 1.0) broken by a second metric
    table = (
        pd.DataFrame(rows, columns=COLUMNS)
        .sort_values([col, tie], ascending=[not higher, False], kind="stable")
        .reset_index(drop=True)
    )
    comparable = len(set(zip(table["evaluated_on"], table["patches"]))) == 1
    return Leaderboard(table, metric, comparable, skipped)


def compare_runs(
    runs: Sequence[str | Path],
    *,
    metric: str = "auroc",
    out: str | Path = "leaderboard",
    select: bool = False,
    evaluate_missing: bool = True,
    printer: Callable[[str], None] = print,
) -> tuple[Leaderboard, list[str]]:
    """Build and write the leaderboard, as ``histoscan compare`` does.

    ``histoscan compare``: the leaderboard of ``runs`` written to ``out`` (and, with ``select``, the best run
    in ``out/selection.json``); returns the board and what happened, in lines (a warning first when the runs
    were not scored on the same rows).
    """
    board = build_leaderboard(runs, metric, evaluate_missing, printer=printer)
    lines = [] if board.comparable else [f"warning: {board.warning()}"]
    paths = board.write(out)
    lines.append(f"written: {', '.join(str(p) for p in paths.values())}")
    if select:
        sel = board.select(out)
        lines.append(f"best: {sel['best_run']} - {sel['reason']}\nselection: {Path(out) / 'selection.json'}")
    return board, lines
