"""Mol-Instructions protein-oriented JSON -> :class:`QAItem`.

A file is a JSON array (``protein_function.json``, ``catalytic_activity.json``,
``domain_motif.json``, ``general_function.json``) of ``{"instruction", "input", "output",
"metadata"?}``; ``input`` holds the sequence, usually fenced in triple backticks, and
``metadata.protein_accession`` (when present) the UniProt accession.  The category comes from the
file name.  Records whose input is not a protein sequence (the protein-design task gives text)
are rejected with that reason.  JSON lines (one object per line) are read too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Optional

from sepit.data.annotations import AnnotationFormatError, QAItem
from sepit.data.readers.text_io import read_text, report, strip_gz
from sepit.structure.record import SEQUENCE_ALPHABET

SOURCE = "mol_instructions"
CATEGORY_BY_FILE = {
    "protein_function": "function",
    "general_function": "function",
    "catalytic_activity": "catalytic_activity",
    "domain_motif": "domains_motifs",
}


def category_of(path: str | Path) -> str:
    stem = strip_gz(Path(path).name).rsplit(".", 1)[0]
    return CATEGORY_BY_FILE.get(stem, "other")


def extract_sequence(text: str) -> Optional[str]:
    """The protein sequence inside ``input`` (backtick fences and whitespace removed), or None."""
    seq = re.sub(r"\s+", "", text.replace("```", "")).upper()
    if not seq or set(seq) - SEQUENCE_ALPHABET:
        return None
    return seq


def _item(path: str, locator: str, index: int, row: object, category: str) -> QAItem:
    if not isinstance(row, dict):
        raise AnnotationFormatError(path, locator, f"expected an object, got {type(row).__name__}")
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
    category = category_of(path)
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
            yield _item(path, locator, index, row, category)
        except AnnotationFormatError as exc:
            report(errors, exc)
