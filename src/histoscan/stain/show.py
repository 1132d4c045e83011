"""``histoscan stain show``: stain vectors and concentrations per group, and patches before and after normalisation.

The EDA report includes the same section (``stain_section``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoscan.data.store import PatchStore
from histoscan.reports.figures import image_grid, new_figure, save_png
from histoscan.reports.html import HtmlReport
from histoscan.stain.colour import optical_density
from histoscan.stain.estimate import macenko, sample_pixels
from histoscan.stain.normalise import StainNormaliser, fit_target

STAIN_JSON = "stain.json"
MAX_GROUPS = 20


@dataclass
class StainShowResult:
    """Where the section's files are, and its numbers."""

    out: Path
    summary: dict[str, Any]
    figures: dict[str, Path]


def _angle(v: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Angle in degrees between each row of ``v`` and ``ref``."""
    cos = np.clip((v * ref).sum(-1) / (np.linalg.norm(v, axis=-1) * np.linalg.norm(ref) + 1e-12), -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def stain_section(store: PatchStore, out: Path, max_patches: int = 2000, seed: int = 0) -> StainShowResult:
    """Per-patch Macenko estimates on a seeded sample of ``store``, summarised per group, with figures in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(store), size=min(len(store), max_patches), replace=False))
    images = store.batch(idx)
    est = macenko(optical_density(sample_pixels(torch.from_numpy(np.ascontiguousarray(images)))))
    ok = est.ok.numpy()
    he, maxc = est.stain_matrix.numpy()[ok], est.max_concentrations.numpy()[ok]
    groups_all = store.groups
    groups = np.asarray(groups_all[idx] if groups_all is not None else np.full(len(idx), "all"), dtype=object)[ok]
    summary: dict[str, Any] = {
        "patches_sampled": len(idx),
        "patches_usable": int(ok.sum()),
        "passed_through": int((~ok).sum()),
        "grouped": groups_all is not None,
    }
    figures: dict[str, Path] = {}
    if ok.sum() == 0:
        summary["note"] = "no sampled patch holds enough tissue for a stain estimate"
        return StainShowResult(out, summary, figures)
    ref = np.median(he, axis=0)
    names, counts = np.unique(groups, return_counts=True)
    top = [str(n) for n in names[np.argsort(-counts)][:MAX_GROUPS]]
    per_group = {}
    for g in top:
        m = groups == g
        per_group[g] = {
            "patches": int(m.sum()),
            "haematoxylin": [round(float(v), 4) for v in np.median(he[m, 0], axis=0)],
            "eosin": [round(float(v), 4) for v in np.median(he[m, 1], axis=0)],
            "max_concentration_h": round(float(np.median(maxc[m, 0])), 4),
            "max_concentration_e": round(float(np.median(maxc[m, 1])), 4),
        }
    summary["median_stain_matrix"] = [[round(float(v), 4) for v in row] for row in ref]
    summary["groups"] = per_group
    figures["stain_vectors"] = _boxes(
        [[_angle(he[groups == g, k], ref[k]) for g in top] for k in (0, 1)],
        top,
        ["haematoxylin vector: angle to the median (degrees)", "eosin vector: angle to the median (degrees)"],
        out / "stain_vectors.png",
    )
    figures["stain_concentrations"] = _boxes(
        [[maxc[groups == g, k] for g in top] for k in (0, 1)],
        top,
        ["haematoxylin: 99th-percentile concentration", "eosin: 99th-percentile concentration"],
        out / "stain_concentrations.png",
    )
    figures["stain_normalised"] = _before_after(images, seed, out / "stain_normalised.png")
    (out / STAIN_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    return StainShowResult(out, summary, figures)


def _boxes(values: list[list[np.ndarray]], groups: list[str], titles: list[str], path: Path) -> Path:
    fig, axes = new_figure((max(640, 40 * len(groups) + 160), 560), rows=2)
    for ax, vals, title in zip(axes[:, 0], values, titles):
        ax.boxplot([v if len(v) else np.zeros(1) for v in vals], showfliers=False)
        ax.set_xticks(range(1, len(groups) + 1), [g[:10] for g in groups], rotation=60, fontsize=7)
        ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def _before_after(images: np.ndarray, seed: int, path: Path, n: int = 8) -> Path:
    """Rows: original patches, Macenko-normalised, Reinhard-normalised (both to this sample's own target)."""
    rng = np.random.default_rng(seed + 1)
    show = images[np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))]
    rows = [show]
    titles = ["original"] * len(show)
    for method in ("macenko", "reinhard"):
        try:
            target = fit_target(images, method, "sample")
        except Exception:  # too little tissue to fit: the row shows the originals, labelled so
            rows.append(show)
            titles += [f"{method}: no target"] * len(show)
            continue
        rows.append(StainNormaliser(target)(torch.from_numpy(np.ascontiguousarray(show))).numpy())
        titles += [method] * len(show)
    return image_grid(np.concatenate(rows), titles, path, cols=len(show), suptitle="before and after normalisation")


def show_stain(store_path: str | Path, out: str | Path, max_patches: int = 2000, seed: int = 0) -> StainShowResult:
    """Write the stain section of ``store_path`` to ``out`` (PNGs, ``stain.json``, ``report.html``)."""
    store = PatchStore(store_path)
    result = stain_section(store, Path(out), max_patches, seed)
    rep = HtmlReport(f"Stain: {store.path.name}", subtitle=f"{result.summary['patches_sampled']} patches sampled")
    add_to_report(rep, result)
    rep.write(Path(out) / "report.html")
    return result


def add_to_report(rep: HtmlReport, result: StainShowResult) -> None:
    """The stain section in an HTML report (``stain show`` and the EDA report)."""
    s = result.summary
    rep.heading("Stain")
    rep.key_values(
        {
            "patches sampled": s["patches_sampled"],
            "usable for a stain estimate": s["patches_usable"],
            "passed through (blank, background, dark, pen, single colour)": s["passed_through"],
        }
    )
    if s.get("groups"):
        rep.table(
            ["group", "patches", "H vector", "E vector", "max conc. H", "max conc. E"],
            [
                [
                    g,
                    v["patches"],
                    str(v["haematoxylin"]),
                    str(v["eosin"]),
                    v["max_concentration_h"],
                    v["max_concentration_e"],
                ]
                for g, v in s["groups"].items()
            ],
        )
    for name, png in result.figures.items():
        rep.figure(png, name.replace("_", " "))
