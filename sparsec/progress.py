"""Progress reporting for long work: a rich bar on a terminal, nothing otherwise.

Stages call ``progress.track(iterable, description, total)`` or use ``progress.task``; the
compiler decides once whether output goes to a terminal (and honours ``--quiet``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """Silent progress: the interface every stage uses."""

    enabled = False

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items

    @contextlib.contextmanager
    def task(self, description: str) -> Iterator[None]:
        yield

    def log(self, message: str) -> None:
        """A line for the user (stderr), shown only when progress is on."""


class RichProgress(Progress):
    """Progress bars and spinners on stderr, drawn with rich."""

    enabled = True

    def __init__(self) -> None:
        from rich.console import Console

        self._console = Console(stderr=True)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn
        from rich.progress import TimeElapsedColumn

        with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TimeElapsedColumn(), console=self._console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)

    @contextlib.contextmanager
    def task(self, description: str) -> Iterator[None]:
        with self._console.status(description):
            yield

    def log(self, message: str) -> None:
        self._console.print(message, highlight=False)


def silent() -> Progress:
    return Progress()


def auto(quiet: bool = False) -> Progress:
    """Rich progress when stderr is a terminal and not quiet; silent otherwise."""
    if quiet or not sys.stderr.isatty():
        return Progress()
    return RichProgress()
