"""Training end to end on generated and real patches: run files, reproducibility, resume, DDP, errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from histoscan.bundle import load_model, read_bundle
from histoscan.cli import app
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.data.synthetic import write_synthetic
from histoscan.errors import ConfigError, DataError
from histoscan.inference.predictor import Predictor
from histoscan.models import create_model
from histoscan.training.config import TrainConfig, shipped_configs
from histoscan.training.fit import train
from tests.conftest import shared

RUN_FILES = {"config.yaml", "metrics.csv", "best.safetensors", "last.ckpt", "model.json", "split.csv", "tensorboard"}


def _quick(store: Path, out: Path, name: str, **kw: object) -> TrainConfig:
    base = dict(
        data=str(store),
        out=str(out),
        name=name,
        model="simple_cnn",
        model_args={"batch_norm": True},
        resize=48,
        batch_size=32,
        max_epochs=4,
        lr=3e-3,
        progress=False,
        early_stopping=None,
        threads=2,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _val_aurocs(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as fh:
        return [float(r["val_auroc"]) for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def train_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainsrc")
    write_synthetic(root / "src", "kaggle", 400, seed=11, noise=0.3, test=16)
    return ingest(root / "src", root / "store", workers=1).store


@pytest.fixture(scope="module")
def first_run(train_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(_quick(train_store, out, "first")).run_dir


@pytest.mark.slow
def test_run_folder_is_complete_and_model_beats_chance(first_run: Path, train_store: Path) -> None:
    assert {p.name for p in first_run.iterdir()} >= RUN_FILES
    assert len(_val_aurocs(first_run)) == 4
    _model, bundle = load_model(first_run)
    assert bundle.classes == ["normal", "tumor"] and bundle.preprocessing.input_size == 48
    with (first_run / "metrics.csv").open() as fh:  # the model's or its weight average's score, whichever was better
        scores = [max(float(r["val_auroc"]), float(r["val_auroc_ema"])) for r in csv.DictReader(fh)]
    assert bundle.best_metric["name"] == "val_auroc" and bundle.best_metric["value"] == max(scores)
    store = PatchStore(train_store)
    split = pd.read_csv(first_run / "split.csv", dtype=str)
    test = store.subset(np.flatnonzero(split["split"].to_numpy() == "test"))
    probs = Predictor(first_run, backend="torch").predict_store(test).probabilities[:, 1]
    assert probs.shape == (len(test),) and probs.min() >= 0 and probs.max() <= 1
    assert roc_auc_score(test.labels, probs) > 0.8


@pytest.mark.slow
def test_rerunning_the_saved_config_reproduces_the_run(first_run: Path, tmp_path: Path) -> None:
    cfg = TrainConfig.from_yaml(first_run / "config.yaml", {"out": str(tmp_path), "name": "again"})
    again = train(cfg).run_dir
    np.testing.assert_allclose(_val_aurocs(again), _val_aurocs(first_run), atol=1e-6)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(first_run: Path, tmp_path: Path) -> None:
    cfg = TrainConfig.from_yaml(first_run / "config.yaml", {"out": str(tmp_path), "name": "killed"})
    cfg.to_yaml(tmp_path / "killed.yaml")
    cmd = [sys.executable, "-m", "histoscan", "train", "--config", str(tmp_path / "killed.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (
            metrics.is_file()
            and len(metrics.read_text().splitlines()) >= 2
            and (tmp_path / "killed" / "last.ckpt").is_file()
        ):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_val_aurocs(tmp_path / "killed"))
    assert done_before < 4
    result = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = _val_aurocs(tmp_path / "killed")
    assert len(resumed) == 4
    np.testing.assert_allclose(resumed, _val_aurocs(first_run), atol=0.02)


@pytest.mark.slow
def test_cli_train_with_shipped_config_and_overrides(train_store: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            "cpu-default",
            "--data",
            str(train_store),
            "--out",
            str(tmp_path),
            "--name",
            "cli",
            "--max-epochs",
            "1",
            "--resize",
            "32",
            "--no-progress",
            "--class-weights",
            "[1.0, 1.5]",
            "--model-args",
            "{batch_norm: false}",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = TrainConfig.from_yaml(tmp_path / "cli" / "config.yaml")
    assert cfg.class_weights == [1.0, 1.5] and cfg.model_args == {"batch_norm": False} and cfg.max_epochs == 1
    assert "run folder" in res.output


def test_bad_training_inputs_are_clear_errors(train_store: Path, kaggle_dir: Path, tmp_path: Path) -> None:
    unlabelled = ingest(kaggle_dir / "test", tmp_path / "unlabelled").store
    with pytest.raises(DataError, match="no labels"):
        train(_quick(unlabelled, tmp_path, "u"))
    with pytest.raises(ConfigError, match="unknown model"):
        train(_quick(train_store, tmp_path, "bad", model="resnet"))
    assert not (tmp_path / "bad").exists()
    (tmp_path / "c.yaml").write_text("model: simple_cnn\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['learning_rate'\]"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(_quick(train_store, tmp_path, "never", resume=True))
    res = CliRunner().invoke(app, ["train", "--data", str(train_store), "--optimizer", "rmsprop"])
    assert res.exit_code == 2 and "rmsprop" in res.output
    assert all(name in res.output for name in ("adamw", "adam", "sgd"))  # the allowed values are listed


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optimizer": "rmsprop"}, "optimizer: 'rmsprop' is not one of adamw, adam, sgd"),
        ({"schedule": "step"}, "schedule: 'step' is not one of cosine, onecycle, plateau, constant"),
        ({"augment": "heavy"}, "augment: 'heavy' is not one of none, flips, light, strong"),
        ({"precision": "8"}, "precision: '8' is not one of auto, 32"),
        ({"accelerator": "tpu"}, "accelerator: 'tpu' is not one of auto, cpu"),
        ({"max_time": 1200}, "max_time: '1200' has no unit"),
        ({"max_time": "20 minutes"}, "max_time: '20 minutes' is not a duration"),
        ({"fold": 1}, "fold needs a folds file"),
        ({"augment": "stain-medium", "stain_augment_p": 0}, "stain_augment_p must be in (0, 1], got 0"),
        ({"stain_augment_p": 0.5}, "stain_augment_p applies to the stain-* presets only, not augment 'light'"),
        ({"stain_matrix_noise": 0.03}, "stain_matrix_noise must be at least 0 and applies to the stain-* presets"),
        ({"augment": "stain-light", "stain_matrix_noise": -1.0}, "(got -1.0 with augment 'stain-light')"),
        ({"stain_consistency": 10.0}, "stain_consistency must be at least 0 and applies to the stain-* presets"),
        ({"augment": "stain-light", "stain_consistency": -1.0}, "(got -1.0 with augment 'stain-light')"),
    ],
)
def test_config_rejects_bad_values_in_yaml_naming_the_allowed_ones(tmp_path: Path, values: dict, message: str) -> None:
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


def test_config_durations_take_units_and_yaml_numbers_for_precision(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("max_time: 1h30m\nprecision: 32\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert cfg.max_time_seconds == 5400.0 and cfg.precision == "32"
    assert TrainConfig(max_time="90s").max_time_seconds == 90.0
    assert TrainConfig(max_time="20m").max_time_seconds == 1200.0
    assert TrainConfig().max_time_seconds is None


def test_config_bare_number_on_the_command_line_asks_for_a_unit(train_store: Path) -> None:
    res = CliRunner().invoke(app, ["train", "--data", str(train_store), "--max-time", "1200"])
    assert res.exit_code == 2 and "has no unit" in res.output and "Traceback" not in res.output


def test_config_help_names_every_field_the_duration_unit_and_choices() -> None:
    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for field in dataclasses.fields(TrainConfig):  # by the flag it declares (precision: --train-precision)
        assert field.metadata.get("flags", "--" + field.name.replace("_", "-")).split("/")[0] in res.output
    assert "90s, 20m, 1h" in res.output and "adamw|adam|sgd" in res.output
    assert "seeds" not in res.output


@pytest.mark.slow
def test_existing_run_is_never_overwritten(first_run: Path, train_store: Path) -> None:
    with pytest.raises(ConfigError, match="exists"):
        train(_quick(train_store, first_run.parent, first_run.name))


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_parses_and_builds(name: str) -> None:
    cfg = TrainConfig.from_yaml(shipped_configs()[name])
    model = create_model(cfg.model, 2, input_size=cfg.resize or 96, **cfg.model_args)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(train_store: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "histoscan",
        "train",
        "--data",
        str(train_store),
        "--out",
        str(tmp_path),
        "--name",
        "ddp",
        "--model",
        "simple_cnn",
        "--resize",
        "32",
        "--max-epochs",
        "2",
        "--batch-size",
        "32",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--no-progress",
        "--threads",
        "1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    run = tmp_path / "ddp"
    assert {p.name for p in run.iterdir()} >= RUN_FILES
    assert len(_val_aurocs(run)) == 2
    load_model(run)


@pytest.mark.slow
def test_multiclass_on_real_lc25000(tmp_path: Path) -> None:
    store = ingest(shared("lc25000-lung"), tmp_path / "store").store
    result = train(_quick(store, tmp_path, "lung", resize=48, max_epochs=3, batch_size=32))
    bundle = read_bundle(result.run_dir)
    assert (
        bundle.task == "multiclass" and bundle.classes == ["lung_aca", "lung_n", "lung_scc"] and bundle.num_outputs == 3
    )
    assert result.best_val_auroc > 0.8  # macro one-vs-rest AUROC
    # and it evaluates as a multi-class model: per-class AUROC, 3x3 confusion matrix, figures
    from histoscan.evaluation.evaluate import evaluate_run

    ev = evaluate_run(result.run_dir, n_boot=50)
    m = ev.metrics
    assert m["task"] == "multiclass" and set(m["auroc_per_class"]) == set(bundle.classes)
    assert np.asarray(m["confusion_matrix"]).shape == (3, 3) and np.asarray(m["confusion_matrix"]).sum() == m["count"]
    assert m["auroc"] > 0.8 and "threshold" not in m
    assert {"confusion_matrix", "roc", "pr", "reliability", "probabilities"} <= set(
        json.loads((ev.out / "metrics.json").read_text())["figures"]
    )


@pytest.mark.slow
def test_grouped_split_on_real_idc(tmp_path: Path) -> None:
    store_path = ingest(shared("idc"), tmp_path / "store").store
    result = train(_quick(store_path, tmp_path, "idc", resize=None, max_epochs=1, limit_train_batches=10))
    split = pd.read_csv(result.run_dir / "split.csv", dtype=str)
    store = PatchStore(store_path)
    patients = {s: set(store.groups[(split["split"] == s).to_numpy()]) for s in ("train", "val", "test")}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]


def test_stain_augment_until_stops_re_staining_once_the_plan_passes_it() -> None:
    """``stain_augment_until``: the stain preset until that fraction of the plan, then its base alone, for good."""
    import torch

    from histoscan.preprocessing import Preprocessing
    from histoscan.stain.augment import build_augmentation
    from histoscan.training.module import PatchClassifier

    cfg = TrainConfig(augment="stain-medium", stain_augment_until=0.8)
    module = PatchClassifier(torch.nn.Identity(), cfg, Preprocessing(image_size=[32, 32]), 2)
    names = [type(op).__name__ for op in module.training_augment().ops]
    assert names[-2:] == ["HEDJitter", "StainMatrixJitter"]
    module.plan.progress = 0.8  # the cosine's progress at the current step (no trainer: global step 0)
    late = [type(op).__name__ for op in module.training_augment().ops]
    assert late == [type(op).__name__ for op in build_augmentation("light").ops]
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(module._preprocess(images, train=False), module.pre(images))  # evaluation: never augmented
    always = PatchClassifier(
        torch.nn.Identity(), TrainConfig(augment="stain-medium"), Preprocessing(image_size=[32, 32]), 2
    )
    always.plan.progress = 0.99
    assert always.training_augment() is always.augment
    for values, message in [
        ({"augment": "stain-medium", "stain_augment_until": 0}, "stain_augment_until must be in (0, 1], got 0"),
        ({"stain_augment_until": 0.5}, "stain_augment_until applies to the stain-* presets only"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainConfig(**values)


def test_stain_consistency_trains_on_a_base_view_and_its_re_stained_copy() -> None:
    """``stain_consistency``: each patch twice (base augmentation, then re-stained on top); the loss is the
    classification loss of the base views plus the weight times the two views' Jensen-Shannon divergence."""
    import torch
    import torch.nn.functional as F

    from histoscan.preprocessing import Preprocessing
    from histoscan.training.module import PatchClassifier

    pre = Preprocessing(image_size=[32, 32])
    cfg = TrainConfig(augment="stain-medium", stain_consistency=5.0, stain_augment_until=0.8)
    module = PatchClassifier(torch.nn.Identity(), cfg, pre, 2)
    images = torch.randint(30, 230, (6, 32, 32, 3), dtype=torch.uint8)
    x = module._preprocess(images, train=True)
    assert x.shape[0] == 12
    gen = torch.Generator().manual_seed(int(cfg.seed * 1_000_003))  # the step's generator (no trainer: step 0)
    base = module.augment_late(pre.to_float(images), gen)
    assert torch.allclose(x[:6], pre.finish(base))
    assert torch.allclose(x[6:], pre.finish(module.restain(base, gen)))
    assert not torch.allclose(x[:6], x[6:])  # the copies were re-stained

    # the divergence: zero for equal predictions, log 2 for opposite certain ones, symmetric
    a, b = torch.tensor([[2.0], [-1.0]]), torch.tensor([[-3.0], [0.5]])
    assert module.consistency(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert module.consistency(torch.tensor([[30.0]]), torch.tensor([[-30.0]])).item() == pytest.approx(0.6931, abs=1e-3)
    assert module.consistency(a, b).item() == pytest.approx(module.consistency(b, a).item())
    y = torch.tensor([1, 0])

    class Fixed(torch.nn.Module):  # logits for the two views, whatever the input
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.cat([a, b]).requires_grad_()

    module.model = Fixed()
    module._inputs = lambda images, train, groups=None: torch.zeros(4)  # type: ignore[method-assign]
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    loss = module.training_step((torch.zeros(2, 32, 32, 3, dtype=torch.uint8), y), 0)
    expected = F.binary_cross_entropy_with_logits(a.squeeze(1), y.float()) + 5.0 * module.consistency(a, b)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # saturated, opposite views (a sigmoid of +-40 is 0 or 1 in float32): a finite divergence and gradient
    sure = torch.tensor([[40.0], [-40.0]], requires_grad=True)
    jsd = module.consistency(sure, -sure)
    jsd.backward()
    assert jsd.item() == pytest.approx(0.6931, abs=1e-3) and torch.isfinite(sure.grad).all()

    module.plan.progress = 0.8  # past stain_augment_until: one view, the base alone
    assert not module.consistency_active() and module._preprocess(images, train=True).shape[0] == 6
    assert module._preprocess(images, train=False).shape[0] == 6  # evaluation: one view, never augmented


@pytest.mark.slow
def test_a_run_whose_loss_stops_being_a_number_stops_and_keeps_its_best_weights(
    train_store: Path, tmp_path: Path
) -> None:
    """NaN weights from epoch 2 on: the run stops after that epoch, says why, and keeps epoch 0-1's best."""
    import lightning as L
    import torch

    class Poison(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 2:
                with torch.no_grad():
                    next(pl_module.model.parameters()).fill_(float("nan"))

    lines: list[str] = []
    result = train(_quick(train_store, tmp_path, "nan", max_epochs=6), printer=lines.append, callbacks=[Poison()])
    assert len(_val_aurocs(result.run_dir)) == 3  # epochs 0, 1 and the poisoned 2; not 6
    bundle = read_bundle(result.run_dir)
    assert "the training loss became nan in epoch 2" in bundle.training["stopped"]
    assert bundle.best_metric["epoch"] in (0, 1) and result.best_epoch in (0, 1)
    assert any("training stopped there and the best weights so far" in line for line in lines)
    model, _ = load_model(result.run_dir)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
