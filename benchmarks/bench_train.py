"""Training throughput of a shipped config: new CPU defaults against the old fp32 contiguous path and a bare loop.

Full pipeline: ``histoscan.training.fit.train`` on a packed store (memory map + pread batches,
dihedral + colour augmentation, Lightning step, EMA update, logging) with the config as shipped
(issue 18: bf16 mixed precision where the CPU has it natively, channels-last, EMA). Old path: the
same config with ``precision: 32``, ``channels_last: false`` and no EMA (what runs used before).
Bare loop: the same model, batch size and AdamW optimiser on one pre-normalised tensor already in
memory, no augmentation, no framework, with the numerics the new defaults chose (bf16 autocast and
channels-last, or fp32). All run in this process, alternating; the best of each is compared.
Targets (issue 18): new / old >= 1.7x on a CPU with AVX512-BF16 or AMX; new / bare loop >= 0.9.

Run: python benchmarks/bench_train.py [--config cpu-default] [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, add_json_option
from histoscan.data.synthetic import write_synthetic_store
from histoscan.models import create_model
from histoscan.runfolder import RunFolder
from histoscan.training.config import TrainConfig, resolve_config_path
from histoscan.training.fit import choose_precision, keep_freed_memory, train


def bare_loop(cfg: TrainConfig, size: int, steps: int, bf16: bool, channels_last: bool) -> float:
    """Images/s of forward + backward + AdamW step on an in-memory tensor."""
    torch.manual_seed(0)
    model = create_model(cfg.model, 2, input_size=size, **cfg.model_args).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(cfg.batch_size, 3, size, size).contiguous(memory_format=fmt)
    y = (torch.rand(cfg.batch_size) > 0.5).float()

    def step() -> None:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1).float(), y)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * cfg.batch_size / (time.perf_counter() - t)


def full_pipeline(cfg: TrainConfig, store: Path, out: Path, steps: int, tag: str, **changes: Any) -> float:
    """Images/s of histoscan's training steps (as logged in metrics.csv: steps only, not validation)."""
    run_cfg = cfg.replace(
        data=str(store),
        out=str(out),
        name=tag,
        max_epochs=2,
        max_time=None,
        limit_train_batches=steps,
        val=0.02,
        test=0.0,
        early_stopping=None,
        progress=False,
        schedule="constant",
        **changes,
    )
    run = train(run_cfg, printer=lambda *_: None).run_dir
    return float(RunFolder(run).read_metrics()[-1]["images_per_s"])  # the second epoch: no start-up costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-default")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    add_json_option(ap)
    args = ap.parse_args()
    rec = Recorder("bench_train", "Training throughput of a shipped config", args.json)
    keep_freed_memory()  # the bare loop gets the same allocator setting the pipeline uses
    cfg = TrainConfig.from_yaml(resolve_config_path(args.config), {"data": "unused"})
    size = cfg.resize or cfg.crop or 96
    bf16 = choose_precision(cfg, cuda=False) == "bf16-mixed"
    channels_last = cfg.channels_last is not False
    with tempfile.TemporaryDirectory(prefix="histoscan-bench-train-") as tmp:
        store = write_synthetic_store(Path(tmp) / "store", cfg.batch_size * args.steps * 2, seed=0)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.config}: {cfg.model} "
            f"{cfg.model_args}, batch {cfg.batch_size}, input {size} px; new defaults: "
            f"{'bf16-mixed' if bf16 else 'fp32'}, {'channels-last' if channels_last else 'contiguous'}, "
            f"EMA {cfg.ema_decay}"
        )
        new, old, bare, bare_old = [], [], [], []
        for r in range(args.repeats):
            new.append(full_pipeline(cfg, store, Path(tmp) / "runs", args.steps, f"new{r}"))
            old.append(
                full_pipeline(
                    cfg,
                    store,
                    Path(tmp) / "runs",
                    args.steps,
                    f"old{r}",
                    precision="32",
                    channels_last=False,
                    ema_decay=None,
                )
            )
            bare.append(bare_loop(cfg, size, args.steps, bf16, channels_last))
            bare_old.append(bare_loop(cfg, size, args.steps, False, False))
        n, o, b, bo = max(new), max(old), max(bare), max(bare_old)
        print(f"full pipeline, new defaults   {n:7.1f} img/s   (runs: {', '.join(f'{v:.0f}' for v in new)})")
        print(f"full pipeline, fp32 contiguous {o:7.1f} img/s   (runs: {', '.join(f'{v:.0f}' for v in old)})")
        print(f"bare loop, new numerics        {b:7.1f} img/s;  bare loop, fp32 contiguous {bo:7.1f} img/s")
        print(
            f"new / old pipeline: {n / o:.2f}x (target >= 1.7); new pipeline / bare loop: {n / b:.2f} (target >= 0.9)"
        )
        rec.figures.update(
            config=args.config,
            steps=args.steps,
            numerics=f"{'bf16-mixed' if bf16 else 'fp32'}, {'channels-last' if channels_last else 'contiguous'}",
            new_over_old=round(n / o, 3),
            new_over_bare_loop=round(n / b, 3),
        )
        rec.tables["Images per second (best of the repeats)"] = [
            {"path": "full pipeline, new defaults", "img_s": round(n, 1)},
            {"path": "full pipeline, fp32 contiguous, no EMA", "img_s": round(o, 1)},
            {"path": "bare loop, new numerics", "img_s": round(b, 1)},
            {"path": "bare loop, fp32 contiguous", "img_s": round(bo, 1)},
        ]
    rec.write()


if __name__ == "__main__":
    main()
