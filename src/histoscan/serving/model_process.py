"""The model in a child process, so HTTP handling and inference do not share one GIL.

Why: with the model in a thread of the server process, every step of a batch that needs the
GIL (each torch or numpy call, the return from ONNX Runtime) waits for the busy event loop to
let go of it, up to the 5 ms switch interval each time. Measured on 2 cores: a batch of 8
took 6.2 ms alone and 70 ms beside a busy Python thread. In its own process the model runs
at its own speed, and the server talks to it over a pipe.

Protocol (stdin / stdout of the child), both ways: a 12-byte header ``<IQ`` (JSON length,
data length), the JSON, then raw array bytes. The child answers jobs in the order they came,
so the parent may send the next batch while one is running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import struct
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import numpy as np

from histoscan.inference.predictor import Prediction, Predictor

_HEADER = struct.Struct("<IQ")


class ModelUnavailable(RuntimeError):
    """The model process is not running (it failed to start or exited)."""


class ModelRunner(Protocol):
    """What the batcher and the routes need of a loaded model."""

    backend: str

    @property
    def alive(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def predict(self, images: Sequence[np.ndarray], tta: bool) -> Prediction: ...


# ---- framing ---------------------------------------------------------------------------
def frame(meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> bytes:
    """One message: header, JSON, then the arrays' bytes back to back."""
    body = json.dumps(meta).encode()
    data = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return _HEADER.pack(len(body), len(data)) + body + data


def pack_job(images: Sequence[np.ndarray], tta: bool) -> bytes:
    """uint8 RGB images of any sizes (the child resizes) and the TTA flag."""
    return frame({"tta": bool(tta), "shapes": [list(im.shape) for im in images]}, images)


def unpack_job(meta: dict[str, Any], data: bytes) -> tuple[list[np.ndarray], bool]:
    images, pos = [], 0
    for shape in meta["shapes"]:
        n = int(np.prod(shape))
        images.append(np.frombuffer(data, np.uint8, n, pos).reshape(shape))
        pos += n
    return images, bool(meta["tta"])


def pack_prediction(pred: Prediction) -> bytes:
    arrays = [pred.probabilities.astype(np.float32), pred.predicted.astype(np.int64)]
    if pred.uncertainty is not None:
        arrays.append(pred.uncertainty.astype(np.float32))
    n, c = pred.probabilities.shape
    return frame({"ok": True, "n": n, "c": c, "uncertainty": pred.uncertainty is not None}, arrays)


def unpack_prediction(meta: dict[str, Any], data: bytes) -> Prediction:
    n, c = int(meta["n"]), int(meta["c"])
    probs = np.frombuffer(data, np.float32, n * c, 0).reshape(n, c)
    predicted = np.frombuffer(data, np.int64, n, 4 * n * c)
    unc = np.frombuffer(data, np.float32, n, 4 * n * c + 8 * n) if meta["uncertainty"] else None
    return Prediction(probs, predicted, unc)


# ---- the child -------------------------------------------------------------------------
def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def child_main(argv: Sequence[str] | None = None) -> int:
    """Load the Predictor, say ready, then answer jobs until stdin closes."""
    ap = argparse.ArgumentParser(prog="python -m histoscan.serving.model_process")
    ap.add_argument("run_dir")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the server, which closes our stdin
    # the protocol owns the original stdout; anything printed by libraries goes to stderr
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    try:
        predictor = Predictor(args.run_dir, backend=args.backend, device=args.device, threads=args.threads or None)
        if predictor.backend.name == "onnx":
            import torch

            # torch only preprocesses here: one thread keeps its OpenMP workers from spinning
            # against ONNX Runtime's (a batch of 16: 1,975 -> 2,553 img/s on 2 cores)
            torch.set_num_threads(1)
    except Exception as exc:
        out.write(frame({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    out.write(frame({"ok": True, "backend": predictor.backend.name}))
    while True:
        header = _read_exact(inp, _HEADER.size)
        if header is None:
            return 0
        meta_len, data_len = _HEADER.unpack(header)
        body = _read_exact(inp, meta_len + data_len)
        if body is None:
            return 0
        try:
            images, tta = unpack_job(json.loads(body[:meta_len]), body[meta_len:])
            reply = pack_prediction(predictor.predict_batch(images, tta))
        except Exception as exc:
            reply = frame({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        out.write(reply)


# ---- the parent ------------------------------------------------------------------------
@dataclass
class ModelProcess:
    """The parent's handle on the child: send jobs, await answers in order, restart if it died."""

    run_dir: str
    backend_choice: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        self.backend = self.backend_choice
        self._proc: asyncio.subprocess.Process | None = None
        self._waiting: deque[asyncio.Future[Prediction]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start the child and wait until its model is loaded (ModelUnavailable, with the reason, if it cannot)."""
        cmd = [
            sys.executable,
            "-m",
            "histoscan.serving.model_process",
            self.run_dir,
            "--backend",
            self.backend_choice,
            "--device",
            self.device,
            "--threads",
            str(self.threads or 0),
        ]
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            meta, _ = await asyncio.wait_for(self._read_message(), self.start_timeout_s)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            await self.stop()
            raise ModelUnavailable(f"the model process for {self.run_dir} did not start (see its error above)") from exc
        if not meta.get("ok"):
            await self.stop()
            raise ModelUnavailable(f"the model process could not load {self.run_dir}: {meta.get('error')}")
        self.backend = str(meta["backend"])
        self._reader = asyncio.create_task(self._read_answers())

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._fail_waiting(ModelUnavailable("the model process stopped"))

    async def predict(self, images: Sequence[np.ndarray], tta: bool) -> Prediction:
        """Send one job; the answer comes back in order. A dead child is restarted once."""
        async with self._lock:  # one writer at a time, and a restart happens once
            if not self.alive:
                await self.stop()
                await self.start()
            assert self._proc is not None and self._proc.stdin is not None
            future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
            self._waiting.append(future)
            self._proc.stdin.write(pack_job(images, tta))
            try:
                await self._proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ModelUnavailable("the model process exited") from exc
        return await future

    async def _read_message(self) -> tuple[dict[str, Any], bytes]:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        meta_len, data_len = _HEADER.unpack(await stdout.readexactly(_HEADER.size))
        body = await stdout.readexactly(meta_len + data_len)
        return json.loads(body[:meta_len]), body[meta_len:]

    async def _read_answers(self) -> None:
        try:
            while True:
                meta, data = await self._read_message()
                future = self._waiting.popleft()
                if future.done():
                    continue
                if meta.get("ok"):
                    future.set_result(unpack_prediction(meta, data))
                else:
                    future.set_exception(RuntimeError(f"model process: {meta.get('error')}"))
        except asyncio.IncompleteReadError:
            code = None if self._proc is None else await self._proc.wait()
            self._fail_waiting(ModelUnavailable(f"the model process exited (code {code})"))

    def _fail_waiting(self, exc: BaseException) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(exc)


class ModelThread:
    """The model in a worker thread of this process: no start-up cost (used by tests and embedding)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.backend = predictor.backend.name

    @property
    def alive(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def predict(self, images: Sequence[np.ndarray], tta: bool) -> Prediction:
        return await asyncio.to_thread(self.predictor.predict_batch, list(images), tta)


if __name__ == "__main__":
    raise SystemExit(child_main())
