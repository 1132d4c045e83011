"""Prediction speed from file to answer, against the work itself, in one run on one machine.

For the CPU default (a briefly trained ``cpu-default`` run: speed does not depend on how well it learnt) and a
Macenko-normalised variant of it, with the torch and the ONNX backend, without TTA and with 8-way TTA:

- ``decode``: images/s of reading and fitting the files alone (the decoding threads, nothing else);
- ``backend``: images/s of the bare backend on tensors already preprocessed in memory (x the views);
- ``predict_batch``: images/s of ``Predictor.predict_batch`` on decoded images in memory (preprocessing, stain
  normalisation, every view, the tissue check, the answers);
- ``end_to_end``: images/s of ``predict_input`` + ``write_predictions`` over the folder (files read to CSV
  written).

The serial bound is 1 / (1/decode + 1/backend): what two shared cores can do at best when decoding and the
network cannot overlap. Aims (issue 34): end to end >= 0.8 of the backend, or >= 0.9 of the serial bound where
decoding is the limit; one stain-normaliser call per image; ``backend="auto"`` picks the faster backend.

Run: python benchmarks/bench_predict.py [--n 2000] [--repeats 2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, shared_or_exit
from histoscan.bundle import read_bundle
from histoscan.data.ingest import ingest
from histoscan.inference.backends import resolve_backend
from histoscan.inference.export import export_onnx
from histoscan.inference.inputs import file_batches
from histoscan.inference.predict import predict_input, write_predictions
from histoscan.inference.predictor import Predictor
from histoscan.stain.normalise import StainNormaliser, fit_target
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import train

TTA = {"": False, "_tta": True}


def best_rates(n: int, works: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The best of ``repeats`` timings of each of ``works`` as images/s, interleaved round by round.

    Each is warmed up twice first (oneDNN builds its kernels for a new shape on the first calls); the rounds
    alternate between the contenders so that a noisy moment of the machine falls on all of them alike.
    """
    for work in works.values():
        work()
        work()
    best = dict.fromkeys(works, 0.0)
    for _ in range(repeats):
        for name, work in works.items():
            t = time.perf_counter()
            work()
            best[name] = max(best[name], n / (time.perf_counter() - t))
    return best


