"""A request's protein (a sequence, or PDB/mmCIF text) -> a validated sequence and Cα coordinates.

Structures go through the project's structure reader (:mod:`sepit.structure.pdbx`, gemmi), so a
served request sees exactly the chains, sequences and coordinate masks the training data saw.
Every failure is an :class:`~sepit.serve.errors.InvalidInput` (422) carrying the reader's reason,
or a :class:`~sepit.serve.errors.LimitExceeded` for proteins over ``limits.max_residues``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from sepit.serve.config import LimitsConfig
from sepit.serve.errors import InvalidInput
from sepit.serve.limits import check_residues
from sepit.serve.schemas import ProteinInput
from sepit.structure.record import SEQUENCE_ALPHABET

#: Declared ``structure.format`` -> the structure reader's format name.
_FORMATS = {"pdb": "pdb", "cif": "mmcif", "mmcif": "mmcif"}


@dataclass
class ResolvedProtein:
    sequence: str
    coords: Optional[np.ndarray]
    """[n, 3] float32 Å, or None."""
    coord_mask: Optional[np.ndarray]
    """[n] bool, or None."""
    source: str
    """``sequence`` | ``pdb`` | ``cif``."""
    chain: Optional[str] = None

    @property
    def residues_with_coords(self) -> int:
        return 0 if self.coord_mask is None else int(self.coord_mask.sum())


def clean_sequence(raw: str, param: str = "sequence") -> str:
    """Upper-case ``raw`` without whitespace; refuse letters outside the protein alphabet."""
    seq = "".join(raw.split()).upper()
    if not seq:
        raise InvalidInput(f"{param} is empty", param=param)
    bad = sorted(set(seq) - SEQUENCE_ALPHABET)
    if bad:
        first = next(i for i, ch in enumerate(seq) if ch in bad)
        shown = "".join(bad)[:20]
        raise InvalidInput(
            f"{param} has characters outside the protein alphabet {shown!r} (first at residue {first + 1}); "
            f"allowed: {''.join(sorted(SEQUENCE_ALPHABET))}",
            param=param,
        )
    return seq


def parse_structure(data: str, declared: str, chain: Optional[str]) -> ResolvedProtein:
    """The requested chain (default: the first protein chain) of PDB/mmCIF text."""
    from sepit.structure.formats import SourceError, detect_format
    from sepit.structure.pdbx import ChainOptions, records_from_structure_text

    try:
        fmt, text = detect_format(data.encode("utf-8", errors="replace"), name=f"upload.{declared}")
    except SourceError as exc:
        raise InvalidInput(f"structure is unreadable: {exc}", param="structure.data") from None
    if fmt not in ("pdb", "mmcif"):
        raise InvalidInput(
            f"structure.data is {fmt} content, not a PDB or mmCIF file (declared format {declared!r})",
            param="structure.data",
        )
    options = ChainOptions(chain=chain, chain_policy="first")
    try:
        result = records_from_structure_text(text, fmt, entry="upload", source="request", options=options)
    except Exception as exc:  # noqa: BLE001 - a reader bug on hostile text must not crash the replica
        raise InvalidInput(f"structure could not be parsed: {type(exc).__name__}: {exc}", param="structure.data") from None
    if not result.records:
        reasons = "; ".join(r.reason for r in result.rejects) or "no protein chain found"
        raise InvalidInput(f"structure has no usable protein chain: {reasons}", param="structure.data")
    rec = result.records[0]
    return ResolvedProtein(
        sequence=rec.sequence, coords=rec.coords, coord_mask=rec.coord_mask,
        source="pdb" if fmt == "pdb" else "cif", chain=rec.chain,
    )


def resolve_protein(protein: ProteinInput, limits: LimitsConfig) -> ResolvedProtein:
    """Validated sequence (+ coordinates for structures) within ``limits.max_residues``."""
    if protein.sequence is not None:
        resolved = ResolvedProtein(clean_sequence(protein.sequence), None, None, "sequence")
    else:
        resolved = parse_structure(protein.structure.data, _FORMATS[protein.structure.format], protein.chain)
    check_residues(len(resolved.sequence), limits)
    return resolved
