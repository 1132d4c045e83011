"""Stain normalisation, stain augmentation and the stain-shift suite, on generated and real patches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from histoscan.bundle import read_bundle
from histoscan.cli import app
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.data.synthetic import write_synthetic
from histoscan.errors import ConfigError, DataError
from histoscan.inference.predictor import Predictor
from histoscan.preprocessing import Preprocessing
from histoscan.runfolder import RunFolder
from histoscan.stain.augment import StainMatrixJitter
from histoscan.stain.colour import optical_density, rgb_to_lab
from histoscan.stain.estimate import macenko, sample_pixels
from histoscan.stain.normalise import StainNormaliser, StainTarget, fit_target
from histoscan.stain.shift import shift_suite
from histoscan.stain.sources import fit_reference
from histoscan.training.config import TrainConfig
from histoscan.training.fit import train
from tests.conftest import shared

HE_A = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
HE_B = np.array([[0.50, 0.80, 0.33], [0.20, 0.90, 0.39]])


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


def stained(n: int, he: np.ndarray, seed: int = 0, side: int = 64) -> np.ndarray:
    """H&E-like uint8 patches: smooth random H and E concentrations (nuclei, stroma, a little background) under ``he``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = np.empty((n, side, side, 3), np.uint8)
    for i in range(n):
        h = sum(
            rng.uniform(0.3, 1.2) * np.exp(-((yy - rng.uniform()) ** 2 + (xx - rng.uniform()) ** 2) / 0.01)
            for _ in range(6)
        )
        e = 1.2 + 0.8 * np.sin(6 * xx + rng.uniform(0, 6)) ** 2 + rng.uniform(0, 0.3, (side, side))
        e = e * np.exp(-3 * h)  # nuclei: mostly haematoxylin
        e[: side // 8] = 0.0  # a strip of background
        conc = np.stack([h, e], -1) + rng.normal(0, 0.02, (side, side, 2))
        od = conc.clip(0) @ _unit(he)
        out[i] = (256 * np.exp(-od) - 1).clip(0, 255).round().astype(np.uint8)
    return out


def hostile(side: int = 64) -> np.ndarray:
    """Blank white, black, single colour, near-white background, very dark, and a patch mostly covered in blue pen."""
    rng = np.random.default_rng(3)
    pen = stained(1, HE_A, seed=9, side=side)[0]
    pen[:, : side * 3 // 4] = np.array([40, 70, 190]) + rng.integers(-4, 5, (side, side * 3 // 4, 3))
    return np.stack(
        [
            np.full((side, side, 3), 255, np.uint8),
            np.zeros((side, side, 3), np.uint8),
            np.full((side, side, 3), (200, 90, 160), np.uint8),
            rng.integers(236, 256, (side, side, 3)).astype(np.uint8),
            rng.integers(0, 12, (side, side, 3)).astype(np.uint8),
            pen.astype(np.uint8),
        ]
    )


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((_unit(a) * _unit(b)).sum(), -1, 1))))


def test_macenko_recovers_the_stain_vectors_the_patches_were_made_with() -> None:
    est = macenko(optical_density(sample_pixels(torch.from_numpy(stained(6, HE_A)))))
    assert est.ok.all()
    for he in est.stain_matrix.numpy():
        assert _angle(he[0], HE_A[0]) < 6 and _angle(he[1], HE_A[1]) < 6


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalisation_brings_two_labs_to_one_look(method: str) -> None:
    a, b = stained(12, HE_A, seed=1), stained(12, HE_B, seed=1)  # same tissue, two stains
    target = fit_target(a, method)
    norm = StainNormaliser(target)
    na, nb = norm(torch.from_numpy(a)).numpy(), norm(torch.from_numpy(b)).numpy()
    tissue = (optical_density(torch.from_numpy(a)) > 0.15).all(-1).numpy()  # Reinhard moves background too
    before = np.abs(a.astype(float) - b)[tissue].mean()
    after = np.abs(na.astype(float) - nb)[tissue].mean()
    # Macenko undoes a change of stain vectors; Reinhard only matches L*a*b* mean and spread, so it helps less
    assert after < (before / 3 if method == "macenko" else 0.8 * before), (before, after)
    assert na.dtype == np.uint8 and norm.counts() == {"patches": 24, "passed_through": 0}


