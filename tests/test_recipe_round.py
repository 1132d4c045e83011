"""benchmarks/recipe_hcd.py's rules (PROTOCOL.md): the paired comparison on validation rows, the decision words,
candidate definitions fixed once, and the test split scored once per round."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("recipe_hcd", ROOT / "benchmarks" / "recipe_hcd.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(labels: np.ndarray, p1: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    return {
        "val_labels": labels.tolist(),
        "val_p1_tta8": p1.tolist(),
        "val_auroc_tta8": float(roc_auc_score(labels, p1)),
        "val_ids_sha256": "same",
    }


def test_a_clearly_better_candidate_shows_a_gain_and_a_copy_does_not(recipe: Any) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    base, better = {}, {}
    for s in range(3):
        noise = rng.normal(0, 1, 400)
        base[s] = _record(labels, labels + 1.5 * noise)
        better[s] = _record(labels, labels + 0.6 * noise)
    gain = recipe.compare(better, base, n_boot=300)
    assert gain["seeds"] == [0, 1, 2] and gain["mean_delta"] > 0 and gain["bootstrap_interval"][0] > 0
    assert gain["t_interval"][0] < gain["mean_delta"] < gain["t_interval"][1]
    assert recipe.decide("better", gain, busy=False, mixed=False) == "gain shown"
    same = recipe.compare(base, base, n_boot=300)
    assert same["mean_delta"] == 0 and same["bootstrap_interval"] == [0.0, 0.0]
    assert recipe.decide("copy", same, busy=False, mixed=False) == "stopped: interval overlaps zero"
    one = recipe.compare({0: better[0]}, base, n_boot=100)  # the screen: one seed
    assert one["seeds"] == [0] and "t_interval" not in one
    assert recipe.decide("wd", one, busy=False, mixed=False) == "screen: advances (delta > 0)"
    assert recipe.decide("wd", one, False, False, best=["long", "wd"]) == "screen: advances (delta > 0)"
    assert recipe.decide("wd", one, False, False, best=["long"]) == "screen: stops (delta > 0, not in the best three)"
    assert recipe.decide("combo", one, busy=False, mixed=False) == "finals: 1 of 3 seeds"
    two = recipe.compare({s: better[s] for s in (0, 1)}, base, n_boot=100)
    assert recipe.decide("wd", two, busy=False, mixed=False) == "finals: 2 of 3 seeds"
    assert recipe.decide("better", gain, busy=True, mixed=False).startswith("busy")
    base[0] = {**base[0], "val_ids_sha256": "other"}
    with pytest.raises(SystemExit, match="validation rows differ"):
        recipe.compare(better, base, n_boot=10)


def test_a_defined_candidate_is_fixed_once(recipe: Any, tmp_path: Path) -> None:
    recipe.define(tmp_path, "combo", {"crop": 96, "weight_decay": 0.05})
    recipe.define(tmp_path, "combo", {"crop": 96, "weight_decay": 0.05})  # the same again: fine
    assert recipe.overrides_of(tmp_path, "combo") == {"crop": 96, "weight_decay": 0.05}
    with pytest.raises(SystemExit, match="already defined with other overrides"):
        recipe.define(tmp_path, "combo", {"crop": 96})
    with pytest.raises(SystemExit, match="one of PROTOCOL's candidates"):
        recipe.define(tmp_path, "wd", {"weight_decay": 0.1})
    with pytest.raises(SystemExit, match="unknown candidate"):
        recipe.overrides_of(tmp_path, "nope")


def test_every_candidate_builds_a_valid_config(recipe: Any, tmp_path: Path) -> None:
    man = {"store": "S", "split_file": "S/splits/x.csv"}
    for name in [*recipe.CANDIDATES, "baseline-ctl"]:
        cfg = recipe.config_for(name, 1, tmp_path, man, 20.0, {})
        assert cfg.seed == 1 and cfg.max_time == "20m" and cfg.split_file == "S/splits/x.csv"
    assert recipe.config_for("wider", 0, tmp_path, man, 20.0, {}).model_args["filter_mult"] == 3
    assert recipe.config_for("randcrop", 0, tmp_path, man, 20.0, {}).random_crop


def test_the_test_split_is_scored_once_per_round(recipe: Any, tmp_path: Path) -> None:
    (tmp_path / "final.started").write_text("baseline 2026-12-07T18:00:00Z abc\n")
    with pytest.raises(SystemExit, match="already scored this round"):
        recipe.final(tmp_path, "baseline", {"store": "S"})
    (tmp_path / "final.started").unlink()
    (tmp_path / "candidates").mkdir()
    (tmp_path / "candidates" / "wd-s0.json").write_text(json.dumps({"candidate": "wd", "seed": 0}))
    with pytest.raises(SystemExit, match="1 seed"):
        recipe.final(tmp_path, "wd", {"store": "S"})
    assert not (tmp_path / "final.started").exists()  # refused before any test row was read


def test_the_vectorised_bootstrap_auroc_is_sklearns_on_each_resample(recipe: Any) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(labels + rng.normal(0, 1, 200), 1)  # rounded: many ties
    counts = rng.multinomial(200, np.full(200, 1 / 200), size=20)
    fast = recipe.weighted_auroc(scores, labels, counts)
    for row, value in zip(counts, fast):
        idx = np.repeat(np.arange(200), row)
        assert value == pytest.approx(roc_auc_score(labels[idx], scores[idx]), abs=1e-12)


def _finished_run(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "model.json").write_text(json.dumps({"training": {"epochs": 3}}))
    return run_dir


def test_final_refuses_lost_weights_before_reading_the_test_split(recipe: Any, tmp_path: Path) -> None:
    """A new machine keeps the records, not the run folders: --final names the seeds to retrain and reads nothing."""
    (tmp_path / "candidates").mkdir()
    for s in (0, 1, 2):
        rec = {"candidate": "wd", "seed": s, "run_dir": str(tmp_path / "runs" / f"wd-s{s}")}
        (tmp_path / "candidates" / f"wd-s{s}.json").write_text(json.dumps(rec))
    _finished_run(tmp_path / "runs" / "wd-s0")
    _finished_run(tmp_path / "runs" / "wd-s2-retrained")
    with pytest.raises(SystemExit, match=r"seed\(s\) \[1\] are gone.*--retrain wd --seeds 1"):
        recipe.final(tmp_path, "wd", {"store": "S"})
    assert not (tmp_path / "final.started").exists()


def test_weights_of_prefers_the_recorded_run_then_its_retraining(recipe: Any, tmp_path: Path) -> None:
    rec = {"run_dir": str(tmp_path / "runs" / "long-s1")}
    assert recipe.weights_of(tmp_path, "long", 1, rec) is None
    retrained = _finished_run(tmp_path / "runs" / "long-s1-retrained")
    assert recipe.weights_of(tmp_path, "long", 1, rec) == retrained
    recorded = _finished_run(tmp_path / "runs" / "long-s1")
    assert recipe.weights_of(tmp_path, "long", 1, rec) == recorded


def test_a_retraining_is_never_compared(recipe: Any, tmp_path: Path) -> None:
    """Records under candidates/retrained/ stand in for lost weights at --final; the decision reads only the originals."""
    (tmp_path / "candidates" / "retrained").mkdir(parents=True)
    (tmp_path / "candidates" / "wd-s0.json").write_text(json.dumps({"candidate": "wd", "seed": 0, "v": "original"}))
    retrained = {"candidate": "wd", "seed": 0, "v": "retrained"}
    (tmp_path / "candidates" / "retrained" / "wd-s0.json").write_text(json.dumps(retrained))
    assert recipe.records(tmp_path) == {"wd": {0: {"candidate": "wd", "seed": 0, "v": "original"}}}


def test_retrain_refuses_what_was_never_recorded_or_was_busy(recipe: Any, tmp_path: Path) -> None:
    (tmp_path / "candidates").mkdir()
    with pytest.raises(SystemExit, match="never recorded"):
        recipe.run_one("wd", 1, tmp_path, {}, 20.0, {}, False, retrain=True)
    busy = {"candidate": "wd", "seed": 1, "run_dir": str(tmp_path / "runs" / "wd-s1"), "busy": True}
    (tmp_path / "candidates" / "wd-s1.json").write_text(json.dumps(busy))
    with pytest.raises(SystemExit, match="not retrained"):
        recipe.run_one("wd", 1, tmp_path, {}, 20.0, {}, False, retrain=True)
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_the_screen_advances_its_three_best_with_a_gain(recipe: Any) -> None:
    """PROTOCOL section 4: rank by d_0; at most three with d_0 > 0 go on; stain-consist is not ranked."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    noise = rng.normal(0, 1, 300)
    by = {"baseline": {0: _record(labels, labels + 1.0 * noise)}}
    scales = {"long": 0.5, "deeper": 0.6, "crop96": 0.7, "wd": 0.8, "stain-consist": 0.1, "mixup": 2.0}
    for name, scale in scales.items():
        by[name] = {0: _record(labels, labels + scale * noise)}
    assert recipe.screen_best(by) == ["long", "deeper", "crop96"]
    del by["long"], by["deeper"], by["crop96"], by["wd"]
    assert recipe.screen_best(by) == []  # mixup is worse, stain-consist is not ranked


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_a_seed_is_compared_with_the_baseline_of_its_own_cpu(recipe: Any, tmp_path: Path) -> None:
    """PROTOCOL 2026-12-07 23:53: the compute match holds within one CPU model; baseline-ctl is a seed-0 baseline."""
    c = tmp_path / "candidates"
    _write(c / "baseline-s0.json", {"candidate": "baseline", "seed": 0, "cpu": "AMD", "v": "b0-amd"})
    _write(c / "baseline-s1.json", {"candidate": "baseline", "seed": 1, "cpu": "Intel", "v": "b1-intel"})
    _write(c / "baseline-ctl-s0.json", {"candidate": "baseline-ctl", "seed": 0, "cpu": "Intel", "v": "ctl"})
    _write(c / "controls" / "baseline-s1-amd.json", {"candidate": "baseline", "seed": 1, "cpu": "AMD", "v": "b1-amd"})
    _write(c / "controls" / "baseline-s2-amd.json", {"candidate": "baseline", "seed": 2, "cpu": "AMD", "busy": True})
    ctl = recipe.controls(tmp_path)
    assert {k: v["v"] for k, v in ctl.items()} == {
        (0, "AMD"): "b0-amd",
        (1, "Intel"): "b1-intel",
        (0, "Intel"): "ctl",
        (1, "AMD"): "b1-amd",
    }  # a busy control is no control
    cand = {0: {"seed": 0, "cpu": "Intel"}, 1: {"seed": 1, "cpu": "AMD"}, 2: {"seed": 2, "cpu": "AMD"}}
    kept, base = recipe.paired(cand, ctl)
    assert sorted(kept) == [0, 1] and base[0]["v"] == "ctl" and base[1]["v"] == "b1-amd"
    with pytest.raises(SystemExit, match="names no CPU model"):
        recipe.paired({0: {"candidate": "wd", "seed": 0}}, ctl)


