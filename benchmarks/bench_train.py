"""Training throughput: the full pipeline against a bare loop, same model, batch and optimiser.

Full pipeline: ``histoscan.training.fit.train`` on a packed store (memory map + pread batches,
dihedral + colour augmentation, Lightning step, logging). Bare loop: the same model, batch size
and AdamW optimiser on one pre-normalised tensor already in memory, no augmentation, no framework.
Both run in this process, alternating; the best of each is compared. Target: ratio >= 0.9 for
``resnet18`` and the 3-block CNN (``simple_cnn``) on CPU.

Run: python benchmarks/bench_train.py [--steps 60] [--batch 32] [--models simple_cnn resnet18]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from histoscan.data.synthetic import write_synthetic_store
from histoscan.models import create_model
from histoscan.training.config import TrainConfig
from histoscan.training.fit import keep_freed_memory, train


def bare_loop(model_name: str, batch: int, steps: int, size: int) -> float:
    """Images/s of forward + backward + AdamW step on an in-memory tensor."""
    torch.manual_seed(0)
    model = create_model(model_name, 2, input_size=size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = (torch.rand(batch) > 0.5).float()
    for _ in range(3):  # warm-up
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
        opt.step()
    t = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def full_pipeline(
    model_name: str, store: Path, out: Path, batch: int, steps: int, tag: str, crop: int | None = None
) -> float:
    """Images/s of histoscan's training steps (as logged in metrics.csv: steps only, not validation)."""
    cfg = TrainConfig(
        data=str(store),
        out=str(out),
        name=f"{model_name}-{tag}",
        model=model_name,
        batch_size=batch,
        max_epochs=2,
        limit_train_batches=steps,
        val=0.02,
        test=0.0,
        augment="light",
        crop=crop,
        early_stopping=None,
        progress=False,
        schedule="constant",
    )
    run = train(cfg, printer=lambda *_: None).run_dir
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return float(rows[-1]["images_per_s"])  # the second epoch: no first-step start-up costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=["simple_cnn", "resnet18"])
    ap.add_argument("--crop", type=int, default=None, help="centre crop of the 96 px patches (cpu-default: 64)")
    args = ap.parse_args()
    keep_freed_memory()  # the bare loop gets the same allocator setting the pipeline uses
    with tempfile.TemporaryDirectory(prefix="histoscan-bench-train-") as tmp:
        store = write_synthetic_store(Path(tmp) / "store", args.batch * args.steps * 2, seed=0)
        size = f"96 px, centre crop {args.crop}" if args.crop else "96 px"
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {size}")
        for name in args.models:
            bare, full = [], []
            for r in range(args.repeats):
                bare.append(bare_loop(name, args.batch, args.steps, args.crop or 96))
                full.append(full_pipeline(name, store, Path(tmp) / "runs", args.batch, args.steps, f"r{r}", args.crop))
            b, f = max(bare), max(full)
            print(
                f"{name:12s} full pipeline {f:7.1f} img/s   bare loop {b:7.1f} img/s   ratio {f / b:.2f} (target >= 0.9)"
            )


if __name__ == "__main__":
    main()
