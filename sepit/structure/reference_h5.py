"""The SEPIT reference's ``pdb.h5`` layout into protein records.

Layout (docs/method.md §5): one HDF5 group per UniProt accession holding ``sequence`` (a 1-element
byte-string dataset) and ``node_position`` (``[n, 3]`` float, Cα coordinates in Å, one row per
residue).  The reference marks a residue without coordinates by an all-zero row; we read such
rows as missing (``coord_mask=False``), since a real Cα exactly at the origin is not a thing
crystallography or AlphaFold produces.  A group whose ``node_position`` row count differs from
its sequence length is rejected (we never guess an alignment).  Large files are read group by
group (``names``) so the preprocess job can split one file into many work units.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np

from sepit.structure.accessions import is_uniprot_accession
from sepit.structure.record import ProteinRecord, RecordError
from sepit.structure.result import ParseResult, Reject

H5Source = Union[str, Path, bytes]


def _open(src: H5Source) -> h5py.File:
    if isinstance(src, bytes):
        return h5py.File(io.BytesIO(src), "r")
    return h5py.File(src, "r")


def h5_group_names(src: H5Source) -> list[str]:
    """Top-level group names in file order (raises OSError/ValueError if not readable HDF5)."""
    with _open(src) as f:
        return [k for k in f.keys()]


def _sequence(dataset: h5py.Dataset) -> str:
    value = dataset[()]
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise RecordError(f"'sequence' holds {value.size} elements; expected 1 byte string")
        value = value.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("ascii")
    if not isinstance(value, str):
        raise RecordError(f"'sequence' has type {type(value).__name__}; expected a byte string")
    return value.strip().upper()


def _record(name: str, group, source: str, checksum: str, max_residues: int) -> ProteinRecord:
    if not isinstance(group, h5py.Group):
        raise RecordError("not a group (expected a group with 'sequence' and 'node_position')")
    missing = [k for k in ("sequence", "node_position") if k not in group]
    if missing:
        raise RecordError(f"group lacks {', '.join(missing)}")
    seq = _sequence(group["sequence"])
    if len(seq) > max_residues:
        raise RecordError(f"{len(seq)} residues exceeds max_residues={max_residues} (absurd size)")
    pos = np.asarray(group["node_position"][()], dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise RecordError(f"node_position has shape {pos.shape}; expected [n, 3]")
    if pos.shape[0] != len(seq):
        raise RecordError(f"node_position has {pos.shape[0]} rows but the sequence has {len(seq)} residues")
    mask = ~np.all(pos == 0.0, axis=1)  # the reference's all-zero "missing" sentinel
    if not mask.any():
        coords, mask = None, None  # no coordinates at all: a sequence-only record
    else:
        coords = pos
    return ProteinRecord(
        id=name, sequence=seq, coords=coords, coord_mask=mask,
        accession=name if is_uniprot_accession(name) else None, chain=None,
        source=source, source_format="h5", checksum=checksum, meta={"h5_group": name},
    )


def records_from_h5(
    src: H5Source, source: str, checksum: str = "", names: Optional[Sequence[str]] = None,
    max_residues: int = 100_000,
) -> ParseResult:
    """Records for ``names`` (default: every group) of a ``pdb.h5`` file; bad groups become rejects."""
    result = ParseResult(source_format="h5")
    try:
        f = _open(src)
    except (OSError, ValueError) as exc:
        result.rejects.append(Reject(source, None, f"unreadable HDF5 file: {exc}", "parse"))
        return result
    with f:
        wanted = list(f.keys()) if names is None else list(names)
        if not wanted:
            result.rejects.append(Reject(source, None, "HDF5 file has no groups", "parse"))
        for name in wanted:
            try:
                if name not in f:
                    raise RecordError("group not found in the file")
                result.records.append(_record(name, f[name], source, checksum, max_residues))
            except (RecordError, OSError, ValueError, UnicodeDecodeError) as exc:
                result.rejects.append(Reject(source, name, str(exc), "validate"))
    return result
