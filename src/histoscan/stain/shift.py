"""The stain-shift suite of ``histoscan evaluate --stain-shift``: fixed, documented, deterministic.

Each shift maps a uint8 NHWC batch to a shifted uint8 batch before the model's own preprocessing
(which includes its stain normalisation, if any), so a model is scored as it would meet another
lab's slides. Families:

in-family (what stain augmentation or normalisation models):
- ``hed-0.05``, ``hed-0.1``, ``hed-0.2``: HED jitter (each stain's optical density scaled by
  U(1 - s, 1 + s) and shifted by U(-s, s)), random per patch from a fixed seed;
- ``restain-<donor>``: each patch Macenko-normalised to the stain fitted from a donor (a store
  or image folder given with ``--stain-donor``; the benchmark uses IDC and LC25000).

out-of-family (what neither models):
- ``lab-a+8``, ``lab-b-8``, ``lab-L-10``: a fixed shift of one CIE L*a*b* channel;
- ``gamma-0.7``, ``gamma-1.4``: I' = 255 (I / 255) ** gamma;
- ``rotate-10``, ``rotate-20``: every pixel's optical density (hence every stain vector) rotated
  by that many degrees about the grey axis (1, 1, 1) / sqrt(3): a change of hue no single stain
  matrix of the patch's own reproduces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscan.data.store import PatchStore
from histoscan.data.transforms import HEDJitter
from histoscan.metrics import auroc, bootstrap_interval
from histoscan.reports.html import HtmlReport
from histoscan.stain.colour import from_optical_density, lab_to_rgb, optical_density, rgb_to_lab, to_uint8
from histoscan.stain.normalise import StainNormaliser
from histoscan.stain.sources import fit_reference

Tensor = torch.Tensor
ShiftFn = Callable[[Tensor, int], Tensor]  # (uint8 NHWC batch, index of its first patch) -> shifted batch
SHIFT_SEED = 1729


@dataclass
class Shift:
    """One shift of the suite: its name, family (``in`` or ``out``) and the batch function."""

    name: str
    family: str
    apply: ShiftFn


def _hed(strength: float) -> ShiftFn:
    jitter = HEDJitter(strength, strength)

    def apply(batch: Tensor, start: int) -> Tensor:
        gen = torch.Generator().manual_seed(SHIFT_SEED * 1_000_003 + start)  # the same draw for a patch every run
        x = jitter(batch.permute(0, 3, 1, 2).float().div(255.0), gen)
        return to_uint8(x.mul(255.0)).permute(0, 2, 3, 1).contiguous()

    return apply


def _lab(channel: int, delta: float) -> ShiftFn:
    def apply(batch: Tensor, start: int) -> Tensor:
        lab = rgb_to_lab(batch)
        lab[..., channel] += delta
        return to_uint8(lab_to_rgb(lab))

    return apply


def _gamma(gamma: float) -> ShiftFn:
    def apply(batch: Tensor, start: int) -> Tensor:
        return to_uint8((batch.float() / 255.0).pow(gamma) * 255.0)

    return apply


def grey_axis_rotation(degrees: float) -> Tensor:
    """3 x 3 rotation by ``degrees`` about (1, 1, 1) / sqrt(3) (Rodrigues' formula)."""
    k = torch.ones(3) / math.sqrt(3.0)
    kx = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    t = math.radians(degrees)
    return torch.eye(3) + math.sin(t) * kx + (1 - math.cos(t)) * (kx @ kx)


def _rotate(degrees: float) -> ShiftFn:
    rot = grey_axis_rotation(degrees)

    def apply(batch: Tensor, start: int) -> Tensor:
        return to_uint8(from_optical_density(optical_density(batch) @ rot.T.to(batch.device)))

    return apply


def _restain(normaliser: StainNormaliser) -> ShiftFn:
    def apply(batch: Tensor, start: int) -> Tensor:
        return normaliser(batch)

    return apply


def shift_suite(donors: Sequence[str | Path] = ()) -> list[Shift]:
    """The fixed suite, with one re-staining shift per donor (DataError when a donor has no usable patches)."""
    shifts = [Shift(f"hed-{s:g}", "in", _hed(s)) for s in (0.05, 0.1, 0.2)]
    for donor in donors:
        target = fit_reference(donor, "macenko")
        shifts.append(Shift(f"restain-{Path(donor).name}", "in", _restain(StainNormaliser(target))))
    shifts += [
        Shift("lab-a+8", "out", _lab(1, 8.0)),
        Shift("lab-b-8", "out", _lab(2, -8.0)),
        Shift("lab-L-10", "out", _lab(0, -10.0)),
        Shift("gamma-0.7", "out", _gamma(0.7)),
        Shift("gamma-1.4", "out", _gamma(1.4)),
        Shift("rotate-10", "out", _rotate(10.0)),
        Shift("rotate-20", "out", _rotate(20.0)),
    ]
    return shifts


def shifted_probabilities(
    predict: Callable[[np.ndarray], np.ndarray], store: PatchStore, shift: Shift | None, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities of every patch of ``store`` under ``shift`` (None: as stored)."""
    parts = []
    for start in range(0, len(store), batch_size):
        batch = torch.from_numpy(
            np.ascontiguousarray(store.batch(np.arange(start, min(len(store), start + batch_size))))
        )
        if shift is not None:
            batch = shift.apply(batch, start)
        parts.append(predict(batch.numpy()))
    return np.concatenate(parts)


def stain_shift_report(
    predict: Callable[[np.ndarray], np.ndarray],
    store: PatchStore,
    suite: Sequence[Shift],
    *,
    clean: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    on_shift: Callable[[Shift | None], None] | None = None,
) -> dict[str, Any]:
    """AUROC (with bootstrap interval) under each shift, its drop from clean, and the worst drop per family.

    ``on_shift`` is called before each pass over the store (None: the clean pass), e.g. to
    re-estimate a per-group stain model's groups under that shift.
    """
    labels = store.labels
    if clean is None:
        if on_shift:
            on_shift(None)
        clean = shifted_probabilities(predict, store, None, batch_size)
    base = auroc(labels, clean)
    rows: list[dict[str, Any]] = []
    for shift in suite:
        if on_shift:
            on_shift(shift)
        probs = shifted_probabilities(predict, store, shift, batch_size)
        value = auroc(labels, probs)
        lo, hi = bootstrap_interval(labels, probs, n_boot, seed)
        rows.append(
            {
                "shift": shift.name,
                "family": shift.family,
                "auroc": value,
                "ci_low": lo,
                "ci_high": hi,
                "drop": base - value,
            }
        )
    worst: dict[str, dict[str, Any]] = {}
    for fam in ("in", "out"):
        fam_rows = [r for r in rows if r["family"] == fam]
        if fam_rows:
            w = max(fam_rows, key=lambda r: r["drop"])
            worst[fam] = {"shift": w["shift"], "drop": w["drop"], "auroc": w["auroc"]}
    return {"clean_auroc": base, "shifts": rows, "worst_drop": worst, "patches": len(labels)}


def shift_lines(report: dict[str, Any]) -> list[str]:
    """The stain-shift report as text lines: one per shift, then the worst drop per family."""
    lines = [f"stain shifts ({report['patches']} patches), clean AUROC {report['clean_auroc']:.4f}:"]
    for r in report["shifts"]:
        lines.append(
            f"  {r['shift']:22s} {r['family']:>3s}-family  AUROC {r['auroc']:.4f} "
            f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]  drop {r['drop']:+.4f}"
        )
    for fam, w in report["worst_drop"].items():
        lines.append(f"  worst {fam}-family drop: {w['drop']:+.4f} ({w['shift']})")
    return lines


def add_shift_section(rep: HtmlReport, report: dict[str, Any]) -> None:
    """The stain-shift table in an evaluation report."""
    rep.heading("Stain shifts")
    rep.paragraph(
        f"Clean AUROC {report['clean_auroc']:.4f} on {report['patches']} patches. In-family shifts are those stain "
        "augmentation or normalisation model (HED jitter, re-staining to a donor); out-of-family ones neither models "
        "(L*a*b* shifts, gamma, rotation of the stain vectors about the grey axis)."
    )
    rep.table(
        ["shift", "family", "AUROC", "95% CI", "drop"],
        [
            [r["shift"], r["family"], r["auroc"], f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]", r["drop"]]
            for r in report["shifts"]
        ],
    )
    rep.key_values(
        {f"worst {fam}-family drop": f"{w['drop']:+.4f} ({w['shift']})" for fam, w in report["worst_drop"].items()}
    )
