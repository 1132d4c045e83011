"""Issue 18 on tiny models: bf16 / channels-last choice, the time-budget plan and its resume, EMA, TTA defaults."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from histoscan.bundle import read_bundle, read_weights
from histoscan.data.ingest import ingest
from histoscan.data.synthetic import write_synthetic
from histoscan.errors import ConfigError
from histoscan.evaluation.evaluate import evaluate_run
from histoscan.inference import backends
from histoscan.inference.predictor import Predictor, default_tta, submission_tta
from histoscan.models import create_model
from histoscan.runfolder import RunFolder
from histoscan.system import native_bf16_cpu
from histoscan.training import fit, schedule
from histoscan.training.callbacks import EpochSummary
from histoscan.training.config import TrainConfig
from histoscan.training.fit import choose_precision, train
from histoscan.training.schedule import SchedulePlan


def _cfg(store: Path, out: Path, name: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        data=str(store),
        out=str(out),
        name=name,
        model="simple_cnn",
        model_args={"batch_norm": True},
        resize=32,
        batch_size=32,
        max_epochs=3,
        lr=3e-3,
        progress=False,
        early_stopping=None,
        threads=2,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("speedsrc")
    write_synthetic(root / "src", "kaggle", 200, seed=7, noise=0.3, test=8)
    return ingest(root / "src", root / "store", workers=1).store


# ---- precision and memory format -----------------------------------------------------------
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with_flag, without = tmp_path / "a", tmp_path / "b"
    with_flag.write_text("processor : 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    without.write_text("processor : 0\nflags\t\t: fpu sse2 avx2\n")
    assert native_bf16_cpu(with_flag) and not native_bf16_cpu(without) and not native_bf16_cpu(tmp_path / "none")
    (tmp_path / "amx").write_text("flags : amx_tile amx_bf16\n")
    assert native_bf16_cpu(tmp_path / "amx")


@pytest.mark.parametrize(("native", "asked", "chosen"), [(True, "auto", "bf16-mixed"), (False, "auto", "32-true")])
def test_auto_precision_follows_the_cpu_and_precision_overrides(
    native: bool, asked: str, chosen: str, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fit, "native_bf16_cpu", lambda: native)
    cfg = _cfg(store, tmp_path, "p", precision=asked)
    assert choose_precision(cfg, cuda=False) == chosen
    assert choose_precision(cfg.replace(precision="32"), cuda=False) == "32"
    assert choose_precision(cfg.replace(precision="bf16-mixed"), cuda=False) == "bf16-mixed"
    for major, on_cuda in ((8, "bf16-mixed"), (7, "16-mixed")):  # bf16 units from Ampere (8.0) on, fp16 before
        monkeypatch.setattr(fit.torch.cuda, "get_device_capability", lambda *_, m=major: (m, 0))
        assert choose_precision(cfg, cuda=True) == on_cuda


@pytest.mark.slow
def test_run_says_its_precision_first_and_records_it(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fit, "native_bf16_cpu", lambda: True)
    lines: list[str] = []
    run = train(_cfg(store, tmp_path, "bf16", max_epochs=1), printer=lines.append).run_dir
    assert "precision bf16-mixed (auto: CPU with native bf16)" in lines[0] and "channels-last" in lines[0]
    training = read_bundle(run).training
    assert training["precision"] == "bf16-mixed" and training["channels_last"] is True
    lines.clear()
    run = train(_cfg(store, tmp_path, "fp32", max_epochs=1, precision="32", channels_last=False), lines.append).run_dir
    assert "precision 32-true (--train-precision)" in lines[0] and "contiguous" in lines[0]
    assert read_bundle(run).training["precision"] == "32-true" and read_bundle(run).training["channels_last"] is False


def test_training_inputs_are_channels_last(store: Path, tmp_path: Path) -> None:
    seen: list[bool] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            x = module._inputs(batch[0], train=True)
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())

    train(_cfg(store, tmp_path, "cl", max_epochs=1, limit_train_batches=2), lambda _: None, [Spy()])
    assert seen and all(seen)


# ---- the schedule plan -------------------------------------------------------------------------
def _old_cosine(step: int, warmup: int, total: int, floor: float = 0.01) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_plan_without_budget_is_the_fixed_warmup_cosine() -> None:
    plan = SchedulePlan(max_epochs=5, warmup_epochs=1)
    plan.steps_per_epoch = 10
    plan.replan(0, 0, None)
    got = [plan.factor(s) for s in range(50)]
    np.testing.assert_allclose(got, [_old_cosine(s, 10, 50) for s in range(50)], atol=1e-9)


def test_plan_shrinks_to_the_time_left_and_ends_at_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(schedule, "time", SimpleNamespace(monotonic=lambda: now[0]))
    plan = SchedulePlan(max_epochs=50, warmup_epochs=1, budget_s=100.0)
    plan.steps_per_epoch = 10
    plan.on_fit_start(None, None)  # type: ignore[arg-type]
    plan.replan(0, 0, None)
    assert plan.planned_epochs == 50
    now[0] = 20.0  # the first epoch took 20 s: 80 s left, 4 more epochs fit
    plan.replan(10, 1, 20.0)
    assert plan.planned_epochs == 5 and plan.factor(10) == pytest.approx(1.0)
    assert plan.factor(49) == pytest.approx(0.01, abs=2e-3) and plan.factor(50) == pytest.approx(0.01)
    before = plan.factor(30)
    now[0] = 70.0  # the machine slowed: epochs 1-2 took 25 s each, 30 s left -> one more epoch, still to the floor
    plan.replan(30, 3, 25.0)
    assert plan.planned_epochs == 4 and plan.factor(30) == pytest.approx(before)  # continuous at the boundary
    assert plan.factor(39) == pytest.approx(0.01, abs=0.02) and plan.factor(40) == pytest.approx(0.01)
    factors = [plan.factor(s) for s in range(10, 41)]
    assert all(a >= b for a, b in itertools.pairwise(factors))  # never rises again after warmup
    restored = SchedulePlan(max_epochs=50, warmup_epochs=1, budget_s=100.0)
    restored.load_state_dict(plan.state_dict())
    assert [restored.factor(s) for s in range(30, 41)] == [plan.factor(s) for s in range(30, 41)]
    assert restored.elapsed_s == pytest.approx(70.0)


def test_one_slow_epoch_does_not_move_the_plan_but_a_lasting_slowdown_does(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(schedule, "time", SimpleNamespace(monotonic=lambda: now[0]))
    plan = SchedulePlan(max_epochs=100, warmup_epochs=1, budget_s=2000.0)
    plan.steps_per_epoch = 10
    plan.on_fit_start(None, None)  # type: ignore[arg-type]
    plan.replan(0, 0, None)

    def epoch(i: int, seconds: float) -> int:
        plan._epoch_start = now[0]
        now[0] += seconds
        plan.on_train_epoch_end(
            SimpleNamespace(sanity_checking=False, current_epoch=i, global_step=10 * (i + 1), should_stop=False), None
        )  # type: ignore[arg-type]
        return plan.planned_epochs

    plans = [epoch(i, 10.0) for i in range(3)]
    assert plans == [100, 100, 100]  # 1970 s left at 10 s an epoch: the 100 allowed fit
    # one 60 s epoch (a neighbour's burst): the median pace is still 10 s (the last epoch's pace alone
    # would have planned 4 + 1910 // 60 = 35 epochs and spent the rest of the run at the floor)
    assert epoch(3, 60.0) == 100
    assert [epoch(i, 10.0) for i in range(4, 7)] == [100, 100, 100]
    slowed = [epoch(i, 40.0) for i in range(7, 10)]  # a lasting slowdown: the plan follows by its second epoch
    assert slowed[0] == 100 and slowed[1] == 9 + 1800 // 40 and slowed[2] == slowed[1]
    restored = SchedulePlan(max_epochs=100, warmup_epochs=1, budget_s=2000.0)
    restored.load_state_dict(plan.state_dict())
    assert restored.recent_s == [40.0, 40.0, 40.0] and restored.pace() == 40.0


class FakeClock(L.Callback):
    """Time that advances ten seconds per training step, so a time-budgeted run is deterministic."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> None:
        self.now, self.stop_after = 0.0, stop_after
        monkeypatch.setattr(schedule, "time", SimpleNamespace(monotonic=lambda: self.now))

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.now += 10.0

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        if self.stop_after is not None and trainer.current_epoch + 1 >= self.stop_after:
            trainer.should_stop = True  # an interrupted session (last.ckpt of this epoch is written)


