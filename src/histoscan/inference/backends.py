"""Two ways to run a model on a preprocessed batch: PyTorch and ONNX Runtime, one interface.

Both check, when they load, that the model's files agree with ``model.json``: unreadable files
and an output width that does not match the classes are one ConfigError line naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from histoscan.bundle import EnsembleBundle, ModelBundle, first_line, load_model, read_bundle
from histoscan.enums import BACKENDS, PRECISIONS
from histoscan.errors import ConfigError
from histoscan.models.factory import logits_and_pooled
from histoscan.rules.ood import needs_features
from histoscan.runfolder import MODEL_FILE, ONNX_CONTRACT_KEY, ONNX_CONTRACT_VERSION, ONNX_FILE, RunFolder
from histoscan.system import available_cores, hardware_id, native_bf16_cpu

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: images per forward pass of the torch backend on a CPU: a larger batch is run in chunks of this size. oneDNN's
#: convolutions keep a chunk's activations in the cores' caches; on 2 cores the CPU default ran about twice as
#: fast in chunks of 64 as in one pass of 256 (bf16 and fp32 alike; ResNet-18 at 80 px 1.15x), measured side by
#: side in benchmarks/bench_predict.py (``torch_chunk``). A GPU takes the whole batch at once.
CPU_CHUNK = 64


def resolve_precision(precision: str, bundle: ModelBundle, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for the torch backend.

    ``auto``: model.json's ``inference.precision`` when set, else bf16 autocast where the hardware
    computes bf16 natively (``native_bf16``: a CUDA card of compute capability >= 8.0, or a CPU with
    AVX512-BF16 / AMX: measured faster in
    benchmarks/bench_predict.py), else fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if bundle.inference.precision is not None:
        return bundle.inference.precision
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively.

    True for a CUDA card of compute capability 8.0 or newer (Ampere on) or a CPU with AVX512-BF16 / AMX; older
    cards and CPUs emulate it, slower than fp32.
    """
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8
    return device.type == "cpu" and native_bf16_cpu()


class Backend(Protocol):
    """Runs float32 NCHW input to logits."""

    name: str

    def logits(self, x: torch.Tensor) -> np.ndarray:
        """Logits of a preprocessed float batch (N x C x H x W)."""


class TorchBackend:
    """The run's ``best.safetensors`` in PyTorch."""

    name = "torch"

    def __init__(self, run_dir: str | Path, device: str | torch.device = "cpu", precision: str = "auto") -> None:
        self.device = torch.device(device)
        self.model, self.bundle = load_model(run_dir, self.device)
        # channels-last: faster convolutions on GPU and, with oneDNN, on CPU (measured 1.4x on 2 cores)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.precision = resolve_precision(precision, self.bundle, self.device)

    def _chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The batch on the device, channels-last, in the pieces one forward pass takes (``CPU_CHUNK``)."""
        x = x.to(self.device, non_blocking=True)
        step = CPU_CHUNK if self.device.type == "cpu" else max(1, len(x))
        return [c.contiguous(memory_format=torch.channels_last) for c in x.split(step)] if len(x) else [x]

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> np.ndarray:
        """Logits of a preprocessed batch from the torch model."""
        dtype = _DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return torch.cat([self.model(c).float() for c in self._chunks(x)]).cpu().numpy()

    @torch.inference_mode()
    def logits_and_features(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Logits and pooled features (before the classifier) of a preprocessed batch, in one pass of the trunk."""
        dtype = _DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            pairs = [logits_and_pooled(self.model, c) for c in self._chunks(x)]
        logits = torch.cat([lg.float() for lg, _ in pairs])
        features = torch.cat([f.float() for _, f in pairs])
        return logits.cpu().numpy(), features.cpu().numpy()


