"""Join annotation records to protein-store records and map coordinates onto the text's sequence.

The sequence kept for an instruction record is the **annotation's** sequence when it has one
(the full UniProt sequence, which the text describes); the store only lends coordinates.  A
store record's residues are placed on that sequence by, in order: identity of the two
sequences, an exact unique substring match (a resolved fragment, or a construct with extra tag
residues), or a semi-global alignment; only *identical* aligned residues receive a coordinate,
everything else gets ``coord_mask=False``.  A structure whose sequence is less than
``min_identity`` identical to the annotation's (over the shorter of the two) is not used: the
record falls back to sequence-only with a note, rather than risk mis-aligned coordinates.
Annotations without a sequence take the store record's sequence and coordinates unchanged.

Candidates are found by the structure file a record names (QA JSONL ``structure_file`` +
``structure_chain``), else by UniProt accession, else by store record id (``pdb.h5`` group names
that are not accessions), else by an identical sequence.  Among several
candidates the one mapping the most residues wins (ties: record id order).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterable, Optional

import numpy as np

from sepit.data.identity import ALIGN_TRANSLATE, aligner
from sepit.structure.record import ProteinRecord


@dataclass
class MappedStructure:
    coords: np.ndarray
    """[n, 3] float32 Å on the target sequence; rows with mask False are 0 and never read."""
    coord_mask: np.ndarray
    """[n] bool."""
    store_id: str
    method: str
    """identical | substring | alignment"""
    identity: float


def _file_key(path: str) -> str:
    name = PurePosixPath(str(path).replace("\\", "/")).name.lower()
    return name[:-3] if name.endswith(".gz") else name


def map_structure(record: ProteinRecord, target: str, min_identity: float = 0.9) -> Optional[MappedStructure]:
    """Coordinates of ``record`` placed on ``target``; None if it has none or the sequences disagree."""
    if not record.has_structure:
        return None
    src, n = record.sequence, len(target)
    coords = np.zeros((n, 3), np.float32)
    mask = np.zeros(n, bool)
    if src == target:
        return MappedStructure(record.coords.copy(), record.coord_mask.copy(), record.id, "identical", 1.0)
    if len(src) < n and target.count(src) == 1:
        off = target.index(src)
        coords[off:off + len(src)] = record.coords
        mask[off:off + len(src)] = record.coord_mask
        method, identity = "substring", 1.0
    elif len(src) > n and src.count(target) == 1:
        off = src.index(target)
        coords[:] = record.coords[off:off + n]
        mask[:] = record.coord_mask[off:off + n]
        method, identity = "substring", 1.0
    else:
        aln = aligner().align(src.translate(ALIGN_TRANSLATE), target.translate(ALIGN_TRANSLATE))[0]
        same = 0
        for (s0, s1), (t0, t1) in zip(*aln.aligned):
            s_idx, t_idx = np.arange(s0, s1), np.arange(t0, t1)
            eq = np.frombuffer(src[s0:s1].encode(), np.uint8) == np.frombuffer(target[t0:t1].encode(), np.uint8)
            same += int(eq.sum())
            s_idx, t_idx = s_idx[eq], t_idx[eq]
            coords[t_idx] = record.coords[s_idx]
            mask[t_idx] = record.coord_mask[s_idx]
        identity = same / min(len(src), n)
        if identity < min_identity:
            return None
        method = "alignment"
    coords[~mask] = 0.0
    if not mask.any():
        return None
    return MappedStructure(coords, mask, record.id, method, identity)


class StoreIndex:
    """Store records indexed by accession, by (file name, chain) and by sequence."""

    def __init__(self, records: Iterable[ProteinRecord]):
        self.records: list[ProteinRecord] = sorted(records, key=lambda r: r.id)
        self.by_accession: dict[str, list[ProteinRecord]] = defaultdict(list)
        self.by_file: dict[tuple[str, Optional[str]], list[ProteinRecord]] = defaultdict(list)
        self.by_sequence: dict[str, list[ProteinRecord]] = defaultdict(list)
        self.by_id: dict[str, ProteinRecord] = {rec.id: rec for rec in self.records}
        for rec in self.records:
            if rec.accession:
                self.by_accession[rec.accession].append(rec)
            key = _file_key(rec.source)
            self.by_file[(key, rec.chain)].append(rec)
            self.by_file[(key, None)].append(rec)
            self.by_sequence[rec.sequence].append(rec)

    @classmethod
    def from_store(cls, path) -> "StoreIndex":
        from sepit.structure.store import ProteinStore

        return cls(ProteinStore(path).records())

    def __len__(self) -> int:
        return len(self.records)

    def candidates(self, accession: Optional[str], sequence: Optional[str],
                   structure_file: Optional[str] = None, chain: Optional[str] = None) -> list[ProteinRecord]:
        if structure_file:
            found = self.by_file.get((_file_key(structure_file), chain)) or []
            if found:
                return found
        if accession and accession in self.by_accession:
            return self.by_accession[accession]
        if accession and accession in self.by_id:  # the reference keys pdb.h5 groups by this id
            return [self.by_id[accession]]
        if sequence and sequence in self.by_sequence:
            return self.by_sequence[sequence]
        return []


@dataclass
class JoinedProtein:
    """The protein side of an instruction record."""

    sequence: str
    coords: Optional[np.ndarray]
    coord_mask: Optional[np.ndarray]
    store_id: Optional[str]
    """Store record that gave the sequence or coordinates (None: annotation only)."""
    note: Optional[str] = None
    """Why a store record that was found is not used for coordinates, if so."""

    @property
    def has_structure(self) -> bool:
        return self.coord_mask is not None and bool(self.coord_mask.any())


def join_protein(
    index: StoreIndex, accession: Optional[str], sequence: Optional[str],
    structure_file: Optional[str] = None, chain: Optional[str] = None, min_identity: float = 0.9,
) -> Optional[JoinedProtein]:
    """The protein for one annotation record; None when there is neither a sequence nor a store record."""
    cands = index.candidates(accession, sequence, structure_file, chain)
    if sequence is None:
        if not cands:
            return None
        # no annotation sequence: take the store record with the most resolved residues
        rec = max(cands, key=lambda r: (r.has_structure, int(r.coord_mask.sum()) if r.has_structure else 0,
                                        -cands.index(r)))
        if rec.has_structure:
            return JoinedProtein(rec.sequence, rec.coords.copy(), rec.coord_mask.copy(), rec.id)
        return JoinedProtein(rec.sequence, None, None, rec.id)
    best: Optional[MappedStructure] = None
    for rec in cands:
        mapped = map_structure(rec, sequence, min_identity)
        if mapped is not None and (best is None or int(mapped.coord_mask.sum()) > int(best.coord_mask.sum())):
            best = mapped
    if best is not None:
        return JoinedProtein(sequence, best.coords, best.coord_mask, best.store_id)
    note = None
    if any(r.has_structure for r in cands):
        note = (f"store record(s) {', '.join(r.id for r in cands[:3])} not used: sequence identity to the "
                f"annotation's sequence below {min_identity}")
    return JoinedProtein(sequence, None, None, None, note)
