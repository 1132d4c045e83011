"""Prediction routes: one image (micro-batched) and a batch of files."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile

from histoscan.serving.state import ServeState, get_state, require_key
from histoscan.serving.uploads import UploadError, check_size, decode_upload

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


def answer(state: ServeState, probs: np.ndarray, predicted: int, uncertainty: float | None) -> dict[str, Any]:
    """The JSON for one image."""
    classes = state.predictor.classes
    out: dict[str, Any] = {
        "label": classes[predicted], "prediction": predicted, "confidence": round(float(probs[predicted]), 6),
        "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs)}, "model": state.run_name,
    }
    if uncertainty is not None:
        out["uncertainty"] = round(uncertainty, 6)
    return out


async def _read(upload: UploadFile, state: ServeState) -> bytes:
    limit = int(state.settings.max_upload_mb * 1024 * 1024)
    data = await upload.read(limit + 1)
    check_size(data, upload.filename or "file", limit)
    return data


@router.post("/predict")
async def predict_one(request: Request, file: UploadFile = File(..., description="A TIFF, PNG or JPEG patch."),
                      tta: bool = Query(False, description="Average the 8 flips/rotations; adds an uncertainty."),
                      state: ServeState = Depends(get_state)) -> dict[str, Any]:
    """Classify one patch."""
    data = await _read(file, state)
    image = decode_upload(data, file.filename or "file", file.content_type)
    probs, predicted, unc = await state.batcher.predict(image, tta)
    return answer(state, probs, predicted, unc)


@router.post("/predict/batch")
async def predict_batch(files: list[UploadFile] = File(..., description="Several patches."),
                        tta: bool = Query(False), state: ServeState = Depends(get_state)) -> dict[str, Any]:
    """Classify many patches; results in the same order, each with its own error if that file was bad."""
    if len(files) > state.settings.max_batch_files:
        raise UploadError(413, f"{len(files)} files is over the batch limit of {state.settings.max_batch_files}")
    results: list[dict[str, Any]] = [{} for _ in files]
    good: list[tuple[int, np.ndarray]] = []
    for i, f in enumerate(files):
        name = f.filename or f"file {i}"
        try:
            good.append((i, decode_upload(await _read(f, state), name, f.content_type)))
        except UploadError as exc:
            results[i] = {"file": name, "error": exc.message, "status": exc.status}
    if good:
        pred = await state.batcher.predict_many([img for _, img in good], tta)
        for k, (i, _) in enumerate(good):
            unc = None if pred.uncertainty is None else float(pred.uncertainty[k])
            results[i] = {"file": files[i].filename, **answer(state, pred.probabilities[k], int(pred.predicted[k]), unc)}
    return {"results": results, "model": state.run_name}
