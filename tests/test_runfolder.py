"""The run folder: model.json's schema, upgrades of old files, and files that lie (each one line, exit 2)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histoscan.bundle import ModelBundle, load_model, read_bundle, save_weights
from histoscan.cli import app
from histoscan.errors import ConfigError
from histoscan.inference.predictor import Predictor
from histoscan.models import create_model
from histoscan.preprocessing import Preprocessing
from histoscan.runfolder import (
    METRIC_COLUMNS,
    SCHEMA_VERSION,
    EnsembleDocument,
    PreprocessingSpec,
    RunFolder,
    parse_document,
    parse_model,
)

FIXTURE = Path(__file__).parent / "fixtures" / "model-v1.json"  # written by histoscan 0.1.0 before the schema


def _v1() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def _tiny_run(root: Path, classes: tuple[str, ...] = ("normal", "tumor"), seed: int = 0) -> Path:
    """A run folder with an untrained simple_cnn at 32 px (no training: the files are what matter here)."""
    import torch

    torch.manual_seed(seed)
    root.mkdir(parents=True)
    bundle = ModelBundle(
        architecture="simple_cnn",
        classes=list(classes),
        preprocessing=Preprocessing(image_size=[32, 32], mean=[0.7, 0.5, 0.7], std=[0.2, 0.2, 0.2]),
        model_args={"batch_norm": True},
    )
    bundle.save(root)
    save_weights(create_model("simple_cnn", len(classes), input_size=32, batch_norm=True), RunFolder(root).weights_path)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A binary run with model.onnx (exported and parity-checked on synthetic patches)."""
    from histoscan.inference.export import export_onnx

    run = _tiny_run(tmp_path_factory.mktemp("exported") / "run")
    export_onnx(run, check=8)
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@dataclasses.dataclass
class Whole:
    """An edit that replaces the whole document."""

    value: object


def _edit(run: Path, change: Callable[[dict[str, Any]], object]) -> Path:
    path = RunFolder(run).model_json
    doc = json.loads(path.read_text())
    replaced = change(doc)
    path.write_text(json.dumps(replaced.value if isinstance(replaced, Whole) else doc))
    return path


