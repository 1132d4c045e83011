"""``POST /v1/explain`` (Grad-CAM overlay of one image) and ``POST /v1/preview`` (any upload as a PNG).

Both decode the upload exactly as ``/v1/predict`` does (same limits, same pool, off the event
loop). The map is computed by the model runner (the model process, or a worker thread), and the
PNGs are encoded in a worker thread: nothing heavy runs on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from histoscan.explain.cam import METHODS
from histoscan.explain.render import Geometry, overlay_png, png_bytes
from histoscan.runfolder import RunFolder
from histoscan.serving.responses import UPLOAD_ERRORS, errors
from histoscan.serving.routes_predict import PatchPrediction, _decode, answer
from histoscan.serving.state import ServeState, get_state, require_key
from histoscan.serving.uploads import UploadError

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
MAX_SCALE = 1e6  # far above any Grad-CAM map value; bounds what reaches the renderer


class PatchExplanation(PatchPrediction):
    """The prediction, and the Grad-CAM overlay as a base64 PNG."""

    method: str = Field(
        description="The CAM method that ran (auto resolved from the model's structure).", examples=["gradcam"]
    )
    target: str = Field(description="The class whose evidence the map shows.", examples=["tumor"])
    map_max: float = Field(description="Largest raw map value (compare images on this scale).")
    scale: float = Field(description="The map value drawn at full colour in the overlay.")
    overlay_png: str = Field(description="The overlay (patch under the heat colours) as base64 PNG.")


def describe_targets(spec: dict[str, Any], classes: list[str]) -> None:
    """Put the served model's choices of ``method`` and ``target`` into the OpenAPI as enums."""
    for p in spec.get("paths", {}).get("/v1/explain", {}).get("post", {}).get("parameters", []):
        if p["name"] == "method":
            p["schema"]["enum"] = list(METHODS)
        elif p["name"] == "target":
            p["schema"]["enum"] = [
                "tumour",
                "tumor",
                "predicted",
                *[c for c in classes if c not in ("tumour", "tumor")],
            ]


def _overlay(state: ServeState, image: Any, m: Any, vmax: float) -> bytes:
    pre = state.bundle.preprocessing
    return overlay_png(image, m, vmax, Geometry.from_preprocessing(pre.image_size, pre.label_size, pre.crop))


@router.post(
    "/explain",
    response_model=PatchExplanation,
    response_model_exclude_none=True,
    responses={**errors(*UPLOAD_ERRORS, 409), 200: {"content": {"image/png": {}}}},
)
async def explain_one(
    request: Request,
    file: UploadFile = File(..., description="A TIFF, PNG or JPEG patch."),
    method: str = Query(
        "auto", description=f"CAM method: {', '.join(METHODS)} (auto: chosen from the model's structure, as the CLI)."
    ),
    target: str = Query("tumour", description="tumour, predicted, or a class name."),
    tta: bool | None = Query(
        None, description="Average the maps of the 8 flips/rotations (default: off, the default for explaining)."
    ),
    scale: float | None = Query(
        None,
        gt=0,
        le=MAX_SCALE,
        allow_inf_nan=False,
        description="Map value drawn at full colour (one scale across images); default: this map's max. "
        "A finite number in (0, 1e6]; 422 otherwise.",
    ),
    state: ServeState = Depends(get_state),
) -> Any:
    """Grad-CAM of one patch: JSON with the overlay as base64 PNG, or the PNG itself with ``Accept: image/png``.

    At most ``--max-explain-queue`` explanations are admitted at once and they wait behind
    predictions (503 with Retry-After when full). An empty file is refused (400).
    """
    if not RunFolder(state.settings.run_dir).weights_path.is_file():
        raise UploadError(
            409, "this server has an ONNX model only; Grad-CAM needs the model's weights (best.safetensors)"
        )
    if method.lower() not in METHODS:
        raise UploadError(422, f"method {method!r} is not one of {', '.join(METHODS)}")
    classes = state.bundle.classes
    if target not in ("tumour", "tumor", "predicted", *classes):
        raise UploadError(422, f"target {target!r} is not tumour, predicted or a class ({', '.join(classes)})")
    with state.batcher.admission.slot("explain"):
        image = await _decode(file, file.filename or "file", state)
        got = await state.batcher.explain(image, method.lower(), target, tta)
        map_max = float(got.map.max())
        vmax = scale or map_max or 1.0  # an all-zero map draws nothing at any scale
        png = await asyncio.to_thread(_overlay, state, image, got.map, vmax)
    fields = answer(state, got.probabilities, got.predicted, None)
    if "image/png" in request.headers.get("accept", ""):
        headers = {"X-Label": fields["label"], "X-Confidence": str(fields["confidence"]), "X-Map-Max": f"{map_max:.6g}"}
        return Response(png, media_type="image/png", headers=headers)
    body = PatchExplanation(
        **fields,
        method=got.method,
        target=got.target,
        map_max=round(map_max, 9),
        scale=round(vmax, 9),
        overlay_png=base64.b64encode(png).decode("ascii"),
    )
    return JSONResponse(body.model_dump(exclude_none=True))


@router.post(
    "/preview",
    response_class=Response,
    responses={**errors(*UPLOAD_ERRORS), 200: {"content": {"image/png": {}}, "description": "The PNG."}},
)
async def preview(
    file: UploadFile = File(..., description="A TIFF, PNG or JPEG patch."), state: ServeState = Depends(get_state)
) -> Response:
    """The upload as the model sees it before preprocessing (fitted to its size), as a PNG: browsers cannot show TIFF.

    At most ``--max-previews`` at once (503 with Retry-After when full); an empty file is refused (400).
    """
    with state.batcher.admission.slot("preview"):
        image = await _decode(file, file.filename or "file", state)
        png = await asyncio.to_thread(png_bytes, image)
    return Response(png, media_type="image/png")
