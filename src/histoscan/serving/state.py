"""What the app holds once loaded, and the dependencies that hand it to routes."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request

from histoscan.bundle import ModelBundle
from histoscan.data.imageio import DecodeBudget
from histoscan.enums import Backend
from histoscan.errors import ConfigError
from histoscan.options import check_choices, doc
from histoscan.serving.batcher import MicroBatcher
from histoscan.serving.model_process import ModelRunner
from histoscan.serving.uploads import DecodePool, UploadDecoder, model_fit

MB = 1_000_000  # every limit and message uses decimal megabytes


@dataclass
class ServeSettings:
    """Options of ``histoscan serve`` (each field's help text is its ``--help``)."""

    run_dir: str = doc("A run folder (the model bundle).", argument=True, metavar="RUN")
    host: str = doc("Address to listen on (0.0.0.0 in a container).", "127.0.0.1")
    port: int = doc("Port.", 8000)
    workers: int = doc("Server processes (each loads the model once).", 1, flags="--processes")
    access_log: bool = doc("Log every request (about 8% of throughput on 2 cores).", True)
    backend: Backend = doc(
        "Inference backend; auto: whichever export timed faster on this hardware, else torch.", "auto", cli=False
    )
    device: str = doc("Torch device for the torch backend (cpu, cuda, cuda:1, mps).", "cpu", cli=False)
    threads: int | None = doc("CPU threads for the model in each process (default: all cores).", None, cli=False)
    max_upload_mb: float = doc("Largest accepted upload in MB (1 MB = 1,000,000 bytes); 413 above.", 20.0)
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

    # ---- limits on what one client can make the server hold or wait for ----
    max_request_mb: float = doc(
        "Largest request body of /v1/predict/batch in MB (1 MB = 1,000,000 bytes); 413 above, "
        "checked from Content-Length before the body is read.",
        64.0,
    )
    max_pixels: int = doc(
        "Most pixels (height x width) an uploaded image may declare; 413 above, before decoding.", 16_000_000
    )
    max_decoded_mb: float = doc(
        "Most memory one uploaded image may need once decoded (pixels x samples x bytes per "
        "sample), in MB; 413 above, before decoding.",
        64.0,
    )
    max_pages: int = doc("Most pages (TIFF) an uploaded file may hold; 413 above.", 8)
    decode_workers: int = doc("Threads that decode uploads, off the event loop (each decodes one image).", 2)
    max_inflight_mb: float = doc(
        "Most request-body bytes received and not yet answered, counted as they arrive, in MB; 503 with "
        "Retry-After above.",
        256.0,
    )
    max_client_share: float = doc(
        "Largest share (0-1] of --max-inflight-mb one client address may hold at once; 503 with Retry-After above.",
        0.25,
    )
    body_idle_timeout_s: float = doc(
        "Longest silence between two chunks of a request body, in s; 408 and the connection closed after.", 10.0
    )
    body_deadline_s: float = doc(
        "Longest time to receive a whole request body from the end of its headers, in s; 408 and the "
        "connection closed after.",
        60.0,
    )
    forwarded_allow_ips: str = doc(
        "Addresses of trusted reverse proxies (comma-separated, '*' for any) whose X-Forwarded-For gives the "
        "client's address for the per-client limits; default: none (the peer's address counts).",
        "",
    )
    max_queue: int = doc("Most images waiting for the model; 503 with Retry-After above (backpressure).", 512)
    max_explain_queue: int = doc(
        "Most /v1/explain requests admitted at once (they wait behind predictions); 503 with Retry-After above.", 2
    )
    max_previews: int = doc("Most /v1/preview requests admitted at once; 503 with Retry-After above.", 8)
    explain_warm: bool = doc(
        "Build the Grad-CAM explainer when the server starts (costs its memory at once) instead of on the "
        "first /v1/explain (which then takes seconds longer).",
        False,
        flags="--explain-warm/--explain-lazy",
    )
    model_timeout_s: float = doc("Longest wait for the model's answer to one batch, in s; 503 after.", 30.0)
    heartbeat_timeout_s: float = doc(
        "A model process whose heartbeat is silent this long (s) is hung: /ready turns 503 and it is restarted.", 10.0
    )
    restart_backoff_s: float = doc(
        "First wait before restarting a model process that failed to start, in s; doubles on "
        "each failure up to 60 s (no restart storm).",
        1.0,
    )

    # ---- scanned slides in the browser (/slides, /v1/slides) ----
    slides: str | None = doc(
        "A folder of scanned slides (the --out folder of 'histoscan slide') to view at /slides; "
        "each slide is read where its summary.json says it is.",
        None,
        metavar="FOLDER",
    )
    slide_cache_mb: float = doc(
        "Memory for encoded Deep Zoom tiles of --slides, in MB; the least recently used are dropped first.", 128.0
    )
    slide_workers: int = doc("Threads that read and encode slide tiles, off the event loop.", 2)
    max_tile_queue: int = doc("Most slide tiles waiting for those threads; 503 with Retry-After above.", 256)

    def __post_init__(self) -> None:
        check_choices(self)
        positive = (
            "max_upload_mb",
            "max_request_mb",
            "max_pixels",
            "max_decoded_mb",
            "max_pages",
            "decode_workers",
            "max_inflight_mb",
            "max_client_share",
            "body_idle_timeout_s",
            "body_deadline_s",
            "max_queue",
            "max_explain_queue",
            "max_previews",
            "model_timeout_s",
            "heartbeat_timeout_s",
            "slide_cache_mb",
            "slide_workers",
            "max_tile_queue",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"serve option {name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if self.max_client_share > 1:
            raise ConfigError(f"serve option max-client-share: must be in (0, 1], got {self.max_client_share}")

    @property
    def upload_limit(self) -> int:
        """Largest single upload in bytes."""
        return int(self.max_upload_mb * MB)

    @property
    def request_limit(self) -> int:
        """Largest batch request body in bytes."""
        return int(self.max_request_mb * MB)


@dataclass
class ServeState:
    """The loaded model, its batcher and the upload decoders (created in the lifespan handler)."""

    settings: ServeSettings
    bundle: ModelBundle
    model: ModelRunner
    batcher: MicroBatcher
    run_name: str = ""
    on_answer: Callable[[str | None], None] | None = None  # counts each image's answer (/metrics)
    decoder: UploadDecoder = field(init=False)
    pool: DecodePool = field(init=False)

    def __post_init__(self) -> None:
        self.run_name = self.run_name or Path(self.settings.run_dir).resolve().name
        s, pre = self.settings, self.bundle.preprocessing
        budget = DecodeBudget(
            max_pixels=s.max_pixels, max_decoded_bytes=int(s.max_decoded_mb * MB), max_pages=s.max_pages
        )
        target = (int(pre.image_size[0]), int(pre.image_size[1]))
        self.decoder = UploadDecoder(budget, model_fit(pre), target)
        self.pool = DecodePool(self.decoder, s.decode_workers)


async def get_state(request: Request) -> ServeState:
    """The service state; 503 until the model is loaded."""
    state = getattr(request.app.state, "histoscan", None)
    if state is None:
        raise HTTPException(status_code=503, detail="model not loaded yet", headers={"Retry-After": "5"})
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
