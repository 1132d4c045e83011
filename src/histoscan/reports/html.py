"""One self-contained HTML page: headings, key/value tables, data tables and embedded PNG figures.

Images are embedded as base64 data URIs, so the report opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left} th{background:#f4f4f6}
td.num{text-align:right;font-variant-numeric:tabular-nums} figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85rem;color:#555;max-width:640px}
p.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4rem .8rem}
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


@dataclass
class HtmlReport:
    """Build a report section by section, then ``write`` it."""

    title: str
    subtitle: str = ""
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        """Add a section heading."""
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, note: bool = False) -> None:
        """Add a paragraph (``note``: in the smaller note style)."""
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def key_values(self, items: dict[str, Any]) -> None:
        """Add a two-column table of names and values."""
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th>{_cell(v)}</tr>" for k, v in items.items())
        self.parts.append(f"<table>{rows}</table>")

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Add a table with a header row."""
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figure(self, png: str | Path, caption: str = "") -> None:
        """Embed a PNG (base64, so the report is one file) with a caption."""
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        alt = html.escape(caption or Path(png).stem)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">{cap}</figure>')

    def render(self) -> str:
        """The whole report as one HTML document."""
        sub = f'<p class="sub">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (
            f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>{sub}{''.join(self.parts)}</body></html>"
        )

    def write(self, path: str | Path) -> Path:
        """Write the report to ``path``; return the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.render(), encoding="utf-8")
        return p
