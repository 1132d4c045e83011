"""The FastAPI application: model loaded once in the lifespan handler, one router per concern."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from histoscan import __version__
from histoscan.bundle import read_bundle
from histoscan.inference.predictor import Predictor
from histoscan.serving import page, routes_explain, routes_health, routes_predict
from histoscan.serving.admission import Admission, Overloaded
from histoscan.serving.batcher import MicroBatcher
from histoscan.serving.guard import RequestGuard, UploadBudget, request_id
from histoscan.serving.metrics import ServeMetrics
from histoscan.serving.model_process import ModelProcess, ModelRunner, ModelThread, ModelUnavailable
from histoscan.serving.slides import routes as slides
from histoscan.serving.state import ServeSettings, ServeState
from histoscan.serving.uploads import UploadError

log = logging.getLogger("histoscan.serve")


def create_app(settings: ServeSettings) -> FastAPI:
    """An app serving ``settings.run_dir``, behind the RequestGuard; nothing is loaded until the server starts."""
    budget = UploadBudget(int(settings.max_inflight_mb * 1_000_000), settings.max_client_share)
    metrics = ServeMetrics(budget)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = load_model_runner(settings)
        await model.start()
        s = settings
        admission = Admission(
            {
                "predict": s.max_queue,
                "explain": s.max_explain_queue,
                "preview": s.max_previews,
                "tile": s.max_tile_queue,
            }
        )
        slides.attach(app, admission)  # slide tiles are admitted (and counted) with the model work
        batcher = MicroBatcher(
            model, s.max_batch, s.max_wait_ms, s.max_in_flight, s.max_queue, admission, s.model_timeout_s
        )
        await batcher.start()
        state = ServeState(settings, read_bundle(settings.run_dir), model, batcher, on_answer=metrics.count_answer)
        app.state.histoscan = state
        metrics.admission = admission
        try:
            yield
        finally:
            await batcher.stop()
            await model.stop()
            state.pool.close()
            slides.close(app)
            app.state.histoscan = None
            metrics.admission = None

    app = FastAPI(
        title="histoscan",
        version=__version__,
        lifespan=lifespan,
        description="Tumour probability for histopathology patches.",
    )
    app.state.settings = settings
    app.state.histoscan = None
    app.state.metrics = metrics
    app.include_router(routes_health.router)
    app.include_router(routes_predict.router)
    app.include_router(routes_explain.router)
    app.include_router(page.router)
    slides.register(app, settings)  # /slides and /v1/slides (a folder of scanned slides, when --slides names one)

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": exc.message})

    @app.exception_handler(ModelUnavailable)
    async def model_down(request: Request, exc: ModelUnavailable) -> JSONResponse:
        return server_error(request, 503, f"model unavailable: {exc}", exc, {"Retry-After": "5"})

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return server_error(request, 503, str(exc), None, {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code >= 500:
            return server_error(request, exc.status_code, "service unavailable", exc, getattr(exc, "headers", None))
        return JSONResponse(
            status_code=exc.status_code, content={"error": str(exc.detail)}, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(status_code=422, content={"error": f"bad request: {problems}"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return server_error(request, 500, "internal error", exc)

    app.add_middleware(RequestGuard, settings=settings, budget=budget, metrics=metrics)
    describe_model_in_openapi(app)
    return app


def describe_model_in_openapi(app: FastAPI) -> None:
    """Once the model is loaded, the OpenAPI lists its own choices (explain's targets are its class names)."""
    generic = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generic()
        state = app.state.histoscan
        if state is None:
            app.openapi_schema = None  # not loaded yet: describe the model once it is
        else:
            routes_explain.describe_targets(spec, list(state.bundle.classes))
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def server_error(
    request: Request, status: int, message: str, exc: BaseException | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A 5xx answer: a short message and the request id for the client, the detail in the server log only.

    Neither server paths nor library error text reach the client; the id finds the log line.
    """
    rid = request_id(request.scope)
    if exc is not None and status == 500:
        log.error("request %s %s failed", rid, request.url.path, exc_info=(type(exc), exc, exc.__traceback__))
    elif exc is not None:
        log.warning("request %s %s: %s (%s)", rid, request.url.path, message, exc.__cause__ or exc)
    return JSONResponse(status_code=status, content={"error": message, "request_id": rid}, headers=headers)


def load_model_runner(settings: ServeSettings) -> ModelRunner:
    """The model in a child process (``histoscan serve``), or in a thread of this one."""
    if settings.model_process:
        return ModelProcess.from_settings(settings)
    predictor = Predictor(settings.run_dir, backend=settings.backend, device=settings.device, threads=settings.threads)
    return ModelThread(predictor, settings.model_timeout_s, settings.explain_warm)
