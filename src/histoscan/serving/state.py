"""What the app holds once loaded, and the dependencies that hand it to routes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request

from histoscan.inference.predictor import Predictor
from histoscan.serving.batcher import MicroBatcher


@dataclass
class ServeSettings:
    """Options of ``histoscan serve``."""

    run_dir: str
    backend: str = "auto"
    device: str = "cpu"
    max_upload_mb: float = 20.0
    max_batch_files: int = 64
    max_batch: int = 64
    max_wait_ms: float = 5.0
    api_key: str | None = None


@dataclass
class ServeState:
    """The loaded model and its batcher (created in the lifespan handler)."""

    settings: ServeSettings
    predictor: Predictor
    batcher: MicroBatcher

    @property
    def run_name(self) -> str:
        from pathlib import Path

        return Path(self.settings.run_dir).resolve().name


def get_state(request: Request) -> ServeState:
    state = getattr(request.app.state, "histoscan", None)
    if state is None:
        raise HTTPException(status_code=503, detail="model not loaded yet")
    return state


def require_key(request: Request) -> None:
    """When an API key is set, every route that depends on this needs ``Authorization: Bearer <key>``."""
    key = request.app.state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong API key (send 'Authorization: Bearer <key>')",
                            headers={"WWW-Authenticate": "Bearer"})
