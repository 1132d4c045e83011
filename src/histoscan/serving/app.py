"""The FastAPI application: model loaded once in the lifespan handler, one router per concern."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from histoscan import __version__
from histoscan.bundle import read_bundle
from histoscan.inference.predictor import Predictor
from histoscan.serving import page, routes_health, routes_predict
from histoscan.serving.batcher import MicroBatcher
from histoscan.serving.model_process import ModelProcess, ModelRunner, ModelThread, ModelUnavailable
from histoscan.serving.state import ServeSettings, ServeState
from histoscan.serving.uploads import UploadError


def create_app(settings: ServeSettings) -> FastAPI:
    """An app serving ``settings.run_dir``; nothing is loaded until the server starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = load_model_runner(settings)
        await model.start()
        batcher = MicroBatcher(model, settings.max_batch, settings.max_wait_ms, settings.max_in_flight)
        await batcher.start()
        app.state.histoscan = ServeState(settings, read_bundle(settings.run_dir), model, batcher)
        try:
            yield
        finally:
            await batcher.stop()
            await model.stop()
            app.state.histoscan = None

    app = FastAPI(
        title="histoscan",
        version=__version__,
        lifespan=lifespan,
        description="Tumour probability for histopathology patches.",
    )
    app.state.settings = settings
    app.state.histoscan = None
    app.include_router(routes_health.router)
    app.include_router(routes_predict.router)
    app.include_router(page.router)

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": exc.message})

    @app.exception_handler(ModelUnavailable)
    async def model_down(_: Request, exc: ModelUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"error": str(exc)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code, content={"error": str(exc.detail)}, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(status_code=422, content={"error": f"bad request: {problems}"})

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:  # never a stack trace to the client
        return JSONResponse(status_code=500, content={"error": f"internal error ({type(exc).__name__})"})

    return app


def load_model_runner(settings: ServeSettings) -> ModelRunner:
    """The model in a child process (``histoscan serve``), or in a thread of this one."""
    if settings.model_process:
        return ModelProcess(settings.run_dir, settings.backend, settings.device, settings.threads)
    return ModelThread(
        Predictor(settings.run_dir, backend=settings.backend, device=settings.device, threads=settings.threads)
    )
