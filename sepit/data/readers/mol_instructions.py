"""Mol-Instructions protein-oriented JSON -> :class:`QAItem`.

A file is a JSON array (``protein_function.json``, ``catalytic_activity.json``,
``domain_motif.json``, ``general_function.json``) of ``{"instruction", "input", "output",
"metadata"?}``; ``input`` holds the sequence, usually fenced in triple backticks, and
``metadata.protein_accession`` (when present) the UniProt accession.  JSON lines (one object per
line) are read too.

The *task* of a record is its ``task`` (or ``metadata.task``) field when it has one (a combined
file), else the file name (``domain_motif.json.gz`` -> ``domain_motif``; a ``_train``/``_test``
suffix is ignored).  :data:`TASK_CATEGORIES` maps tasks to our categories.  ``protein_design``
(text in, sequence out: no given protein to ask about) and unknown task names are rejected per
record with :class:`UnusedTaskError`, which names the task, so the builder can report the counts
per task name (:func:`unused_task_counts`) instead of dropping them silently.  Other records whose
input is not a protein sequence are rejected with that reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional

from sepit.data.annotations import AnnotationFormatError, QAItem
from sepit.data.readers.text_io import read_text, report, strip_gz
from sepit.structure.record import SEQUENCE_ALPHABET

SOURCE = "mol_instructions"
#: Mol-Instructions protein task -> our category (the keys of OPEN_TEMPLATES in questions.py).
TASK_CATEGORIES = {
    "protein_function": "function",  # GO functions, processes and locations in one sentence
    "general_function": "function",  # "functional description generation": a UniProt-style summary
    "catalytic_activity": "catalytic_activity",
    "domain_motif": "domains_motifs",
}
#: Mol-Instructions protein tasks we know but cannot use, and why.
UNUSABLE_TASKS = {
    "protein_design": "its input is a text description and its output a designed sequence: "
                      "there is no given protein to ask about",
}
_SPLIT_SUFFIX = re.compile(r"_(?:train|test|valid|validation|dev)$")


class UnusedTaskError(AnnotationFormatError):
    """A record of a task we do not turn into examples; ``task`` names it for per-task counts."""

    def __init__(self, file: str, line, task: str, reason: str):
        self.task = task
        super().__init__(file, line, reason)


def task_of_file(path: str | Path) -> str:
    """``.../domain_motif.json.gz`` -> ``domain_motif`` (lower case, ``-`` as ``_``, split suffix dropped)."""
    stem = strip_gz(Path(path).name).rsplit(".", 1)[0].lower().replace("-", "_")
    return _SPLIT_SUFFIX.sub("", stem)


def category_of(task: str) -> Optional[str]:
    """Our category for a Mol-Instructions task name, None when we do not use the task."""
    return TASK_CATEGORIES.get(task)


def _unused_task_reason(task: str) -> str:
    if task in UNUSABLE_TASKS:
        return f"Mol-Instructions task {task!r} not used: {UNUSABLE_TASKS[task]}"
    return (f"Mol-Instructions task {task!r} is unknown (known: {', '.join(sorted(TASK_CATEGORIES))}; "
            f"not used: {', '.join(sorted(UNUSABLE_TASKS))}); name the file after its task or give "
            f"records a 'task' field")


def unused_task_counts(errors: Iterable[AnnotationFormatError]) -> Counter:
    """Records per task name that were rejected because of their task."""
    return Counter(e.task for e in errors if isinstance(e, UnusedTaskError))


def extract_sequence(text: str) -> Optional[str]:
    """The protein sequence inside ``input`` (backtick fences and whitespace removed), or None."""
    seq = re.sub(r"\s+", "", text.replace("```", "")).upper()
    if not seq or set(seq) - SEQUENCE_ALPHABET:
        return None
    return seq


def _task(row: dict, file_task: str) -> str:
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    for value in (row.get("task"), meta.get("task")):
        if isinstance(value, str) and value.strip():
            return value.strip().lower().replace("-", "_")
    return file_task


def _item(path: str, locator: str, index: int, row: object, file_task: str) -> QAItem:
    if not isinstance(row, dict):
        raise AnnotationFormatError(path, locator, f"expected an object, got {type(row).__name__}")
    task = _task(row, file_task)
    category = category_of(task)
    if category is None:
        raise UnusedTaskError(path, locator, task, _unused_task_reason(task))
    for key in ("instruction", "input", "output"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise AnnotationFormatError(path, locator, f"field {key!r} is missing or empty")
    sequence = extract_sequence(row["input"])
    if sequence is None:
        raise AnnotationFormatError(path, locator, f"'input' is not a protein sequence: {row['input'][:50]!r}")
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    return QAItem(
        source=SOURCE, source_file=path, record=locator, question=row["instruction"].strip(),
        answer=row["output"].strip(), task="open", category=category,
        accession=meta.get("protein_accession") or None, sequence=sequence,
        item_id=f"{strip_gz(Path(path).name)}:{index}",
    )


def read_mol_instructions(path: str | Path, errors: Optional[list] = None) -> Iterator[QAItem]:
    path = str(path)
    file_task = task_of_file(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            report(errors, AnnotationFormatError(path, exc.lineno, f"not valid JSON: {exc.msg}"))
            return
        located = [(f"record {i}", i, row) for i, row in enumerate(rows)]
    else:
        located = []
        for no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {no}", no, json.loads(line)))
            except json.JSONDecodeError as exc:
                report(errors, AnnotationFormatError(path, no, f"not valid JSON: {exc.msg}"))
    if not located:
        report(errors, AnnotationFormatError(path, None, "no records"))
    for locator, index, row in located:
        try:
            yield _item(path, locator, index, row, file_task)
        except AnnotationFormatError as exc:
            report(errors, exc)
