"""One bounded admission for all model work (predictions, batches, explanations, previews) and slide tiles.

Each kind of work has its own limit (images for predictions, requests for the others; ``tile``:
Deep Zoom tiles, overlays and regions of ``--slides`` waiting for the tile threads); a
request over its kind's limit is refused at once with Overloaded (503 with Retry-After)
instead of queueing without bound. The counts are what ``/ready`` and ``/metrics`` report.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

KINDS = ("predict", "explain", "preview", "tile")


class Overloaded(RuntimeError):
    """The queue for this kind of work is full: the client should retry after ``retry_after`` seconds (503)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Admission:
    """Counts of admitted work per kind against per-kind limits (one event loop: no lock needed)."""

    def __init__(self, limits: dict[str, int]) -> None:
        for kind, limit in limits.items():
            if limit < 1:
                raise ValueError(f"admission limit for {kind} must be >= 1, got {limit}")
        self.limits = dict(limits)
        self.used = {kind: 0 for kind in limits}
        self.refused = {kind: 0 for kind in limits}

    def refusal(self, kind: str, n: int = 1) -> Overloaded | None:
        """The Overloaded that admitting ``n`` units of ``kind`` now would raise (None: there is room)."""
        if self.used[kind] + n <= self.limits[kind]:
            return None
        if kind == "tile":
            return Overloaded(
                f"server busy: {self.used[kind]} slide tiles queued (limit {self.limits[kind]}); retry shortly", 1
            )
        unit = "images are" if kind == "predict" else f"{kind} requests are"
        return Overloaded(
            f"server busy: {self.used[kind]} {unit} waiting for the model (limit {self.limits[kind]})",
            retry_after=1 if kind == "predict" else 5,
        )

    def take(self, kind: str, n: int = 1) -> None:
        """Admit ``n`` units of ``kind`` or raise Overloaded."""
        refused = self.refusal(kind, n)
        if refused is not None:
            self.refused[kind] += 1
            raise refused
        self.used[kind] += n

    def give(self, kind: str, n: int = 1) -> None:
        """Release ``n`` units of ``kind``."""
        self.used[kind] -= n

    @contextmanager
    def slot(self, kind: str, n: int = 1) -> Iterator[None]:
        """Hold ``n`` units of ``kind`` for the duration of the block."""
        self.take(kind, n)
        try:
            yield
        finally:
            self.give(kind, n)

    def saturated(self) -> list[str]:
        """The kinds whose limit is reached (new work of that kind is refused)."""
        return [k for k, limit in self.limits.items() if self.used[k] >= limit]
