"""The validated protein record every other part of sepit consumes.

A record is one protein chain: its one-letter sequence and, per residue, a Cα coordinate with an
explicit validity mask (never an all-zero sentinel).  Sequence-only records (FASTA) have
``coords=None``.  ``to_row``/``from_row`` define the protein store's Parquet schema.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from sepit.errors import SepitError

# 20 standard residues + X (unknown / unmappable). U (selenocysteine) and O (pyrrolysine) are
# accepted in sequences because ESM-2's alphabet has them; B/Z/J ambiguity codes too.
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
SEQUENCE_ALPHABET = frozenset(AMINO_ACIDS + "XUOBZJ")

#: Largest |coordinate| (Å) accepted; real PDB/mmCIF coordinates fit in 8.3 fixed columns.
MAX_ABS_COORD = 9999.0
#: Longest protein accepted by default (ESM-2 positional limit is 1022 residues + cls/eos).
DEFAULT_MAX_RESIDUES = 1022


class RecordError(SepitError, ValueError):
    """A protein record is invalid; the message names the record and the reason."""


@dataclass
class ProteinRecord:
    id: str
    """Unique record id, e.g. ``AF-O84033-F1:A`` or ``1aki:A`` or a FASTA id."""
    sequence: str
    """One-letter sequence (upper case), one letter per residue, X for unknown."""
    coords: Optional[np.ndarray] = None
    """[n, 3] float32 Cα coordinates in Å, or None for sequence-only records."""
    coord_mask: Optional[np.ndarray] = None
    """[n] bool: True where ``coords`` holds a real Cα position."""
    plddt: Optional[np.ndarray] = None
    """[n] float32 per-residue pLDDT (0-100) for predicted models, else None."""
    accession: Optional[str] = None
    """UniProt accession when the source states it (AFDB name, DBREF, _struct_ref, FASTA)."""
    chain: Optional[str] = None
    """Chain id in the source file (None for FASTA)."""
    source: str = ""
    """Path (or name) of the source file."""
    source_format: str = ""
    """pdb | mmcif | afdb | fasta | h5"""
    checksum: str = ""
    """sha256 of the source file's bytes (decompressed content is not re-hashed)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form extras (title, resolution, n_models, ...); stored as JSON."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def length(self) -> int:
        return len(self.sequence)

    @property
    def has_structure(self) -> bool:
        return self.coords is not None and self.coord_mask is not None and bool(self.coord_mask.any())

    def validate(self) -> None:
        name = self.id or "<unnamed record>"
        if not self.sequence:
            raise RecordError(f"{name}: empty sequence")
        bad = sorted(set(self.sequence) - SEQUENCE_ALPHABET)
        if bad:
            raise RecordError(
                f"{name}: sequence has characters outside the protein alphabet: {''.join(bad)!r}"
            )
        n = len(self.sequence)
        if self.coords is None:
            if self.coord_mask is not None:
                raise RecordError(f"{name}: coord_mask given without coords")
        else:
            c = np.asarray(self.coords, dtype=np.float32)
            if c.shape != (n, 3):
                raise RecordError(f"{name}: coords shape {c.shape} does not match sequence length {n} (expected ({n}, 3))")
            m = np.ones(n, bool) if self.coord_mask is None else np.asarray(self.coord_mask, bool)
            if m.shape != (n,):
                raise RecordError(f"{name}: coord_mask length {m.shape} does not match sequence length {n}")
            valid = c[m]
            if not np.isfinite(valid).all():
                raise RecordError(f"{name}: coordinates contain NaN or infinity")
            if valid.size and np.abs(valid).max() > MAX_ABS_COORD:
                raise RecordError(f"{name}: absurd coordinate magnitude {np.abs(valid).max():.1f} Å (> {MAX_ABS_COORD})")
            c = np.where(m[:, None], c, 0.0).astype(np.float32)  # masked rows hold 0, never read
            self.coords, self.coord_mask = c, m
        if self.plddt is not None:
            p = np.asarray(self.plddt, dtype=np.float32)
            if p.shape != (n,):
                raise RecordError(f"{name}: plddt length {p.shape} does not match sequence length {n}")
            self.plddt = p

    # ------------------------------------------------------------------ Parquet row
    def to_row(self) -> dict[str, Any]:
        import json

        return {
            "id": self.id,
            "accession": self.accession,
            "chain": self.chain,
            "sequence": self.sequence,
            "length": self.length,
            "coords": None if self.coords is None else self.coords.reshape(-1).tolist(),
            "coord_mask": None if self.coord_mask is None else self.coord_mask.tolist(),
            "plddt": None if self.plddt is None else self.plddt.tolist(),
            "has_structure": self.has_structure,
            "source": self.source,
            "source_format": self.source_format,
            "checksum": self.checksum,
            "meta": json.dumps(self.meta, sort_keys=True, default=str),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ProteinRecord":
        import json

        n = len(row["sequence"])
        coords = row.get("coords")
        mask = row.get("coord_mask")
        plddt = row.get("plddt")
        meta = row.get("meta") or "{}"
        return cls(
            id=row["id"],
            sequence=row["sequence"],
            coords=None if coords is None else np.asarray(coords, np.float32).reshape(n, 3),
            coord_mask=None if mask is None else np.asarray(mask, bool),
            plddt=None if plddt is None else np.asarray(plddt, np.float32),
            accession=row.get("accession"),
            chain=row.get("chain"),
            source=row.get("source") or "",
            source_format=row.get("source_format") or "",
            checksum=row.get("checksum") or "",
            meta=json.loads(meta) if isinstance(meta, str) else dict(meta),
        )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
