"""Gather concurrent single-image requests into batches for the model; explanations wait behind them."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histoscan.inference.predictor import Prediction
from histoscan.serving.admission import Admission, Overloaded
from histoscan.serving.model_process import ExplainAnswer, ModelRunner, ModelUnavailable

__all__ = ["MicroBatcher", "Overloaded"]

Result = tuple[
    np.ndarray, int, "float | None", "str | None", "str | None"
]  # probs, class, uncertainty, answer, quality


@dataclass
class _Item:
    image: np.ndarray
    tta: bool | None
    future: asyncio.Future[Result]


@dataclass
class _Explain:
    image: np.ndarray
    method: str
    target: str
    tta: bool | None  # None: the explain default (histoscan.inference.tta)
    future: asyncio.Future[ExplainAnswer]


class MicroBatcher:
    """Continuous batching: a waiting request joins the next batch sent to the model.

    While up to ``max_in_flight`` batches are with the model, new requests wait; when one
    comes back, everything waiting (up to ``max_batch``) goes as the next batch. Under load
    batches grow by themselves and an idle model answers a lone request at once. With
    ``max_wait_ms`` > 0 a batch smaller than ``max_batch`` waits that long for company first.
    At most ``max_queue`` images wait (single requests and batch requests together); beyond
    that a request is refused at once with Overloaded instead of the queue growing.

    Explanations go through the same dispatcher but yield to predictions: one is sent to the
    model only when no prediction is waiting, and at most one is with the model at a time, so
    a flood of explanations delays a prediction by one explanation at most. Every wait for an
    answer (queue and model together) is bounded by ``timeout_s`` (ModelUnavailable, a 503).
    """

    def __init__(
        self,
        model: ModelRunner,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        max_in_flight: int = 2,
        max_queue: int = 512,
        admission: Admission | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_in_flight < 1 or max_queue < 1:
            raise ValueError(
                f"need max_batch >= 1, max_wait_ms >= 0, max_in_flight >= 1, max_queue >= 1; got "
                f"{max_batch}, {max_wait_ms}, {max_in_flight}, {max_queue}"
            )
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000.0
        self.max_in_flight, self.max_queue, self.timeout_s = max_in_flight, max_queue, timeout_s
        self.admission = admission or Admission({"predict": max_queue, "explain": 2, "preview": 8})
        self._pending: deque[_Item] = deque()
        self._explains: deque[_Explain] = deque()
        self._explaining = False  # an explanation is with the model
        self._changed = asyncio.Event()
        self._slots: asyncio.Semaphore | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start accepting work."""
        self._slots = asyncio.Semaphore(self.max_in_flight)

    async def stop(self) -> None:
        """Cancel the dispatcher and the batches in flight."""
        for task in [self._dispatcher, *self._running]:
            if task is not None:
                task.cancel()
        self._dispatcher = None

    @property
    def queued(self) -> int:
        """Images waiting for or with the model."""
        return self.admission.used["predict"]

    async def predict(self, image: np.ndarray, tta: bool | None = None) -> Result:
        """Probabilities, predicted class, uncertainty (with several views), answer and quality flag for one image."""
        if self._slots is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        with self.admission.slot("predict"):
            future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            self._pending.append(_Item(image, tta, future))
            self._wake()
            return await self._answer(future)

    async def predict_many(self, images: Sequence[np.ndarray], tta: bool | None = None) -> Prediction:
        """A whole batch request goes straight to the model (it is a batch already)."""
        with self.admission.slot("predict", len(images)):
            return await self.model.predict(images, tta)

    async def explain(self, image: np.ndarray, method: str, target: str, tta: bool | None) -> ExplainAnswer:
        """Grad-CAM of one image, sent to the model when no prediction waits (admit it with kind "explain" first)."""
        if self._slots is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future: asyncio.Future[ExplainAnswer] = asyncio.get_running_loop().create_future()
        self._explains.append(_Explain(image, method, target, tta, future))
        self._wake()
        return await self._answer(future)

    async def _answer(self, future: asyncio.Future[Any]) -> Any:
        try:
            return await asyncio.wait_for(future, self.timeout_s)  # a timeout cancels it: the dispatcher skips it
        except asyncio.TimeoutError:
            raise ModelUnavailable(f"the model did not answer within {self.timeout_s:g} s") from None

    def _wake(self) -> None:
        self._changed.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())

    async def _dispatch(self) -> None:
        assert self._slots is not None
        while self._pending or self._explains:
            await self._slots.acquire()
            if self.max_wait > 0 and 0 < len(self._pending) < self.max_batch:
                await asyncio.sleep(self.max_wait)
            if self._pending:
                items = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
                items = [it for it in items if not it.future.done()]  # clients that went away
                if not items:
                    self._slots.release()
                    continue
                self._spawn(self._run(items))
            elif self._explains and not self._explaining:
                job = self._explains.popleft()
                if job.future.done():
                    self._slots.release()
                    continue
                self._explaining = True
                self._spawn(self._run_explain(job))
            else:  # only explanations wait, and one is with the model: wait for it or for a prediction
                self._slots.release()
                self._changed.clear()
                await self._changed.wait()

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_explain(self, job: _Explain) -> None:
        assert self._slots is not None
        try:
            got = await self.model.explain(job.image, job.method, job.target, job.tta)
            if not job.future.done():
                job.future.set_result(got)
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
        finally:
            self._explaining = False
            self._slots.release()
            self._changed.set()

    async def _run(self, items: list[_Item]) -> None:
        assert self._slots is not None
        try:
            for tta in (None, False, True):
                group = [it for it in items if it.tta == tta]
                if not group:
                    continue
                try:
                    pred = await self.model.predict([it.image for it in group], tta)
                except Exception as exc:
                    for it in group:
                        if not it.future.done():
                            it.future.set_exception(exc)
                    continue
                for k, it in enumerate(group):
                    if not it.future.done():
                        unc = None if pred.uncertainty is None else float(pred.uncertainty[k])
                        answer = None if pred.answers is None else pred.answers[k]
                        quality = None if pred.quality is None else pred.quality[k]
                        it.future.set_result((pred.probabilities[k], int(pred.predicted[k]), unc, answer, quality))
        finally:
            self._slots.release()
