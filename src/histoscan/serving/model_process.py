"""The model in a child process, so HTTP handling and inference do not share one GIL.

Why: with the model in a thread of the server process, every step of a batch that needs the
GIL (each torch or numpy call, the return from ONNX Runtime) waits for the busy event loop to
let go of it, up to the 5 ms switch interval each time. Measured on 2 cores: a batch of 8
took 6.2 ms alone and 70 ms beside a busy Python thread. In its own process the model runs
at its own speed, and the server talks to it over a pipe.

Protocol (stdin / stdout of the child), both ways: a 12-byte header ``<IQ`` (JSON length,
data length), the JSON, then raw array bytes. The child answers predictions in the order they
came, so the parent may send the next batch while one is running. Explanations run in a thread
of their own in the child (one at a time, answered in their order, marked ``"op": "explain"``),
so a slow explanation, or the explainer being built, never holds a prediction up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import numpy as np

from histoscan.inference.predictor import Prediction, Predictor

if TYPE_CHECKING:
    from histoscan.explain import Explainer
    from histoscan.serving.state import ServeSettings

_HEADER = struct.Struct("<IQ")
log = logging.getLogger("histoscan.serve")


class ModelUnavailable(RuntimeError):
    """The model cannot answer now (its process failed to start, exited, hung or timed out); a 503.

    The message is short and holds no path: it goes to the client.
    """


class ModelRunner(Protocol):
    """What the batcher and the routes need of a loaded model."""

    backend: str

    @property
    def alive(self) -> bool:
        """Whether the model answers."""

    @property
    def explainer_ready(self) -> bool:
        """Whether an explainer is built, so an explanation starts at once."""

    def status(self) -> dict[str, Any]:
        """Readiness and, when not ready, why."""

    async def start(self) -> None:
        """Load the model."""

    async def stop(self) -> None:
        """Stop the model."""

    async def predict(self, images: Sequence[np.ndarray], tta: bool | None) -> Prediction:
        """Predict a batch of decoded images (``tta`` None: the model's default)."""

    async def explain(self, image: np.ndarray, method: str, target: str, tta: bool | None) -> ExplainAnswer:
        """Grad-CAM map of one image."""


@dataclass
class ExplainAnswer:
    """One image's Grad-CAM map (raw values, on the image's pixels) and the model's answer."""

    probabilities: np.ndarray
    predicted: int
    map: np.ndarray
    target: str
    method: str  # the CAM method that ran ('auto' resolved from the model's structure)


# ---- framing ---------------------------------------------------------------------------
def frame(meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> bytes:
    """One message: header, JSON, then the arrays' bytes back to back."""
    body = json.dumps(meta).encode()
    data = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return _HEADER.pack(len(body), len(data)) + body + data


def pack_job(images: Sequence[np.ndarray], tta: bool | None) -> bytes:
    """uint8 RGB images of any sizes (the child resizes) and the TTA flag."""
    return frame({"tta": None if tta is None else bool(tta), "shapes": [list(im.shape) for im in images]}, images)


def unpack_job(meta: dict[str, Any], data: bytes) -> tuple[list[np.ndarray], bool | None]:
    """Images and TTA flag of a job, from its frame."""
    images, pos = [], 0
    for shape in meta["shapes"]:
        n = int(np.prod(shape))
        images.append(np.frombuffer(data, np.uint8, n, pos).reshape(shape))
        pos += n
    return images, None if meta["tta"] is None else bool(meta["tta"])


def pack_explain_job(image: np.ndarray, method: str, target: str, tta: bool | None) -> bytes:
    """One uint8 image to explain, with the method, the target and the TTA flag."""
    meta = {
        "op": "explain",
        "method": method,
        "target": target,
        "tta": None if tta is None else bool(tta),
        "shapes": [list(image.shape)],
    }
    return frame(meta, [image])


def pack_explanation(answer: ExplainAnswer) -> bytes:
    """Frame a Grad-CAM answer for the pipe."""
    probs = answer.probabilities.astype(np.float32)
    h, w = answer.map.shape
    meta = {
        "ok": True,
        "op": "explain",
        "c": int(probs.shape[0]),
        "h": h,
        "w": w,
        "predicted": answer.predicted,
        "target": answer.target,
        "method": answer.method,
    }
    return frame(meta, [probs, answer.map.astype(np.float32)])


def unpack_explanation(meta: dict[str, Any], data: bytes) -> ExplainAnswer:
    """A Grad-CAM answer from its frame."""
    c, h, w = int(meta["c"]), int(meta["h"]), int(meta["w"])
    probs = np.frombuffer(data, np.float32, c, 0)
    m = np.frombuffer(data, np.float32, h * w, 4 * c).reshape(h, w)
    return ExplainAnswer(probs, int(meta["predicted"]), m, str(meta["target"]), str(meta["method"]))


def explain_one(
    explainers: dict[tuple[str, str], Explainer],
    run_dir: str,
    device: str,
    image: np.ndarray,
    method: str,
    target: str,
    tta: bool | None,
) -> ExplainAnswer:
    """Explain one image with the cached Explainer (built on first use: it loads the weights).

    At most one Explainer is kept: asking for another method or target drops the old one
    first, so the memory explanations hold is bounded by one explainer (its footprint is
    measured in docs/incoming/36.md).
    """
    key = (method, target)
    if key not in explainers:
        explainers.clear()
        gc.collect()
        warm_explainer(explainers, run_dir, device, method, target)
    e = explainers[key].explain_batch([image], tta)
    return ExplainAnswer(e.probabilities[0], int(e.predicted[0]), e.maps[0], e.targets[0], explainers[key].method)


def warm_explainer(
    explainers: dict[tuple[str, str], Explainer],
    run_dir: str,
    device: str,
    method: str = "auto",
    target: str = "tumour",
) -> None:
    """Build the Explainer for ``(method, target)`` now (the page's default: the auto method on the tumour class)."""
    from histoscan.explain import Explainer

    explainers[(method, target)] = Explainer(run_dir, method=method, target=target, device=device, batch_size=1)


def pack_prediction(pred: Prediction) -> bytes:
    """Frame a prediction for the pipe."""
    arrays: list[np.ndarray] = [pred.probabilities.astype(np.float32), pred.predicted.astype(np.int64)]
    if pred.uncertainty is not None:
        arrays.append(pred.uncertainty.astype(np.float32))
    n, c = pred.probabilities.shape
    meta = {"ok": True, "n": n, "c": c, "uncertainty": pred.uncertainty is not None}
    return frame({**meta, "answers": pred.answers, "quality": pred.quality}, arrays)  # short strings: in the meta


def unpack_prediction(meta: dict[str, Any], data: bytes) -> Prediction:
    """A prediction from its frame."""
    n, c = int(meta["n"]), int(meta["c"])
    probs = np.frombuffer(data, np.float32, n * c, 0).reshape(n, c)
    predicted = np.frombuffer(data, np.int64, n, 4 * n * c)
    unc = np.frombuffer(data, np.float32, n, 4 * n * c + 8 * n) if meta["uncertainty"] else None
    return Prediction(probs, predicted, unc, meta.get("answers"), meta.get("quality"))


# ---- the child -------------------------------------------------------------------------
HEARTBEAT_S = 0.5  # the child's heartbeat period


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _Writer:
    """The child's side of the pipe: whole messages, from the main thread and the heartbeat thread."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.lock = out, threading.Lock()

    def write(self, message: bytes) -> None:
        with self.lock:
            self.out.write(message)

    def beat(self, period: float) -> None:
        """Send a heartbeat every ``period`` s until the pipe closes (daemon thread).

        The beat comes from its own thread, so a long batch (TTA on a big model) keeps the
        heartbeat going, while a stopped or wedged process (SIGSTOP, a deadlock holding the
        GIL) falls silent and the parent restarts it.
        """
        beat = frame({"hb": True})
        while True:
            time.sleep(period)
            try:
                self.write(beat)
            except (OSError, ValueError):
                return


def child_main(argv: Sequence[str] | None = None) -> int:
    """Load the Predictor, say ready, then answer jobs until stdin closes."""
    ap = argparse.ArgumentParser(prog="python -m histoscan.serving.model_process")
    ap.add_argument("run_dir")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--explain-warm", action="store_true")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the server, which closes our stdin
    # the protocol owns the original stdout; anything printed by libraries goes to stderr
    out = _Writer(os.fdopen(os.dup(1), "wb", buffering=0))
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    try:
        predictor = Predictor(args.run_dir, backend=args.backend, device=args.device, threads=args.threads or None)
        if predictor.backend.name == "onnx":
            import torch

            # torch only preprocesses here: one thread keeps its OpenMP workers from spinning
            # against ONNX Runtime's (a batch of 16: 1,975 -> 2,553 img/s on 2 cores)
            torch.set_num_threads(1)
        explainers: dict[tuple[str, str], Explainer] = {}
        if args.explain_warm:
            warm_explainer(explainers, args.run_dir, args.device)
    except Exception as exc:
        out.write(frame({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    views = predictor.tta_views(None)
    settings = {**predictor.settings_record(views), "notices": predictor.fitted_notices(views)}
    out.write(frame({"ok": True, "backend": predictor.backend.name, "predictor": settings}))
    threading.Thread(target=out.beat, args=(HEARTBEAT_S,), daemon=True, name="heartbeat").start()
    explaining = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explain")

    def explain(meta: dict[str, Any], image: np.ndarray, tta: bool | None) -> None:
        try:
            got = explain_one(explainers, args.run_dir, args.device, image, meta["method"], meta["target"], tta)
            out.write(pack_explanation(got))
        except Exception as exc:
            out.write(frame({"ok": False, "op": "explain", "error": f"{type(exc).__name__}: {exc}"}))

    while True:
        header = _read_exact(inp, _HEADER.size)
        if header is None:
            explaining.shutdown(wait=False, cancel_futures=True)
            return 0
        meta_len, data_len = _HEADER.unpack(header)
        body = _read_exact(inp, meta_len + data_len)
        if body is None:
            explaining.shutdown(wait=False, cancel_futures=True)
            return 0
        meta: dict[str, Any] = {}
        try:
            meta = json.loads(body[:meta_len])
            images, tta = unpack_job(meta, body[meta_len:])
            if meta.get("op") == "explain":
                explaining.submit(explain, meta, images[0].copy(), tta)  # None: the explain default
                continue
            reply = pack_prediction(predictor.predict_batch(images, tta))
        except Exception as exc:
            op = {"op": "explain"} if meta.get("op") == "explain" else {}
            reply = frame({"ok": False, **op, "error": f"{type(exc).__name__}: {exc}"})
        out.write(reply)


# ---- the parent ------------------------------------------------------------------------
MAX_BACKOFF_S = 60.0


@dataclass
class ModelProcess:
    """The parent's handle on the child: send jobs, await answers in order, restart it when it dies or hangs.

    A watchdog task restarts a child that exited or whose heartbeat fell silent for
    ``heartbeat_timeout_s``. A child that fails to start is retried after a back-off that
    doubles up to a minute; meanwhile every request is answered ModelUnavailable at once
    and ``status()`` says why. Each answer is awaited at most ``timeout_s``.
    """

    run_dir: str
    backend_choice: str
    device: str
    threads: int | None
    timeout_s: float
    heartbeat_timeout_s: float
    backoff_s: float
    start_timeout_s: float = 120.0
    explain_warm: bool = False

    def __post_init__(self) -> None:
        self.backend = self.backend_choice
        self.predictor_settings: dict[str, Any] = {}  # what answers: Predictor.settings_record and its notices
        self.starts = 0  # child processes launched (tests and /ready read it)
        self._proc: asyncio.subprocess.Process | None = None
        # answers come back in order within each lane: predictions, and explanations (their own thread)
        self._waiting: dict[str, deque[tuple[asyncio.Future[Any], Callable[[dict[str, Any], bytes], Any]]]] = {
            "predict": deque(),
            "explain": deque(),
        }
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._last_beat = 0.0
        self._failures = 0
        self._retry_at = 0.0
        self._problem: str | None = None
        self.explainer_ready = False  # an explainer is built in the child (warm, or after a first explanation)

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> ModelProcess:
        """The model process ``histoscan serve`` runs with these settings (the one place its options are read)."""
        s = settings
        return cls(
            s.run_dir,
            s.backend,
            s.device,
            s.threads,
            s.model_timeout_s,
            s.heartbeat_timeout_s,
            s.restart_backoff_s,
            explain_warm=s.explain_warm,
        )

    @property
    def alive(self) -> bool:
        """The child runs and its heartbeat is fresh."""
        return self._proc is not None and self._proc.returncode is None and not self._silent()

    def _silent(self) -> bool:
        return time.monotonic() - self._last_beat > self.heartbeat_timeout_s

    def status(self) -> dict[str, Any]:
        """Readiness and, when not ready, the reason and the seconds until the next restart."""
        if self.alive:
            return {"ready": True}
        out: dict[str, Any] = {"ready": False, "reason": self._problem or "the model process is not running"}
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            out["retry_in_s"] = round(wait, 1)
        return out

    async def start(self) -> None:
        """Start the child and wait until its model is loaded (ModelUnavailable, with the reason, if it cannot)."""
        await self._launch()
        self._watchdog = asyncio.create_task(self._watch())

    async def _launch(self) -> None:
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
            *(["--explain-warm"] if self.explain_warm else []),
        ]
        self.starts += 1
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            meta, _ = await asyncio.wait_for(self._read_message(), self.start_timeout_s)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            await self._halt(kill=True)
            self._failed("the model process did not start")
            log.error("the model process for %s did not start (see its error above)", self.run_dir)
            raise ModelUnavailable("the model process did not start") from exc
        if not meta.get("ok"):
            await self._halt(kill=True)
            self._failed("the model could not be loaded")
            log.error("the model process could not load %s: %s", self.run_dir, meta.get("error"))
            raise ModelUnavailable("the model could not be loaded")
        self.backend = str(meta["backend"])
        self.predictor_settings = dict(meta.get("predictor") or {})
        self.explainer_ready = self.explain_warm
        self._failures, self._retry_at, self._problem = 0, 0.0, None
        self._last_beat = time.monotonic()
        self._reader = asyncio.create_task(self._read_answers())

    def _failed(self, problem: str) -> None:
        self._failures += 1
        wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + wait
        self._problem = f"{problem}; next attempt in {wait:g} s"

    async def _ensure_running(self) -> None:
        """Restart a dead or hung child, unless a restart failed and its back-off has not passed."""
        async with self._lock:
            if self.alive:
                return
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise ModelUnavailable(f"{self._problem or 'the model is restarting'} (retry in {wait:.0f} s)")
            if self._proc is not None:
                hung = self._proc.returncode is None
                log.warning("the model process %s; restarting it", "stopped answering" if hung else "exited")
                await self._halt(kill=hung)
            await self._launch()

    async def stop(self) -> None:
        """Stop the watchdog and the model process."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await self._halt(kill=False)

    async def _halt(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                if kill:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()  # also ends a stopped (SIGSTOP) process
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._fail_waiting(ModelUnavailable("the model process stopped"))

    async def _watch(self) -> None:
        """Restart a child that exited or fell silent (with back-off when restarts fail)."""
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat_timeout_s / 4))
            if self.alive:
                continue
            proc = self._proc
            if proc is not None and proc.returncode is None and self._silent():
                log.warning("the model process (pid %d) stopped answering; killing and restarting it", proc.pid)
                self._problem = "the model process stopped answering"
                proc.kill()  # ends a stopped (SIGSTOP) child too, which unblocks a writer waiting on its pipe
                self._fail_waiting(ModelUnavailable("the model process stopped answering"))
            with contextlib.suppress(ModelUnavailable):  # the back-off is recorded in status()
                await self._ensure_running()

    async def predict(self, images: Sequence[np.ndarray], tta: bool | None) -> Prediction:
        """Send one job; the answer comes back in order (ModelUnavailable after ``timeout_s``)."""
        result: Prediction = await self._send(pack_job(images, tta), unpack_prediction, "predict")
        return result

    async def explain(self, image: np.ndarray, method: str, target: str, tta: bool | None) -> ExplainAnswer:
        """Grad-CAM of one image, computed in the model process (never on the server's event loop)."""
        job = pack_explain_job(image, method, target, tta)
        result: ExplainAnswer = await self._send(job, unpack_explanation, "explain")
        self.explainer_ready = (method, target) == ("auto", "tumour")
        return result

    async def _send(self, message: bytes, unpack: Callable[[dict[str, Any], bytes], Any], lane: str) -> Any:
        await self._ensure_running()
        async with self._lock:  # one writer at a time
            if self._proc is None or self._proc.stdin is None:
                raise ModelUnavailable("the model process is restarting")
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiting[lane].append((future, unpack))
            self._proc.stdin.write(message)
            try:
                await self._proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ModelUnavailable("the model process exited") from exc
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            raise ModelUnavailable(f"the model did not answer within {self.timeout_s:g} s") from None

    async def _read_message(self) -> tuple[dict[str, Any], bytes]:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        while True:
            meta_len, data_len = _HEADER.unpack(await stdout.readexactly(_HEADER.size))
            body = await stdout.readexactly(meta_len + data_len)
            meta = json.loads(body[:meta_len])
            if not meta.get("hb"):
                return meta, body[meta_len:]
            self._last_beat = time.monotonic()

    async def _read_answers(self) -> None:
        try:
            while True:
                meta, data = await self._read_message()
                self._last_beat = time.monotonic()
                future, unpack = self._waiting["explain" if meta.get("op") == "explain" else "predict"].popleft()
                if future.done():
                    continue
                if meta.get("ok"):
                    future.set_result(unpack(meta, data))
                else:
                    future.set_exception(RuntimeError(f"model process: {meta.get('error')}"))
        except asyncio.IncompleteReadError:
            code = None if self._proc is None else await self._proc.wait()
            log.warning("the model process exited (code %s)", code)
            self._fail_waiting(ModelUnavailable("the model process exited"))

    def _fail_waiting(self, exc: BaseException) -> None:
        waiting = [w for lane in self._waiting.values() for w in lane]
        for lane in self._waiting.values():
            lane.clear()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(exc)


class ModelThread:
    """The model in a worker thread of this process: no start-up cost (used by tests and embedding)."""

    def __init__(self, predictor: Predictor, timeout_s: float = 30.0, explain_warm: bool = False) -> None:
        self.predictor, self.timeout_s, self.explain_warm = predictor, timeout_s, explain_warm
        self.backend = predictor.backend.name
        views = predictor.tta_views(None)
        self.predictor_settings: dict[str, Any] = {
            **predictor.settings_record(views),
            "notices": predictor.fitted_notices(views),
        }
        self._explainers: dict[tuple[str, str], Explainer] = {}

    @property
    def explainer_ready(self) -> bool:
        """The page's default explainer (the auto method, tumour class) is built."""
        return ("auto", "tumour") in self._explainers

    @property
    def alive(self) -> bool:
        """Always true: the model runs in this process."""
        return True

    def status(self) -> dict[str, Any]:
        """Always ready."""
        return {"ready": True}

    async def start(self) -> None:
        """Build the explainer now when asked to (``explain_warm``); the model was loaded with the runner."""
        if self.explain_warm:
            run_dir, device = str(self.predictor.run_dir), str(self.predictor.device)
            await asyncio.to_thread(warm_explainer, self._explainers, run_dir, device)

    async def stop(self) -> None:
        """Nothing to stop."""
        return None

    async def predict(self, images: Sequence[np.ndarray], tta: bool | None) -> Prediction:
        """Predict in a worker thread, with the request timeout."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self.predictor.predict_batch, list(images), tta), self.timeout_s
            )
        except asyncio.TimeoutError:
            raise ModelUnavailable(f"the model did not answer within {self.timeout_s:g} s") from None

    async def explain(self, image: np.ndarray, method: str, target: str, tta: bool | None) -> ExplainAnswer:
        """Grad-CAM of one image in a worker thread (the model's, never the event loop)."""
        run_dir, device = str(self.predictor.run_dir), str(self.predictor.device)
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(explain_one, self._explainers, run_dir, device, image, method, target, tta),
                self.timeout_s,
            )
        except asyncio.TimeoutError:
            raise ModelUnavailable(f"the model did not answer within {self.timeout_s:g} s") from None


if __name__ == "__main__":
    raise SystemExit(child_main())
