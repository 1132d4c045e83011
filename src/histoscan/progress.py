"""The one terminal progress bar (rich) that long steps report to: ingest, EDA, prediction, downloads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

Advance = Callable[[int], None]
Start = Callable[..., Advance]


class _Rate(ProgressColumn):
    """Items per second of a task, e.g. "812 tiles/s"."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} {self.unit}/s" if task.speed else "")


@contextmanager
def progress_bar(label: str, *, count_bytes: bool = False, rate_unit: str | None = None) -> Iterator[Start]:
    """A progress bar; yields ``start(total, name=label) -> advance(n)``, one task per ``start``.

    ``count_bytes`` shows sizes (downloads) instead of ``done/total``; a total of 0 or None is open-ended.
    ``rate_unit`` adds a rate column ("tiles" shows "812 tiles/s").
    Bars of items vanish when done; download bars stay, so the files fetched remain listed.
    """
    counter = DownloadColumn() if count_bytes else MofNCompleteColumn()
    rate = (_Rate(rate_unit),) if rate_unit else ()
    columns = (TextColumn("{task.description}"), BarColumn(), counter, *rate, TimeRemainingColumn())
    with Progress(*columns, transient=not count_bytes) as bar:

        def start(total: int | None, name: str | None = None) -> Advance:
            task = bar.add_task(name or label, total=total or None)
            return lambda n: bar.advance(task, n)

        yield start
