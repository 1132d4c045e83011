"""``histoscan eda``: figures and one self-contained HTML report about a store.

Class balance, a sample grid per class (the labelled centre 32x32 outlined on 96 px patches),
mean image per class, RGB and grey-level histograms per class, brightness per class, image sizes
seen at ingest, blank / dark / blurry patches with examples, exact duplicates and per-group counts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoscan.data.store import PatchStore
from histoscan.eda import stats as st
from histoscan.evaluation.plots import centre_outline
from histoscan.reports.figures import image_grid, new_figure, save_png
from histoscan.reports.html import HtmlReport
from histoscan.stain.show import stain_section

EDA_JSON = "eda.json"
REPORT_HTML = "report.html"


@dataclass
class EdaResult:
    """Where the report is, its numbers, and how long it took."""

    out: Path
    summary: dict[str, Any]
    figures: dict[str, Path]
    seconds: float

    def lines(self) -> list[str]:
        """What ``histoscan eda`` prints: counts, quality checks, figures, and where the report is."""
        q = self.summary["quality"]
        return [
            f"{self.summary['patches']:,} patches {self.summary['counts']}; blank {q['blank']}, dark {q['dark']}, "
            f"blurry {q['blurry']}, duplicate groups {self.summary['duplicate_groups']}; {len(self.figures)} figures "
            f"in {self.seconds:.1f} s",
            f"report: {self.out / REPORT_HTML}",
        ]


def run_eda(
    store_path: str | Path,
    out: str | Path,
    *,
    sample: int = 5000,
    grid: int = 16,
    seed: int = 0,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> EdaResult:
    """Explore ``store_path`` and write ``out/report.html``, ``out/eda.json`` and the PNG figures.

    Args:
        store_path: the packed store to explore.
        out: the folder the report and figures are written to (created when missing).
        sample: patches per class for mean images and histograms (per-patch checks cover every patch).
        grid: example patches per class in the sample grids.
        seed: seed of the per-class samples and of the example grids.
        progress: ``start(total) -> advance(n)`` for a progress bar over the per-patch pass.
    """
    started = time.perf_counter()
    store = PatchStore(store_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = store.labels
    names = _label_names(store)
    stats = st.patch_stats(store, progress(len(store)) if progress else None)
    picks = st.sample_positions(labels, sample, seed)
    samples = {c: st.class_sample(store, pos) for c, pos in picks.items()}
    outline = centre_outline(store.image_size)
    rng = np.random.default_rng(seed)
    figures: dict[str, Path] = {"class_counts": _counts_png(store, names, out / "class_counts.png")}
    for c, pos in picks.items():
        show = np.sort(rng.choice(pos, size=min(grid, len(pos)), replace=False))
        figures[f"samples_{names[c]}"] = image_grid(
            store.batch(show),
            [str(i) for i in store.ids[show]],
            out / f"samples_{_safe(names[c])}.png",
            suptitle=f"{names[c]}: random patches" + (" (labelled centre 32x32 outlined)" if outline else ""),
            outline=outline,
        )
    figures["mean_images"] = _mean_images_png(samples, names, out / "mean_images.png")
    figures["rgb_histograms"] = _rgb_png(samples, names, out / "rgb_histograms.png")
    figures["intensity"] = _intensity_png(samples, stats, labels, names, out / "intensity.png")
    report = store.report() or {}
    figures["sizes"] = _sizes_png(
        report.get("sizes_seen") or {"x".join(map(str, store.image_size)): len(store)}, out / "sizes.png"
    )
    quality = {"blank": stats.blank, "dark": stats.dark, "blurry": stats.blurry}
    for kind, mask in quality.items():
        idx = np.flatnonzero(mask)
        if len(idx):
            show = np.sort(rng.choice(idx, size=min(16, len(idx)), replace=False))
            figures[f"{kind}_examples"] = image_grid(
                store.batch(show),
                [f"{store.ids[i]}" for i in show],
                out / f"{kind}_examples.png",
                suptitle=f"{kind} patches ({len(idx)} in the store)",
            )
    dup_groups = report.get("duplicate_content") or []
    if dup_groups:
        figures["duplicates"] = _duplicates_png(store, dup_groups, out / "duplicates.png")
    groups = store.groups
    if groups is not None:
        figures["groups"] = _groups_png(groups, labels, names, out / "groups.png")
    summary = _summary(store, names, stats, quality, dup_groups, samples, groups)
    stain = stain_section(store, out, seed=seed)
    figures.update(stain.figures)
    summary["stain"] = stain.summary
    (out / EDA_JSON).write_text(json.dumps(summary, indent=2))
    _html(out / REPORT_HTML, store, summary, figures)
    return EdaResult(out, summary, figures, time.perf_counter() - started)


def _label_names(store: PatchStore) -> dict[int, str]:
    return {**{i: n for i, n in enumerate(store.class_names)}, -1: "unlabelled"}


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _counts_png(store: PatchStore, names: dict[int, str], path: Path) -> Path:
    counts = store.counts()
    fig, ax = new_figure((560, 400))
    a = ax[0, 0]
    bars = a.bar(
        list(counts), list(counts.values()), color=[f"C{i}" for i in range(len(counts))]
    )  # as in the other plots
    total = max(1, sum(counts.values()))
    for b, v in zip(bars, counts.values()):
        a.annotate(
            f"{v:,}\n{v / total:.1%}",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    a.set(ylabel="patches", title=f"class balance ({total:,} patches)")
    a.margins(y=0.2)
    return save_png(fig, path)


def _mean_images_png(samples: dict[int, st.ClassSample], names: dict[int, str], path: Path) -> Path:
    keys = sorted(samples)
    extra = len(keys) == 2
    fig, ax = new_figure((220 * (len(keys) + extra), 260), 1, len(keys) + extra)
    for a, c in zip(ax[0], keys):
        a.imshow(samples[c].mean_image)
        a.set_title(f"mean {names[c]} (n={samples[c].count})", fontsize=9)
        a.set_axis_off()
    if extra:
        diff = samples[keys[1]].mean_image.astype(float).mean(-1) - samples[keys[0]].mean_image.astype(float).mean(-1)
        lim = max(1.0, float(np.abs(diff).max()))
        im = ax[0, -1].imshow(diff, cmap="coolwarm", vmin=-lim, vmax=lim)
        ax[0, -1].set_title(f"{names[keys[1]]} - {names[keys[0]]} (grey)", fontsize=9)
        ax[0, -1].set_axis_off()
        fig.colorbar(im, ax=ax[0, -1], shrink=0.7)
    return save_png(fig, path)


def _rgb_png(samples: dict[int, st.ClassSample], names: dict[int, str], path: Path) -> Path:
    fig, ax = new_figure((960, 320), 1, 3)
    levels = np.arange(256)
    for c_idx, (a, channel) in enumerate(zip(ax[0], ("red", "green", "blue"))):
        for c in sorted(samples):
            a.plot(levels, samples[c].rgb_density[c_idx], label=names[c], lw=1.2)
        a.set(title=f"{channel} channel", xlabel="intensity", ylabel="density", xlim=(0, 255))
        a.legend(fontsize=8)
    return save_png(fig, path)


def _intensity_png(
    samples: dict[int, st.ClassSample], stats: st.PatchStats, labels: np.ndarray, names: dict[int, str], path: Path
) -> Path:
    fig, ax = new_figure((960, 340), 1, 2)
    for c in sorted(samples):
        ax[0, 0].plot(np.arange(256), samples[c].grey_density, label=names[c])
        ax[0, 1].hist(
            stats.brightness[labels == c], bins=np.linspace(0, 255, 52), alpha=0.55, density=True, label=names[c]
        )
    ax[0, 0].set(title="pixel intensity (grey)", xlabel="grey level", ylabel="density", xlim=(0, 255))
    ax[0, 1].axvline(st.BLANK_MEAN, ls=":", color="grey")
    ax[0, 1].axvline(st.DARK_MEAN, ls=":", color="grey")
    ax[0, 1].set(title="mean brightness per patch", xlabel="mean grey level", ylabel="density", xlim=(0, 255))
    for a in ax[0]:
        a.legend(fontsize=8)
    return save_png(fig, path)


def _sizes_png(sizes: dict[str, int], path: Path) -> Path:
    items = sorted(sizes.items(), key=lambda kv: -kv[1])[:15]
    fig, ax = new_figure((560, 340))
    ax[0, 0].barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#7f7f7f")
    ax[0, 0].set(title="image sizes seen at ingest (before resizing)", xlabel="images")
    return save_png(fig, path)


def _duplicates_png(store: PatchStore, dup_groups: list[list[str]], path: Path) -> Path:
    where = {pid: i for i, pid in enumerate(store.ids)}
    pairs = [[where[p] for p in g[:2] if p in where] for g in dup_groups[:8]]
    pos = [p for pair in pairs if len(pair) == 2 for p in pair]
    return image_grid(
        store.batch(np.array(pos, dtype=np.int64)),
        [str(store.ids[p]) for p in pos],
        path,
        cols=8,
        suptitle=f"exact duplicates, shown in pairs ({len(dup_groups)} groups)",
    )


def _groups_png(groups: np.ndarray, labels: np.ndarray, names: dict[int, str], path: Path, top: int = 40) -> Path:
    uniq, counts = np.unique(groups, return_counts=True)
    order = uniq[np.argsort(-counts)][:top]
    fig, ax = new_figure((960, 380))
    a = ax[0, 0]
    bottom = np.zeros(len(order))
    for c in sorted(set(labels.tolist())):
        v = np.array([int(((groups == g) & (labels == c)).sum()) for g in order])
        a.bar(range(len(order)), v, bottom=bottom, label=names[c])
        bottom += v
    a.set_xticks(range(len(order)), [str(g) for g in order], rotation=90, fontsize=6)
    a.set(title=f"patches per group (largest {len(order)} of {len(uniq)})", ylabel="patches")
    a.legend(fontsize=8)
    return save_png(fig, path)


def _summary(
    store: PatchStore,
    names: dict[int, str],
    stats: st.PatchStats,
    quality: dict[str, np.ndarray],
    dup_groups: list[list[str]],
    samples: dict[int, st.ClassSample],
    groups: np.ndarray | None,
) -> dict[str, Any]:
    counts = store.counts()
    nonzero = [v for v in counts.values() if v]
    out: dict[str, Any] = {
        "store": str(store.path.resolve()),
        "patches": len(store),
        "image_size": list(store.image_size),
        "classes": store.class_names,
        "counts": counts,
        "imbalance_ratio": round(max(nonzero) / min(nonzero), 3) if nonzero else None,
        "layout": store.meta.get("layout"),
        "quality": {k: int(v.sum()) for k, v in quality.items()},
        "quality_rules": {
            "blank": f"mean grey >= {st.BLANK_MEAN:g} and std <= {st.BLANK_STD:g}",
            "dark": f"mean grey <= {st.DARK_MEAN:g}",
            "blurry": f"Laplacian variance < {st.BLURRY_SHARPNESS:g} (and not blank)",
        },
        "duplicate_groups": len(dup_groups),
        "sampled_per_class": {names[c]: s.count for c, s in samples.items()},
        "brightness_mean_per_class": {
            names[int(c)]: round(float(stats.brightness[store.labels == c].mean()), 2) for c in np.unique(store.labels)
        },
    }
    if groups is not None:
        _, per = np.unique(groups, return_counts=True)
        out["groups"] = {
            "count": len(per),
            "patches_min": int(per.min()),
            "patches_median": float(np.median(per)),
            "patches_max": int(per.max()),
        }
    return out


def _html(path: Path, store: PatchStore, summary: dict[str, Any], figures: dict[str, Path]) -> Path:
    rep = HtmlReport(
        f"Data report: {store.path.name}",
        subtitle=f"{summary['patches']:,} patches, "
        f"{'x'.join(map(str, summary['image_size']))} px, layout {summary['layout']}",
    )
    rep.heading("Summary")
    rep.key_values(
        {
            "patches": summary["patches"],
            **{f"class {k}": v for k, v in summary["counts"].items()},
            "imbalance ratio (largest / smallest class)": summary["imbalance_ratio"],
            "exact-duplicate groups": summary["duplicate_groups"],
            **({"groups": summary["groups"]["count"]} if "groups" in summary else {}),
        }
    )
    rep.heading("Patch quality (every patch checked)")
    rep.table(
        ["check", "patches", "rule"], [[k, v, summary["quality_rules"][k]] for k, v in summary["quality"].items()]
    )
    if summary["imbalance_ratio"] and summary["imbalance_ratio"] > 1.5:
        rep.paragraph(
            f"Classes are imbalanced ({summary['imbalance_ratio']:.2f}:1): judge models by AUROC or balanced "
            "accuracy, and consider class weights or a balanced sampler.",
            note=True,
        )
    if summary["duplicate_groups"]:
        rep.paragraph("Exact duplicates can land on both sides of a split and inflate validation scores.", note=True)
    rep.heading("Figures")
    for name, png in figures.items():
        rep.figure(png, name.replace("_", " "))
    return rep.write(path)
