"""FASTA files into sequence-only protein records (``coords=None``).

Headers: the first word is the record id; UniProt headers (``>sp|P00750|TPA_HUMAN ...``) give the
accession (which is then also the id), and so does a bare accession (``>Q9H400 Cell.membrane``).
The rest of the header is kept in ``meta["description"]``.  Sequences are upper-cased, a final
``*`` stop is removed, white space inside sequence lines is ignored; gaps (``-``/``.``, an
alignment rather than a sequence), other characters outside the protein alphabet, an empty
sequence, a repeated id or a sequence over ``max_residues`` reject that record with a reason.
"""

from __future__ import annotations

from sepit.structure.accessions import fasta_accession
from sepit.structure.record import SEQUENCE_ALPHABET, ProteinRecord, RecordError
from sepit.structure.result import ParseResult, Reject


def _entries(text: str) -> list[tuple[str, str, int]]:
    """[(header, raw sequence, line number of the header)]; text before the first '>' is an error."""
    entries: list[tuple[str, list[str], int]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith(";"):
            continue
        if s.startswith(">"):
            entries.append((s[1:].strip(), [], lineno))
        elif not entries:
            raise RecordError(f"line {lineno}: sequence data before the first '>' header")
        else:
            entries[-1][1].append("".join(s.split()))
    return [(h, "".join(parts), ln) for h, parts, ln in entries]


def records_from_fasta_text(
    text: str, source: str, checksum: str = "", max_residues: int = 100_000
) -> ParseResult:
    result = ParseResult(source_format="fasta")
    try:
        entries = _entries(text)
    except RecordError as exc:
        result.rejects.append(Reject(source, None, f"malformed FASTA: {exc}", "parse"))
        return result
    if not entries:
        result.rejects.append(Reject(source, None, "malformed FASTA: no '>' header line", "parse"))
        return result
    seen: dict[str, int] = {}
    for header, raw, lineno in entries:
        accession = fasta_accession(header)
        first = header.split(None, 1)[0] if header else ""
        rec_id = accession if accession and "|" in first else first
        if not rec_id:
            result.rejects.append(Reject(source, f"line {lineno}", "FASTA header is empty", "parse"))
            continue
        seq = raw.upper()
        if seq.endswith("*"):
            seq = seq[:-1]
        reason = None
        if not seq:
            reason = "empty sequence"
        elif "-" in seq or "." in seq:
            reason = "sequence contains alignment gaps ('-' or '.'); give ungapped sequences"
        elif set(seq) - SEQUENCE_ALPHABET:
            bad = "".join(sorted(set(seq) - SEQUENCE_ALPHABET))
            reason = f"sequence has characters outside the protein alphabet: {bad!r}"
        elif len(seq) > max_residues:
            reason = f"{len(seq)} residues exceeds max_residues={max_residues} (absurd size)"
        elif rec_id in seen:
            reason = f"id {rec_id} repeats the record at line {seen[rec_id]}"
        if reason:
            result.rejects.append(Reject(source, rec_id, reason, "validate"))
            continue
        seen[rec_id] = lineno
        description = header.split(None, 1)[1] if len(header.split(None, 1)) > 1 else ""
        meta = {"description": description} if description else {}
        result.records.append(ProteinRecord(
            id=rec_id, sequence=seq, accession=accession, chain=None, source=source,
            source_format="fasta", checksum=checksum, meta=meta,
        ))
    return result
