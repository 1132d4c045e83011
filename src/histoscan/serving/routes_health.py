"""Liveness, readiness and the model card."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from histoscan import __version__
from histoscan.bundle import EnsembleBundle
from histoscan.serving.metrics import CONTENT_TYPE
from histoscan.serving.responses import KEYED_ERRORS, errors
from histoscan.serving.state import ServeState, get_state, require_key

router = APIRouter()


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up (no key needed)."""
    return {"status": "ok"}


class ReadyBody(BaseModel):
    """Readiness, and how full the server is."""

    ready: bool
    reason: str | None = Field(None, description="Why not ready.")
    retry_in_s: float | None = Field(None, description="Seconds until the next restart of the model process.")
    saturated: list[str] = Field(
        description="What is full now: predict, explain, preview (their queues) or uploads (90% of the "
        "upload allowance held). Not empty: 503, new work of that kind is refused."
    )
    queue: dict[str, dict[str, int]] = Field(description="Work admitted per kind, and its limit.")
    uploads: dict[str, int] = Field(description="Bodies being received, bytes held, and the byte limit.")


@router.get(
    "/ready",
    dependencies=[Depends(require_key)],
    response_model=ReadyBody,
    responses={401: errors(401)[401], 503: {"model": ReadyBody, "description": "Not ready or saturated (and why)."}},
)
def ready(request: Request) -> JSONResponse:
    """Whether the service can take work: 200, or 503 with the reason.

    200 when the model is loaded, answering and not saturated; 503 with the reason when not (probes read the
    status).
    """
    state = getattr(request.app.state, "histoscan", None)
    status = {"ready": False, "reason": "the model is not loaded yet"} if state is None else state.model.status()
    load = request.app.state.metrics.saturation()
    status.update(load)
    if status["ready"] and load["saturated"]:
        status["ready"], status["reason"] = False, f"saturated: {', '.join(load['saturated'])} full"
    return JSONResponse(status_code=200 if status["ready"] else 503, content=status)


@router.get(
    "/metrics",
    dependencies=[Depends(require_key)],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format."}, **errors(401)},
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: queue depth per kind, uploads in flight, 503 and 408 counts, latency per route."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/model", dependencies=[Depends(require_key)], responses=errors(*KEYED_ERRORS))
def model_card(state: ServeState = Depends(get_state)) -> dict[str, Any]:
    """The model card of the served model.

    Architecture, classes, input size, threshold, calibration, referral rule, tissue check, out-of-distribution
    detector, validation metric, versions.
    """
    b = state.bundle
    rule = b.trust.referral
    return {
        "model": state.run_name,
        "architecture": b.architecture,
        "model_args": b.model_args,
        "task": b.task,
        "classes": b.classes,
        "input_size": b.preprocessing.input_size,
        "image_size": b.preprocessing.image_size,
        "preprocessing": b.preprocessing.to_dict(),
        "threshold": b.threshold,
        "calibration": {"temperature": b.temperature},
        "referral": None if rule is None else rule.model_dump(mode="json", exclude={"error_auroc"}),
        "tissue_check": b.trust.tissue_check is not None,
        "ood": None
        if b.trust.ood is None
        else b.trust.ood.model_dump(mode="json", include={"score", "threshold", "quantile", "fitted_on", "rows"}),
        "validation": b.best_metric,
        "backend": state.model.backend,
        # what answers: backend, precision, TTA views, members, threshold and how each fitted value was fitted,
        # with a line for each one fitted under another predictor
        "predictor": getattr(state.model, "predictor_settings", {}),
        "explainer_ready": state.model.explainer_ready,
        "trained_with": b.histoscan_version,
        "histoscan_version": __version__,
        **(
            {
                "members": [
                    {
                        "run": d.name,
                        "architecture": m.architecture,
                        "input_size": m.preprocessing.input_size,
                        "weight": w,
                    }
                    for d, m, w in zip(b.member_dirs, b.members, b.weights)
                ]
            }
            if isinstance(b, EnsembleBundle)
            else {}
        ),
    }
