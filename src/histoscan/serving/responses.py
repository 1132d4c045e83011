"""The error body every refusal uses, and the OpenAPI ``responses`` each route declares with it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error answer: one line naming the problem (and, on a 5xx, the id of the server's log line)."""

    error: str = Field(description="What was wrong, in one line.", examples=["empty.tif: empty file"])
    request_id: str | None = Field(None, description="On a 5xx: the id that finds the server's log line.")


WHY = {
    400: "Bad upload: not an image, a truncated or corrupt file, an empty file, or an invalid Content-Length.",
    401: "Missing or wrong API key (only when the server has one).",
    404: "Not found: no slide by that name in the served folder, no --slides folder, or a tile outside the pyramid.",
    408: "The request body stalled or took too long (body-idle-timeout-s, body-deadline-s); connection closed.",
    409: "The model cannot do this (Grad-CAM on an ONNX-only model).",
    410: "The slide file was moved or deleted after its scan, or OpenSlide cannot read it.",
    413: "Too large: the body, a file, its pixels, its decoded size, its pages, or too many files.",
    415: "The declared content type is not an image.",
    422: "A missing or invalid field or parameter (a non-finite or out-of-range number, an empty file list).",
    500: "Internal error: the body carries the request id of the server's log line.",
    503: "Busy (a queue or the upload allowance is full) or the model is unavailable; retry after Retry-After s.",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}

UPLOAD_ERRORS = (400, 401, 408, 413, 415, 422, 500, 503)
KEYED_ERRORS = (401, 500, 503)


def errors(*statuses: int, why: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each status with its reason (``why`` overrides one) and the ErrorBody schema."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": (why or {}).get(status) or WHY[status]}
        if status == 503:
            entry["headers"] = RETRY_AFTER
        out[status] = entry
    return out
