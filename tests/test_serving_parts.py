"""The serving parts on their own: the micro-batcher, the model process and its protocol, the upload decoder."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histoscan.data.imageio import DecodeBudget, read_image
from histoscan.inference.predictor import Prediction, Predictor
from histoscan.serving.batcher import MicroBatcher
from histoscan.serving.model_process import (
    ModelProcess,
    ModelUnavailable,
    pack_job,
    pack_prediction,
    unpack_job,
    unpack_prediction,
)
from histoscan.serving.state import ServeSettings
from histoscan.serving.uploads import UploadDecoder, UploadError, decode_upload


class FakeModel:
    """Probability of class 1 = the image's mean / 255; records every batch it was given."""

    backend = "fake"
    alive = True

    def __init__(self, delay: float = 0.01, fail: bool = False) -> None:
        self.delay, self.fail, self.calls = delay, fail, []  # type: ignore[var-annotated]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def predict(self, images: Sequence[np.ndarray], tta: bool) -> Prediction:
        self.calls.append((len(images), tta))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model broke")
        p = np.array([float(im.mean()) / 255 for im in images], np.float32)
        unc = np.zeros(len(images), np.float32) if tta else None
        return Prediction(np.stack([1 - p, p], 1), (p >= 0.5).astype(np.int64), unc)


def _images(n: int) -> list[np.ndarray]:
    return [np.full((8, 8, 3), 10 * i, np.uint8) for i in range(n)]


def test_batcher_gathers_concurrent_requests_and_answers_each_its_own() -> None:
    async def go() -> tuple[list[tuple[np.ndarray, int, float | None]], FakeModel]:
        model = FakeModel()
        b = MicroBatcher(model, max_batch=16)
        await b.start()
        out = await asyncio.gather(*(b.predict(im) for im in _images(20)))
        await b.stop()
        return out, model

    out, model = asyncio.run(go())
    assert [round(float(o[0][1]) * 255) for o in out] == [10 * i for i in range(20)]  # each got its own answer
    sizes = [n for n, _ in model.calls]
    assert sum(sizes) == 20 and len(sizes) < 20 and max(sizes) <= 16  # batched, within the limit


def test_batcher_separates_tta_and_hands_errors_to_every_waiting_request() -> None:
    async def go() -> tuple[list[object], FakeModel]:
        model = FakeModel()
        b = MicroBatcher(model, max_batch=8, max_wait_ms=5)
        await b.start()
        out = await asyncio.gather(*(b.predict(im, tta=i % 2 == 1) for i, im in enumerate(_images(6))))
        broken = MicroBatcher(FakeModel(fail=True), max_batch=8)
        await broken.start()
        errors = await asyncio.gather(*(broken.predict(im) for im in _images(3)), return_exceptions=True)
        return [*out, *errors], model

    out, model = asyncio.run(go())
    assert [o[2] is not None for o in out[:6]] == [False, True] * 3  # type: ignore[index]
    assert {tta for _, tta in model.calls} == {False, True} and sum(n for n, _ in model.calls) == 6
    assert all(isinstance(e, RuntimeError) and "model broke" in str(e) for e in out[6:])
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(FakeModel(), max_batch=0)


def test_protocol_round_trip() -> None:
    images = [np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3), np.zeros((5, 4, 3), np.uint8)]
    msg = pack_job(images, tta=True)
    meta_len, data_len = np.frombuffer(msg[:4], "<u4")[0], np.frombuffer(msg[4:12], "<u8")[0]
    import json

    meta = json.loads(msg[12 : 12 + meta_len])
    back, tta = unpack_job(meta, msg[12 + meta_len : 12 + meta_len + data_len])
    assert tta and all(np.array_equal(a, b) for a, b in zip(images, back))
    pred = Prediction(
        np.array([[0.2, 0.8], [0.9, 0.1]], np.float32), np.array([1, 0]), np.array([0.01, 0.02], np.float32)
    )
    msg = pack_prediction(pred)
    meta_len = int(np.frombuffer(msg[:4], "<u4")[0])
    got = unpack_prediction(json.loads(msg[12 : 12 + meta_len]), msg[12 + meta_len :])
    assert np.array_equal(got.probabilities, pred.probabilities) and got.predicted.tolist() == [1, 0]
    assert got.uncertainty is not None and np.allclose(got.uncertainty, [0.01, 0.02])


@pytest.mark.slow
def test_model_process_answers_like_the_predictor_and_restarts_after_dying(tiny_run: Path, kaggle_dir: Path) -> None:
    files = sorted((kaggle_dir / "test").glob("*.tif"))[:5]
    images = [read_image(f).pixels for f in files] + [np.full((200, 150, 3), 128, np.uint8)]  # one needs resizing
    want = Predictor(tiny_run, backend="torch").predict_batch(images)

    async def go() -> tuple[Prediction, Prediction, bool]:
        proc = ModelProcess.from_settings(ServeSettings(str(tiny_run), backend="torch"))
        await proc.start()
        try:
            first = await proc.predict(images, tta=False)
            assert proc._proc is not None
            os.kill(proc._proc.pid, signal.SIGKILL)
            await proc._proc.wait()
            was_alive = proc.alive
            again = await proc.predict(images, tta=False)  # restarted
            return first, again, was_alive
        finally:
            await proc.stop()

    first, again, was_alive = asyncio.run(go())
    assert not was_alive
    for got in (first, again):
        assert np.allclose(got.probabilities, want.probabilities, atol=1e-5)
        assert got.predicted.tolist() == want.predicted.tolist()


def test_model_process_that_cannot_load_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        await ModelProcess.from_settings(ServeSettings(str(tmp_path / "missing-run"))).start()

    with pytest.raises(ModelUnavailable, match=r"could not be loaded") as info:
        asyncio.run(go())
    assert str(tmp_path) not in str(info.value)  # the message reaches clients: no server path in it
    assert any("missing-run" in r.getMessage() for r in caplog.records)  # the detail is in the log


def _tif(img: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def test_upload_decoder_reads_same_layout_tiffs_from_their_strip_and_others_in_full() -> None:
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(2))
    decode = UploadDecoder(DecodeBudget(), lambda pixels: pixels, (96, 96))
    assert np.array_equal(decode(_tif(a), "a.tif", "image/tiff"), a) and decode.hits == 0
    assert np.array_equal(decode(_tif(b), "b.tif", "image/tiff"), b) and decode.hits == 1
    # a file of the template's size whose header differs (here its width: 96 -> 16,711,776 px) is not trusted to the
    # fast path, which would return a 96x96 image: the full decoder reads the header and refuses the file
    tampered = bytearray(_tif(a))
    tampered[20] ^= 0xFF
    with pytest.raises(UploadError, match=r"t\.tif: image too large"):
        decode(bytes(tampered), "t.tif", "image/tiff")
    assert decode.hits == 1
    other = _tif(b, compression="zlib")  # another layout: decoded in full, still right
    assert np.array_equal(decode(other, "c.tif", "image/tiff"), b) and decode.hits == 1
    small = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    assert np.array_equal(decode(_tif(small), "d.tif", None), small)
    with pytest.raises(UploadError, match="unsupported type"):
        decode(_tif(a), "a.txt", "text/plain")
    with pytest.raises(UploadError, match="empty"):
        decode(b"", "e.tif", "image/tiff")
    assert np.array_equal(decode_upload(_tif(a), "a.tif", None, DecodeBudget()), a)
