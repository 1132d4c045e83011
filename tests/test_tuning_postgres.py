"""``tune --storage postgresql://...``: the URL maps to the installed driver, and many workers share one study on a
real PostgreSQL server (pruning across workers, a worker killed mid-trial loses only that trial).

The server: ``HISTOSCAN_TEST_POSTGRES`` (a URL, as ``.ci/run`` exports it), else a throwaway cluster this module
starts with the PostgreSQL binaries (``initdb`` / ``pg_ctl`` on PATH or under /usr/lib/postgresql; as the
``postgres`` user when run as root). The tests skip, saying why, when neither is available.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from histoscan.errors import ConfigError
from histoscan.tuning.settings import TuneSettings
from histoscan.tuning.study import database_url, tune

FAST = {"max_epochs": 2, "early_stopping": None, "batch_size": 32, "resize": 32, "val": 0.25, "test": 0.15}
HEARTBEAT = 20  # seconds: a killed worker's trial is failed this long after its last heartbeat


# ---- the URL and its driver (no server needed) -------------------------------------------------------------
def test_postgresql_urls_map_to_the_installed_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {"psycopg2"}
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            real("json") if name in installed else (None if name in ("psycopg", "psycopg2") else real(name))
        ),
    )
    assert database_url("postgresql://u:pw@db:5432/optuna") == "postgresql+psycopg2://u:pw@db:5432/optuna"
    assert database_url("postgres://u@db/optuna") == "postgresql+psycopg2://u@db/optuna"  # the hosts' spelling
    installed.add("psycopg")
    assert database_url("postgresql://u@db/optuna") == "postgresql+psycopg://u@db/optuna"  # psycopg 3 first
    assert database_url("sqlite:////tmp/s.db") == "sqlite:////tmp/s.db"
    installed.clear()
    with pytest.raises(ConfigError) as err:
        database_url("postgresql://u:secret@db/optuna")
    assert str(err.value) == (
        "--storage postgresql://u:***@db/optuna: no postgresql driver is installed; "
        "pip install 'histoscan[postgres]' (psycopg2-binary)"
    )
    with pytest.raises(ConfigError, match=r"the psycopg2 driver is not installed; pip install 'histoscan\[postgres\]'"):
        database_url("postgresql+psycopg2://u@db/optuna")


# ---- a real server -----------------------------------------------------------------------------------------
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL: HISTOSCAN_TEST_POSTGRES, or a throwaway cluster on 127.0.0.1 (stopped afterwards)."""
    if os.environ.get("HISTOSCAN_TEST_POSTGRES"):
        yield os.environ["HISTOSCAN_TEST_POSTGRES"]
        return
    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is None:
        pytest.skip("no PostgreSQL driver (pip install 'histoscan[postgres]')")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server: initdb/pg_ctl not found (Debian package 'postgresql'; .ci/run installs it)")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="histoscan-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        try:
            shutil.chown(root, "postgres")
        except (LookupError, PermissionError) as exc:
            pytest.skip(f"running as root and no 'postgres' user to run the server as ({exc})")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    made = run(initdb, "-D", str(data), "-A", "trust", "-U", "histoscan", "--no-sync")
    if made.returncode != 0:
        pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
    opts = f"-p {port} -k {root} -h 127.0.0.1 -c fsync=off"
    started = run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")
    if started.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {started.stderr.strip()[-300:]}")
    try:
        yield f"postgresql://histoscan@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tune_store(kaggle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histoscan.data.ingest import ingest

    return ingest(kaggle_dir, tmp_path_factory.mktemp("pgtune") / "store", workers=1).store


