"""The one terminal progress bar (rich) that long steps report to: ingest, EDA, prediction, downloads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

Advance = Callable[[int], None]
Start = Callable[..., Advance]


@contextmanager
def progress_bar(label: str, *, count_bytes: bool = False) -> Iterator[Start]:
    """A progress bar; yields ``start(total, name=label) -> advance(n)``, one task per ``start``.

    ``count_bytes`` shows sizes (downloads) instead of ``done/total``; a total of 0 or None is open-ended.
    Bars of items vanish when done; download bars stay, so the files fetched remain listed.
    """
    counter = DownloadColumn() if count_bytes else MofNCompleteColumn()
    columns = (TextColumn("{task.description}"), BarColumn(), counter, TimeRemainingColumn())
    with Progress(*columns, transient=not count_bytes) as bar:

        def start(total: int | None, name: str | None = None) -> Advance:
            task = bar.add_task(name or label, total=total or None)
            return lambda n: bar.advance(task, n)

        yield start
