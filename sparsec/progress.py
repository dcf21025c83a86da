"""Progress reporting for long work: a rich bar on a terminal; in a log (stderr not a terminal,
as in CI) a plain line for each step that took long, so an hour-long plan is not silent.

Stages call ``progress.track(iterable, description, total)`` or use ``progress.task``; the
compiler decides once whether output goes to a terminal (and honours ``--quiet``).
"""

from __future__ import annotations

import contextlib
import sys
import time
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


class LogProgress(Progress):
    """Plain lines on stderr for a log: a step that took at least ``slow`` seconds when it ends,
    and a long loop's count at most every ``every`` seconds. Quick work prints nothing."""

    enabled = True

    def __init__(self, slow: float = 10.0, every: float = 60.0, stream=None) -> None:
        self.slow, self.every, self.stream = slow, every, stream

    def _line(self, text: str) -> None:
        print(f"sparsec: {text}", file=self.stream or sys.stderr, flush=True)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        start = last = time.monotonic()
        done = 0
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.every:
                self._line(f"{description}: {done}{f'/{total}' if total else ''} ({now - start:.0f} s)")
                last = now
        if time.monotonic() - start >= self.slow:
            self._line(f"{description}: {done} done in {time.monotonic() - start:.0f} s")

    @contextlib.contextmanager
    def task(self, description: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        if time.monotonic() - start >= self.slow:
            self._line(f"{description}: {time.monotonic() - start:.0f} s")

    def log(self, message: str) -> None:
        self._line(message)


def silent() -> Progress:
    return Progress()


def auto(quiet: bool = False) -> Progress:
    """Rich progress when stderr is a terminal, plain lines for slow steps in a log; nothing when quiet."""
    if quiet:
        return Progress()
    return RichProgress() if sys.stderr.isatty() else LogProgress()
