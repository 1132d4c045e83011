"""ONNX export with a dynamic batch axis and a parity check against PyTorch.

The graph's contract, fixed once (marker ``histoscan_onnx_contract = "1"`` in the file's metadata):

- in: ``input``, float32, N x 3 x S x S, already preprocessed: fitted to ``image_size``, cropped or
  resized to S = ``preprocessing.input_size`` and normalised with ``preprocessing.mean``/``std`` of
  ``model.json`` (the Predictor's ``Preprocessing`` does all of it);
- out: ``logits``, float32, N x 1 for a binary model, N x C for C classes.

Preprocessing is not in the graph, and temperature, sigmoid/softmax and the threshold stay in the
Predictor, read from ``model.json``: so the file carries no copy of ``model.json``, and
``histoscan calibrate`` or ``evaluate --save-threshold`` never make it stale. A consumer outside
histoscan reads ``model.json`` beside it for those.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histoscan.bundle import ModelBundle, first_line, load_model
from histoscan.data.store import PatchStore
from histoscan.errors import HistoscanError
from histoscan.inference.probabilities import probabilities
from histoscan.runfolder import ONNX_CONTRACT_KEY, ONNX_CONTRACT_VERSION, RunFolder

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


def _check_images(bundle: ModelBundle, data: str | Path | None, n: int) -> tuple[np.ndarray, str]:
    """Real patches for the parity check: ``data``, else the store the run trained on, else synthetic ones."""
    candidate = Path(data) if data else bundle.training_store
    if candidate is not None and (candidate / "meta.json").is_file():
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
    path = RunFolder(run).onnx_path
    tmp = path.with_name(path.name + ".tmp")
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
        raise ExportError(
            f"{run}: ONNX export of {bundle.architecture} at {size} px failed: {first_line(exc)}"
        ) from exc
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()  # a marker of the contract above, never a copy of model.json
    entry.key, entry.value = ONNX_CONTRACT_KEY, ONNX_CONTRACT_VERSION
    proto.doc_string = "histoscan: preprocessed float32 N x 3 x S x S 'input' -> N x K 'logits'; see model.json"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))

    images, source = _check_images(bundle, data, check)
    x = bundle.preprocessing(images)
    with torch.inference_mode():
        want = model(x).float().numpy()
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    diff = float(np.abs(probabilities(got) - probabilities(want)).max())
    if not np.isfinite(diff) or diff >= PARITY_TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"{run}: ONNX probabilities differ from PyTorch by {diff:.2e} (limit {PARITY_TOLERANCE:g}) on "
            f"{len(images)} patches of {source}; nothing was written"
        )
    os.replace(tmp, path)
    return ExportResult(path, diff, len(images), source)