def _rows(run: Path) -> list[dict[str, str]]:
    return RunFolder(run).read_metrics()


@pytest.mark.slow
def test_time_budget_finishes_the_schedule_logs_the_plan_and_resumes_it(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 160 training patches / 32 = 5 steps = 50 fake seconds per epoch; 230 s fit 4 epochs of the 20 allowed
    cfg = _cfg(store, tmp_path, "budget", max_epochs=20, max_time="230s", warmup_epochs=1, val=0.2, test=0.0)
    whole = train(cfg, lambda _: None, [FakeClock(monkeypatch)]).run_dir
    rows = _rows(whole)
    assert len(rows) == 4 and [r["planned_epochs"] for r in rows] == ["4", "4", "4", "4"]
    assert float(rows[-1]["lr"]) == pytest.approx(cfg.lr * schedule.FLOOR, rel=1e-3)  # annealed at the deadline
    assert 0 < float(rows[-1]["time_left_s"]) < 50
    ckpt = torch.load(whole / "last.ckpt", weights_only=False)
    plan_state = next(v for k, v in ckpt["callbacks"].items() if "SchedulePlan" in k)
    assert plan_state["planned_epochs"] == 4 and plan_state["budget_s"] == 230.0

    part = cfg.replace(name="parted")
    train(part, lambda _: None, [FakeClock(monkeypatch, stop_after=2)])
    assert len(_rows(tmp_path / "parted")) == 2
    train(part.replace(resume=True), lambda _: None, [FakeClock(monkeypatch)])
    resumed = _rows(tmp_path / "parted")
    assert [r["planned_epochs"] for r in resumed] == [r["planned_epochs"] for r in rows]
    np.testing.assert_allclose([float(r["lr"]) for r in resumed], [float(r["lr"]) for r in rows], rtol=1e-6)


# ---- the weight average -------------------------------------------------------------------------
@pytest.mark.slow
def test_ema_is_kept_in_last_ckpt_with_batchnorm_buffers(store: Path, tmp_path: Path) -> None:
    run = train(_cfg(store, tmp_path, "ema", max_epochs=2, ema_decay=0.9), lambda _: None).run_dir
    state = torch.load(run / "last.ckpt", weights_only=False)["state_dict"]
    assert int(state["ema.n_averaged"]) > 1
    assert any(k.startswith("ema.module.") and k.endswith("running_mean") for k in state)
    rows = _rows(run)
    assert all(r["val_auroc_ema"] for r in rows) and {r["best_weights"] for r in rows} <= {"model", "ema"}
    assert read_bundle(run).best_metric["weights"] in ("model", "ema")
    assert train(_cfg(store, tmp_path, "noema", max_epochs=1, ema_decay=None), lambda _: None).run_dir.is_dir()
    with pytest.raises(ConfigError, match="ema_decay"):
        _cfg(store, tmp_path, "bad", ema_decay=1.5)


def _summary_after(tmp_path: Path, val: float, val_ema: float) -> tuple[EpochSummary, Any]:
    model = create_model("simple_cnn", 2, input_size=32, batch_norm=True)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)  # the average differs from the model
    summary = EpochSummary(tmp_path, printer=lambda _: None)
    trainer = SimpleNamespace(
        sanity_checking=False,
        current_epoch=0,
        is_global_zero=True,
        callback_metrics={"val_auroc": torch.tensor(val), "val_auroc_ema": torch.tensor(val_ema)},
    )
    module = SimpleNamespace(model=model, ema=ema, plan=None)
    summary.on_train_epoch_end(trainer, module)  # type: ignore[arg-type]
    return summary, module


