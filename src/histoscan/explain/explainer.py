"""``Explainer(run).explain(images)``: Grad-CAM maps on the pixels of the images given.

The map is computed on the model's input (after the stored crop / resize, in float32 whatever
precision the model serves in) and mapped back onto the image: resized back to the crop, placed
at the crop's offset, zero outside it; then onto the image as it was given: an edge patch that the
``pad-edges`` fit padded keeps its own rows and columns (the padding is cropped away), any other
size is resized. Values are the method's raw values, one scale across images (``cam.RawScale``),
so a confident negative is not drawn as hot as a tumour. The layer and, with ``method="auto"``,
the method are chosen from the model's structure (``explain.layers``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from histoscan.data.imageio import fit_kind
from histoscan.errors import ConfigError
from histoscan.explain.cam import LogitTarget, auto_method, cam_class, upsample
from histoscan.explain.layers import choose_layer
from histoscan.geometry import centre_slices
from histoscan.inference.backends import TorchBackend
from histoscan.inference.predictor import Predictor
from histoscan.inference.tta import tta_views
from histoscan.runfolder import EnsembleDocument, RunFolder, member_dir

TUMOUR_NAMES = ("tumour", "tumor", "cancer", "malignant", "metastasis", "positive")


@dataclass
class Explanation:
    """Maps (float32, each the height and width of its input image) with the model's answer for each image."""

    maps: list[np.ndarray]
    probabilities: np.ndarray
    predicted: np.ndarray
    targets: list[str]

    def __len__(self) -> int:
        return len(self.maps)


