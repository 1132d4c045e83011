"""What the checks on a run folder cost: reading and validating model.json, and loading a model with every check.

(a) ``read_bundle``: decode + schema validation (+ the in-memory upgrade for a version-1 file).
(b) ``load_model``: build the network, read best.safetensors, check every tensor's shape, load it
    (and the shape check alone).
(c) ``check_model``: what ``histoscan serve`` does before starting (torch and ONNX backends).

Models: simple_cnn at 96 px and resnet50 at 224 px, untrained (no training needed: files are what is read).
Bounded: a fixed number of repeats, a few seconds in all on 2 cores.

Run: python benchmarks/bench_runfolder.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import Recorder, add_json_option
from histoscan.bundle import ModelBundle, check_state, load_model, read_bundle, read_weights, save_weights
from histoscan.inference.backends import check_model
from histoscan.inference.export import export_onnx
from histoscan.models import create_model
from histoscan.preprocessing import Preprocessing
from histoscan.runfolder import RunFolder

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "model-v1.json"


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def make_run(root: Path, arch: str, size: int) -> Path:
    run = root / arch
    run.mkdir(parents=True)
    pre = Preprocessing(image_size=[size, size], mean=[0.7, 0.5, 0.7], std=[0.2, 0.2, 0.2])
    ModelBundle(architecture=arch, classes=["normal", "tumor"], preprocessing=pre).save(run)
    save_weights(create_model(arch, 2, input_size=size), RunFolder(run).weights_path)
    export_onnx(run, check=4)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("bench_runfolder", "Reading and checking a run folder", args.json)
    with tempfile.TemporaryDirectory(prefix="bench-runfolder-") as tmp:
        root = Path(tmp)
        old = root / "v1"
        old.mkdir()
        shutil.copy(FIXTURE, old / "model.json")
        v1_ms = median_ms(lambda: read_bundle(old), args.repeats)
        print(f"read_bundle, version-1 model.json (upgraded in memory): {v1_ms:.2f} ms")
        rec.figures["read_bundle_v1_ms"] = round(v1_ms, 3)
        rows = [
            report(make_run(root, arch, size), arch, args.repeats)
            for arch, size in (("simple_cnn", 96), ("resnet50", 224))
        ]
        rec.tables["Median milliseconds per call"] = rows
    rec.write()


def report(run: Path, arch: str, repeats: int) -> dict[str, object]:
    """Print the three costs for one run folder; return them as one table row."""
    mb = RunFolder(run).weights_path.stat().st_size / 1e6
    reps = max(3, repeats // 4)
    row: dict[str, object] = {"model": arch, "weights_mb": round(mb, 1)}
    print(f"{arch} ({mb:.1f} MB of weights):")
    row["read_bundle_ms"] = median_ms(lambda: read_bundle(run), repeats)
    print(f"  read_bundle (validated model.json)  {row['read_bundle_ms']:8.2f} ms")
    row["load_model_ms"] = median_ms(lambda: load_model(run), reps)
    print(f"  load_model (every check)            {row['load_model_ms']:8.1f} ms")
    model, bundle = load_model(run)
    state = read_weights(RunFolder(run).weights_path)
    row["shape_check_ms"] = median_ms(lambda: check_state(model, state, "w", bundle), repeats)
    print(f"    of which the shape check          {row['shape_check_ms']:8.2f} ms")
    row["check_model_torch_ms"] = median_ms(lambda: check_model(run, "torch"), reps)
    print(f"  check_model, torch backend          {row['check_model_torch_ms']:8.1f} ms")
    row["check_model_onnx_ms"] = median_ms(lambda: check_model(run, "onnx"), reps)
    print(f"  check_model, onnx backend           {row['check_model_onnx_ms']:8.1f} ms")
    return row


if __name__ == "__main__":
    main()