def count_normaliser_calls(predictor: Predictor, images: np.ndarray) -> float:
    """Images passed through the stain normaliser per image predicted, under 8-way TTA."""
    calls: list[int] = []
    original = StainNormaliser.__call__

    def counting(self: StainNormaliser, batch: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(int(batch.shape[0]))
        return original(self, batch, *args, **kwargs)  # type: ignore[arg-type]

    StainNormaliser.__call__ = counting  # type: ignore[method-assign]
    try:
        predictor.predict_batch(images, tta=True)
    finally:
        StainNormaliser.__call__ = original  # type: ignore[method-assign]
    return sum(calls) / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("bench_predict", "Batch prediction speed: decode, backend, end to end", args.json)
    hcd = shared_or_exit("hcd")
    out: dict[str, object] = {"n": args.n, "batch": args.batch, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="histoscan-bench-predict-") as tmp:
        work = Path(tmp)
        folder = work / "patches"
        folder.mkdir()
        files = sorted((hcd / "train").glob("*.tif"))[: args.n]
        for f in files:
            (folder / f.name).symlink_to(f.resolve())
            f.read_bytes()  # page cache warm for every contender
        store = ingest(hcd, work / "store").store
        overrides = {"data": str(store), "out": str(work / "runs"), "max_epochs": 1, "progress": False}
        cfg = TrainConfig.from_yaml(
            resolve_config_path("cpu-default"), {**overrides, "name": "default", "limit_train_batches": 10}
        )
        default = train(cfg, printer=lambda *_: None).run_dir
        macenko = work / "runs" / "macenko"
        macenko.mkdir()
        for f in default.iterdir():
            if f.is_file():
                (macenko / f.name).write_bytes(f.read_bytes())
        bundle = read_bundle(macenko)
        bundle.preprocessing.stain = fit_target(store_sample(store), "macenko").to_dict()
        bundle.save(macenko)
        print(f"{len(files)} patches, model {cfg.model} crop {cfg.crop}, batch {args.batch}, torch {torch.__version__}")

        rows: dict[str, dict[str, float]] = {}
        ratios: dict[str, dict[str, float]] = {}
        for variant, run in (("default", default), ("macenko", macenko)):
            export_onnx(run)
            speed = read_bundle(run).inference.backend_speed
            out[f"auto_backend_{variant}"] = resolve_backend(run, "auto")
            out[f"backend_speed_{variant}"] = speed.model_dump() if speed else None
            fit = read_bundle(run).preprocessing.fit_image
            images = np.concatenate([b.images for b in file_batches(files, folder, fit, args.batch, 2)])
            decode = best_rates(
                len(files),
                {"decode": lambda fit=fit: sum(len(b.ids) for b in file_batches(files, folder, fit, args.batch, 2))},
                args.repeats,
            )["decode"]
            for backend in ("torch", "onnx"):
                predictor = Predictor(run, backend=backend, batch_size=args.batch)
                pre = predictor.bundle.preprocessing
                # in the layout the backend reads without a copy (NCHW for ONNX Runtime, channels-last for torch)
                tensors = [
                    pre.network_input(pre.prepare(images[i : i + args.batch]), memory_format=predictor.memory_format)
                    for i in range(0, len(images), args.batch)
                ]
                if variant == "default" and backend == "torch":
                    out["torch_chunk"] = chunk_speedup(predictor, tensors, len(images), args.repeats)
                    out["tissue_features_threads"] = tissue_threads(images, args.batch, args.repeats)
                    out["stain_log_lookup"] = stain_log_lookup(images, args.batch, args.repeats)
                for suffix, tta in TTA.items():
                    views = 8 if tta else 1

                    def end_to_end(predictor: Predictor = predictor, tta: bool = tta) -> None:
                        table = predict_input(predictor, folder, tta=tta, workers=2)
                        write_predictions(table, work / "p.csv", force=True)

                    rates = best_rates(
                        len(images),
                        {
                            "bare": lambda p=predictor, ts=tensors, v=views: [
                                p.backend.logits(x) for x in ts for _ in range(v)
                            ],
                            "in_memory": lambda p=predictor, im=images, t=tta: p.predict_batch(im, tta=t),
                            "e2e": end_to_end,
                        },
                        args.repeats,
                    )
                    bare, in_memory, e2e = rates["bare"], rates["in_memory"], rates["e2e"]
                    bound = 1.0 / (1.0 / decode + 1.0 / bare)
                    key = f"{backend}{suffix}"
                    rows[f"{variant}/{key}"] = {
                        "decode": round(decode, 1),
                        "backend": round(bare, 1),
                        "predict_batch": round(in_memory, 1),
                        "end_to_end": round(e2e, 1),
                        "serial_bound": round(bound, 1),
                    }
                    ratios.setdefault("end_to_end_over_backend", {})[f"{variant}/{key}"] = round(e2e / bare, 3)
                    ratios.setdefault("end_to_end_over_serial_bound", {})[f"{variant}/{key}"] = round(e2e / bound, 3)
                    print(
                        f"{variant:8s} {key:9s}: decode {decode:6.0f}  backend {bare:6.0f}  predict_batch "
                        f"{in_memory:6.0f}  end to end {e2e:6.0f} img/s; e2e/backend {e2e / bare:.2f}, "
                        f"e2e/serial bound {e2e / bound:.2f}"
                    )
            if variant == "macenko":
                calls = count_normaliser_calls(Predictor(run, backend="torch", batch_size=args.batch), images[:512])
                out["normaliser_calls_per_image"] = calls
                print(f"stain normaliser calls per image under 8-way TTA, tissue check included: {calls:g}")
        # the headline keys the issue names: the CPU default's rows
        for ratio, by_row in ratios.items():
            out[ratio] = {key.split("/", 1)[1]: v for key, v in by_row.items() if key.startswith("default/")}
            out[f"{ratio}_macenko"] = {
                key.split("/", 1)[1]: v for key, v in by_row.items() if key.startswith("macenko/")
            }
        out["rows"] = rows
        out["auto_backend"] = out["auto_backend_default"]
    rec.figures.update(out)
    rec.write()


def side_by_side(n: int, label: str, works: dict[str, Callable[[], object]], repeats: int) -> dict[str, object]:
    """Two contenders (the new one first, then what it replaced) timed by ``best_rates``: img/s and the ratio."""
    rates = best_rates(n, works, repeats)
    (new, a), (old, b) = rates.items()
    print(f"{label}: {new} {a:.0f} img/s, {old} {b:.0f} img/s")
    return {new: round(a, 1), old: round(b, 1), "speedup": round(a / b, 2)}


def chunk_speedup(predictor: Predictor, tensors: list[torch.Tensor], n: int, repeats: int) -> dict[str, object]:
    """The torch backend in chunks of ``CPU_CHUNK`` against one pass per batch, side by side (img/s)."""
    from histoscan.inference import backends

    def run(chunk: int) -> Callable[[], object]:
        def work() -> None:
            saved, backends.CPU_CHUNK = backends.CPU_CHUNK, chunk
            try:
                for x in tensors:
                    predictor.backend.logits(x)
            finally:
                backends.CPU_CHUNK = saved

        return work

    batch = len(tensors[0])
    works = {"chunked": run(backends.CPU_CHUNK), "one_pass": run(batch)}
    label = f"torch backend, batch {batch}, chunks of {backends.CPU_CHUNK}"
    return {"chunk": backends.CPU_CHUNK, "batch": batch, **side_by_side(n, label, works, repeats)}


def tissue_threads(images: np.ndarray, batch: int, repeats: int) -> dict[str, object]:
    """The tissue check's statistics with their chunks spread over every core against one thread (img/s)."""
    from histoscan.rules.tissue import tissue_features

    def run(threads: int | None) -> Callable[[], object]:
        return lambda: [tissue_features(images[i : i + batch], threads) for i in range(0, len(images), batch)]

    works = {"every_core": run(None), "one_thread": run(1)}
    return side_by_side(len(images), "tissue check statistics", works, repeats)


def stain_log_lookup(images: np.ndarray, batch: int, repeats: int) -> dict[str, object]:
    """ln(I + 1) of every value by table lookup (``_log1p_planes``) against torch's ``log1p`` (img/s)."""
    from histoscan.stain.colour import _log1p_planes

    batches = [torch.from_numpy(images[i : i + batch]) for i in range(0, len(images), batch)]

    def computed() -> None:
        for b in batches:
            n, h, w, _ = b.shape
            b.permute(0, 3, 1, 2).reshape(n, 3, h * w).float().log1p_()

    works = {"lookup": lambda: [_log1p_planes(b) for b in batches], "log1p": computed}
    return side_by_side(len(images), "stain mapping's ln(I + 1)", works, repeats)


def store_sample(store: Path, n: int = 64) -> np.ndarray:
    """A few patches of the store, for fitting a stain target."""
    from histoscan.data.store import PatchStore

    s = PatchStore(store)
    return s.batch(np.linspace(0, len(s) - 1, n).astype(int))


if __name__ == "__main__":
    main()
