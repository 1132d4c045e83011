"""Preprocessing that travels with a model: stored once in ``model.json``, read by every consumer.

The stages, in this order, for training and prediction alike:

1. fit to size (uint8): ``fit_image`` brings an image of any size to ``image_size`` under the
   ``fit`` policy (the one fit function, ``data.imageio.fit_to_size``; ingest uses it too);
2. stain normalisation of the full patch (``stain``: Reinhard or Macenko to a fitted target, from each
   patch's own stain estimate, or for a per-group model from its group's: ``groups`` names each patch's
   group, whose stain ``estimate_stain_groups`` / ``estimate_store_groups`` estimated once; without
   ``groups`` each image is its own group); a patch with no usable stain estimate passes through
   unchanged and is counted in ``stain_counts``;
3. training only: augmentation on float [0, 1] NCHW of the full patch (``PatchClassifier``);
4. centre crop to ``crop`` and / or resize to ``resize``;
5. mean / std normalisation.

Prediction runs 1, 2, 4 and 5 fused in ``__call__``; training calls the same ``__call__`` when it
does not augment, and ``to_float`` (1-2) then ``finish`` (4-5) around its augmentation when it does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from histoscan.data.imageio import fit_to_size
from histoscan.data.store import PatchStore
from histoscan.data.transforms import centre_crop, dihedral, normalise, resize
from histoscan.enums import FIT_POLICIES, FitPolicy
from histoscan.errors import ConfigError
from histoscan.geometry import centre_slices
from histoscan.stain.groups import GroupStains, estimate_groups, stain_group_names
from histoscan.stain.normalise import StainNormaliser, StainTarget

Images = np.ndarray | torch.Tensor | Sequence[np.ndarray]
#: each patch's stain group (patient, slide) name, for per-group stain normalisation
Groups = Sequence[object] | np.ndarray


@dataclass
class Preprocessing:
    """uint8 images -> the model's input tensor, with every parameter stored in ``model.json``.

    The stored fields are those of ``model.json``'s ``preprocessing`` (``histoscan.runfolder.PreprocessingSpec``,
    which validates them and is the one description of the file; ``histoscan.bundle`` converts field by field
    and a test keeps the two field lists equal). A run's ``Preprocessing`` is built from its validated spec.

    Attributes:
        image_size: (height, width) the model was trained on; every image is first fitted to it.
        fit: ``pad-edges`` white-pads an edge patch (full in one direction, short in the other) and
            resizes anything else; ``resize`` always resizes (bilinear, antialiased when shrinking).
        crop: centre crop side (at ``image_size``) before the network, or None.
        resize: side the (cropped) image is resized to, or None.
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel standard deviation on the [0, 1] scale.
        mpp: micrometres per pixel of the training patches (at ``image_size``), or None when unknown.
        label_size: side in px (at ``image_size``) of the centred square the label describes
            (32 for Kaggle / PCam 96 px patches); None when the label describes the whole image.
        stain: the stain normalisation target (``histoscan.stain.normalise.StainTarget.to_dict``), or None.
    """

    image_size: list[int] = field(default_factory=lambda: [96, 96])
    fit: FitPolicy = "resize"
    crop: int | None = None
    resize: int | None = None
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    mpp: float | None = None
    label_size: int | None = None
    stain: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.fit not in FIT_POLICIES:
            raise ConfigError(f"preprocessing.fit {self.fit!r} is not one of {list(FIT_POLICIES)}")
        self._stain: StainNormaliser | None = None
        self.stain_groups = GroupStains()  # per-group models: the groups estimated so far (not stored)

    @property
    def stain_normaliser(self) -> StainNormaliser | None:
        """The normaliser built from ``stain`` (None without one); it keeps the pass-through counts."""
        if self.stain is None:
            return None
        try:
            target = StainTarget.from_dict(self.stain)
        except ConfigError as exc:
            raise ConfigError(f"preprocessing.stain: {exc}") from None
        if self._stain is None or self._stain.target.to_dict() != target.to_dict():
            self._stain = StainNormaliser(target)
        return self._stain

    @property
    def per_group(self) -> bool:
        """Whether the stain is normalised per group (``stain.granularity`` ``group``)."""
        return self.stain is not None and self.stain.get("granularity", "patch") == "group"

    def stain_counts(self, groups: set[str] | None = None) -> dict[str, int]:
        """Patches stain-normalised so far and how many passed through unchanged (zeros without normalisation).

        Per-group models add ``groups`` (estimated so far, or those of ``groups``) and
        ``groups_passed_through`` (too little tissue: their patches pass through unchanged).
        """
        norm = self.stain_normaliser
        counts = norm.counts() if norm is not None else {"patches": 0, "passed_through": 0}
        return {**counts, **(self.stain_groups.counts(groups) if self.per_group else {})}

    def estimate_stain_groups(
        self, groups: np.ndarray, read: Callable[[np.ndarray], np.ndarray], only: set[str] | None = None
    ) -> None:
        """Per-group models: estimate the stain of each group of ``groups`` (one name per position) not yet estimated.

        ``read(positions)`` returns those patches (uint8 NHWC, any size: fitted here); each group's
        estimate pools an evenly spaced sample of its patches (``histoscan.stain.groups``). A no-op
        for other models.
        """
        norm = self.stain_normaliser
        if norm is None or not self.per_group:
            return
        estimate_groups(self.stain_groups, groups, lambda pos: self.fit_batch(read(pos)), norm.estimate_pooled, only)

    def estimate_store_groups(self, store: PatchStore) -> np.ndarray | None:
        """Per-group models: the stain group of each patch of ``store`` (a view), its groups estimated; else None.

        The groups are the store's patients / slides (``stain_group_names``), each estimated from the
        group's patches in the whole store (not only the view's), so every split of a store sees the
        estimate training saw. A store without groups is one group.
        """
        if not self.per_group:
            return None
        full = PatchStore(store.path)
        names = stain_group_names(store)
        self.estimate_stain_groups(stain_group_names(full), full.batch, only=set(names.tolist()))
        return names

    @property
    def input_size(self) -> int:
        """Side of the tensor the network sees."""
        if self.resize:
            return int(self.resize)
        if self.crop:
            return int(self.crop)
        return int(self.image_size[0])

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessing`` entry of ``model.json``."""
        d = {**asdict(self), "input_size": self.input_size}
        if self.stain is not None:
            d["stain"] = StainTarget.from_dict(self.stain).to_dict()
        return d

    # ---- stage 1: fit to size (uint8) ------------------------------------------------
    def fit_image(self, img: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 of any size -> uint8 at ``image_size``, under the ``fit`` policy."""
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ConfigError(f"expected a uint8 HxWx3 RGB image, got {got}")
        h, w = self.image_size
        return fit_to_size(img, (int(h), int(w)), self.fit)[0]

    def fit_batch(self, images: Images) -> np.ndarray:
        """A uint8 NHWC batch at ``image_size`` from a batch or a list of images of any sizes."""
        h, w = (int(v) for v in self.image_size)
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.shape[1:3] == (h, w):
                return images
            images = list(images)
        out = np.empty((len(images), h, w, 3), np.uint8)
        for i, img in enumerate(images):
            try:
                out[i] = self.fit_image(img)
            except ConfigError as exc:
                raise ConfigError(f"image {i}: {exc}") from exc
        return out

    # ---- stage 2: stain normalisation (uint8, full patch) -------------------------------
    def normalise_stain(self, batch: torch.Tensor, groups: Groups | None = None) -> torch.Tensor:
        """The uint8 NHWC batch after stain normalisation (the batch itself when ``stain`` is None).

        Per-group models map each patch with its group's estimate (``groups``: one name per patch, each
        estimated before); without ``groups`` each image is its own group (its own estimate).
        """
        norm = self.stain_normaliser
        if norm is None:
            return batch
        if groups is None or not self.per_group:
            return norm(batch)
        if len(groups) != batch.shape[0]:
            raise ConfigError(f"{len(groups)} stain groups for {batch.shape[0]} images")
        return norm(batch, self.stain_groups.for_patches(groups, batch.device))

    def _fitted(self, batch: Images, device: torch.device | str | None, groups: Groups | None = None) -> torch.Tensor:
        """Stages 1-2: a uint8 NHWC tensor at ``image_size`` on ``device``."""
        h, w = (int(v) for v in self.image_size)
        if not isinstance(batch, torch.Tensor) or tuple(batch.shape[1:3]) != (h, w):
            batch = torch.from_numpy(np.ascontiguousarray(self.fit_batch(batch)))
        if device is not None:
            batch = batch.to(device, non_blocking=True)
        return self.normalise_stain(batch, groups)

    # ---- the training path around augmentation ------------------------------------------
    def to_float(
        self, batch: Images, device: torch.device | str | None = None, groups: Groups | None = None
    ) -> torch.Tensor:
        """Stages 1-2, then float [0, 1] NCHW of the full patch: what training augmentation works on."""
        return self._fitted(batch, device, groups).permute(0, 3, 1, 2).float().div_(255.0)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 4 on float NCHW at ``image_size``: centre crop, then resize."""
        if self.crop:
            x = centre_crop(x, self.crop)
        if self.resize:
            x = resize(x, self.resize)
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Stages 4-5 on float [0, 1] NCHW at ``image_size``: crop / resize, then mean / std."""
        return normalise(self.geometry(x), self.mean, self.std)

    # ---- the fused path (prediction, and training without augmentation) ------------------
    def prepare(
        self, batch: Images, device: torch.device | str | None = None, groups: Groups | None = None
    ) -> torch.Tensor:
        """Stages 1-2 once: a uint8 NHWC tensor at ``image_size`` on ``device``, stain-normalised.

        Prediction prepares each image once and builds every TTA view and the tissue check from the
        result (``network_input``, ``as_float``), so fitting and stain normalisation never run per view.
        """
        return self._fitted(batch, device, groups)

    @staticmethod
    def as_float(prepared: torch.Tensor) -> torch.Tensor:
        """A prepared uint8 NHWC tensor as float [0, 1] NCHW (no stage runs again)."""
        return prepared.permute(0, 3, 1, 2).float().div_(255.0)

    def network_input(
        self, prepared: torch.Tensor, k: int = 0, memory_format: torch.memory_format = torch.channels_last
    ) -> torch.Tensor:
        """Stages 4-5 on a prepared uint8 NHWC tensor (see ``prepare``), under dihedral element ``k``.

        The centre crop is a slice of the uint8 batch before conversion, and scaling and normalisation are
        one fused step. ``memory_format``: the layout the backend reads without a copy. Channels-last (the
        default) is what oneDNN convolutions run about 1.4x faster on CPU; ONNX Runtime reads contiguous NCHW,
        built here in the same pass as the conversion to float instead of by a transposing copy afterwards.
        """
        t = prepared
        if self.crop:
            h, w = (int(v) for v in self.image_size)
            rows, cols = centre_slices(h, w, self.crop)
            t = t[:, rows, cols]
        planar = t.permute(0, 3, 1, 2)
        if memory_format == torch.channels_last:
            x = planar.float()  # keeps the NHWC memory: no transpose
        else:
            x = torch.empty(planar.shape, dtype=torch.float32, device=planar.device).copy_(planar)
        if self.resize:
            x = resize(x, self.resize)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
        scale = 1.0 / (torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0)
        x = x.sub_(mean).mul_(scale) if not self.resize else (x - mean) * scale
        return dihedral_k(x.contiguous(memory_format=memory_format), k, memory_format)

    def __call__(
        self, batch: Images, device: torch.device | str | None = None, k: int = 0, groups: Groups | None = None
    ) -> torch.Tensor:
        """Images -> normalised float NCHW on ``device`` (under dihedral element ``k``): every stage but augmentation.

        ``groups``: each image's stain group, for per-group models (see ``normalise_stain``). Same result as
        ``finish(to_float(batch))``: ``network_input(prepare(batch))``.
        """
        return self.network_input(self.prepare(batch, device, groups), k)

    def stage2_key(self) -> str:
        """What stages 1-2 depend on: two preprocessings with the same key prepare an image identically."""
        return json.dumps([list(self.image_size), self.fit, self.stain], sort_keys=True, default=str)


def dihedral_k(x: torch.Tensor, k: int, memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """``dihedral(x, k)`` in ``memory_format``, or ``x`` itself for the identity."""
    return dihedral(x, k).contiguous(memory_format=memory_format) if k else x


def channel_stats(images: np.ndarray, max_images: int = 2000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale from up to ``max_images`` random images."""
    rng = np.random.default_rng(seed)
    n = images.shape[0]
    idx = np.sort(rng.choice(n, size=min(n, max_images), replace=False))
    sample = np.asarray(images[idx], dtype=np.float32) / 255.0
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)).clip(min=1e-3)
    return [round(float(m), 5) for m in mean], [round(float(s), 5) for s in std]