class OnnxBackend:
    """The run's ``model.onnx`` in ONNX Runtime (CUDA provider when present, else CPU).

    The graph's contract (see ``histoscan.inference.export``): a preprocessed float32 N x 3 x S x S
    tensor in, N x K logits out.
    """

    name = "onnx"

    def __init__(self, run_dir: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        run = RunFolder(run_dir)
        self.bundle: ModelBundle = read_bundle(run_dir)
        path = run.onnx_path
        if not path.is_file():
            raise ConfigError(f"{run_dir}: no {ONNX_FILE}; run 'histoscan export {run_dir}' first")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or available_cores()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between runs: decoding and preprocessing share these cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no public base class
            reason = re.sub(r"Load model from \S+ failed: ?", "", first_line(exc))  # the path is said once already
            raise ConfigError(f"{path}: not a readable ONNX model ({reason})") from None
        self.input_name = self.session.get_inputs()[0].name
        self._check_contract(path)

    def _check_contract(self, path: Path) -> None:
        """The graph's marker, input size and output width against model.json."""
        marker = self.session.get_modelmeta().custom_metadata_map.get(ONNX_CONTRACT_KEY)
        if marker is not None and marker != ONNX_CONTRACT_VERSION:
            raise ConfigError(
                f"{path}: ONNX contract version {marker} was written by a newer histoscan; "
                f"this one reads {ONNX_CONTRACT_VERSION}"
            )
        b = self.bundle
        shape = self.session.get_inputs()[0].shape
        side = b.preprocessing.input_size
        if len(shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (3, side, side))):
            raise ConfigError(
                f"{path}: the graph takes input of shape {shape}; preprocessing in {MODEL_FILE} gives N x 3 x {side} x {side}"
            )
        width = self.session.get_outputs()[0].shape[-1]
        if not isinstance(width, int):  # a symbolic width: run one image to learn it
            width = self.logits(torch.zeros(1, 3, side, side)).shape[-1]
        if width != b.num_outputs:
            raise ConfigError(
                f"{path}: the graph gives {width} output(s), but the {len(b.classes)} classes in {MODEL_FILE} "
                f"({', '.join(b.classes)}) need {b.num_outputs}"
            )

    def logits(self, x: torch.Tensor) -> np.ndarray:
        """Logits of a preprocessed batch from the ONNX graph."""
        return self.outputs(x)[0]

    def outputs(self, x: torch.Tensor) -> list[np.ndarray]:
        """Every output of the graph (an ensemble's second output holds its members' probabilities)."""
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return [np.asarray(o, dtype=np.float32) for o in self.session.run(None, {self.input_name: arr})]


def resolve_backend(run_dir: str | Path, backend: str = "auto", device: str = "cpu") -> str:
    """``torch`` or ``onnx``.

    ``auto`` is whichever was faster for this bundle on this hardware when ``histoscan export`` timed both
    (model.json's ``inference.backend_speed``): ONNX only when the run has ``model.onnx``, the device is the
    CPU and the measurement was made on hardware like this one (or the bundle ships no PyTorch weights);
    otherwise torch.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    run = RunFolder(run_dir)
    if device != "cpu" or not run.onnx_path.is_file():
        return "torch"
    bundle = read_bundle(run_dir)
    if not run.weights_path.is_file() and not isinstance(bundle, EnsembleBundle):
        return "onnx"  # an ONNX-only bundle (weights not shipped): the one backend it can run
    if needs_features(bundle.trust.ood):
        return "torch"  # the graph outputs no pooled features (the documented fallback of trust.ood)
    speed = bundle.inference.backend_speed
    return speed.faster if speed is not None and speed.hardware == hardware_id(device) else "torch"


def check_model(run_dir: str | Path, backend: str = "auto", device: str = "cpu") -> ModelBundle:
    """Load the run's model once on the CPU, with every check, and let it go.

    For commands that load the model elsewhere later (``serve`` loads it in a child process):
    a file that lies stops them here, with one ConfigError line, before anything starts.
    """
    if resolve_backend(run_dir, backend, device) == "onnx":
        return OnnxBackend(run_dir, threads=1).bundle
    bundle = read_bundle(run_dir)
    if isinstance(bundle, EnsembleBundle):
        for member in bundle.member_dirs:
            TorchBackend(member, "cpu")
        return bundle
    return TorchBackend(run_dir, "cpu").bundle
