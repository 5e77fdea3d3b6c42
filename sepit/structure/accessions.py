"""UniProt accessions as structure and sequence files state them.

Sources, in the order a file is asked: the AlphaFold DB entry name (``AF-<acc>-F1``) and its
``_ma_target_ref_db_details``; PDB ``DBREF``/``DBREF1``+``DBREF2`` records; mmCIF ``_struct_ref``
joined to chains through ``_struct_ref_seq``; UniProt FASTA headers (``sp|ACC|NAME``).
A chain referencing several different UniProt entries (a chimera) gets no single accession; the
list is kept in the record's ``meta["uniprot"]``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

import gemmi

#: UniProtKB accession format (https://www.uniprot.org/help/accession_numbers), optional isoform.
UNIPROT_ACCESSION = re.compile(
    r"^(?:[OPQ][0-9][A-Z0-9]{3}[0-9]|[A-NR-Z][0-9](?:[A-Z][A-Z0-9]{2}[0-9]){1,2})(?:-\d+)?$"
)
AFDB_ENTRY = re.compile(r"AF-([A-Z0-9]{6,10}(?:-\d+)?)-F(\d+)", re.IGNORECASE)
#: Database names meaning UniProtKB in DBREF / _struct_ref (SWS/TREMBL in pre-2008 entries).
UNIPROT_DB_NAMES = frozenset({"UNP", "SWS", "TREMBL", "UNIPROT", "UNIPROTKB"})


def is_uniprot_accession(text: str) -> bool:
    return bool(UNIPROT_ACCESSION.match(text.strip()))


def afdb_accession(name: str) -> Optional[str]:
    """``AF-O84033-F1-model_v4`` -> ``O84033``."""
    m = AFDB_ENTRY.search(name)
    if m and is_uniprot_accession(m.group(1).upper()):
        return m.group(1).upper()
    return None


def pdb_dbref_accessions(pdb_text: str) -> dict[str, list[str]]:
    """chain id -> UniProt accessions from PDB DBREF / DBREF1+DBREF2 records (file order)."""
    out: dict[str, list[str]] = defaultdict(list)
    pending: dict[str, str] = {}  # chain -> database of a DBREF1 waiting for its DBREF2
    for line in pdb_text.splitlines():
        rec = line[:6]
        if rec == "DBREF ":
            chain, db, acc = line[12:13].strip(), line[26:32].strip().upper(), line[33:41].strip()
        elif rec == "DBREF1":
            pending[line[12:13].strip()] = line[26:32].strip().upper()
            continue
        elif rec == "DBREF2":
            chain = line[12:13].strip()
            db, acc = pending.pop(chain, ""), line[18:40].strip()
        else:
            continue
        if db in UNIPROT_DB_NAMES and is_uniprot_accession(acc) and acc not in out[chain]:
            out[chain].append(acc)
    return dict(out)


def _loop_rows(block: gemmi.cif.Block, category: str, tags: list[str]) -> list[dict[str, str]]:
    table = block.find(category, tags)
    rows = []
    for row in table:
        rows.append({t.lstrip("?"): (row.str(i) if row.has(i) else "") for i, t in enumerate(tags)})
    return rows


def mmcif_uniprot_accessions(block: gemmi.cif.Block) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(auth chain id -> accessions, entity id -> accessions) from ``_struct_ref[_seq]``."""
    refs = _loop_rows(block, "_struct_ref.", ["id", "db_name", "pdbx_db_accession", "?entity_id"])
    by_ref: dict[str, str] = {}
    by_entity: dict[str, list[str]] = defaultdict(list)
    for r in refs:
        acc = r["pdbx_db_accession"].strip()
        if r["db_name"].strip().upper() in UNIPROT_DB_NAMES and is_uniprot_accession(acc):
            by_ref[r["id"]] = acc
            if r.get("entity_id") and acc not in by_entity[r["entity_id"]]:
                by_entity[r["entity_id"]].append(acc)
    by_chain: dict[str, list[str]] = defaultdict(list)
    for r in _loop_rows(block, "_struct_ref_seq.", ["ref_id", "?pdbx_strand_id"]):
        acc = by_ref.get(r["ref_id"])
        chain = (r.get("pdbx_strand_id") or "").strip()
        if acc and chain and acc not in by_chain[chain]:
            by_chain[chain].append(acc)
    return dict(by_chain), dict(by_entity)


def mmcif_afdb_accession(block: gemmi.cif.Block) -> Optional[str]:
    """Accession from ModelCIF's ``_ma_target_ref_db_details`` (AlphaFold DB models)."""
    for r in _loop_rows(block, "_ma_target_ref_db_details.", ["db_accession", "?db_name"]):
        acc = r["db_accession"].strip()
        if is_uniprot_accession(acc) and (not r.get("db_name") or r["db_name"].upper() in UNIPROT_DB_NAMES):
            return acc
    return None


def fasta_accession(header: str) -> Optional[str]:
    """Accession from a FASTA header: ``sp|P12345|NAME ...``, ``tr|...``, or a bare accession id."""
    first = header.split(None, 1)[0] if header.strip() else ""
    parts = first.split("|")
    if len(parts) >= 2 and parts[0] in ("sp", "tr") and is_uniprot_accession(parts[1]):
        return parts[1]
    if len(parts) >= 2 and parts[0].upper() in ("UNIPROT", "UNIPROTKB") and is_uniprot_accession(parts[1]):
        return parts[1]
    if is_uniprot_accession(first):
        return first
    return afdb_accession(first)


def single_accession(accessions: list[str]) -> Optional[str]:
    """The accession when exactly one distinct entry is referenced (isoform suffixes kept)."""
    unique = sorted(set(accessions))
    return unique[0] if len(unique) == 1 else None
