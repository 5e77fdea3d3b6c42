"""Labelled FASTA (DeepLoc style) -> :class:`ProteinAnnotation` with location labels.

Header layout: ``>ACCESSION Location-MembraneFlag [set]``, e.g. ``>Q9H400 Cell.membrane-M test``.
Dots in the location stand for spaces (``Endoplasmic.reticulum``); a dual location is joined by
``-`` (``Cytoplasm-Nucleus-U``).  The membrane flag (M membrane-bound, S soluble, U unknown) is
validated but not turned into questions: the bundled QA set already asks it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Optional

from sepit.data.annotations import AnnotationFormatError, ProteinAnnotation
from sepit.data.readers.text_io import numbered_lines, report
from sepit.structure.record import SEQUENCE_ALPHABET

MEMBRANE_FLAGS = {"M", "S", "U"}
_LABEL = re.compile(r"^([A-Za-z./ ]+(?:-[A-Za-z./ ]+)*)-([A-Z])$")


def parse_label(label: str) -> tuple[list[str], str]:
    """``"Cytoplasm-Nucleus-U"`` -> (["Cytoplasm", "Nucleus"], "U")."""
    m = _LABEL.match(label)
    if not m:
        raise ValueError(f"label {label!r} is not 'Location-Flag' (e.g. 'Cell.membrane-M')")
    flag = m.group(2)
    if flag not in MEMBRANE_FLAGS:
        raise ValueError(f"membrane flag {flag!r} in {label!r} is not one of {sorted(MEMBRANE_FLAGS)}")
    return [loc.replace(".", " ").strip() for loc in m.group(1).split("-")], flag


def read_labelled_fasta(
    path: str | Path, errors: Optional[list] = None, source: str = "deeploc"
) -> Iterator[ProteinAnnotation]:
    """One annotation per FASTA record; the record locator is its header line."""
    path = str(path)
    header: Optional[tuple[int, str]] = None
    seq: list[str] = []
    seen = 0

    def finish() -> Optional[ProteinAnnotation]:
        no, text = header
        parts = text[1:].split()
        if len(parts) < 2:
            raise AnnotationFormatError(path, no, f"header {text[:60]!r} lacks a 'Location-Flag' label")
        try:
            locations, _flag = parse_label(parts[1])
        except ValueError as exc:
            raise AnnotationFormatError(path, no, str(exc)) from None
        sequence = "".join(seq).upper()
        if not sequence:
            raise AnnotationFormatError(path, no, f"record {parts[0]} has no sequence")
        bad = sorted(set(sequence) - SEQUENCE_ALPHABET)
        if bad:
            raise AnnotationFormatError(path, no, f"record {parts[0]}: sequence has non-amino-acid characters {''.join(bad)!r}")
        return ProteinAnnotation(source=source, source_file=path, record=f"line {no}", accession=parts[0],
                                 sequence=sequence, locations=locations)

    for no, line in numbered_lines(path):
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            if header is not None:
                seen += 1
                try:
                    yield finish()
                except AnnotationFormatError as exc:
                    report(errors, exc)
            header, seq = (no, line), []
        elif header is None:
            report(errors, AnnotationFormatError(path, no, "sequence text before the first '>' header"))
            return
        else:
            seq.append(line)
    if header is not None:
        seen += 1
        try:
            yield finish()
        except AnnotationFormatError as exc:
            report(errors, exc)
    if seen == 0:
        report(errors, AnnotationFormatError(path, None, "no FASTA records found"))
