"""Delimited annotation tables (STRING ``protein.info`` and the like) -> :class:`ProteinAnnotation`.

A :class:`TableSpec` says which column holds the protein id and which columns hold text of
which category.  Tables rarely carry UniProt accessions or sequences (STRING names proteins
``272561.CT_001``), so an *id map* (:mod:`sepit.data.readers.id_maps`: our derived JSONL, or
STRING's own ``protein.aliases`` and ``protein.sequences``) translates the table's ids to
accessions and, where it knows them, sequences.  A row whose id the map does not know keeps
``accession=None``; the builder then reports it as skipped.  A row whose id the map holds as
ambiguous (several accessions) is rejected with the candidates named.

Function text in UniProt style often ends with ``Belongs to the X family.``; that sentence is
moved to the family category.  Placeholder text (``Hypothetical protein.``) is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

from sepit.data.annotations import AnnotationFormatError, ProteinAnnotation, clean_text
from sepit.data.readers.id_maps import ID_KEYS, IdMapping, load_id_map  # noqa: F401 (re-exported)
from sepit.data.readers.text_io import read_text, report

_UNINFORMATIVE = re.compile(
    r"^(?:(?:conserved |putative )?(?:hypothetical|uncharacteri[sz]ed)(?: conserved)? protein"
    r"(?: [A-Za-z]*_?\d+)?|predicted protein|unknown function|no annotation)\.?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TableSpec:
    """Which columns of a delimited table mean what."""

    id_column: str
    text_columns: Mapping[str, str]
    """column -> category (``function``, ``location``, ``family``, ``keywords`` ...)."""
    name_column: Optional[str] = None
    accession_column: Optional[str] = None
    sequence_column: Optional[str] = None
    length_column: Optional[str] = None
    """A residue count to check against the sequence (table's or id map's), when both exist."""
    delimiter: str = "\t"
    source: str = "table"
    list_separator: str = ";"
    """Separator inside list-valued categories (keywords, locations)."""


STRING_SPEC = TableSpec(
    id_column="string_protein_id",
    text_columns={"annotation": "function"},
    name_column="preferred_name",
    length_column="protein_size",
    source="string",
)


def split_function_text(text: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """``"X does Y; Belongs to the Z family."`` -> (function without the family part, family)."""
    text = clean_text(text)
    if not text:
        return None, None
    parts = [p.strip() for p in re.split(r";\s+(?=Belongs to )|(?<=\.)\s+(?=Belongs to )", text)]
    family = " ".join(p for p in parts if p.startswith("Belongs to ")) or None
    function = "; ".join(p for p in parts if not p.startswith("Belongs to ")).strip() or None
    if function and _UNINFORMATIVE.match(function):
        function = None
    if function and not function.endswith("."):
        function += "."
    return function, family


def read_annotation_table(
    path: str | Path,
    spec: TableSpec = STRING_SPEC,
    id_map: Optional[Mapping[str, IdMapping]] = None,
    errors: Optional[list] = None,
) -> Iterator[ProteinAnnotation]:
    """One annotation per data row.  Header: the first line (a leading ``#`` is ignored)."""
    path = str(path)
    lines = read_text(path).splitlines()
    header_no = next((i for i, l in enumerate(lines) if l.strip()), None)
    if header_no is None:
        report(errors, AnnotationFormatError(path, None, "empty table"))
        return
    header = [h.strip() for h in lines[header_no].lstrip("#").split(spec.delimiter)]
    wanted = [spec.id_column, *spec.text_columns, spec.name_column, spec.accession_column,
              spec.sequence_column, spec.length_column]
    missing = [c for c in wanted if c and c not in header]
    if missing:
        report(errors, AnnotationFormatError(
            path, header_no + 1, f"header lacks column(s) {missing}; it has {header}"))
        return
    col = {name: i for i, name in enumerate(header)}
    for idx in range(header_no + 1, len(lines)):
        no, line = idx + 1, lines[idx]
        if not line.strip():
            continue
        try:
            yield _parse_row(path, no, line.split(spec.delimiter), header, col, spec, id_map)
        except AnnotationFormatError as exc:
            report(errors, exc)


def _parse_row(path, no, cells, header, col, spec: TableSpec, id_map) -> ProteinAnnotation:
    if len(cells) != len(header):
        raise AnnotationFormatError(path, no, f"row has {len(cells)} fields, header has {len(header)}")
    get = lambda c: cells[col[c]].strip() if c else ""  # noqa: E731
    ext_id = get(spec.id_column)
    if not ext_id:
        raise AnnotationFormatError(path, no, f"empty {spec.id_column!r}")
    accession = get(spec.accession_column) or None
    sequence = get(spec.sequence_column).upper() or None
    mapped = id_map.get(ext_id) if id_map else None
    if mapped is not None and mapped.candidates and not accession:
        raise AnnotationFormatError(
            path, no, f"{ext_id}: ambiguous in the id map ({mapped.source}): several UniProt accessions "
            f"{', '.join(mapped.candidates)}; not guessed")
    if mapped is not None:
        accession = accession or mapped.accession
        sequence = sequence or mapped.sequence
    if spec.length_column and sequence:
        declared = get(spec.length_column)
        if not declared.isdigit():
            raise AnnotationFormatError(path, no, f"{spec.length_column}={declared!r} is not a residue count")
        if int(declared) != len(sequence):
            raise AnnotationFormatError(
                path, no, f"{ext_id}: {spec.length_column}={declared} but the sequence has {len(sequence)} residues")
    ann = ProteinAnnotation(
        source=spec.source, source_file=path, record=f"line {no}", accession=accession,
        sequence=sequence, name=get(spec.name_column) or None, external_id=ext_id,
    )
    for column, category in spec.text_columns.items():
        text = get(column)
        if not text:
            continue
        if category == "function":
            function, family = split_function_text(text)
            ann.function = function
            ann.family = ann.family or family
        elif category in ("location", "keywords", "ec"):
            items = [clean_text(t) for t in text.split(spec.list_separator)]
            target = {"location": "locations", "keywords": "keywords", "ec": "ec"}[category]
            getattr(ann, target).extend(t for t in items if t)
        elif category in ("family", "catalytic_activity", "domains_motifs"):
            if category == "family":
                ann.family = clean_text(text)
            else:
                getattr(ann, category).append(clean_text(text))
        else:
            raise AnnotationFormatError(path, no, f"column {column!r}: category {category!r} is not supported")
    return ann
