"""Liveness, readiness and the model card."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from histoscan import __version__
from histoscan.serving.state import ServeState, get_state, require_key

router = APIRouter()


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up (no key needed)."""
    return {"status": "ok"}


@router.get("/ready", dependencies=[Depends(require_key)])
def ready(request: Request) -> dict[str, Any]:
    """The model is loaded and can answer."""
    state = getattr(request.app.state, "histoscan", None)
    return {"ready": state is not None and state.model.alive}


@router.get("/v1/model", dependencies=[Depends(require_key)])
def model_card(state: ServeState = Depends(get_state)) -> dict[str, Any]:
    """Architecture, classes, input size, threshold, calibration, validation metric, versions."""
    b = state.bundle
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
        "validation": b.best_metric,
        "backend": state.model.backend,
        "trained_with": b.histoscan_version,
        "histoscan_version": __version__,
    }
