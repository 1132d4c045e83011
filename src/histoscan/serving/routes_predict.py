"""Prediction routes: one image (micro-batched) and a batch of files."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, File, Query, UploadFile
from pydantic import BaseModel, Field

from histoscan.inference.tta import parse_tta
from histoscan.serving.responses import UPLOAD_ERRORS, errors
from histoscan.serving.state import ServeState, get_state, require_key
from histoscan.serving.uploads import UploadError, check_size

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


class PatchPrediction(BaseModel):
    """The answer for one image."""

    label: str = Field(description="Predicted class name.", examples=["tumor"])
    prediction: int = Field(description="Predicted class index.", examples=[1])
    confidence: float = Field(description="Probability of the predicted class.", examples=[0.93])
    probabilities: dict[str, float] = Field(
        description="Probability of every class.", examples=[{"normal": 0.07, "tumor": 0.93}]
    )
    model: str = Field(description="The served run.")
    uncertainty: float | None = Field(
        None, description="Spread of the probability over the TTA views (whenever there are several)."
    )
    answer: str | None = Field(
        None,
        description="What to report: the class name, 'refer' (doubtful: refer to a pathologist), "
        "'not tissue' or 'out of distribution' (never a class).",
        examples=["tumor", "refer", "not tissue"],
    )
    quality: str | None = Field(
        None,
        description="The tissue check's flag: ok, blank, dark, uniform, grayscale, noise, out of distribution, "
        "or unchecked (the model has no tissue check).",
        examples=["ok"],
    )


class BatchEntry(BaseModel):
    """One file of a batch: a prediction, or the reason the file could not be read."""

    file: str | None = None
    label: str | None = None
    prediction: int | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    model: str | None = None
    uncertainty: float | None = None
    answer: str | None = None
    quality: str | None = None
    error: str | None = Field(default=None, description="Why this file was refused (the others are still answered).")
    status: int | None = Field(default=None, description="The HTTP status this file alone would have got.")


class BatchPrediction(BaseModel):
    """Results in the order the files were sent."""

    results: list[BatchEntry]
    model: str


def answer(
    state: ServeState,
    probs: np.ndarray,
    predicted: int,
    uncertainty: float | None,
    answer: str | None = None,
    quality: str | None = None,
) -> dict[str, Any]:
    """The fields of one image's answer (counted for ``/metrics``)."""
    classes = state.bundle.classes
    if state.on_answer is not None:
        state.on_answer(answer)
    return {
        "label": classes[predicted],
        "prediction": predicted,
        "confidence": round(float(probs[predicted]), 6),
        "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs)},
        "model": state.run_name,
        "uncertainty": None if uncertainty is None else round(uncertainty, 6),
        "answer": answer,
        "quality": quality,
    }


def _views(state: ServeState, tta: bool | None) -> bool | None:
    """``tta`` as asked; 422 when it is not the policy the model's referral rule was fitted under."""
    rule = state.bundle.trust.referral
    if rule is not None and tta is not None and parse_tta(tta) != sorted(rule.tta):
        raise UploadError(
            422, f"this model refers doubtful images under TTA views {rule.tta}: leave tta out to predict with them"
        )
    return tta


async def _decode(upload: UploadFile, name: str, state: ServeState) -> np.ndarray:
    """Read one uploaded file (at most the limit + 1 byte) and decode it in the pool, at the model's size."""
    limit = state.settings.upload_limit
    data = await upload.read(limit + 1)
    check_size(data, name, limit)
    return await state.pool.decode(data, name, upload.content_type)


@router.post(
    "/predict", response_model=PatchPrediction, response_model_exclude_none=True, responses=errors(*UPLOAD_ERRORS)
)
async def predict_one(
    file: UploadFile = File(..., description="A TIFF, PNG or JPEG patch."),
    tta: bool | None = Query(
        None,
        description="Average the 8 flips/rotations (adds an uncertainty). Default: the policy of the model's "
        "referral rule when it has one, else none.",
    ),
    state: ServeState = Depends(get_state),
) -> PatchPrediction:
    """Classify one patch: probabilities, uncertainty and the answer (a class, refer, not tissue, out of distribution).

    A model with per-group stain normalisation treats the image as its own group: its stain is
    estimated from the image alone (the service knows no patient or slide). An empty file is
    refused (400).
    """
    tta = _views(state, tta)
    image = await _decode(file, file.filename or "file", state)
    probs, predicted, unc, said, quality = await state.batcher.predict(image, tta)
    return PatchPrediction(**answer(state, probs, predicted, unc, said, quality))


@router.post(
    "/predict/batch",
    response_model=BatchPrediction,
    response_model_exclude_none=True,
    responses=errors(*UPLOAD_ERRORS),
)
async def predict_batch(
    files: list[UploadFile] = File(..., min_length=1, description="Several patches (at least one)."),
    tta: bool | None = Query(None, description="As for /v1/predict."),
    state: ServeState = Depends(get_state),
) -> BatchPrediction:
    """Classify many patches; results in the same order, each with its own error if that file was bad.

    A model with per-group stain normalisation treats each image as its own group (the files of
    one request are not assumed to share a patient or slide). A request without files is refused
    (422); an empty file gets its own 400 entry while the others are answered.
    """
    tta = _views(state, tta)
    if len(files) > state.settings.max_batch_files:
        raise UploadError(413, f"{len(files)} files is over the batch limit of {state.settings.max_batch_files}")
    results: list[BatchEntry] = [BatchEntry() for _ in files]
    good: list[tuple[int, np.ndarray]] = []

    async def one(i: int, f: UploadFile) -> None:
        name = f.filename or f"file {i}"
        try:
            good.append((i, await _decode(f, name, state)))
        except UploadError as exc:
            results[i] = BatchEntry(file=name, error=exc.message, status=exc.status)

    await asyncio.gather(*(one(i, f) for i, f in enumerate(files)))  # the pool bounds how many decode at once
    good.sort(key=lambda item: item[0])
    if good:
        pred = await state.batcher.predict_many([img for _, img in good], tta)
        for k, (i, _) in enumerate(good):
            unc = None if pred.uncertainty is None else float(pred.uncertainty[k])
            said = None if pred.answers is None else pred.answers[k]
            quality = None if pred.quality is None else pred.quality[k]
            fields = answer(state, pred.probabilities[k], int(pred.predicted[k]), unc, said, quality)
            results[i] = BatchEntry(file=files[i].filename, **fields)
    return BatchPrediction(results=results, model=state.run_name)
