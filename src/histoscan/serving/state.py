"""What the app holds once loaded, and the dependencies that hand it to routes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request

from histoscan.bundle import ModelBundle
from histoscan.serving.batcher import MicroBatcher
from histoscan.serving.model_process import ModelRunner
from histoscan.serving.uploads import UploadDecoder


@dataclass
class ServeSettings:
    """Options of ``histoscan serve``."""

    run_dir: str
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    max_upload_mb: float = 20.0
    max_batch_files: int = 64
    max_batch: int = 64
    max_wait_ms: float = 0.0
    max_in_flight: int = 2
    model_process: bool = True
    api_key: str | None = None


@dataclass
class ServeState:
    """The loaded model and its batcher (created in the lifespan handler)."""

    settings: ServeSettings
    bundle: ModelBundle
    model: ModelRunner
    batcher: MicroBatcher
    decode: UploadDecoder = field(default_factory=UploadDecoder)
    run_name: str = ""

    def __post_init__(self) -> None:
        self.run_name = self.run_name or Path(self.settings.run_dir).resolve().name


async def get_state(request: Request) -> ServeState:
    state = getattr(request.app.state, "histoscan", None)
    if state is None:
        raise HTTPException(status_code=503, detail="model not loaded yet")
    return state


async def require_key(request: Request) -> None:
    """When an API key is set, every route that depends on this needs ``Authorization: Bearer <key>``."""
    key = request.app.state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key (send 'Authorization: Bearer <key>')",
            headers={"WWW-Authenticate": "Bearer"},
        )