@pytest.mark.parametrize(("val", "val_ema", "chosen"), [(0.8, 0.9, "ema"), (0.9, 0.8, "model")])
def test_the_better_of_model_and_ema_becomes_the_best_weights(
    tmp_path: Path, val: float, val_ema: float, chosen: str
) -> None:
    summary, module = _summary_after(tmp_path, val, val_ema)
    assert summary.best_weights == chosen and summary.best == pytest.approx(max(val, val_ema))
    saved = read_weights(tmp_path / "best.safetensors")
    source = module.ema.module if chosen == "ema" else module.model
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(saved[name], tensor)
    assert RunFolder(tmp_path).read_metrics()[0]["best_weights"] == chosen


# ---- inference: precision and TTA defaults --------------------------------------------------------
def test_predictor_precision_auto_follows_the_cpu_and_model_json(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = np.random.default_rng(0).integers(0, 255, (6, 96, 96, 3), dtype=np.uint8)
    monkeypatch.setattr(backends, "native_bf16_cpu", lambda: True)
    bf16 = Predictor(tiny_run, backend="torch")
    assert bf16.backend.precision == "bf16"  # type: ignore[attr-defined]
    fp32 = Predictor(tiny_run, backend="torch", precision="fp32")
    np.testing.assert_allclose(
        bf16.predict_batch(images).probabilities, fp32.predict_batch(images).probabilities, atol=0.02
    )
    monkeypatch.setattr(backends, "native_bf16_cpu", lambda: False)
    assert Predictor(tiny_run, backend="torch").backend.precision == "fp32"  # type: ignore[attr-defined]
    pinned = tmp_path / "pinned"
    import shutil

    shutil.copytree(tiny_run, pinned)
    bundle = read_bundle(pinned)
    bundle.inference.precision = "bf16"
    bundle.save(pinned)
    assert Predictor(pinned, backend="torch").backend.precision == "bf16"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="precision"):
        Predictor(tiny_run, backend="torch", precision="int8")


@pytest.mark.slow
def test_tta_is_the_default_for_evaluation_and_submissions_of_binary_models(tiny_run: Path, tmp_path: Path) -> None:
    p = Predictor(tiny_run, backend="torch")
    assert default_tta(p.bundle) == list(range(8))
    assert submission_tta(p, None, "sample_submission.csv") == list(range(8))
    assert submission_tta(p, None, None) == [0] and submission_tta(p, False, "s.csv") == [0]  # no TTA
    with_tta = evaluate_run(tiny_run, out=tmp_path / "a", n_boot=10)
    without = evaluate_run(tiny_run, tta=False, out=tmp_path / "b", n_boot=10)
    import json

    assert json.loads((with_tta.out / "metrics.json").read_text())["tta"] is True
    assert json.loads((without.out / "metrics.json").read_text())["tta"] is False
    bundle = read_bundle(tiny_run)
    bundle.inference.tta = [0, 4]
    assert default_tta(bundle) == [0, 4]
