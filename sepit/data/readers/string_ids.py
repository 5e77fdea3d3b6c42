"""STRING's own id files as id maps: ``protein.aliases`` (-> UniProt accession) and
``protein.sequences`` (-> sequence), so a STRING user needs no derived file of ours.

``protein.aliases.v12.0.txt[.gz]`` is a TSV with the header ``#string_protein_id	alias	source``
and one row per (STRING id, alias, source), e.g.::

    272561.CT_004	O84007	UniProt_AC
    272561.CT_004	GATB_CHLTR	UniProt_ID
    272561.CT_004	CT_004	UniProt_GN_OrderedLocusNames

(STRING v11 joins several sources of one alias with spaces: ``BLAST_UniProt_AC Ensembl_UniProt_AC``.)
A STRING id maps to the accession its UniProt-typed accession sources give, best source first:
``UniProt_AC``, then other ``*UniProt*_AC`` sources (Ensembl, HGNC), then ``BLAST_UniProt_AC``
(a sequence-similarity hit).  Several distinct accessions in the best source make the id
*ambiguous*: it gets no accession and its rows are reported, never resolved by a guess (STRING
lists a UniProt entry's secondary accessions there too, and does not mark the primary one).

Besides the STRING id itself, the map answers to the id without its taxon prefix (``CT_004``)
and to the aliases of locus-tag sources (``*OrderedLocusNames``, ``*ORFNames``, ``*locus_tag``),
unless such a name belongs to several STRING proteins.

``protein.sequences.v12.0.fa[.gz]`` is FASTA with the STRING id as the header
(``>272561.CT_004``); it gives sequences, which the aliases file does not have.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sepit.data.annotations import AnnotationFormatError
from sepit.data.readers.text_io import numbered_lines, strip_gz
from sepit.structure.record import SEQUENCE_ALPHABET

ALIASES_HEADER = ("string_protein_id", "alias", "source")
#: UniProt's accession syntax (https://www.uniprot.org/help/accession_numbers), optional isoform.
UNIPROT_ACCESSION = re.compile(r"^(?:[OPQ][0-9][A-Z0-9]{3}[0-9]|[A-NR-Z][0-9](?:[A-Z][A-Z0-9]{2}[0-9]){1,2})(?:-\d+)?$")
_LOCUS_SOURCE = re.compile(r"OrderedLocusNames|ORFNames|locus_tag", re.IGNORECASE)


def is_aliases_header(line: str) -> bool:
    return tuple(c.strip() for c in line.lstrip("#").split("\t")) == ALIASES_HEADER


def accession_tier(source: str) -> Optional[int]:
    """0 for ``UniProt_AC``, 1 for other UniProt accession sources, 2 for BLAST hits, None otherwise."""
    if "uniprot" not in source.lower() or not source.endswith("_AC"):
        return None
    if source == "UniProt_AC":
        return 0
    return 2 if source.startswith("BLAST_") else 1


@dataclass
class StringAliasMap:
    """What one aliases file says: per STRING id the accession, or the competing ones."""

    accession: dict[str, str] = field(default_factory=dict)
    """STRING id or unique alias -> UniProt accession."""
    ambiguous: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """STRING id (or alias) -> the several accessions claiming it (sorted)."""
    string_ids: set[str] = field(default_factory=set)
    """The distinct STRING ids in the file."""
    without_uniprot: int = 0
    """STRING ids with no UniProt accession alias at all."""
    alias_keys: int = 0
    """Locus-tag / bare-id names added as extra keys."""
    alias_collisions: int = 0
    """Locus-tag names shared by several STRING proteins (not used as keys)."""

    def summary(self, path: str) -> str:
        mapped = sum(1 for k in self.accession if k in self.string_ids)
        ambiguous = sum(1 for k in self.ambiguous if k in self.string_ids)
        return (f"{path}: STRING aliases for {len(self.string_ids)} proteins: {mapped} -> one UniProt accession, "
                f"{ambiguous} ambiguous (several accessions; rows using them are skipped), "
                f"{self.without_uniprot} without a UniProt accession; {self.alias_keys} locus-tag keys added, "
                f"{self.alias_collisions} shared by several proteins and not used")


def load_string_aliases(path: str | Path) -> StringAliasMap:
    """Parse a STRING ``protein.aliases`` file (streamed; per-species files have ~10^5-10^6 rows)."""
    path = str(path)
    # STRING id -> tier -> accessions; STRING id -> locus-tag names
    by_tier: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    locus_names: dict[str, set[str]] = defaultdict(set)
    ids: list[str] = []
    seen: set[str] = set()
    header_seen = False
    for no, line in numbered_lines(path):
        if not line.strip():
            continue
        if not header_seen:
            if not is_aliases_header(line):
                raise AnnotationFormatError(
                    path, no, f"not a STRING protein.aliases header ('#string_protein_id<TAB>alias<TAB>source'): "
                    f"{line[:80]!r}")
            header_seen = True
            continue
        cells = line.split("\t")
        if len(cells) != 3 or not cells[0].strip() or not cells[1].strip():
            raise AnnotationFormatError(
                path, no, f"expected 3 tab-separated fields (STRING id, alias, source; id and alias non-empty), "
                f"got {len(cells)}: {line[:80]!r}")
        string_id, alias, sources = cells[0].strip(), cells[1].strip(), cells[2].split()
        if string_id not in seen:
            seen.add(string_id)
            ids.append(string_id)
        for source in sources:
            tier = accession_tier(source)
            if tier is not None and UNIPROT_ACCESSION.match(alias):
                by_tier[string_id][tier].add(alias.split("-")[0])  # isoform P12345-2 -> entry P12345
            elif _LOCUS_SOURCE.search(source):
                locus_names[string_id].add(alias)
    if not header_seen:
        raise AnnotationFormatError(path, None, "empty file (no STRING protein.aliases header)")
    out = StringAliasMap(string_ids=set(ids))
    for string_id in ids:
        tiers = by_tier.get(string_id)
        if not tiers:
            out.without_uniprot += 1
            continue
        best = tiers[min(tiers)]
        if len(best) == 1:
            out.accession[string_id] = next(iter(best))
        else:
            out.ambiguous[string_id] = tuple(sorted(best))
    _add_alias_keys(out, ids, locus_names)
    return out


def _add_alias_keys(out: StringAliasMap, ids: list[str], locus_names: dict[str, set[str]]) -> None:
    """Bare ids (``CT_004``) and locus tags as extra keys, when they name one STRING protein only."""
    owners: dict[str, set[str]] = defaultdict(set)
    for string_id in ids:
        names = set(locus_names.get(string_id, ()))
        if "." in string_id:
            names.add(string_id.split(".", 1)[1])
        for name in names - {string_id}:
            owners[name].add(string_id)
    for name, claimed_by in owners.items():
        if name in out.string_ids:
            continue  # a name that is itself a STRING id keeps its own mapping
        if len(claimed_by) > 1:
            out.alias_collisions += 1
            continue
        string_id = next(iter(claimed_by))
        if string_id in out.accession:
            out.accession[name] = out.accession[string_id]
        elif string_id in out.ambiguous:
            out.ambiguous[name] = out.ambiguous[string_id]
        else:
            continue
        out.alias_keys += 1


def is_sequences_file(path: str | Path) -> bool:
    name = strip_gz(Path(path).name).lower()
    return name.rsplit(".", 1)[-1] in ("fa", "fasta", "faa")


def load_string_sequences(path: str | Path) -> dict[str, str]:
    """``>STRING_ID`` FASTA (STRING ``protein.sequences``) -> {STRING id: sequence}."""
    path = str(path)
    out: dict[str, str] = {}
    current: Optional[tuple[int, str]] = None
    chunks: list[str] = []

    def flush() -> None:
        if current is None:
            return
        no, key = current
        seq = "".join(chunks).upper().rstrip("*")  # some FASTA end proteins with a stop '*'
        if not seq:
            raise AnnotationFormatError(path, no, f"{key}: no sequence")
        bad = sorted(set(seq) - SEQUENCE_ALPHABET)
        if bad:
            raise AnnotationFormatError(
                path, no, f"{key}: sequence has characters outside the protein alphabet: {''.join(bad)!r}")
        if key in out and out[key] != seq:
            raise AnnotationFormatError(path, no, f"{key}: a second, different sequence")
        out[key] = seq

    for no, line in numbered_lines(path):
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            flush()
            key = line[1:].split()[0] if line[1:].split() else ""
            if not key:
                raise AnnotationFormatError(path, no, "FASTA header without an id")
            current, chunks = (no, key), []
        elif current is None:
            raise AnnotationFormatError(path, no, "sequence line before the first '>' header")
        else:
            chunks.append(line)
    flush()
    if not out:
        raise AnnotationFormatError(path, None, "no FASTA records")
    return out
