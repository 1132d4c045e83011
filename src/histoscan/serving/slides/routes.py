"""``/v1/slides``: the scanned slides of the served folder, their Deep Zoom tiles, overlay and regions; the pages.

Every route looks its slide up in the folder's index (``SlideLibrary``): the id in the URL is a key,
never a path. The API routes need the API key like every ``/v1`` route (the same ``require_key``
dependency, and the RequestGuard middleware before it in ``histoscan serve``); the pages and their
static files are open, like the try-it page, and send the key the user types with every request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from histoscan.serving.admission import Admission, Overloaded
from histoscan.serving.responses import errors
from histoscan.serving.slides import overlay as overlay_mod
from histoscan.serving.slides.deepzoom import SlideUnavailable, TileOutside, TileService
from histoscan.serving.slides.library import (
    PROB_FILE,
    PROB_META_FILE,
    REGIONS_FILE,
    SlideEntry,
    SlideLibrary,
    _read_json,
)
from histoscan.serving.state import require_key

log = logging.getLogger("histoscan.serve")

MB = 1_000_000
STATIC_URL = "/static/slides"
MAX_PAGE = 500  # most slides in one page of the list
MAX_LEVEL = 64  # Deep Zoom levels: log2 of the longer side + 1 (a 2^40-pixel side would have 41)
MAX_TILE_INDEX = 10_000_000  # tile columns / rows (far beyond any slide; bounds the number, 422 above)


@dataclass
class SlideSettings:
    """What the slide routes need: the folder, the tile cache and pool sizes, and the API key."""

    folder: str
    cache_mb: float = 128.0
    workers: int = 2
    max_queue: int = 256
    api_key: str | None = None

    @classmethod
    def from_serve(cls, settings: Any) -> SlideSettings:
        """From ``ServeSettings`` (its ``slides``, ``slide_cache_mb``, ``slide_workers`` and ``max_tile_queue``)."""
        return cls(
            settings.slides, settings.slide_cache_mb, settings.slide_workers, settings.max_tile_queue, settings.api_key
        )


class SlideService:
    """The index of the served folder and the tiles of its slides (one per app)."""

    def __init__(self, settings: SlideSettings) -> None:
        self.library = SlideLibrary(settings.folder)
        self.tiles = TileService(int(settings.cache_mb * MB), settings.workers, settings.max_queue)

    def close(self) -> None:
        """Stop the tile threads."""
        self.tiles.close()


def get_slides(request: Request) -> SlideService:
    """The slide service of the app; 404 when the server was started without ``--slides``."""
    service = getattr(request.app.state, "slides", None)
    if service is None:
        raise HTTPException(404, "this server serves no slides (start it with --slides FOLDER)")
    return service


def lookup(service: SlideService, slide: str) -> SlideEntry:
    """The slide with id ``slide``: 400 for anything shaped like a path, 404 for a name not in the folder."""
    if not slide or slide.startswith(".") or any(c in slide for c in "/\\\x00:"):
        raise HTTPException(400, f"slide id {slide!r} is not a slide name (the ids are the names /v1/slides lists)")
    entry = service.library.entry(slide)
    if entry is None:
        raise HTTPException(404, f"no slide named {slide!r} in the served folder")
    return entry


def attach(app: FastAPI, admission: Admission) -> None:
    """Admit the slide routes' tile work through the server's one Admission (its ``tile`` kind)."""
    service = getattr(app.state, "slides", None)
    if service is not None:
        service.tiles.admission = admission


# the statuses each kind of slide route answers (the OpenAPI lists them with the error body's schema)
FAILED_SCAN = {409: "The slide's scan failed: there is nothing to show."}
LIST_ERRORS = errors(401, 404, 422, 500, 503)
SLIDE_ERRORS = errors(400, 401, 404, 422, 500, 503)
IMAGE_ERRORS = errors(400, 401, 404, 409, 410, 422, 500, 503, why=FAILED_SCAN)


def slide_url(name: str) -> str:
    """The API path of one slide."""
    return f"/v1/slides/{quote(name, safe='')}"


def status_of(service: SlideService, entry: SlideEntry) -> tuple[str, str | None]:
    """(status, message): done; failed (the scan's error); missing (the slide file moved or was deleted)."""
    if entry.failed:
        return "failed", f"the scan failed: {entry.get('error', 'no reason recorded')}"
    if entry.slide_path(service.library.root) is None:
        return "missing", (
            f"the slide file {entry.slide_file_name()} is no longer where it was scanned "
            "(moved or deleted after the scan); its heatmap and regions remain, the slide cannot be shown"
        )
    return "done", None


def row(service: SlideService, entry: SlideEntry) -> dict[str, Any]:
    """One slide of the list."""
    status, message = status_of(service, entry)
    base = slide_url(entry.name)
    return {
        "name": entry.name,
        "status": status,
        "message": message,
        "tumour_mm2": entry.number("tumour_mm2"),
        "tissue_mm2": entry.number("tissue_mm2"),
        "max_probability": entry.number("max_probability"),
        "topk_mean_probability": entry.number("topk_mean_probability"),
        "top_k": entry.get("top_k"),
        "tiles": entry.get("tiles"),
        "model": entry.get("model"),  # the model's fingerprint (issue 35's identity); older scans: absent
        "run": _run_name(entry),
        "identity_key": entry.get("identity_key"),
        "slide_mpp_source": entry.get("slide_mpp_source"),
        "url": base,
        "dzi": f"{base}.dzi" if status == "done" else None,
        "viewer": f"/slides/{quote(entry.name, safe='')}" if not entry.failed else None,
    }


router = APIRouter(prefix="/v1/slides", dependencies=[Depends(require_key)], tags=["slides"])


@router.get("", responses=LIST_ERRORS)
def list_slides(
    offset: int = Query(0, ge=0, description="First slide of the page (0-based)."),
    limit: int = Query(50, ge=1, le=MAX_PAGE, description=f"Slides in the page (at most {MAX_PAGE})."),
    q: str = Query("", max_length=200, description="Only slides whose name contains this (case-insensitive)."),
    service: SlideService = Depends(get_slides),
) -> dict[str, Any]:
    """The scanned slides, a page at a time: name, status, tumour area, max and top-k probability, .dzi URL."""
    total, entries = service.library.page(offset, limit, q)
    return {"total": total, "offset": offset, "limit": limit, "slides": [row(service, e) for e in entries]}


@router.get("/{slide}.dzi", responses={**IMAGE_ERRORS, 200: {"content": {"application/xml": {}}}})
async def deepzoom_descriptor(slide: str, service: SlideService = Depends(get_slides)) -> Response:
    """The Deep Zoom descriptor of the slide (XML)."""
    path = _slide_file(service, lookup(service, slide))
    return Response(await _unavailable_as_410(service.tiles.dzi(path)), media_type="application/xml")


@router.get("/{slide}_files/{level}/{col}_{row}.jpeg", responses={**IMAGE_ERRORS, 200: {"content": {"image/jpeg": {}}}})
async def deepzoom_tile(
    slide: str,
    level: int = Path(ge=0, le=MAX_LEVEL, description="Deep Zoom level (0: one pixel; the last: full resolution)."),
    col: int = Path(ge=0, le=MAX_TILE_INDEX, description="Tile column in the level."),
    row: int = Path(ge=0, le=MAX_TILE_INDEX, description="Tile row in the level."),
    service: SlideService = Depends(get_slides),
) -> Response:
    """One Deep Zoom tile (JPEG); 404 outside the pyramid."""
    path = _slide_file(service, lookup(service, slide))
    try:
        data = await _unavailable_as_410(service.tiles.tile(path, level, col, row))
    except TileOutside as exc:
        raise HTTPException(404, f"{slide}: {exc}") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/{slide}/overlay.png", responses={**SLIDE_ERRORS, 200: {"content": {"image/png": {}}}})
async def overlay_image(slide: str, service: SlideService = Depends(get_slides)) -> Response:
    """The probability grid coloured (inferno, P 0 to 1; cells not scanned transparent), one square per cell."""
    entry = lookup(service, slide)
    path = service.library.output(entry, PROB_FILE)
    if path is None:
        raise HTTPException(404, f"{slide}: the scan left no probability grid ({PROB_FILE})")
    key = ("overlay", path, path.stat().st_mtime_ns)
    png = service.tiles.cache.get(key)
    if png is None:
        png = await service.tiles.run(lambda: overlay_mod.overlay_png(overlay_mod.read_grid(path)))
        service.tiles.cache.put(key, png)
    return Response(png, media_type="image/png")


@router.get("/{slide}/regions.geojson", responses={**SLIDE_ERRORS, 200: {"content": {"application/geo+json": {}}}})
async def regions(slide: str, service: SlideService = Depends(get_slides)) -> JSONResponse:
    """The tumour regions of a slide as GeoJSON.

    The tumour regions (GeoJSON, level-0 pixels minus the slide's bounds corner, as QuPath reads them);
    per-tile objects, when the scan wrote them, are left out.
    """
    entry = lookup(service, slide)
    path = service.library.output(entry, REGIONS_FILE)
    if path is None:
        raise HTTPException(404, f"{slide}: the scan left no regions ({REGIONS_FILE})")
    data = await service.tiles.run(_read_json, path)
    if data is None:
        raise HTTPException(404, f"{slide}: {REGIONS_FILE} is not readable GeoJSON")
    features = [
        f
        for f in data.get("features", [])
        if isinstance(f, dict) and (f.get("properties") or {}).get("objectType") != "tile"
    ]
    return JSONResponse({"type": "FeatureCollection", "features": features}, media_type="application/geo+json")


@router.get("/{slide}", responses=SLIDE_ERRORS)
async def slide_detail(slide: str, service: SlideService = Depends(get_slides)) -> dict[str, Any]:
    """Everything the viewer needs: status, size and resolution, the overlay's placement, the summary."""
    entry = lookup(service, slide)
    out = row(service, entry)
    s = entry.summary
    bounds: dict[str, Any] = s["bounds"] if isinstance(s.get("bounds"), dict) else {}
    offset = (float(bounds.get("x", 0) or 0), float(bounds.get("y", 0) or 0))  # the pyramid starts at the bounds
    if out["status"] == "done":
        try:
            opened = await service.tiles.describe(_slide_file(service, entry))
            offset = opened.offset
            out["width"], out["height"] = opened.size
        except (SlideUnavailable, HTTPException) as exc:
            out["status"], out["message"] = "missing", str(getattr(exc, "detail", exc))
            out["dzi"] = None
    meta = None
    meta_file = service.library.output(entry, PROB_META_FILE)
    if meta_file is not None:
        meta = await service.tiles.run(_read_json, meta_file)
    prob = service.library.output(entry, PROB_FILE)
    place = overlay_mod.placement(entry, meta, None)
    out["mpp"] = entry.number("slide_mpp") or (meta or {}).get("slide_mpp")
    out["overlay"] = (
        {
            "url": f"{slide_url(entry.name)}/overlay.png",
            "colormap": overlay_mod.COLORMAP,
            "vmin": 0.0,
            "vmax": 1.0,
            "colors": overlay_mod.colour_stops(),
            **place.to_dict(offset),
        }
        if place is not None and prob is not None
        else None
    )
    has_regions = service.library.output(entry, REGIONS_FILE) is not None
    out["regions"] = (
        {
            "url": f"{slide_url(entry.name)}/regions.geojson",
            # GeoJSON x, y + this = Deep Zoom image pixels (GeoJSON is relative to the bounds' corner, as QuPath)
            "offset": [float(bounds.get("x", 0) or 0) - offset[0], float(bounds.get("y", 0) or 0) - offset[1]],
        }
        if has_regions
        else None
    )
    keep = (
        "threshold",
        "resolution",
        "slide_mpp_source",
        "cell_um",
        "grid",
        "tta",
        "backend",
        "histoscan_version",
        "model",
        "identity_key",
        "identity",
        "predictor",
    )
    out["summary"] = {k: s[k] for k in keep if k in s}
    if out["run"] is not None:
        out["summary"]["run"] = out["run"]
    return out


def _run_name(entry: SlideEntry) -> str | None:
    """The name of the run folder that scanned the slide (the summary keeps its path)."""
    run = entry.get("run")
    return str(run).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] if run else None


