"""Id maps: a table's protein ids (STRING ``272561.CT_001``, locus tags) -> UniProt accession and sequence.

Accepted files (:func:`load_id_map` tells them apart by header and name):

* STRING ``protein.aliases`` (``#string_protein_id	alias	source``): accessions from the
  UniProt-typed sources (:mod:`sepit.data.readers.string_ids`);
* STRING ``protein.sequences`` FASTA (``>272561.CT_001``): sequences;
* JSON lines with ``accession`` and one of ``string_id``/``external_id``/``id`` (and optionally
  ``sequence``), e.g. the bundled ``derived/proteins.jsonl``;
* CSV/TSV with a header holding ``accession`` and one of those id columns.

Several maps merge field by field (:func:`merge_id_maps`): an aliases file gives the accession, a
sequences file the sequence of the same id.  Ids that several accessions claim are kept as
*ambiguous* (``accession=None``, ``candidates``): a table row using one is skipped with that
reason, never resolved by a guess.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

from sepit.data.annotations import AnnotationFormatError
from sepit.data.readers.string_ids import (
    is_aliases_header, is_sequences_file, load_string_aliases, load_string_sequences,
)
from sepit.data.readers.text_io import numbered_lines, read_text, strip_gz


@dataclass(frozen=True)
class IdMapping:
    accession: Optional[str]
    """UniProt accession; None when the map only knows the sequence, or the id is ambiguous."""
    sequence: Optional[str] = None
    candidates: tuple[str, ...] = ()
    """The several accessions that claim this id (ambiguous); empty otherwise."""
    source: Optional[str] = None
    """The map file(s) this came from, for error messages."""


ID_KEYS = ("string_id", "external_id", "id")


def _first_line(path: str) -> str:
    for _no, line in numbered_lines(path):
        if line.strip():
            return line
    return ""


def load_id_map(path: str | Path, notes: Optional[list[str]] = None) -> dict[str, IdMapping]:
    """Read one id map file (any layout in the module docstring).

    ``notes`` (when given) receives one summary line per file where something was left unmapped
    (ambiguous STRING ids, ids without a UniProt alias), for the builder to print and record.
    """
    path = str(path)
    if is_sequences_file(path) or _first_line(path).startswith(">"):
        return {k: IdMapping(None, seq, source=path) for k, seq in load_string_sequences(path).items()}
    if is_aliases_header(_first_line(path)):
        aliases = load_string_aliases(path)
        if notes is not None:
            notes.append(aliases.summary(path))
        out = {k: IdMapping(acc, source=path) for k, acc in aliases.accession.items()}
        out.update({k: IdMapping(None, candidates=c, source=path) for k, c in aliases.ambiguous.items()})
        return out
    text = read_text(path)
    out: dict[str, IdMapping] = {}
    name = strip_gz(Path(path).name)
    if name.endswith(".jsonl") or name.endswith(".json"):
        for no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AnnotationFormatError(path, no, f"not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise AnnotationFormatError(path, no, "expected a JSON object per line")
            _add_mapping(out, row, path, no)
        return out
    delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames or "accession" not in reader.fieldnames:
        raise AnnotationFormatError(
            path, 1, "id map header must have an 'accession' column (or be STRING's "
            "'#string_protein_id\\talias\\tsource' aliases header, or FASTA)")
    for no, row in enumerate(reader, start=2):
        _add_mapping(out, row, path, no)
    return out


def _add_mapping(out: dict[str, IdMapping], row: Mapping, path: str, no: int) -> None:
    accession = row.get("accession")
    if not accession:
        return  # rows of other kinds in a mixed index (e.g. proteins without accession)
    seq = row.get("sequence") or None
    for key in ID_KEYS:
        ext = row.get(key)
        if ext:
            prev = out.get(ext)
            if prev is not None and prev.accession != accession:
                raise AnnotationFormatError(path, no, f"id {ext!r} maps to both {prev.accession} and {accession}")
            out[ext] = IdMapping(accession, seq.upper() if isinstance(seq, str) else None, source=path)


def merge_id_maps(maps: Iterable[Mapping[str, IdMapping]], notes: Optional[list[str]] = None) -> dict[str, IdMapping]:
    """Field-wise union: accession from whichever map has one, sequence likewise.

    Two maps giving one id different accessions make it ambiguous (reported, not guessed); two
    different sequences keep the first and add a note.
    """
    merged: dict[str, IdMapping] = {}
    seq_conflicts: list[str] = []
    for one in maps:
        for key, new in one.items():
            old = merged.get(key)
            if old is None:
                merged[key] = new
                continue
            claims = {a for a in (old.accession, new.accession) if a} | set(old.candidates) | set(new.candidates)
            if len(claims) > 1:
                accession, candidates = None, tuple(sorted(claims))
            else:
                accession, candidates = (next(iter(claims)) if claims else None), ()
            sequence = old.sequence or new.sequence
            if old.sequence and new.sequence and old.sequence != new.sequence:
                seq_conflicts.append(key)
            # name the files that claimed accessions when the id is ambiguous, every file otherwise
            sources = [m.source for m in (old, new) if m.accession or m.candidates or not candidates]
            merged[key] = IdMapping(accession, sequence, candidates, ", ".join(s for s in sources if s))
    if seq_conflicts and notes is not None:
        notes.append(f"id maps disagree on the sequence of {len(seq_conflicts)} ids (the first map's kept), "
                     f"e.g. {seq_conflicts[:3]}")
    return merged
