"""Liveness, readiness and the model card."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from histoscan import __version__
from histoscan.bundle import EnsembleBundle
from histoscan.serving.state import ServeState, get_state, require_key

router = APIRouter()


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up (no key needed)."""
    return {"status": "ok"}


@router.get("/ready", dependencies=[Depends(require_key)], responses={503: {"description": "Not ready (and why)."}})
def ready(request: Request) -> JSONResponse:
    """200 when the model is loaded and answering; 503 with the reason when not (probes read the status)."""
    state = getattr(request.app.state, "histoscan", None)
    status = {"ready": False, "reason": "the model is not loaded yet"} if state is None else state.model.status()
    return JSONResponse(status_code=200 if status["ready"] else 503, content=status)


@router.get("/v1/model", dependencies=[Depends(require_key)])
def model_card(state: ServeState = Depends(get_state)) -> dict[str, Any]:
    """The model card of the served model.

    Architecture, classes, input size, threshold, calibration, referral rule, tissue check, validation metric,
    versions.
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
        "validation": b.best_metric,
        "backend": state.model.backend,
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
