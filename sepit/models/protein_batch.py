"""Collate proteins into ESM-2 token batches with coordinates aligned to token positions.

Layout per row (fair-esm ESM-1b/ESM-2 alphabet):

    position: 0      1 .. n        n+1     n+2 .. L-1
    token:    <cls>  residues      <eos>   <pad> ...
    coords:   -      residue Cα Å  -       -            (coord_mask False on every '-')

so ``coords[b, t]`` is the Cα of the residue at token ``t``.  A sequence longer than
``max_residues`` is an error unless ``truncate=True``, which cuts sequence, coordinates and mask
together (never one without the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from sepit.errors import SepitError

#: Longest protein by default: ESM-2 was trained on 1024 tokens = <cls> + 1022 residues + <eos>.
DEFAULT_MAX_RESIDUES = 1022


class ProteinBatchError(SepitError, ValueError):
    """An item cannot be collated; the message names the item index and the reason."""


@dataclass
class ProteinBatch:
    tokens: torch.Tensor
    """[B, L] long token ids (fair-esm alphabet), right-padded with ``padding_idx``."""
    coords: torch.Tensor
    """[B, L, 3] float32 Cα coordinates in Å aligned to tokens (0 where coord_mask is False)."""
    coord_mask: torch.Tensor
    """[B, L] bool, True only on residue tokens that have a coordinate."""
    lengths: torch.Tensor
    """[B] long, number of residues per protein (tokens in use = lengths + 2)."""
    padding_idx: int = 1

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, L] bool: True on real tokens (<cls>, residues, <eos>), False on padding."""
        return self.tokens.ne(self.padding_idx)

    @property
    def residue_mask(self) -> torch.Tensor:
        """[B, L] bool: True on residue tokens only (not <cls>/<eos>/padding)."""
        pos = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return (pos[None, :] >= 1) & (pos[None, :] <= self.lengths[:, None])

    @property
    def has_structure(self) -> torch.Tensor:
        """[B] bool: the protein has at least one residue coordinate."""
        return self.coord_mask.any(1)

    def to(self, device: torch.device | str) -> "ProteinBatch":
        return ProteinBatch(
            tokens=self.tokens.to(device), coords=self.coords.to(device),
            coord_mask=self.coord_mask.to(device), lengths=self.lengths.to(device),
            padding_idx=self.padding_idx,
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: Sequence[int]) -> "ProteinBatch":
        """The batch of ``rows`` only, cut to their longest protein: the batch that collating
        just those proteins gives."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.tokens.device)
        lengths = self.lengths[idx]
        width = int(lengths.max()) + 2  # + <cls> and <eos>
        return ProteinBatch(self.tokens[idx, :width], self.coords[idx, :width], self.coord_mask[idx, :width],
                            lengths, self.padding_idx)

    def without_structure(self, drop: torch.Tensor) -> "ProteinBatch":
        """Copy in which rows with ``drop[b]`` True lose their coordinates (structure dropout)."""
        keep = ~drop.to(self.coord_mask.device).bool()
        mask = self.coord_mask & keep[:, None]
        return ProteinBatch(self.tokens, self.coords * mask.unsqueeze(-1), mask, self.lengths, self.padding_idx)


def _as_array(x: Any, name: str, index: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the item's fault
        raise ProteinBatchError(f"item {index}: {name} is not array-like ({exc})") from None


# IUPAC codes a validated ProteinRecord may hold that ESM's alphabet lacks: J (Leu or Ile) is
# tokenised as X (unknown), as ESM-2's training data did with ambiguous residues.
_ESM_SUBSTITUTES = {"J": "X"}


def _residue_ids(alphabet: Any, sequence: str, index: int) -> list[int]:
    ids = []
    for pos, ch in enumerate(sequence.upper()):
        idx = alphabet.tok_to_idx.get(_ESM_SUBSTITUTES.get(ch, ch))
        if idx is None or not ch.isalpha():  # letters only: no gaps ('-', '.') or special tokens
            raise ProteinBatchError(f"item {index}: residue {pos + 1} is {ch!r}, not in the ESM alphabet")
        ids.append(idx)
    return ids


def collate_proteins(
    alphabet: Any,
    items: Sequence[tuple[str, Optional[Any], Optional[Any]]],
    max_residues: int = DEFAULT_MAX_RESIDUES,
    truncate: bool = False,
) -> ProteinBatch:
    """Tokenise ``(sequence, coords [n, 3] | None, coord_mask [n] | None)`` items into a batch.

    ``coords`` may also be the flat 3n list of the Parquet rows.  ``coord_mask=None`` with
    coords means every residue has a coordinate.  Coordinates at
    masked-out residues are ignored (and stored as 0).  Raises :class:`ProteinBatchError` naming
    the item for empty / over-long sequences, unknown residues or misaligned coordinates.
    """
    if not items:
        raise ProteinBatchError("cannot collate an empty list of proteins")
    rows: list[tuple[list[int], np.ndarray, np.ndarray]] = []
    for index, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ProteinBatchError(f"item {index}: expected (sequence, coords|None, coord_mask|None)")
        seq, coords, mask = item
        if not isinstance(seq, str) or not seq:
            raise ProteinBatchError(f"item {index}: sequence must be a non-empty string")
        n = len(seq)
        if coords is None:
            if mask is not None:
                raise ProteinBatchError(f"item {index}: coord_mask given without coords")
            c, m = np.zeros((n, 3), np.float32), np.zeros(n, bool)
        else:
            c = _as_array(coords, "coords", index).astype(np.float32)
            if c.shape == (3 * n,):  # the flat [x1, y1, z1, x2, ...] layout of the Parquet rows
                c = c.reshape(n, 3)
            if c.shape != (n, 3):
                raise ProteinBatchError(
                    f"item {index}: coords shape {c.shape} does not match sequence length {n} (expected ({n}, 3))"
                )
            m = np.ones(n, bool) if mask is None else _as_array(mask, "coord_mask", index).astype(bool)
            if m.shape != (n,):
                raise ProteinBatchError(f"item {index}: coord_mask shape {m.shape} does not match sequence length {n}")
            if not np.isfinite(c[m]).all():
                raise ProteinBatchError(f"item {index}: coordinates contain NaN or infinity at unmasked residues")
            c = np.where(m[:, None], c, 0.0).astype(np.float32)
        if n > max_residues:
            if not truncate:
                raise ProteinBatchError(
                    f"item {index}: sequence has {n} residues, above max_residues={max_residues}; "
                    "pass truncate=True to keep the first max_residues residues and their coordinates"
                )
            seq, c, m = seq[:max_residues], c[:max_residues], m[:max_residues]
        rows.append((_residue_ids(alphabet, seq, index), c, m))

    width = max(len(ids) for ids, _, _ in rows) + 2  # + <cls> and <eos>
    B = len(rows)
    tokens = torch.full((B, width), alphabet.padding_idx, dtype=torch.long)
    coords = torch.zeros((B, width, 3), dtype=torch.float32)
    coord_mask = torch.zeros((B, width), dtype=torch.bool)
    lengths = torch.zeros(B, dtype=torch.long)
    for b, (ids, c, m) in enumerate(rows):
        n = len(ids)
        tokens[b, 0] = alphabet.cls_idx
        tokens[b, 1 : n + 1] = torch.tensor(ids, dtype=torch.long)
        tokens[b, n + 1] = alphabet.eos_idx
        coords[b, 1 : n + 1] = torch.from_numpy(c)
        coord_mask[b, 1 : n + 1] = torch.from_numpy(m)
        lengths[b] = n
    return ProteinBatch(tokens, coords, coord_mask, lengths, alphabet.padding_idx)
