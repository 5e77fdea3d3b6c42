"""Opening annotation files: plain or gzip-compressed text, with errors that name the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from sepit.data.annotations import AnnotationFormatError

T = TypeVar("T")


def strip_gz(name: str) -> str:
    """``foo.txt.gz`` -> ``foo.txt`` (the name a format is recognised by)."""
    return name[:-3] if name.endswith(".gz") else name


def read_text(path: str | Path) -> str:
    """The whole file as text (gunzipped when the name ends in ``.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationFormatError(str(path), None, "file does not exist")
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise AnnotationFormatError(str(path), None, f"cannot decompress: {exc}") from None
    except UnicodeDecodeError as exc:
        raise AnnotationFormatError(str(path), None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(1-based line number, line without its newline)`` for every line, streamed (large files)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationFormatError(str(path), None, "file does not exist")
    opener = gzip.open if path.name.endswith(".gz") else open
    no = 0
    try:
        with opener(path, "rt", encoding="utf-8", newline=None) as fh:
            for no, line in enumerate(fh, start=1):
                yield no, line.rstrip("\r\n")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise AnnotationFormatError(str(path), None, f"cannot decompress: {exc}") from None
    except UnicodeDecodeError as exc:
        raise AnnotationFormatError(str(path), no + 1, f"not UTF-8 text ({exc.reason})") from None


def report(errors: Optional[list], error: AnnotationFormatError) -> None:
    """Strict mode (``errors is None``): raise.  Lenient mode: collect and go on."""
    if errors is None:
        raise error
    errors.append(error)


def read_json_lines(path: str | Path, errors: Optional[list],
                    parse: Callable[[int, Any], Iterable[T]]) -> Iterator[T]:
    """Items of a JSON-lines file: ``parse(line number, decoded record)`` gives each record's
    items.  A line that is not JSON, or that ``parse`` rejects with an AnnotationFormatError, is
    reported (see :func:`report`) as a whole, with none of its items; blank lines are skipped; a
    file without records is an error too."""
    path = str(path)
    n = 0
    for no, line in numbered_lines(path):
        if not line.strip():
            continue
        n += 1
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AnnotationFormatError(path, no, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
            items = list(parse(no, row))
        except AnnotationFormatError as exc:
            report(errors, exc)
            continue
        yield from items
    if n == 0:
        report(errors, AnnotationFormatError(path, None, "no records"))