def _one_line_naming(exc: pytest.ExceptionInfo[ConfigError], path: Path, field: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and field in msg, msg


# ---- schema, versions, upgrades ----------------------------------------------------------------
def test_todays_model_json_keeps_loading(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURE, run / "model.json")
    b = read_bundle(run)
    assert b.architecture == "simple_cnn" and b.classes == ["normal", "tumor"] and b.task == "binary"
    assert b.preprocessing.input_size == 48 and (b.preprocessing.crop, b.preprocessing.resize) == (64, 48)
    assert b.preprocessing.fit == "pad-edges"  # version-1 stores were white-padded by ingest
    assert (b.preprocessing.mpp, b.preprocessing.label_size, b.preprocessing.stain) == (None, None, None)
    assert b.temperature == 1.0 and b.threshold == 0.5 and b.model_args == {"batch_norm": True}
    assert b.training_store == Path("/data/stores/kaggle-train") and b.split["sizes"]["train"] == 84
    # with weights of that architecture it loads and predicts
    save_weights(create_model("simple_cnn", 2, input_size=48, batch_norm=True), run / "best.safetensors")
    load_model(run)
    p = Predictor(run, backend="torch").predict_batch(np.full((2, 96, 96, 3), 200, np.uint8))
    assert p.probabilities.shape == (2, 2) and np.allclose(p.probabilities.sum(1), 1)


def test_a_version_1_multiclass_file_keeps_its_classes_and_width() -> None:
    old = _v1()
    old.update(classes=["lung_aca", "lung_n", "lung_scc"], task="multiclass", num_outputs=3)
    b = ModelBundle.from_dict(old)
    assert b.task == "multiclass" and b.num_outputs == 3 and b.classes == ["lung_aca", "lung_n", "lung_scc"]
    assert "num_outputs" not in b.to_dict() and b.to_dict()["schema_version"] == SCHEMA_VERSION


def test_saving_upgrades_to_the_current_schema_without_derived_copies(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURE, run / "model.json")
    read_bundle(run).save(run)
    doc = json.loads((run / "model.json").read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["kind"] == "model"
    assert "task" not in doc and "num_outputs" not in doc and "input_size" not in doc["preprocessing"]
    assert doc["preprocessing"]["fit"] == "pad-edges" and doc["calibration"] == {"temperature": 1.0}
    assert {k: doc[k] for k in ("inference", "trust")} == {
        "inference": {"precision": None, "tta": None, "backend_speed": None},
        "trust": {"referral": None, "tissue_check": None, "ood": None},
    }
    again = read_bundle(run)
    assert again == read_bundle(run) and again.to_dict() == doc
    assert not [p for p in run.iterdir() if p.name != "model.json"]  # the atomic write left no temporary file


def test_preprocessing_schema_covers_every_preprocessing_field() -> None:
    assert set(PreprocessingSpec.model_fields) == {f.name for f in dataclasses.fields(Preprocessing)}


def test_new_fields_are_validated_too() -> None:
    base = ModelBundle.from_dict(_v1()).to_dict()
    good = json.loads(json.dumps(base))
    stain = {
        "method": "macenko",
        "stain_matrix": [[0.65, 0.7, 0.29], [0.07, 0.99, 0.11]],
        "max_concentrations": [2, 1.5],
    }
    good["preprocessing"].update(mpp=0.5, label_size=32, stain=stain, fit="resize")
    good["inference"] = {"precision": "bf16", "tta": [0, 5]}
    referral = {
        "by": "probability",
        "band": [0.3, 0.7],
        "tta": [0, 1],
        "asked": "coverage",
        "target": 0.9,
        "count": 100,
        "coverage": 0.9,
        "accuracy": 0.95,
    }
    tissue = {
        "features": ["a", "b"],
        "mean": [0.0, 1.0],
        "covariance": [[1.0, 0.0], [0.0, 1.0]],
        "threshold": 4.0,
        "quantile": 0.999,
        "margin": 1.5,
        "count": 50,
    }
    good["trust"] = {"referral": referral, "tissue_check": tissue}
    b = ModelBundle.from_dict(good)
    assert b.preprocessing.mpp == 0.5 and b.preprocessing.label_size == 32 and b.inference.tta == [0, 5]
    assert ModelBundle.from_dict(b.to_dict()) == b
    for field, value, where in [
        ("preprocessing", {**good["preprocessing"], "label_size": 200}, "preprocessing"),
        ("preprocessing", {**good["preprocessing"], "mpp": -1}, "preprocessing.mpp"),
        ("preprocessing", {**good["preprocessing"], "fit": "stretch"}, "preprocessing.fit"),
        ("preprocessing", {**good["preprocessing"], "stain": {"method": "macenko"}}, "preprocessing.stain"),
        (
            "preprocessing",
            {**good["preprocessing"], "stain": {**stain, "method": "vahadane"}},
            "preprocessing.stain.method",
        ),
        ("inference", {"precision": "int3"}, "inference.precision"),
        ("inference", {"tta": [9]}, "inference.tta[0]"),
        ("trust", {"referral": {**referral, "band": [0.8, 0.2]}}, "trust.referral"),
        ("trust", {"referral": {**referral, "by": "uncertainty"}}, "trust.referral"),
        ("trust", {"tissue_check": {**tissue, "mean": [0.0]}}, "trust.tissue_check"),
        ("trust", {"referral_band": [0.3, 0.7]}, "trust.referral_band"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(f"m.json: {where}")):
            parse_model({**good, field: value}, "m.json")


def test_a_newer_schema_is_refused_with_its_version() -> None:
    newer = SCHEMA_VERSION + 1
    with pytest.raises(ConfigError, match=rf"m\.json: schema_version {newer} was written by a newer histoscan"):
        parse_document({**_v1(), "schema_version": newer}, "m.json")
    with pytest.raises(ConfigError, match=r"m\.json: schema_version: not a positive whole number"):
        parse_document({**_v1(), "schema_version": "2"}, "m.json")


def test_ensemble_is_a_schema_alternative_but_not_a_single_model(tmp_path: Path) -> None:
    doc = {
        "format": "histoscan-model",
        "schema_version": 2,
        "kind": "ensemble",
        "members": [{"run": "fold0"}, {"run": "fold1", "weight": 2.0}],
        "classes": ["normal", "tumor"],
    }
    parsed = parse_document(doc, "e.json")
    assert isinstance(parsed, EnsembleDocument) and [m.weight for m in parsed.members] == [1.0, 2.0]
    run = tmp_path / "ens"
    run.mkdir()
    RunFolder(run).write_model_json(doc)
    with pytest.raises(ConfigError, match=r"model\.json: kind: an ensemble of 2 runs, but a single model is needed"):
        RunFolder(run).read_model_json()
    with pytest.raises(ConfigError, match=r"member .*fold0 is not a histoscan run"):
        read_bundle(run)
    with pytest.raises(ConfigError, match=r"e\.json: members\[0\]\.weight"):
        parse_document({**doc, "members": [{"run": "a", "weight": 0}, {"run": "b"}]}, "e.json")
    with pytest.raises(ConfigError, match=r"e\.json: members: "):
        parse_document({**doc, "members": [{"run": "a"}]}, "e.json")
    with pytest.raises(ConfigError, match=r'e\.json: kind: must be "model" or "ensemble"'):
        parse_document({**doc, "kind": "committee"}, "e.json")


def test_an_invalid_document_is_never_written(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path / "run")
    before = RunFolder(run).model_json.read_text()
    bundle = read_bundle(run)
    bundle.temperature = float("nan")
    with pytest.raises(ConfigError, match=r"model\.json: calibration\.temperature"):
        bundle.save(run)
    assert RunFolder(run).model_json.read_text() == before


# ---- files that lie: model.json ------------------------------------------------------------------
LIES: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("classes as a string", lambda d: d.update(classes="normal"), "classes"),
    ("one class", lambda d: d.update(classes=["normal"]), "classes"),
    ("repeated classes", lambda d: d.update(classes=["a", "a"]), "classes"),
    ("temperature 0", lambda d: d["calibration"].update(temperature=0), "calibration.temperature"),
    ("negative temperature", lambda d: d["calibration"].update(temperature=-1.0), "calibration.temperature"),
    ("NaN temperature", lambda d: d["calibration"].update(temperature=math.nan), "calibration.temperature"),
    ("infinite temperature", lambda d: d["calibration"].update(temperature=math.inf), "calibration.temperature"),
    ("no mean", lambda d: d["preprocessing"].pop("mean"), "preprocessing.mean"),
    ("no std", lambda d: d["preprocessing"].pop("std"), "preprocessing.std"),
    ("mean of 2", lambda d: d["preprocessing"].update(mean=[0.5, 0.5]), "preprocessing.mean"),
    ("std of 4", lambda d: d["preprocessing"].update(std=[0.2] * 4), "preprocessing.std"),
    ("std 0", lambda d: d["preprocessing"].update(std=[0.2, 0.0, 0.2]), "preprocessing.std[1]"),
    ("negative std", lambda d: d["preprocessing"].update(std=[-0.2, 0.2, 0.2]), "preprocessing.std[0]"),
    ("threshold above 1", lambda d: d.update(threshold=1.5), "threshold"),
    ("negative threshold", lambda d: d.update(threshold=-0.1), "threshold"),
    ("threshold as text", lambda d: d.update(threshold="0.5"), "threshold"),
    ("crop larger than the image", lambda d: d["preprocessing"].update(crop=200), "preprocessing"),
    ("a misspelt field", lambda d: d.update(temprature=2.0), "temprature"),
    ("a JSON list", lambda d: Whole([d]), "JSON list"),
    ("a JSON number", lambda d: Whole(3), "JSON int"),
    ("another format", lambda d: d.update(format="keras"), "not a histoscan model file"),
]


@pytest.mark.parametrize("change,field", [lie[1:] for lie in LIES], ids=[lie[0] for lie in LIES])
def test_model_json_that_lies_is_one_line_naming_file_and_field(
    change: Callable[[dict[str, Any]], object], field: str, tmp_path: Path
) -> None:
    for version in (1, 2):  # today's files and the current schema alike
        run = tmp_path / f"v{version}"
        run.mkdir()
        shutil.copy(FIXTURE, run / "model.json")
        if version == 2:
            read_bundle(run).save(run)
        path = _edit(run, change)
        with pytest.raises(ConfigError) as exc:
            read_bundle(run)
        _one_line_naming(exc, path, field)


def test_predict_and_serve_exit_2_with_the_line(
    exported: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    def no_server(*_: Any, **__: Any) -> None:
        raise AssertionError("the server must not start for a run that lies")

    monkeypatch.setattr(uvicorn, "run", no_server)
    run = _copy(exported, tmp_path)
    path = _edit(run, lambda d: d.update(classes="normal"))
    for args in (["predict", str(run), str(images), "--out", str(tmp_path / "p.csv")], ["serve", str(run)]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        assert f"{path}: classes: Input should be a valid list" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) <= 2  # one line, perhaps wrapped once by the terminal width


# ---- files that lie: the model's own files ----------------------------------------------------------
def _three_classes(d: dict[str, Any]) -> None:
    d["classes"] = ["a", "b", "c"]


MODEL_LIES: list[tuple[str, str, Callable[[Path], Path], str]] = [
    ("3 classes over binary weights", "torch", lambda r: _edit(r, _three_classes) and r / "best.safetensors", "the weights give 1 output(s), but the 3 classes"),
    ("3 classes over a binary graph", "onnx", lambda r: _edit(r, _three_classes) and r / "model.onnx", "the graph gives 1 output(s), but the 3 classes"),
    ("truncated weights", "torch", lambda r: _truncate(r / "best.safetensors"), "not a readable safetensors file"),
    ("garbage weights", "torch", lambda r: _garbage(r / "best.safetensors"), "not a readable safetensors file"),
    ("garbage graph", "onnx", lambda r: _garbage(r / "model.onnx"), "not a readable ONNX model"),
    ("empty graph", "onnx", lambda r: _empty(r / "model.onnx"), "not a readable ONNX model"),
    ("unknown model argument", "torch", lambda r: _edit(r, lambda d: d["model_args"].update(depth=3)), "model_args"),
    ("model argument of the wrong type", "torch", lambda r: _edit(r, lambda d: d["model_args"].update(batch_norm="yes")), "batch_norm"),
    ("unknown architecture", "torch", lambda r: _edit(r, lambda d: d.update(architecture="resnet9000")), "resnet9000"),
]  # fmt: skip


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x89garbage, not a model " * 50)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("backend,lie,expected", [m[1:] for m in MODEL_LIES], ids=[m[0] for m in MODEL_LIES])
def test_model_files_that_lie_are_one_line_at_load_time(
    backend: str,
    lie: Callable[[Path], Path],
    expected: str,
    exported: Path,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    def no_server(*_: Any, **__: Any) -> None:
        raise AssertionError("the server must not start for a run that lies")

    monkeypatch.setattr(uvicorn, "run", no_server)
    run = _copy(exported, tmp_path)
    path = lie(run)
    with pytest.raises(ConfigError) as exc:
        Predictor(run, backend=backend)
    _one_line_naming(exc, path, expected)
    for command in (
        ["predict", str(run), str(images), "--backend", backend, "--out", str(tmp_path / "p.csv")],
        ["serve", str(run), "--backend", backend],
    ):
        res = CliRunner().invoke(app, command)
        assert res.exit_code == 2 and expected in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "p.csv").exists()


def test_the_honest_run_predicts_with_both_backends(exported: Path, images: Path, tmp_path: Path) -> None:
    for backend in ("torch", "onnx"):
        res = CliRunner().invoke(app, ["predict", str(exported), str(images), "--backend", backend, "--precision", "fp32", "--out", str(tmp_path / f"{backend}.csv")])  # fmt: skip
        assert res.exit_code == 0, res.output
    a, b = (np.loadtxt(tmp_path / f"{k}.csv", delimiter=",", skiprows=1, usecols=(1, 2)) for k in ("torch", "onnx"))
    assert np.abs(a - b).max() < 1e-4


def test_a_multiclass_model_json_over_multiclass_weights_loads(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path / "mc", classes=("aca", "n", "scc"))
    model, bundle = load_model(run)
    assert bundle.num_outputs == 3 and model.get_classifier().out_features == 3
    _edit(run, lambda d: d.update(classes=["aca", "n", "scc", "extra"]))
    with pytest.raises(ConfigError, match=r"best\.safetensors: the weights give 3 output\(s\), but the 4 classes"):
        load_model(run)
    _edit(run, lambda d: d.update(classes=["aca", "n"]))
    with pytest.raises(ConfigError, match=r"the weights give 3 output\(s\), but the 2 classes .* need 1"):
        load_model(run)


# ---- the rest of the folder ----------------------------------------------------------------------
def test_metrics_rows_are_replaced_from_a_resumed_epoch_on(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    assert run.read_metrics() == []
    for epoch in (0, 1, 2):
        run.append_metrics({"epoch": epoch, "val_auroc": 0.5 + epoch / 10})
    run.append_metrics({"epoch": 1, "val_auroc": 0.9})  # a resume redoes epoch 1: epoch 2 goes too
    rows = run.read_metrics()
    assert [(r["epoch"], r["val_auroc"]) for r in rows] == [("0", "0.5"), ("1", "0.9")]
    assert list(rows[0]) == METRIC_COLUMNS
    with pytest.raises(ValueError, match="val_aucroc"):
        run.append_metrics({"epoch": 3, "val_aucroc": 1.0})


def test_evaluation_folders_are_named_by_store_split_and_tta(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(FIXTURE, run_dir / "model.json")
    run = RunFolder(run_dir)
    assert run.eval_dir() == run_dir / "eval"
    assert run.eval_dir("/data/stores/kaggle-train", "test") == run_dir / "eval"
    assert run.eval_dir("/data/stores/kaggle-train", "val") == run_dir / "eval-kaggle-train-val"
    assert run.eval_dir(tmp_path / "pcam", "test", tta=True) == run_dir / "eval-pcam-test-tta"
    assert run.data_store(None) == Path("/data/stores/kaggle-train") and run.data_store("x") == Path("x")
