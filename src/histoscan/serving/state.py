"""What the app holds once loaded, and the dependencies that hand it to routes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import HTTPException, Request

from histoscan.bundle import ModelBundle
from histoscan.options import check_choices, doc
from histoscan.serving.batcher import MicroBatcher
from histoscan.serving.model_process import ModelRunner
from histoscan.serving.uploads import UploadDecoder

Backend = Literal["auto", "torch", "onnx"]


@dataclass
class ServeSettings:
    """Options of ``histoscan serve`` (each field's help text is its ``--help``)."""

    run_dir: str = doc("A run folder (the model bundle).", argument=True, metavar="RUN")
    host: str = doc("Address to listen on (0.0.0.0 in a container).", "127.0.0.1")
    port: int = doc("Port.", 8000)
    workers: int = doc("Server processes (each loads the model once).", 1)
    access_log: bool = doc("Log every request (about 8% of throughput on 2 cores).", True)
    backend: Backend = doc("Inference backend; auto: onnx when model.onnx exists, else torch.", "auto")
    device: str = doc("Torch device for the torch backend (cpu, cuda, cuda:1, mps).", "cpu")
    threads: int | None = doc("CPU threads for the model in each process (default: all cores).", None)
    max_upload_mb: float = doc("Largest accepted upload in MB (413 above).", 20.0)
    max_batch_files: int = doc("Most files in one /v1/predict/batch request.", 64)
    max_batch: int = doc("Most single-image requests gathered into one model batch.", 64)
    max_wait_ms: float = doc("How long a batch smaller than --max-batch waits for more requests, in ms.", 0.0)
    max_in_flight: int = doc("Model batches queued to the model at once (more wait in the batcher).", 2)
    model_process: bool = doc(
        "Run the model in a child process (default), or with --in-process in a thread of the server process "
        "(no extra process, but slower under load: the two share one GIL).",
        True,
        flags="--model-process/--in-process",
    )
    api_key: str | None = doc(
        "API key every route needs (set HISTOSCAN_API_KEY; never a command-line option).", None, cli=False
    )

    def __post_init__(self) -> None:
        check_choices(self)


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
