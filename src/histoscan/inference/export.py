"""ONNX export with a dynamic batch axis and a parity check against PyTorch.

The graph's contract, fixed once (marker ``histoscan_onnx_contract = "1"`` in the file's metadata):

- in: ``input``, float32, N x 3 x S x S, already preprocessed: fitted to ``image_size``, cropped or
  resized to S = ``preprocessing.input_size`` and normalised with ``preprocessing.mean``/``std`` of
  ``model.json`` (the Predictor's ``Preprocessing`` does all of it);
- out: ``logits``, float32, N x 1 for a binary model, N x C for C classes.

An ensemble's graph keeps the same contract, the input preprocessed by its first member's recipe: the
members must share their geometry and stain target (members that differ in crop, resize or stain are
refused: export them one by one), each member's own mean/std is re-applied inside the graph (an exact
affine map), each member's temperature is inside the graph, ``logits`` are the logits of
the members' weighted mean probability (the ensemble's own temperature stays in model.json), and a
second output ``member_probabilities`` (N x M x C) lets the Predictor report the spread across members.

Preprocessing is not in the graph, and temperature, sigmoid/softmax and the threshold stay in the
Predictor, read from ``model.json``: so the file carries no copy of ``model.json``, and
``histoscan calibrate`` or ``evaluate --save-threshold`` never make it stale. A consumer outside
histoscan reads ``model.json`` beside it for those.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch

from histoscan.bundle import EnsembleBundle, ModelBundle, first_line, load_model, read_bundle
from histoscan.data.store import PatchStore
from histoscan.errors import HistoscanError
from histoscan.inference.probabilities import probabilities
from histoscan.rules.ood import needs_features
from histoscan.runfolder import ONNX_CONTRACT_KEY, ONNX_CONTRACT_VERSION, BackendSpeed, RunFolder
from histoscan.system import hardware_id

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
    speed: BackendSpeed | None = None

    def lines(self) -> list[str]:
        """What ``histoscan export`` prints."""
        out = [
            f"wrote {self.path}; max |p_onnx - p_torch| = {self.max_abs_diff:.2e} on "
            f"{self.checked} patches of {self.check_source}"
        ]
        if self.speed is not None:
            s = self.speed
            out.append(
                f"one view, batch {s.batch}: torch {s.torch:.0f} img/s, onnx {s.onnx:.0f} img/s on this machine; "
                f"backend auto will use {s.faster}"
            )
        return out


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
    run_dir: str | Path, *, opset: int = 18, data: str | Path | None = None, check: int = 64, time_backends: bool = True
) -> ExportResult:
    """Write ``model.onnx`` into the run and verify it; a mismatch removes the file and raises ExportError.

    With ``time_backends`` both backends then predict the check patches side by side and model.json's
    ``inference.backend_speed`` records which was faster on this hardware: what ``backend="auto"`` follows.
    """
    import onnx
    import onnxruntime as ort

    run = Path(run_dir)
    outputs = ["logits"]
    model: torch.nn.Module
    bundle: ModelBundle
    ensemble = read_bundle(run)
    if isinstance(ensemble, EnsembleBundle):
        model, bundle, outputs = _ensemble_module(run, ensemble), ensemble, ["logits", "member_probabilities"]
    else:
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
                output_names=outputs,
                opset_version=opset,
                dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
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
        out = model(x)
        want = (out[0] if isinstance(out, tuple) else out).float().numpy()
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    if isinstance(bundle, EnsembleBundle):  # against the torch ensemble itself: each member's own preprocessing
        from histoscan.inference.predictor import Predictor

        reference = Predictor(run, backend="torch", precision="fp32").predict_batch(images).probabilities
        diff = float(np.abs(probabilities(got, bundle.temperature) - reference).max())
    else:
        diff = float(np.abs(probabilities(got) - probabilities(want)).max())
    if not np.isfinite(diff) or diff >= PARITY_TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"{run}: ONNX probabilities differ from PyTorch by {diff:.2e} (limit {PARITY_TOLERANCE:g}) on "
            f"{len(images)} patches of {source}; nothing was written"
        )
    os.replace(tmp, path)
    speed = None
    if time_backends and not needs_features(bundle.trust.ood):  # else auto runs torch: the graph gives no features
        speed = measure_backends(run, images)
        bundle = read_bundle(run)
        bundle.inference.backend_speed = speed
        bundle.save(run)
    return ExportResult(path, diff, len(images), source, speed)


def measure_backends(run_dir: str | Path, images: np.ndarray, rounds: int = 3) -> BackendSpeed:
    """Images/s of one-view prediction with each backend on ``images`` (on the CPU).

    The two are timed in alternation so both see the same machine load; the best round of each counts.
    """
    from histoscan.inference.predictor import Predictor

    predictors = {name: Predictor(run_dir, backend=name, batch_size=len(images)) for name in ("torch", "onnx")}
    best = dict.fromkeys(predictors, 0.0)
    for p in predictors.values():
        p.predict_batch(images, tta=False)  # warm-up: first-call allocations and graph optimisation
    for _ in range(rounds):
        for name, p in predictors.items():
            start = time.perf_counter()
            p.predict_batch(images, tta=False)
            best[name] = max(best[name], len(images) / max(time.perf_counter() - start, 1e-9))
    faster: Literal["torch", "onnx"] = "onnx" if best["onnx"] > best["torch"] else "torch"
    return BackendSpeed(
        torch=round(best["torch"], 1),
        onnx=round(best["onnx"], 1),
        faster=faster,
        hardware=hardware_id("cpu"),
        batch=len(images),
    )


class EnsembleModule(torch.nn.Module):
    """An ensemble as one network for ONNX export.

    The members' networks on one input preprocessed by the first member's recipe: logits of their weighted mean
    probability, and each member's probabilities (N x M x C). Each member's own normalisation is re-applied
    exactly: x_j = (x * std_0 + mean_0 - mean_j) / std_j.
    """

    def __init__(self, models: list[torch.nn.Module], bundles: list[ModelBundle], weights: list[float]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(models)
        m0, s0 = torch.tensor(bundles[0].preprocessing.mean), torch.tensor(bundles[0].preprocessing.std)
        scale, shift = [], []
        for b in bundles:
            mj, sj = torch.tensor(b.preprocessing.mean), torch.tensor(b.preprocessing.std)
            scale.append(s0 / sj)
            shift.append((m0 - mj) / sj)
        self.register_buffer("scale", torch.stack(scale).float()[:, None, :, None, None])
        self.register_buffer("shift", torch.stack(shift).float()[:, None, :, None, None])
        self.register_buffer("temperatures", torch.tensor([b.temperature for b in bundles], dtype=torch.float32))
        w = torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the weighted mean probability, and each member's probabilities."""
        scale, shift, temps = (
            cast(torch.Tensor, self.scale),
            cast(torch.Tensor, self.shift),
            cast(torch.Tensor, self.temperatures),
        )
        views: list[torch.Tensor] = [
            probabilities(cast(torch.Tensor, m(x * scale[j] + shift[j])) / temps[j], 1.0)
            for j, m in enumerate(self.members)
        ]
        probs = torch.stack(views, dim=1)
        mean = (probs * cast(torch.Tensor, self.weights)[None, :, None]).sum(dim=1).clamp(1e-7, 1 - 1e-7)
        if mean.shape[1] == 2:
            logits = (torch.log(mean[:, 1]) - torch.log(mean[:, 0]))[:, None]
        else:
            logits = torch.log(mean)
        return logits, probs


def _ensemble_module(run: Path, ensemble: EnsembleBundle) -> EnsembleModule:
    """The ensemble as one network; ExportError naming a member whose input recipe differs from the first's."""
    first = _input_recipe(ensemble.members[0])
    for d, b in zip(ensemble.member_dirs[1:], ensemble.members[1:]):
        recipe = _input_recipe(b)
        diff = [k for k in first if first[k] != recipe[k]]
        if diff:
            raise ExportError(
                f"{run}: member {d} preprocesses differently ({diff[0]} {recipe[diff[0]]} vs {first[diff[0]]}); "
                "one ONNX graph takes one preprocessed input: export the members one by one, or predict with the "
                "torch backend"
            )
    models = [load_model(d)[0] for d in ensemble.member_dirs]
    return EnsembleModule(models, ensemble.members, ensemble.weights).eval()


def _input_recipe(bundle: ModelBundle) -> dict[str, object]:
    pre = asdict(bundle.preprocessing)
    return {k: pre.get(k) for k in ("image_size", "fit", "crop", "resize", "stain")}
