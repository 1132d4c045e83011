"""Prometheus metrics of one server process: saturation (queues, uploads in flight), refusals, latency.

Each app has its own CollectorRegistry (tests start many apps in one process; the global
registry would refuse the second). With several ``--workers`` each process reports its own
figures: scrape each, or run one worker per container.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from histoscan.serving.admission import KINDS, Admission
from histoscan.serving.guard import UploadBudget

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ANSWERS = ("class", "refer", "not tissue", "out of distribution")  # the labels of histoscan_answers
ROUTES = ("/v1/predict", "/v1/predict/batch", "/v1/explain", "/v1/preview")


class ServeMetrics:
    """The figures ``/metrics`` exposes; the guard calls ``observe`` once per HTTP request."""

    def __init__(self, budget: UploadBudget) -> None:
        self.registry = CollectorRegistry()
        self.budget = budget
        self.admission: Admission | None = None  # set once the model is loaded
        r = self.registry
        self.requests = Counter(
            "histoscan_responses", "HTTP responses by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "histoscan_request_seconds",
            "Time from request head to the end of the answer, by route.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.busy = Counter("histoscan_busy_refusals", "Requests answered 503 (any cause).", registry=r)
        self.late = Counter("histoscan_timeouts", "Request bodies answered 408 (too slow).", registry=r)
        self.answers = Counter(
            "histoscan_answers",
            "Images answered, by answer: class, refer, not tissue, out of distribution (a drift shows here).",
            ["answer"],
            registry=r,
        )
        for kind in ANSWERS:
            self.answers.labels(kind)  # every kind exported from the start, at 0
        queue = Gauge("histoscan_queue_depth", "Work admitted and not yet answered, by kind.", ["kind"], registry=r)
        limit = Gauge("histoscan_queue_limit", "Admission limit, by kind.", ["kind"], registry=r)
        for kind in KINDS:
            queue.labels(kind).set_function(self._used(kind))
            limit.labels(kind).set_function(self._limit(kind))
        uploads = Gauge("histoscan_uploads_in_flight", "Request bodies being received now.", registry=r)
        uploads.set_function(lambda: budget.receiving)
        held = Gauge("histoscan_upload_bytes_in_flight", "Request-body bytes held now.", registry=r)
        held.set_function(lambda: budget.used)
        cap = Gauge("histoscan_upload_bytes_limit", "The upload allowance (--max-inflight-mb) in bytes.", registry=r)
        cap.set(budget.limit)

    def _used(self, kind: str) -> Callable[[], float]:
        return lambda: 0 if self.admission is None else self.admission.used.get(kind, 0)

    def _limit(self, kind: str) -> Callable[[], float]:
        return lambda: 0 if self.admission is None else self.admission.limits.get(kind, 0)

    def observe(self, scope: MutableMapping[str, Any], status: int, seconds: float) -> None:
        """Count one answered request (routes outside the API are pooled as "other": bounded labels)."""
        path = str(scope.get("path", "")).rstrip("/") or "/"
        if path in ROUTES or path in ("/health", "/ready", "/metrics", "/v1/model", "/v1/slides"):
            route = path
        elif path.startswith("/v1/slides/"):
            route = slide_route(path)
        else:
            route = "other"
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status == 503 and route != "/ready":  # /ready's 503 is a probe's answer, not refused work
            self.busy.inc()
        elif status == 408:
            self.late.inc()

    def count_answer(self, answer: str | None) -> None:
        """Count one image's answer (a class name counts as ``class``; None: a run without answers)."""
        if answer is not None:
            self.answers.labels(answer if answer in ANSWERS else "class").inc()

    def saturation(self) -> dict[str, Any]:
        """What ``/ready`` reports: queue depths and limits, upload bytes held, and what is full."""
        adm = self.admission
        full = [] if adm is None else adm.saturated()
        if self.budget.used >= 0.9 * self.budget.limit:
            full.append("uploads")
        return {
            "saturated": full,
            "queue": {} if adm is None else {k: {"used": adm.used[k], "limit": adm.limits[k]} for k in adm.limits},
            "uploads": {"receiving": self.budget.receiving, "bytes": self.budget.used, "limit": self.budget.limit},
        }

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


def slide_route(path: str) -> str:
    """The template of a ``/v1/slides/...`` path (one label per route, whatever the slide or tile)."""
    rest = path[len("/v1/slides/") :]
    if "_files/" in rest:
        return "/v1/slides/{slide}_files/{level}/{col}_{row}.jpeg"
    if rest.endswith("/overlay.png"):
        return "/v1/slides/{slide}/overlay.png"
    if rest.endswith("/regions.geojson"):
        return "/v1/slides/{slide}/regions.geojson"
    if rest.endswith(".dzi"):
        return "/v1/slides/{slide}.dzi"
    return "/v1/slides/{slide}"
