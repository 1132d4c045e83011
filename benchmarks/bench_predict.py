"""Prediction speed, same run and model throughout.

(a) ``histoscan predict`` over a folder of 5,000 real TIFF patches from ../shared/data/hcd end to end
    (decode in worker processes, preprocess, infer, write the CSV) against the backend alone on
    preprocessed tensors already in memory. Target: ratio >= 0.8.
(b) ONNX Runtime against PyTorch on CPU for the default model (cpu-default architecture),
    backend alone on the same tensors. Target: ONNX >= 1.5x faster, or say why not.
(c) The torch backend's precision (issue 18): bf16 autocast against fp32, channels-last both, backend
    alone on the same tensors, and the largest difference in P(tumour) between them. ``auto`` picks
    bf16 on CPUs with native bf16 (AVX512-BF16 / AMX), fp32 elsewhere.
(d) The tissue check's cost (issue 16): ``Predictor.predict_batch`` (one view) with the run's tissue check
    against the same Predictor without it, and the check alone (``check_images``) on the same images.

Run: python benchmarks/bench_predict.py [--n 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import shared_or_exit
from histoscan.data.ingest import ingest
from histoscan.inference.export import export_onnx
from histoscan.inference.predict import predict_input, write_predictions
from histoscan.inference.predictor import Predictor
from histoscan.rules.tissue import check_images
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import train


def backend_alone(predictor: Predictor, tensors: list[torch.Tensor]) -> float:
    n = sum(t.shape[0] for t in tensors)
    predictor.backend.logits(tensors[0])  # warm-up
    t = time.perf_counter()
    for x in tensors:
        predictor.backend.logits(x)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    hcd = shared_or_exit("hcd")
    with tempfile.TemporaryDirectory(prefix="histoscan-bench-predict-") as tmp:
        work = Path(tmp)
        folder = work / "patches"
        folder.mkdir()
        files = sorted((hcd / "train").glob("*.tif"))[: args.n]
        for f in files:
            (folder / f.name).symlink_to(f.resolve())
            f.read_bytes()  # page cache warm for every contender
        store = ingest(hcd, work / "store").store
        cfg = TrainConfig.from_yaml(
            resolve_config_path("cpu-default"),
            {
                "data": str(store),
                "out": str(work / "runs"),
                "name": "bench",
                "max_epochs": 1,
                "limit_train_batches": 20,
                "progress": False,
            },
        )
        run = train(cfg, printer=lambda *_: None).run_dir
        export_onnx(run)
        torch_p = Predictor(run, backend="torch", batch_size=args.batch)
        fp32_p = Predictor(run, backend="torch", batch_size=args.batch, precision="fp32")
        bf16_p = Predictor(run, backend="torch", batch_size=args.batch, precision="bf16")
        onnx_p = Predictor(run, backend="onnx", batch_size=args.batch)
        from histoscan.inference.inputs import file_batches

        images = np.concatenate(
            [b.images for b in file_batches(files, folder, torch_p.bundle.preprocessing.fit_image, args.batch, 1)]
        )
        pre = torch_p.bundle.preprocessing
        tensors = [pre(images[i : i + args.batch]) for i in range(0, len(images), args.batch)]
        print(
            f"{len(files)} patches, model {cfg.model} {cfg.model_args} crop {cfg.crop}, batch {args.batch}, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads"
        )
        for name, predictor in (("torch", torch_p), ("onnx", onnx_p)):
            alone, e2e = [], []
            for _ in range(args.repeats):
                alone.append(backend_alone(predictor, tensors))
                t = time.perf_counter()
                table = predict_input(predictor, folder)
                write_predictions(table, work / f"{name}.csv", force=True)  # every repeat rewrites it
                e2e.append(len(table.ids) / (time.perf_counter() - t))
            a, e = max(alone), max(e2e)
            print(
                f"(a) {name:5s}: end to end over the folder {e:7.0f} img/s; backend alone {a:7.0f} img/s; ratio {e / a:.2f} (target >= 0.8)"
            )
            if name == "torch":
                torch_alone = a
            else:
                print(f"(b) ONNX Runtime / PyTorch, backend alone: {a / torch_alone:.2f}x (target >= 1.5)")
        fp32 = max(backend_alone(fp32_p, tensors) for _ in range(args.repeats))
        bf16 = max(backend_alone(bf16_p, tensors) for _ in range(args.repeats))
        diff = max(
            float(
                np.abs(
                    fp32_p.predict_batch(images[i : i + args.batch]).probabilities[:, 1]
                    - bf16_p.predict_batch(images[i : i + args.batch]).probabilities[:, 1]
                ).max()
            )
            for i in range(0, min(len(images), 4 * args.batch), args.batch)
        )
        print(
            f"(c) torch backend alone: fp32 {fp32:7.0f} img/s, bf16 autocast {bf16:7.0f} img/s: {bf16 / fp32:.2f}x; "
            f"max |P_bf16 - P_fp32| {diff:.1e} on {min(len(images), 4 * args.batch)} patches; "
            f"auto chose {torch_p.backend.precision}"  # type: ignore[attr-defined]
        )
        check = torch_p.bundle.trust.tissue_check
        if check is None:
            print("(d) skipped: the run has no tissue check")
            return
        plain = Predictor(run, backend="torch", batch_size=args.batch)
        plain.bundle.trust.tissue_check = None
        rates: dict[str, float] = {}
        for name, work_fn in (
            ("with check", lambda: torch_p.predict_batch(images, tta=False)),
            ("without", lambda: plain.predict_batch(images, tta=False)),
            (
                "check alone",
                lambda: [
                    check_images(check, pre, images[i : i + args.batch]) for i in range(0, len(images), args.batch)
                ],
            ),
        ):
            best = 0.0
            for _ in range(args.repeats):
                t = time.perf_counter()
                work_fn()
                best = max(best, len(images) / (time.perf_counter() - t))
            rates[name] = best
        print(
            f"(d) predict_batch, one view: with the tissue check {rates['with check']:7.0f} img/s, without "
            f"{rates['without']:7.0f} img/s ({rates['with check'] / rates['without']:.2f}x); "
            f"the check alone {rates['check alone']:7.0f} img/s"
        )


if __name__ == "__main__":
    main()
