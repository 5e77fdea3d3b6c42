"""Annotation readers: one module per input format, one entry point :func:`read_annotations`.

Every reader yields :class:`~sepit.data.annotations.ProteinAnnotation` or
:class:`~sepit.data.annotations.QAItem` records and raises
:class:`~sepit.data.annotations.AnnotationFormatError` (file, line/record, reason) on malformed
input; given an ``errors`` list it collects the errors instead and keeps reading.

Formats (``FORMATS``): ``uniprot-text``, ``uniprot-xml``, ``string`` (STRING ``protein.info``-like TSV),
``labelled-fasta`` (DeepLoc), ``qa-jsonl``, ``reference-jsonl``, ``mol-instructions``.
:func:`detect_format` picks one from the file name and its first line.  Id maps for tables
(our derived JSONL, STRING's ``protein.aliases`` / ``protein.sequences``) are read by
:func:`load_id_map` (:mod:`sepit.data.readers.id_maps`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping, Optional

from sepit.data.annotations import AnnotationFormatError, InputRecord
from sepit.data.readers.fasta_labels import read_labelled_fasta
from sepit.data.readers.mol_instructions import read_mol_instructions
from sepit.data.readers.qa_jsonl import read_qa_jsonl
from sepit.data.readers.reference_jsonl import read_reference_jsonl
from sepit.data.readers.id_maps import IdMapping, load_id_map, merge_id_maps
from sepit.data.readers.string_ids import is_aliases_header
from sepit.data.readers.tables import STRING_SPEC, read_annotation_table
from sepit.data.readers.text_io import numbered_lines, strip_gz
from sepit.data.readers.uniprot import read_uniprot_text, read_uniprot_xml

FORMATS = ("uniprot-text", "uniprot-xml", "string", "labelled-fasta", "qa-jsonl", "reference-jsonl",
           "mol-instructions")

__all__ = ["FORMATS", "detect_format", "read_annotations", "load_id_map", "merge_id_maps", "IdMapping",
           "parse_annotation_arg"]


def parse_annotation_arg(arg: str) -> tuple[Optional[str], str]:
    """``"uniprot-text:/data/x.dat"`` -> (format, path); a bare path -> (None, path)."""
    head, sep, rest = arg.partition(":")
    if sep and head in FORMATS:
        return head, rest
    return None, arg


def _first_line(path: str) -> str:
    for _no, line in numbered_lines(path):  # streamed: annotation files can be gigabytes
        if line.strip():
            return line.strip()
    return ""


def detect_format(path: str | Path) -> str:
    """The reader format for ``path`` from its name and first non-empty line."""
    path = str(path)
    name = strip_gz(Path(path).name).lower()
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    if "protein.aliases" in name or "protein.sequences" in name or is_aliases_header(_first_line(path)):
        raise AnnotationFormatError(
            path, None, "this is a STRING id file (protein.aliases / protein.sequences), not annotations: "
            "give it as an id map (--id-maps), with protein.info as the annotation file")
    if suffix == "xml":
        return "uniprot-xml"
    if suffix in ("fasta", "fa", "faa"):
        return "labelled-fasta"
    first = _first_line(path)
    if suffix == "json" or (suffix == "jsonl" and '"instruction"' in first):
        return "mol-instructions"
    if suffix == "jsonl":
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            raise AnnotationFormatError(path, 1, "first line is not valid JSON") from None
        if isinstance(row, dict) and "task_type" in row:
            return "qa-jsonl"
        if isinstance(row, dict) and ("caption" in row or "conversation" in row):
            return "reference-jsonl"
        raise AnnotationFormatError(path, 1, "JSON lines of unknown kind (expected task_type, caption or conversation)")
    if first.startswith("ID   "):
        return "uniprot-text"
    if first.lstrip("#").split("\t")[0] == STRING_SPEC.id_column:
        return "string"
    raise AnnotationFormatError(
        path, None, f"cannot tell the annotation format from the name and first line {first[:60]!r}; "
        f"prefix the path with one of {FORMATS} and a colon")


def read_annotations(
    path: str | Path,
    fmt: Optional[str] = None,
    id_map: Optional[Mapping[str, IdMapping]] = None,
    errors: Optional[list] = None,
) -> Iterator[InputRecord]:
    """Read one annotation file of format ``fmt`` (detected when None)."""
    fmt = fmt or detect_format(path)
    if fmt == "uniprot-text":
        return read_uniprot_text(path, errors)
    if fmt == "uniprot-xml":
        return read_uniprot_xml(path, errors)
    if fmt == "string":
        return read_annotation_table(path, STRING_SPEC, id_map, errors)
    if fmt == "labelled-fasta":
        return read_labelled_fasta(path, errors)
    if fmt == "qa-jsonl":
        return read_qa_jsonl(path, errors)
    if fmt == "reference-jsonl":
        return read_reference_jsonl(path, errors)
    if fmt == "mol-instructions":
        return read_mol_instructions(path, errors)
    raise AnnotationFormatError(str(path), None, f"unknown annotation format {fmt!r}; choose one of {FORMATS}")