def _slide_file(service: SlideService, entry: SlideEntry) -> Any:
    """The slide image's path now, or 410 saying it moved (or 409 for a failed scan)."""
    if entry.failed:
        raise HTTPException(409, f"{entry.name}: the scan failed, there is nothing to show")
    path = entry.slide_path(service.library.root)
    if path is None:
        raise HTTPException(410, f"{entry.name}: {status_of(service, entry)[1]}")
    return path


async def _unavailable_as_410(awaitable: Any) -> Any:
    try:
        return await awaitable
    except SlideUnavailable as exc:
        raise HTTPException(410, str(exc)) from None


# ---- pages ---------------------------------------------------------------------------------
pages = APIRouter(include_in_schema=False)


def _page(name: str) -> str:
    return (resources.files("histoscan.serving.slides") / "static" / name).read_text(encoding="utf-8")


@pages.get("/slides", response_class=HTMLResponse)
def slides_page() -> str:
    """The list of scanned slides."""
    return _page("slides.html")


@pages.get("/slides/{slide}", response_class=HTMLResponse)
def viewer_page(slide: str) -> str:
    """The viewer of one slide (the page reads the slide id from its own URL)."""
    return _page("viewer.html")


def static_files() -> StaticFiles:
    """The viewer's static files (page scripts, OpenSeadragon)."""
    return StaticFiles(directory=str(resources.files("histoscan.serving.slides") / "static"))


def register(app: FastAPI, settings: Any) -> None:
    """Add the slide routes and pages to an app.

    Add the slide routes and pages to ``app``; the folder is opened (index built lazily) when ``settings.slides``
    names one.
    """
    app.state.slides = SlideService(SlideSettings.from_serve(settings)) if getattr(settings, "slides", None) else None
    app.include_router(router)
    app.include_router(pages)
    app.mount(STATIC_URL, static_files(), name="slides-static")


def close(app: FastAPI) -> None:
    """Stop the tile threads (in the app's shutdown)."""
    service = getattr(app.state, "slides", None)
    if service is not None:
        service.close()


def create_viewer_app(settings: SlideSettings) -> FastAPI:
    """An app serving only the slides of ``settings.folder`` (no model): what ``open_viewer`` runs."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            close(app)

    app = FastAPI(title="histoscan slides", lifespan=lifespan)
    app.state.settings = settings  # require_key reads settings.api_key
    app.state.slides = SlideService(settings)
    app.include_router(router)
    app.include_router(pages)
    app.mount(STATIC_URL, static_files(), name="slides-static")

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/slides")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse(status_code=503, content={"error": str(exc)}, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:  # the same line as serve's
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(status_code=422, content={"error": f"bad request: {problems}"})

    return app
