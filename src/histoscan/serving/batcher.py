"""Gather concurrent single-image requests into batches for the Predictor."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from histoscan.inference.predictor import Prediction, Predictor


@dataclass
class _Item:
    image: np.ndarray
    tta: bool
    future: "asyncio.Future[tuple[np.ndarray, int, float | None]]"


class MicroBatcher:
    """A queue drained by one task: up to ``max_batch`` images or ``max_wait_ms``, whichever comes first.

    The model runs in a worker thread so the event loop keeps accepting requests meanwhile.
    """

    def __init__(self, predictor: Predictor, max_batch: int = 64, max_wait_ms: float = 5.0) -> None:
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def predict(self, image: np.ndarray, tta: bool = False) -> tuple[np.ndarray, int, float | None]:
        """Probabilities, predicted class and (with TTA) uncertainty for one image."""
        assert self._queue is not None, "MicroBatcher.start() was not called"
        fut: asyncio.Future[tuple[np.ndarray, int, float | None]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(image, tta, fut))
        return await fut

    async def predict_many(self, images: Sequence[np.ndarray], tta: bool = False) -> Prediction:
        """A whole batch request goes straight to the Predictor (it is a batch already)."""
        return await asyncio.to_thread(self.predictor.predict_batch, list(images), tta)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            for tta in (False, True):
                group = [it for it in items if it.tta == tta]
                if not group:
                    continue
                try:
                    pred = await asyncio.to_thread(self.predictor.predict_batch, [it.image for it in group], tta)
                except Exception as exc:  # noqa: BLE001 - hand the error to each waiting request
                    for it in group:
                        if not it.future.done():
                            it.future.set_exception(exc)
                    continue
                self.batches += 1
                for k, it in enumerate(group):
                    if not it.future.done():
                        unc = None if pred.uncertainty is None else float(pred.uncertainty[k])
                        it.future.set_result((pred.probabilities[k], int(pred.predicted[k]), unc))
