"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared_or_exit(name: str) -> Path:
    """A folder of ../shared/data, or exit saying it is absent."""
    path = SHARED / name
    if not path.exists():
        sys.exit(f"benchmark needs {path} (the real data folder); it is absent")
    return path


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux)."""
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# --- the JSON every benchmark writes with --json OUT (read by docs/scripts/gen_benchmarks.py) -----------------

RESULTS = ROOT / "benchmarks" / "results"  # small result files committed on purpose: the docs' benchmark data
ENVELOPE_VERSION = 1


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """Give a benchmark's parser the ``--json OUT`` option every script shares."""
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="OUT",
        help="also write the figures as JSON (with the command, commit, date and machine) to OUT",
    )


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name, with `` +AMX`` where its flags list ``amx_bf16``.

    Virtual machines often report one generic model name (``Intel(R) Xeon(R) Processor``) for CPUs with and
    without AMX, which nearly doubles bf16 training speed: the flag tells those machines apart
    (benchmarks/PROTOCOL.md, 2026-12-08 01:50).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    name = flags = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = value
    name = name or platform.processor() or platform.machine()
    return f"{name} +AMX" if "amx_bf16" in flags.split() else name


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, GPU (if any), Python and the key library versions."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def load_average() -> float:
    """The one-minute load average of the machine (NaN where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return float("nan")


class Recorder:
    """Collects a benchmark's figures and tables and writes them, in the shared envelope, to ``--json OUT``.

    Create it at the start of ``main()`` (it reads the load average before the benchmark loads the machine:
    ``quiet`` is true when that was below half a core), put figures in ``figures`` (flat or nested dicts of
    numbers and strings, keys as the benchmark's issue names them) and tables in ``tables`` (a title -> a
    list of rows, each a dict of column -> value), then call ``write()``.
    """

    def __init__(self, name: str, title: str, out: Path | None, quiet: bool | None = None) -> None:
        self.name, self.title, self.out = name, title, out
        self.figures: dict[str, Any] = {}
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.notes: list[str] = []
        self.output: list[str] = []  # the report as printed, when tee() is on
        self.started = time.time()
        self.load_at_start = load_average()
        self.quiet = quiet if quiet is not None else bool(self.load_at_start < 0.5)
        global _ACTIVE
        _ACTIVE = self

    def envelope(self) -> dict[str, Any]:
        """The JSON document: what ran, where, when, and what it measured."""
        script = Path(sys.argv[0])
        with contextlib.suppress(ValueError):
            script = script.resolve().relative_to(ROOT)
        return {
            "envelope": ENVELOPE_VERSION,
            "benchmark": self.name,
            "title": self.title,
            "command": shlex.join(["python", str(script), *sys.argv[1:]]),
            "commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": round(time.time() - self.started, 1),
            "machine": machine(),
            "load_at_start": round(self.load_at_start, 2),
            "quiet": self.quiet,
            "figures": self.figures,
            "tables": self.tables,
            "notes": self.notes,
            "output": self.output,
        }

    def tee(self) -> None:
        """From now on, keep a copy of everything printed to stdout in ``output`` (the report as printed).

        For scripts whose figures are printed lines rather than one table: the JSON then holds the report
        exactly as the script printed it, and the docs show it as such.
        """
        recorder, stdout = self, sys.stdout
        pending = [""]

        class _Tee:
            def write(self, text: str) -> int:
                *lines, pending[0] = (pending[0] + text).split("\n")
                recorder.output.extend(lines)
                return stdout.write(text)

            def flush(self) -> None:
                stdout.flush()

            def __getattr__(self, name: str) -> Any:
                return getattr(stdout, name)

        sys.stdout = _Tee()  # type: ignore[assignment]

    def write(self) -> dict[str, Any]:
        """Write the envelope to ``out`` when one was given; return it either way."""
        doc = self.envelope()
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(doc, indent=2, default=_plain) + "\n")
            print(f"wrote {self.out}")
        return doc


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, paths: as plain JSON values."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


_ACTIVE: Recorder | None = None


def recorder() -> Recorder | None:
    """The recorder of this run (the last one created), for functions deep in a script to add figures to."""
    return _ACTIVE


def finish() -> None:
    """Write the recorder of this run, if there is one (call after ``main()`` returned normally)."""
    if _ACTIVE is not None:
        _ACTIVE.write()