class Explainer:
    """Grad-CAM (or another CAM method) for a run's model.

    Args:
        run_dir: a run folder with ``best.safetensors`` (Grad-CAM needs the weights; ONNX is not enough).
        method: one of ``histoscan.explain.cam.METHODS``; ``auto`` chooses from the model's structure
            (``cam.auto_method``).
        target: ``tumour`` (the positive class), ``predicted`` (each image's predicted class) or a class name.
        device: torch device.
        batch_size: images per forward/backward pass.
        layer: a submodule name to read instead of the layer chosen from the structure (``layers.choose_layer``).
        finer: read the stage before the chosen layer (twice the resolution; LayerCAM under ``auto``).

    Raises:
        ConfigError: an unknown method, target or layer, or a model the explainer cannot handle (before any
            image is read).
    """

    def __init__(
        self,
        run_dir: str | Path,
        method: str = "auto",
        target: str = "tumour",
        device: str = "cpu",
        batch_size: int = 32,
        layer: str | None = None,
        finer: bool = False,
    ) -> None:
        self.method = method.lower()
        if self.method != "auto":
            cam_class(self.method)  # an unknown method is refused before the run is read
        run = RunFolder(run_dir)
        doc = run.read_document()
        if isinstance(doc, EnsembleDocument):
            raise ConfigError(
                f"{run_dir}: an ensemble of {len(doc.members)} runs; Grad-CAM explains one network: explain a "
                f"member instead (e.g. {member_dir(run_dir, doc.members[0].run)})"
            )
        if not run.weights_path.is_file():
            raise ConfigError(
                f"{run_dir}: no {run.weights_path.name}; Grad-CAM needs the model's weights, not only ONNX"
            )
        self.predictor = Predictor(run_dir, backend="torch", device=device, batch_size=batch_size)
        self.bundle = self.predictor.bundle
        self.pre = self.bundle.preprocessing
        backend = cast(TorchBackend, self.predictor.backend)
        self.model = backend.model.float().eval()  # maps in fp32 whatever precision the model serves in
        try:
            self.choice = choose_layer(self.model, self.bundle.architecture, self.pre.input_size, layer, finer)
        except ConfigError:
            raise
        except Exception as exc:  # a network that cannot run at its stored input size, or one of a shape we cannot read
            raise ConfigError(
                f"model {self.bundle.architecture!r} cannot be explained at input size {self.pre.input_size}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        self.layer, self.reshape = self.choice.module, self.choice.reshape
        if self.method == "auto":
            self.method = auto_method(self.choice.flattens, finer)
        self.cam_cls = cam_class(self.method)
        self.seconds_per_image = float("nan")  # measured by _check on one blank image (after a warm-up when slow)
        self.target = target
        self._fixed = None if target == "predicted" else self._class_index(target)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # CAM hooks on one model: one map computation at a time
        self._check()

    # ---- targets ------------------------------------------------------------------------
    def _class_index(self, target: str) -> int:
        classes = self.bundle.classes
        if target in classes:
            return classes.index(target)
        if target.lower() in ("tumour", "tumor"):
            if self.bundle.task == "binary":
                return 1
            named = [i for i, c in enumerate(classes) if c.lower() in TUMOUR_NAMES]
            if len(named) == 1:
                return named[0]
        raise ConfigError(
            f"--target {target!r}: not a class of this model ({', '.join(classes)}); use tumour, predicted or a class"
        )

    def _logit_target(self, cls: int) -> LogitTarget:
        if self.bundle.task == "binary":
            return LogitTarget(0, 1.0 if cls == 1 else -1.0)
        return LogitTarget(cls)

    def _check(self) -> None:
        """Run one tiny image through the method: a layer it cannot use fails here, naming method and model."""
        h, w = (int(v) for v in self.pre.image_size)
        try:
            blank = np.zeros((1, h, w, 3), np.uint8)
            for _ in range(2):  # the first pass includes one-off warm-up: a slow one is timed again
                start = time.perf_counter()
                self._maps_on_input(blank, [0], None)
                self.seconds_per_image = time.perf_counter() - start
                if self.seconds_per_image < 0.25:
                    break
        except ConfigError:
            raise
        except Exception as exc:  # the package raises builtin kinds (ValueError, IndexError, RuntimeError)
            raise ConfigError(
                f"--method {self.method} cannot explain model {self.bundle.architecture!r}: {type(exc).__name__}: {exc}"
            ) from None

    # ---- the maps -----------------------------------------------------------------------
    def _maps_on_input(
        self, batch: np.ndarray, ks: list[int], classes: np.ndarray | None, groups: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Maps at the model's input size (averaged over dihedral views, each turned back) and mean probabilities."""
        n = len(batch)
        if classes is None:
            fixed = self._fixed if self._fixed is not None else 1
            classes = np.full(n, fixed)
        targets = [self._logit_target(int(c)) for c in classes]
        maps, probs = [], []
        # the package's context manager releases the hooks and the stored activations on the way out
        # (pytorch-grad-cam issues 132 and 483: CAM objects left alive leak memory)
        with (
            self._lock,
            torch.inference_mode(False),
            torch.enable_grad(),
            self.cam_cls(self.model, [self.layer], reshape_transform=self.reshape) as cam,
        ):
            for k in ks:
                x = self.pre(batch, self.predictor.device, k, groups)
                m = torch.from_numpy(cam(x, targets))[:, None]
                maps.append(dihedral_back(m, k)[:, 0].numpy())
                probs.append(self.predictor.probabilities_from_logits(cam.outputs.detach().float().cpu().numpy()))
                cam.outputs = None  # drop the graph before the next view
        return np.mean(maps, axis=0).astype(np.float32), np.mean(probs, axis=0)

    def input_maps(self, images: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """Maps on the network's input (N, s, s), that input (N, 3, s, s, normalised) and the probabilities.

        No TTA: what faithfulness metrics perturb is this one input. Split by ``batch_size``.
        """
        maps, inputs, probs = [], [], []
        for start in range(0, len(images), self.batch_size):
            batch = self.pre.fit_batch(images[start : start + self.batch_size])
            m, p = self._maps_on_input(batch, [0], None)
            maps.append(m)
            probs.append(p)
            inputs.append(self.pre(batch, self.predictor.device, 0).float().cpu())
        return np.concatenate(maps), torch.cat(inputs), np.concatenate(probs)

    def to_patch(self, maps: np.ndarray) -> np.ndarray:
        """Maps on the model's input (N, s, s) -> maps on the fitted image (N, H, W): zero outside a centre crop."""
        h, w = (int(v) for v in self.pre.image_size)
        crop = self.pre.crop
        if self.pre.resize:
            maps = upsample(maps, (crop, crop) if crop else (h, w))
        if not crop:
            return maps.astype(np.float32)
        out = np.zeros((len(maps), h, w), np.float32)
        rows, cols = centre_slices(h, w, crop)
        out[:, rows, cols] = maps
        return out

    def to_image(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A map on the fitted image (H, W) -> on the image as given (``shape``): the fit undone.

        ``pad-edges`` put an edge patch's pixels at the top-left and white below / right of them: the
        map is cropped to those pixels (resizing would shift it); a resized image gets the map resized.
        """
        kind = fit_kind((int(shape[0]), int(shape[1])), (int(m.shape[0]), int(m.shape[1])), self.pre.fit)
        if kind is None:
            return m
        if kind == "padded":
            return np.ascontiguousarray(m[: shape[0], : shape[1]])
        return upsample(m[None], (int(shape[0]), int(shape[1])))[0]

    def explain_batch(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        tta: bool | Sequence[int] | None = None,
        groups: np.ndarray | None = None,
    ) -> Explanation:
        """Maps and predictions for uint8 RGB images of any size (split by ``batch_size``).

        ``groups``: per-group stain models: each image's stain group, estimated before
        (``pre.estimate_stain_groups`` / ``estimate_store_groups``); without it each image is its own group.
        """
        ks = tta_views(self.bundle, tta, "explain")
        maps: list[np.ndarray] = []
        probs, preds = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = self.pre.fit_batch(chunk)
            g = groups[start : start + self.batch_size] if groups is not None else None
            classes = None
            if self._fixed is None:  # "predicted": the prediction (over the TTA views) decides the target
                classes = self.predictor.predict_batch(batch, ks, g).predicted
            m, p = self._maps_on_input(batch, ks, classes, g)
            on_patch = self.to_patch(m)
            for i, img in enumerate(chunk):
                maps.append(self.to_image(on_patch[i], tuple(np.asarray(img).shape[:2])))
            probs.append(p)
            preds.append(self.predictor.classify(p) if classes is None else classes)
        c = len(self.bundle.classes)
        probabilities = np.concatenate(probs) if probs else np.zeros((0, c), np.float32)
        predicted = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        names = self.bundle.classes
        targets = [names[int(k)] if self._fixed is None else names[self._fixed] for k in predicted]
        return Explanation(maps, probabilities, predicted, targets)

    def explain(
        self, images: np.ndarray | Sequence[np.ndarray], tta: bool | Sequence[int] | None = None
    ) -> np.ndarray | list[np.ndarray]:
        """float32 maps, each the height and width of its image: an (N, H, W) array for an NHWC batch."""
        maps = self.explain_batch(images, tta).maps
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return np.stack(maps) if maps else np.zeros((0, *images.shape[1:3]), np.float32)
        return maps


def dihedral_back(m: torch.Tensor, k: int) -> torch.Tensor:
    """A map computed on dihedral view ``k`` turned back onto the original orientation."""
    from histoscan.data.transforms import dihedral_inverse

    return dihedral_inverse(m, k) if k else m
