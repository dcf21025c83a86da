"""Everything a command writes, checked before the work starts and written all or none.

:class:`Outputs` holds the destinations of one command (a model and its data file, reports,
a recipe). :meth:`Outputs.check` refuses a destination that cannot be written, a report format
sparsec does not know, or a report that needs a package that is not installed -- before any
work. :meth:`Outputs.commit` then writes every text into a temporary file beside its
destination and renames all of them into place together (the model last of the renames of its
own files), so a failure leaves either everything or nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sparsec.errors import OptionError, OutputError

REPORT_FORMATS = (".json", ".md", ".html")


def check_writable(path: Path, what: str) -> None:
    """Refuse a destination whose directory is missing or read-only, or that is a directory."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name for the {what}")
    if not parent.is_dir():
        raise OutputError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: exists and is not writable")


def check_reports(paths: Iterable[str | os.PathLike], formats: tuple[str, ...] = REPORT_FORMATS) -> list[Path]:
    """Report paths with a known format and a writable place; the one check every command runs."""
    checked = []
    for raw in paths:
        path = Path(raw)
        if path.suffix not in formats:
            raise OptionError(f"--report {path}: unknown format '{path.suffix}' (use {', '.join(formats)})")
        check_writable(path, "report")
        checked.append(path)
    return checked


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    staged = _stage_text(Path(path), text)
    os.replace(staged, path)


def _stage_text(path: Path, text: str) -> Path:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".sparsec-tmp", dir=path.parent or ".")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return Path(tmp)


@dataclass
class Outputs:
    """The destinations of one command and the texts to write there."""

    model: Path | None = None
    reports: list[Path] = field(default_factory=list)
    recipe: Path | None = None

    def check(self) -> None:
        """Every destination writable, every report format known (before any work)."""
        self.reports = check_reports(self.reports)
        if self.recipe is not None:
            if self.recipe.suffix not in (".yaml", ".yml", ".json"):
                raise OptionError(f"--save-recipe {self.recipe}: use a .yaml, .yml or .json file")
            check_writable(self.recipe, "recipe")

    def commit(self, texts: dict[Path, str], staged_model=None) -> None:
        """Write ``texts`` (path -> content) and commit ``staged_model``: all, or none.

        Every text is staged beside its destination first; only when all are staged are the
        model and then the texts renamed into place.
        """
        staged: list[tuple[Path, Path]] = []
        try:
            for path, text in texts.items():
                staged.append((_stage_text(path, text), path))
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            if staged_model is not None:
                staged_model.discard()
            raise
        if staged_model is not None:
            try:
                staged_model.commit()
            except BaseException:
                for tmp, _ in staged:
                    tmp.unlink(missing_ok=True)
                raise
        for tmp, path in staged:
            os.replace(tmp, path)