def _worker(store: Path, space: Path, root: Path, url: str, trials: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "histoscan", "tune", "--data", str(store), "--space", str(space)]
    cmd += ["--trials", str(trials), "--study", "pg", "--out", str(root), "--storage", url, "--resume"]
    cmd += ["--pruner", "median", "--sampler", "random", "--heartbeat", str(HEARTBEAT)]
    cmd += [a for k, v in FAST.items() for a in ("--set", f"{k}={'null' if v is None else v}")]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="pg", storage=database_url(url)).get_trials()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_share_a_postgres_study_prune_across_and_survive_a_kill(
    postgres_url: str, tune_store: Path, tmp_path: Path
) -> None:
    url = postgres_url
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "base": {"model": "simple_cnn", "model_args": {"batch_norm": True}},
                "params": {"lr": {"choice": [3.0e-3, 5.0e-3, 10.0]}},
            }
        )
    )
    storage = database_url(url)
    study = optuna.create_study(study_name="pg", storage=storage, direction="maximize")
    for lr in (3.0e-3, 5.0e-3):  # (the sampler may pick lr 10 later too: pruned or complete, both fine)
        study.enqueue_trial({"lr": lr})
    # 1. this process alone: two good trials, the pruner's reference
    settings = dict(
        data=str(tune_store),
        space=str(space),
        study="pg",
        out=str(tmp_path),
        storage=url,
        resume=True,
        pruner="median",
        sampler="random",
        heartbeat=HEARTBEAT,
        overrides=FAST,
    )
    tune(TuneSettings(trials=2, **settings), printer=lambda *_: None)  # type: ignore[arg-type]
    first = {t.user_attrs["worker"] for t in _trials(url)}
    # 2. a trial that cannot learn (lr 10: AUROC 0.5), then two worker processes on the same study
    study.enqueue_trial({"lr": 10.0})
    workers = [_worker(tune_store, space, tmp_path, url, 8) for _ in range(2)]
    victim, survivor = workers
    victim_id = None
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:  # the victim has finished a trial and runs another
        time.sleep(0.5)
        mine = [t for t in _trials(url) if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
        if any(t.state.is_finished() for t in mine) and any(t.state == optuna.trial.TrialState.RUNNING for t in mine):
            victim_id = mine[-1].user_attrs["worker"]
            break
    assert victim_id, (
        f"the worker never finished a trial: {victim.stderr.read().decode()[-2000:] if victim.stderr else ''}"
    )
    before = {t.number: (t.state, t.value) for t in _trials(url) if t.state.is_finished()}
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    victim.wait()
    _, err = survivor.communicate(timeout=400)
    assert survivor.returncode == 0, err.decode()[-2000:]
    # 3. the study resumes: once the killed trial's heartbeat is stale, a worker marks it failed and retries it
    time.sleep(max(0.0, killed_at + HEARTBEAT + 2 - time.time()))
    tune(TuneSettings(trials=9, **settings), printer=lambda *_: None)  # type: ignore[arg-type]
    trials = _trials(url)
    states = [t.state for t in trials]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["worker"] == victim_id, [
        (t.number, t.state.name, t.params, t.user_attrs.get("worker"), t.user_attrs.get("error"), t.system_attrs)
        for t in trials
    ] + [victim_id]
    assert optuna.trial.TrialState.RUNNING not in states
    # everything else finished normally, or is the killed trial's parameters queued (or run) once more
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].params == failed[0].params
    ok = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in ok for t in trials if t is not failed[0] and t is not retries[0])
    for number, (state, value) in before.items():  # what finished before the kill is kept as it was
        assert (trials[number].state, trials[number].value) == (state, value)
    # both worker processes contributed finished trials
    by_worker = {t.user_attrs["worker"] for t in trials if t.state.is_finished() and t.state.name != "FAIL"}
    assert victim_id in by_worker and any(w.endswith(f":{survivor.pid}") for w in by_worker)
    # pruning across workers: the bad trial was pruned by another process against this process's trials
    bad = next(t for t in trials if t.system_attrs.get("fixed_params") == {"lr": 10.0})
    assert bad.state == optuna.trial.TrialState.PRUNED and bad.user_attrs["worker"] not in first
