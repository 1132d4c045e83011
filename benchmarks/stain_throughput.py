"""Stain normalisation and stain augmentation throughput on 96 px patches, against the training pipeline.

Times Macenko and Reinhard normalisation (batched, uint8 in, uint8 out), the ``stain-medium``
augmentation ops, and one training step of the shipped cpu-default (forward, backward, AdamW, its
own preprocessing and ``light`` augmentation) on real HCD patches, all with ``--threads`` CPU threads
(default 2) or on ``--device``. Aim: >= 2,000 patches/s for Macenko on 2 cores.

Each rate is printed per wall-clock second and per CPU second of this process (see ``rate``).

Run: python benchmarks/stain_throughput.py [--store STORE] [--batch 256] [--seconds 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Recorder, add_json_option, finish, shared_or_exit
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.models import create_model
from histoscan.preprocessing import Preprocessing
from histoscan.stain.augment import STAIN_STRENGTHS, StainMatrixJitter, build_augmentation
from histoscan.stain.groups import select_rows
from histoscan.stain.normalise import StainNormaliser, fit_target
from histoscan.training.config import resolve_config_path


def rate(fn: Callable[[], object], items: int, seconds: float) -> str:
    """Items per second of ``fn`` over about ``seconds`` (after one warm-up call), wall clock and per CPU second.

    On a shared machine the wall-clock rate falls with other jobs' load; items per CPU second (this
    process's CPU time over all its threads) falls much less, and times the thread count is what
    an idle machine would give with perfect scaling.
    """
    fn()
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        fn()
        done += items
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    return f"{done / wall:8.0f} /s wall, {done / max(used, 1e-9):8.0f} per CPU second"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="an ingested hcd store (default: ingest ../shared/data/hcd)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-training", action="store_true", help="skip the training-step timings")
    add_json_option(ap)
    args = ap.parse_args()
    Recorder("stain_throughput", "Stain normalisation and augmentation throughput", args.json).tee()
    torch.set_num_threads(args.threads)
    store_path = Path(args.store) if args.store else ingest(shared_or_exit("hcd"), Path("/tmp/stain-bench-store")).store
    store = PatchStore(store_path)
    images = store.batch(np.arange(min(len(store), 2048)))
    batch = torch.from_numpy(np.ascontiguousarray(images[: args.batch])).to(args.device)
    print(f"device {args.device}, {args.threads} threads, batch {args.batch} of {images.shape[1]} px patches")
    for method in ("macenko", "reinhard"):
        norm = StainNormaliser(fit_target(images, method, str(store_path)))
        print(f"{method:10s} normalisation:    {rate(lambda n=norm: n(batch), len(batch), args.seconds)}")
        group = norm.estimate_pooled(batch[:64])  # per-group granularity: one estimate, mapped to every patch
        rows = select_rows(group, torch.zeros(len(batch), dtype=torch.long))
        print(f"{method:10s} (group estimate): {rate(lambda n=norm, e=rows: n(batch, e), len(batch), args.seconds)}")
    s = STAIN_STRENGTHS["medium"]
    x = batch.permute(0, 3, 1, 2).float() / 255
    jitter = StainMatrixJitter(s.matrix, s.concentration)
    aug = build_augmentation("stain-medium")
    gen = torch.Generator().manual_seed(0)
    print(f"stain-matrix jitter:              {rate(lambda: jitter(x, gen), len(x), args.seconds)}")
    print(f"stain-medium preset:              {rate(lambda: aug(x, gen), len(x), args.seconds)}")
    if args.no_training:
        return
    # one training step of the shipped cpu-default, as the training loop runs it
    cfg = yaml.safe_load(resolve_config_path("cpu-default").read_text())
    pre = Preprocessing(image_size=[96, 96], crop=cfg["crop"], label_size=32)
    model = create_model(cfg["model"], 2, input_size=pre.input_size, **cfg["model_args"]).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    light = build_augmentation("light", keep=32)
    bs = int(cfg["batch_size"])
    y = torch.randint(0, 2, (bs, 1), device=args.device).float()

    def step() -> None:
        xb = pre.finish(light(pre.to_float(batch[:bs]), gen))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    print(f"cpu-default training step:        {rate(step, bs, args.seconds)} (images, batch {bs})")
    pre.stain = fit_target(images, "macenko", str(store_path)).to_dict()
    print(f"  the same with Macenko:          {rate(step, bs, args.seconds)} (images, batch {bs})")


if __name__ == "__main__":
    main()
    finish()
