"""``explain.html``: one self-contained page of overlays, grouped by outcome when labels are known."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GROUPS = (
    ("TP", "true positives"),
    ("FP", "false positives"),
    ("FN", "false negatives"),
    ("TN", "true negatives"),
)
_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
h2{border-bottom:1px solid #ddd;font-size:1.15rem}
figure{display:inline-block;margin:.3rem;width:196px;vertical-align:top}
figure img{width:192px;border:1px solid #eee}figcaption{font-size:.75rem;word-break:break-all}
p.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.3rem .6rem}"""


@dataclass
class Item:
    """One picture of the gallery."""

    id: str
    probability: float  # of the explained class (binary: tumour)
    group: str  # TP/FP/FN/TN, or the predicted class when labels are unknown
    png: bytes
    caption: str


def outcome(label: int | None, predicted: int, classes: Sequence[str]) -> str:
    """TP/FP/FN/TN for a labelled binary prediction, else the predicted class name."""
    if label is None or label < 0 or len(classes) != 2:
        return f"predicted {classes[predicted]}"
    return ("T" if label == predicted else "F") + ("P" if predicted == 1 else "N")


def keep_top(items: list[Item], limit: int) -> list[Item]:
    """The ``limit`` most confident items of each group (what the page shows), so memory stays bounded."""
    out: list[Item] = []
    for group in {i.group for i in items}:
        out += sorted((i for i in items if i.group == group), key=lambda i: -i.probability)[:limit]
    return out


def write_gallery(
    path: Path,
    title: str,
    items: Sequence[Item],
    limit: int,
    notes: Sequence[str] = (),
    counts: dict[str, int] | None = None,
) -> Path:
    """Write the page: groups in TP, FP, FN, TN order (others by name), each sorted by probability, highest first.

    ``counts`` gives each group's full size when ``items`` holds only the shown ones (``keep_top``).
    """
    names = dict(GROUPS)
    order = [g for g, _ in GROUPS] + sorted({i.group for i in items} - set(names))
    parts = [f"<h1>{html.escape(title)}</h1>"] + [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    for group in order:
        members = sorted((i for i in items if i.group == group), key=lambda i: -i.probability)
        if not members:
            continue
        shown = members[:limit]
        total = (counts or {}).get(group, len(members))
        more = f" (the {len(shown)} most confident shown)" if total > len(shown) else ""
        parts.append(f'<h2 id="{html.escape(group)}">{html.escape(names.get(group, group))}: {total}{more}</h2>')
        for it in shown:
            data = base64.b64encode(it.png).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(it.id)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(it.caption)}</figcaption></figure>"
            )
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
