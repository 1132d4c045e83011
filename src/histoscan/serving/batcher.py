"""Gather concurrent single-image requests into batches for the model."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoscan.inference.predictor import Prediction
from histoscan.serving.model_process import ModelRunner

Result = tuple[
    np.ndarray, int, "float | None", "str | None", "str | None"
]  # probs, class, uncertainty, answer, quality


class Overloaded(RuntimeError):
    """The queue for the model is full: the client should retry after ``retry_after`` seconds (503)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Item:
    image: np.ndarray
    tta: bool | None
    future: asyncio.Future[Result]


class MicroBatcher:
    """Continuous batching: a waiting request joins the next batch sent to the model.

    While up to ``max_in_flight`` batches are with the model, new requests wait; when one
    comes back, everything waiting (up to ``max_batch``) goes as the next batch. Under load
    batches grow by themselves and an idle model answers a lone request at once. With
    ``max_wait_ms`` > 0 a batch smaller than ``max_batch`` waits that long for company first.
    At most ``max_queue`` images wait (single requests and batch requests together); beyond
    that a request is refused at once with Overloaded instead of the queue growing.
    """

    def __init__(
        self,
        model: ModelRunner,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        max_in_flight: int = 2,
        max_queue: int = 512,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_in_flight < 1 or max_queue < 1:
            raise ValueError(
                f"need max_batch >= 1, max_wait_ms >= 0, max_in_flight >= 1, max_queue >= 1; got "
                f"{max_batch}, {max_wait_ms}, {max_in_flight}, {max_queue}"
            )
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000.0
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.queued = 0  # images waiting for or with the model
        self._pending: deque[_Item] = deque()
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

    async def predict(self, image: np.ndarray, tta: bool | None = None) -> Result:
        """Probabilities, predicted class, uncertainty (with several views), answer and quality flag for one image."""
        if self._slots is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        self._admit(1)
        try:
            future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            self._pending.append(_Item(image, tta, future))
            if self._dispatcher is None or self._dispatcher.done():
                self._dispatcher = asyncio.create_task(self._dispatch())
            return await future
        finally:
            self.queued -= 1

    async def predict_many(self, images: Sequence[np.ndarray], tta: bool | None = None) -> Prediction:
        """A whole batch request goes straight to the model (it is a batch already)."""
        self._admit(len(images))
        try:
            return await self.model.predict(images, tta)
        finally:
            self.queued -= len(images)

    def _admit(self, n: int) -> None:
        if self.queued + n > self.max_queue:
            raise Overloaded(f"server busy: {self.queued} images are waiting for the model (limit {self.max_queue})")
        self.queued += n

    async def _dispatch(self) -> None:
        assert self._slots is not None
        while self._pending:
            await self._slots.acquire()
            if self.max_wait > 0 and len(self._pending) < self.max_batch:
                await asyncio.sleep(self.max_wait)
            items = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            items = [it for it in items if not it.future.done()]  # clients that went away
            if not items:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

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
