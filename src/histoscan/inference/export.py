"""ONNX export with a dynamic batch axis, the preprocessing embedded, and a parity check against PyTorch."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histoscan.bundle import load_model
from histoscan.data.store import PatchStore
from histoscan.errors import HistoscanError
from histoscan.inference.backends import ONNX_FILE

PARITY_TOLERANCE = 1e-4


class ExportError(HistoscanError):
    """The exported model does not reproduce PyTorch's outputs."""


@dataclass
class ExportResult:
    """Where the file went and how closely it matches PyTorch."""

    path: Path
    max_abs_diff: float
    checked: int
    check_source: str


def _check_images(run_dir: Path, data: str | Path | None, n: int) -> tuple[np.ndarray, str]:
    """Real patches for the parity check: ``data``, else the store the run trained on, else synthetic ones."""
    from histoscan.bundle import read_bundle

    bundle = read_bundle(run_dir)
    candidate = Path(data) if data else Path(bundle.training.get("store", ""))
    if candidate and (candidate / "meta.json").is_file():
        store = PatchStore(candidate)
        idx = np.linspace(0, len(store) - 1, num=min(n, len(store))).astype(int)
        return store.batch(idx), str(candidate)
    from histoscan.data.synthetic import synth_batch

    h, _ = bundle.preprocessing.image_size
    return synth_batch(n, seed=0, size=h)[0], "synthetic patches (no store found)"


def export_onnx(
    run_dir: str | Path, *, opset: int = 18, data: str | Path | None = None, check: int = 64
) -> ExportResult:
    """Write ``model.onnx`` into the run and verify it; a mismatch removes the file and raises ExportError."""
    import onnx
    import onnxruntime as ort

    run = Path(run_dir)
    model, bundle = load_model(run)
    size = bundle.preprocessing.input_size
    dummy = torch.randn(2, 3, size, size)
    path = run / ONNX_FILE
    tmp = run / (ONNX_FILE + ".tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=["input"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{run}: ONNX export of {bundle.architecture} at {size} px failed: {first}") from exc
    proto = onnx.load(str(tmp))
    meta = {"histoscan": json.dumps(bundle.to_dict())}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))

    images, source = _check_images(run, data, check)
    x = bundle.preprocessing(images)
    with torch.inference_mode():
        want = model(x).float().numpy()
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    to_prob = (
        (lambda z: 1 / (1 + np.exp(-z)))
        if bundle.task == "binary"
        else (lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    )
    diff = float(np.abs(to_prob(got) - to_prob(want)).max())
    if not np.isfinite(diff) or diff >= PARITY_TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"{run}: ONNX probabilities differ from PyTorch by {diff:.2e} (limit {PARITY_TOLERANCE:g}) on "
            f"{len(images)} patches of {source}; nothing was written"
        )
    os.replace(tmp, path)
    return ExportResult(path, diff, len(images), source)