def test_reinhard_moves_the_lab_statistics_to_the_target() -> None:
    target = fit_target(stained(10, HE_A, seed=2), "reinhard")
    source = torch.from_numpy(stained(4, HE_B, seed=5))
    out = StainNormaliser(target)(source)

    def tissue_means(x: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(x.reshape(4, -1, 3).float())
        tissue = (optical_density(x.reshape(4, -1, 3)) > 0.15).all(-1)
        return torch.stack([lab[i][tissue[i]].mean(0) for i in range(4)])

    want = torch.tensor(target.lab_mean)
    before = (tissue_means(source) - want).norm(dim=1)
    after = (tissue_means(out) - want).norm(dim=1)  # not zero: saturated colours clip at the sRGB gamut
    assert (after < 0.5 * before).all(), (before, after)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_hostile_patches_pass_through_unchanged_and_are_counted(method: str) -> None:
    norm = StainNormaliser(fit_target(stained(10, HE_A), method))
    bad = hostile()
    out = norm(torch.from_numpy(bad)).numpy()
    assert out.dtype == np.uint8 and np.isfinite(out).all()
    for i in range(5):  # every one but the pen-marked patch has no usable stain: returned as it came
        assert (out[i] == bad[i]).all(), i
    assert norm.counts()["patches"] == 6 and norm.counts()["passed_through"] >= 5


def test_per_patch_normalisation_does_not_depend_on_the_rest_of_the_batch() -> None:
    norm = StainNormaliser(fit_target(stained(10, HE_A), "macenko"))
    batch = np.concatenate([stained(3, HE_B, seed=4), hostile()])
    together = norm(torch.from_numpy(batch)).numpy()
    alone = np.concatenate([norm(torch.from_numpy(batch[i : i + 1])).numpy() for i in range(len(batch))])
    assert (together == alone).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_normalisation_on_the_gpu_matches_the_cpu() -> None:
    norm = StainNormaliser(fit_target(stained(10, HE_A), "macenko"))
    x = torch.from_numpy(np.concatenate([stained(4, HE_B), hostile()]))
    diff = (norm(x.cuda()).cpu().int() - norm(x).int()).abs()
    assert diff.max() <= 2


def test_the_target_travels_in_model_json_and_is_checked(tiny_run: Path, tmp_path: Path) -> None:
    bundle = read_bundle(tiny_run)
    bundle.preprocessing.stain = fit_target(stained(10, HE_A), "macenko").to_dict()
    run = tmp_path / "run"
    run.mkdir()
    for f in tiny_run.iterdir():
        if f.is_file():
            (run / f.name).write_bytes(f.read_bytes())
    bundle.save(run)
    assert read_bundle(run).preprocessing.stain["method"] == "macenko"
    images = stained(5, HE_B, side=96)
    manual = Preprocessing(**dataclasses.asdict(read_bundle(run).preprocessing))
    want = Predictor(tiny_run).backend.logits(manual(images))
    got = Predictor(run).logits(images)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, Predictor(tiny_run).logits(images))
    doc = json.loads((run / "model.json").read_text())
    doc["preprocessing"]["stain"]["max_concentrations"] = [1.0]
    (run / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"model.json: preprocessing.stain.max_concentrations"):
        RunFolder(run).read_model_json()
    doc["preprocessing"]["stain"] = {"method": "macenko"}
    (run / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="needs stain_matrix"):
        RunFolder(run).read_model_json()


