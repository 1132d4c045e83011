"""Run the app under uvicorn (one or several worker processes)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from fastapi import FastAPI

from histoscan.inference.backends import check_model
from histoscan.serving.app import create_app
from histoscan.serving.slides.library import SlideLibrary
from histoscan.serving.state import ServeSettings

SETTINGS_ENV = "HISTOSCAN_SERVE_SETTINGS"
API_KEY_ENV = "HISTOSCAN_API_KEY"


def app_from_env() -> FastAPI:
    """App factory for uvicorn workers: settings from the environment."""
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start the server with 'histoscan serve RUN'")
    settings = ServeSettings(**json.loads(raw))
    settings.api_key = os.environ.get(API_KEY_ENV) or None
    return create_app(settings)


def serve(settings: ServeSettings) -> None:
    """Check the run, then serve it until interrupted."""
    import uvicorn

    check_model(settings.run_dir, settings.backend, settings.device)  # a file that lies: one line, before starting
    if settings.slides:
        SlideLibrary(settings.slides)  # a --slides that is no folder: one line, before starting
    public = asdict(settings)
    public.pop("api_key", None)  # the key stays in its own variable, never in the settings blob
    os.environ[SETTINGS_ENV] = json.dumps(public)
    uvicorn.run(
        "histoscan.serving.server:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="info",
        timeout_graceful_shutdown=5,
        access_log=settings.access_log,
        # X-Forwarded-For is believed only from the proxies named (none by default: uvicorn's own
        # default trusts 127.0.0.1, which would let any local client pick its address for the per-client limits)
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )
