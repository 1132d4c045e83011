"""Human-readable summaries of a validation report and of a store (rich renderables)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from histoscan.data.store import PatchStore

_LIST_LIMIT = 5


def _few(items: list[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_LIST_LIMIT])
    return shown + (f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def report_summary(report: dict[str, Any]) -> Group:
    """The validation report as a table plus one line per problem kind."""
    t = Table(title=f"ingest: {report['layout']} source {report['source']}", show_header=False)
    t.add_row("images listed", str(report["listed"]))
    t.add_row("images stored", str(report["stored"]))
    t.add_row("stored size", "x".join(map(str, report["image_size"])))
    for name, n in report["counts_per_class"].items():
        t.add_row(f"class {name}", str(n))
    t.add_row("sizes seen", ", ".join(f"{k} ({v})" for k, v in list(report["sizes_seen"].items())[:6]))
    if report["conversions"]:
        t.add_row("converted", ", ".join(f"{k}: {v}" for k, v in report["conversions"].items()))
    lines = []
    checks = [
        ("unreadable", [f"{u['path']} ({u['reason']})" for u in report["unreadable"]], "left out"),
        ("duplicate_ids", report["duplicate_ids"], "first kept"),
        ("labels_without_image", report["labels_without_image"], "not stored"),
        ("images_without_label", report["images_without_label"], "not stored"),
        (
            "duplicate_content",
            [" = ".join(g) for g in report["duplicate_content"]],
            "kept; beware of leakage across splits",
        ),
    ]
    for key, items, action in checks:
        if items:
            lines.append(Text(f"{key.replace('_', ' ')}: {len(items)} ({action}): {_few(items)}", style="yellow"))
    if not lines:
        lines.append(Text("no problems found", style="green"))
    return Group(t, *lines)


def store_summary(store: PatchStore) -> Table:
    """What a store holds: size, classes, counts, groups, splits saved."""
    t = Table(title=f"store {store.path}", show_header=False)
    m = store.meta
    t.add_row("patches", str(len(store)))
    t.add_row("image size", "x".join(map(str, store.image_size)))
    t.add_row("classes", ", ".join(store.class_names))
    for name, n in store.counts().items():
        t.add_row(f"  {name}", str(n))
    groups = store.groups
    t.add_row("groups", str(len(set(groups))) if groups is not None else "none")
    t.add_row("layout", str(m.get("layout")))
    t.add_row("source", str(m.get("source")))
    t.add_row("created", f"{m.get('created')} by histoscan {m.get('histoscan_version')}")
    splits = sorted(p.stem for p in (store.path / "splits").glob("*.csv")) if (store.path / "splits").is_dir() else []
    t.add_row("saved splits", ", ".join(splits) or "none")
    return t