def test_bad_targets_and_donors_are_one_line_errors(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(12):
        Image.fromarray(np.full((48, 48, 3), 250, np.uint8)).save(blank / f"{i}.png")
    with pytest.raises(DataError, match=r"blank: only 0 of 12 patches hold enough tissue"):
        fit_reference(blank, "macenko")
    with pytest.raises(DataError, match=r"blank: only 0 of 12"):
        shift_suite([blank])
    with pytest.raises(ConfigError, match=r"blank: unknown stain normalisation method 'vahadane'"):
        fit_reference(blank, "vahadane")
    with pytest.raises(DataError, match="no such store, folder or image"):
        fit_reference(tmp_path / "missing", "macenko")
    with pytest.raises(ConfigError, match="stain_target needs stain_norm"):
        TrainConfig(data="x", stain_target="t.json")
    with pytest.raises(ConfigError, match="lacks stain_matrix"):
        StainTarget("macenko")


def test_stain_augmentation_is_deterministic_by_seed_and_keeps_background() -> None:
    x = torch.from_numpy(np.concatenate([stained(4, HE_A), hostile()])).permute(0, 3, 1, 2).float() / 255
    jitter = StainMatrixJitter(0.06, 0.2)
    a = jitter(x, torch.Generator().manual_seed(1))
    b = jitter(x, torch.Generator().manual_seed(1))
    c = jitter(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert (a[:4] - x[:4]).abs().mean() > 0.005  # tissue changes
    assert torch.allclose(a[4:9], x[4:9], atol=1 / 255 + 1e-6)  # no usable stain: unchanged (up to 8-bit rounding)
    # zero strength is the identity: the density outside the H&E plane is kept, not projected away
    same = StainMatrixJitter(0.0, 0.0)(x, torch.Generator().manual_seed(1))
    assert (same - x).abs().max() < 1e-3


def test_the_shift_suite_is_fixed_and_deterministic() -> None:
    batch = torch.from_numpy(stained(4, HE_A))
    suite = shift_suite()
    names = [s.name for s in suite]
    assert names == [
        "hed-0.05", "hed-0.1", "hed-0.2", "lab-a+8", "lab-b-8", "lab-L-10", "gamma-0.7", "gamma-1.4", "rotate-10", "rotate-20"
    ]  # fmt: skip
    for s in suite:
        once, again = s.apply(batch, 0), s.apply(batch, 0)
        assert once.dtype == torch.uint8 and torch.equal(once, again), s.name
        assert (once.int() - batch.int()).abs().float().mean() > 0.5, s.name
    for s in suite:
        s.apply(torch.from_numpy(hostile()), 0)  # never raises on hostile patches


@pytest.fixture(scope="module")
def stain_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stainsrc")
    write_synthetic(root / "src", "kaggle", 200, seed=21, noise=0.3, test=8)
    return ingest(root / "src", root / "store", workers=1).store


@pytest.mark.slow
def test_train_with_macenko_and_stain_augmentation_then_evaluate_under_shifts(
    stain_store: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        data=str(stain_store),
        out=str(tmp_path / "runs"),
        name="stain",
        model="simple_cnn",
        resize=48,
        batch_size=32,
        max_epochs=2,
        progress=False,
        early_stopping=None,
        threads=2,
        stain_norm="macenko",
        augment="stain-medium",
    )
    lines: list[str] = []
    run = train(cfg, printer=lines.append).run_dir
    assert any(line.startswith("stain normalisation:") and "passed through unchanged" in line for line in lines)
    stain = json.loads((run / "model.json").read_text())["preprocessing"]["stain"]
    assert stain["method"] == "macenko" and stain["fitted_from"] == str(stain_store)
    # mean/std describe the patches as the model sees them: after stain normalisation
    bundle = read_bundle(run)
    store = PatchStore(stain_store)
    sample = store.batch(np.arange(len(store)))
    normalised = bundle.preprocessing.normalise_stain(torch.from_numpy(sample)).numpy()
    raw_mean = sample.reshape(-1, 3).mean(axis=0) / 255
    assert not np.allclose(bundle.preprocessing.mean, raw_mean, atol=2e-3)
    assert np.allclose(bundle.preprocessing.mean, normalised.reshape(-1, 3).mean(axis=0) / 255, atol=0.03)
    donor = tmp_path / "donor"
    donor.mkdir()
    for i, img in enumerate(stained(10, HE_B, seed=7)):
        Image.fromarray(img).save(donor / f"{i}.png")
    r = CliRunner().invoke(
        app, ["evaluate", str(run), "--stain-shift", "--stain-donor", str(donor), "--bootstrap", "50"]
    )
    assert r.exit_code == 0, r.output
    assert "restain-donor" in r.output and "worst out-family drop" in r.output
    assert "Stain shifts" in (run / "eval" / "report.html").read_text()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    report = metrics["metrics"]["stain_shift"] if "metrics" in metrics else metrics["stain_shift"]
    assert {r["family"] for r in report["shifts"]} == {"in", "out"} and len(report["shifts"]) == 11
    assert set(report["worst_drop"]) == {"in", "out"}
    counts = metrics["stain_normalisation"]
    assert counts["patches"] == report["patches"] and 0 <= counts["passed_through"] <= counts["patches"]


@pytest.mark.slow
def test_cli_fit_show_and_train_from_a_target(stain_store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "target.json"
    r = runner.invoke(app, ["stain", "fit", str(stain_store), "--method", "reinhard", "--out", str(target)])
    assert r.exit_code == 0, r.output
    assert json.loads(target.read_text())["method"] == "reinhard"
    r = runner.invoke(app, ["stain", "fit", str(stain_store), "--method", "vahadane", "--out", str(target)])
    assert r.exit_code == 2 and "unknown stain normalisation method" in r.output and str(stain_store) in r.output
    r = runner.invoke(app, ["stain", "show", str(stain_store), "--out", str(tmp_path / "show")])
    assert r.exit_code == 0, r.output
    for f in ("stain_vectors.png", "stain_concentrations.png", "stain_normalised.png", "stain.json", "report.html"):
        assert (tmp_path / "show" / f).is_file(), f
    cfg = TrainConfig(
        data=str(stain_store),
        out=str(tmp_path / "runs"),
        name="t",
        model="simple_cnn",
        resize=32,
        batch_size=64,
        max_epochs=1,
        progress=False,
        early_stopping=None,
        threads=2,
        stain_norm="macenko",
        stain_target=str(target),
    )
    with pytest.raises(ConfigError, match="a reinhard stain target, but stain_norm is macenko"):
        train(cfg, printer=lambda _: None)
    run = train(cfg.replace(stain_norm="reinhard"), printer=lambda _: None).run_dir
    assert read_bundle(run).preprocessing.stain["lab_mean"] == json.loads(target.read_text())["lab_mean"]


def test_real_tissue_never_gives_nan_and_is_mostly_normalised() -> None:
    hcd = shared("hcd")
    from histoscan.stain.sources import reference_patches

    target = fit_reference(hcd / "train", "macenko", max_patches=200)
    idc = reference_patches(shared("idc"), max_patches=300)
    norm = StainNormaliser(target)
    out = norm(torch.from_numpy(idc)).numpy()
    assert out.dtype == np.uint8 and out.shape == idc.shape
    assert norm.counts()["passed_through"] < 0.5 * len(idc)
    est = macenko(optical_density(sample_pixels(torch.from_numpy(out))))
    he = est.stain_matrix[est.ok].median(0).values.numpy()
    assert _angle(he[0], np.array(target.stain_matrix[0])) < 8


@pytest.mark.slow
def test_the_eda_report_has_the_stain_section(stain_store: Path, tmp_path: Path) -> None:
    from histoscan.eda.report import run_eda

    r = run_eda(stain_store, tmp_path / "eda", sample=50, grid=4)
    assert r.summary["stain"]["patches_sampled"] == 200 and r.summary["stain"]["patches_usable"] > 0
    assert {"stain_vectors", "stain_concentrations", "stain_normalised"} <= set(r.figures)
    assert "stain normalised" in (tmp_path / "eda" / "report.html").read_text()