def test_a_missing_same_cpu_baseline_is_trained_first(recipe: Any, tmp_path: Path, monkeypatch: Any) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(recipe, "run_one", lambda *a, **k: calls.append((a[:2], k.get("path"), k.get("run_name"))))
    monkeypatch.setattr(recipe, "_cpu_model", lambda: "Intel(R) Xeon(R) Processor")
    recipe.ensure_control(1, tmp_path, {}, 20.0, False)  # no baseline seed 1 at all: the usual place
    assert calls == [(("baseline", 1), None, None)]
    _write(tmp_path / "candidates" / "baseline-s1.json", {"candidate": "baseline", "seed": 1, "cpu": "AMD EPYC"})
    calls.clear()
    recipe.ensure_control(1, tmp_path, {}, 20.0, False)  # one on another CPU: a control of this one beside it
    path = tmp_path / "candidates" / "controls" / "baseline-s1-intel-r-xeon-r-processor.json"
    assert calls == [(("baseline", 1), path, "baseline-s1-intel-r-xeon-r-processor")]
    _write(path, {"candidate": "baseline", "seed": 1, "cpu": "Intel(R) Xeon(R) Processor"})
    calls.clear()
    recipe.ensure_control(1, tmp_path, {}, 20.0, False)  # there now: nothing to train
    assert calls == []


def test_the_cpu_label_tells_amx_machines_from_others_with_the_same_model_name(recipe: Any) -> None:
    amx = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n"
    plain = amx.replace(" amx_bf16 amx_tile", "")
    assert recipe._cpu_model(amx) == "Intel(R) Xeon(R) Processor +AMX"
    assert recipe._cpu_model(plain) == "Intel(R) Xeon(R) Processor"
    assert recipe._cpu_model(plain + "processor\t: 1\n" + amx) == "Intel(R) Xeon(R) Processor"  # the first CPU's
    assert recipe.cpu_slug(recipe._cpu_model(amx)) == "intel-r-xeon-r-processor-amx"
