"""Residue graphs: a protein record as a torch-geometric ``Data``.

Nodes are the residues **that have a Cα coordinate**; residues without one (unmodelled, or no CA
atom) cannot be placed in space, so they are not nodes.  Nothing is lost or mis-aligned:
``sequence_position[k]`` is node k's position in the record's sequence, ``num_residues`` the full
sequence length, so node features can be scattered back to sequence positions.

Fields of the returned ``Data`` (N nodes, E directed edges):

- ``pos``          [N, 3] float32, Cα coordinates in Å
- ``x``            [N] long, residue tokens in :data:`RESIDUE_VOCAB` (20 standard + X; U/O/B/Z/J -> X)
- ``sequence_position`` [N] long, sequence position (0-based) of each node (not named
  ``*_index``: PyG would offset it by the node count when batching)
- ``edge_index``   [2, E] long, (source j, target i) pairs, PyG's ``source_to_target`` flow, no self loops
- ``edge_attr``    [E, 1] float32, Cα–Cα distance in Å
- ``num_residues`` int, sequence length;  ``record_id`` str

Edges: ``mode="radius"`` links residues closer than ``cutoff`` Å (both directions);
``mode="knn"`` links each node to its ``k`` nearest neighbours (edges j -> i for the k nearest j
of each i; ties broken by sequence position).  Only distances enter, so the graph is invariant to
rotations and translations of the coordinates.  Pure torch (no torch-cluster): distances are
computed in row blocks so memory stays O(block · N).

torch-geometric is the optional extra ``sepit[graph]``: the encoder builds its own radius/kNN
neighbourhoods in pure torch (``EncoderConfig.structure_graph``), so no stage imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

try:
    from torch_geometric.data import Batch, Data
except ImportError as exc:  # the optional extra: no training stage needs residue graphs
    raise ImportError(
        "sepit.structure.graph builds torch-geometric graphs and needs the optional extra: "
        "pip install 'sepit[graph]' (torch-geometric)"
    ) from exc

from sepit.structure.record import AMINO_ACIDS, ProteinRecord

#: Residue token vocabulary of the graph (index = token id); everything else maps to X.
RESIDUE_VOCAB = AMINO_ACIDS + "X"
_TOKEN = {aa: i for i, aa in enumerate(RESIDUE_VOCAB)}
_X = _TOKEN["X"]


@dataclass(frozen=True)
class GraphConfig:
    mode: str = "radius"
    """radius | knn"""
    cutoff: float = 10.0
    """Radius in Å (mode=radius); 8-10 Å Cα contact maps are the field's usual choice."""
    k: int = 16
    """Neighbours per residue (mode=knn)."""
    block_size: int = 1024
    """Rows of the distance matrix computed at once (memory: block_size × N floats)."""

    def __post_init__(self) -> None:
        if self.mode not in ("radius", "knn"):
            raise ValueError(f"GraphConfig.mode={self.mode!r} is not allowed; choose one of ['radius', 'knn']")
        if not self.cutoff > 0:
            raise ValueError(f"GraphConfig.cutoff={self.cutoff!r} must be > 0 Å")
        if self.k < 1:
            raise ValueError(f"GraphConfig.k={self.k!r} must be >= 1")
        if self.block_size < 1:
            raise ValueError(f"GraphConfig.block_size={self.block_size!r} must be >= 1")


def residue_tokens(sequence: str) -> torch.Tensor:
    """[n] long token ids of ``sequence`` in :data:`RESIDUE_VOCAB`."""
    return torch.tensor([_TOKEN.get(aa, _X) for aa in sequence], dtype=torch.long)


def _radius_edges(pos: torch.Tensor, cutoff: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = pos.shape[0]
    src, dst, dist = [], [], []
    for start in range(0, n, block):
        d = torch.cdist(pos[start:start + block].double(), pos.double())  # [b, N], fp64: exact ties
        rows, cols = torch.nonzero(d < cutoff, as_tuple=True)
        keep = (rows + start) != cols
        rows, cols = rows[keep], cols[keep]
        dst.append(rows + start)
        src.append(cols)
        dist.append(d[rows, cols])
    return torch.stack([torch.cat(src), torch.cat(dst)]), torch.cat(dist)


def _knn_edges(pos: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = pos.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return torch.empty(2, 0, dtype=torch.long), torch.empty(0, dtype=torch.float64)
    src, dst, dist = [], [], []
    for start in range(0, n, block):
        d = torch.cdist(pos[start:start + block].double(), pos.double())
        idx = torch.arange(d.shape[0])
        d[idx, idx + start] = float("inf")  # no self loops
        # stable sort: equal distances keep sequence order, so ties resolve the same way every time
        order = torch.sort(d, dim=1, stable=True).indices[:, :k]
        dst.append((idx + start).repeat_interleave(k))
        src.append(order.reshape(-1))
        dist.append(torch.gather(d, 1, order).reshape(-1))
    return torch.stack([torch.cat(src), torch.cat(dst)]), torch.cat(dist)


def record_to_graph(record: ProteinRecord, config: GraphConfig = GraphConfig()) -> Data:
    """The residue graph of ``record``; raises ValueError for sequence-only records."""
    if not record.has_structure:
        raise ValueError(f"{record.id}: has no Cα coordinates; a residue graph needs a structure")
    mask = torch.as_tensor(record.coord_mask, dtype=torch.bool)
    sequence_position = torch.nonzero(mask, as_tuple=False).reshape(-1)
    pos = torch.as_tensor(record.coords, dtype=torch.float32)[mask]
    if config.mode == "radius":
        edge_index, dist = _radius_edges(pos, config.cutoff, config.block_size)
    else:
        edge_index, dist = _knn_edges(pos, config.k, config.block_size)
    return Data(
        x=residue_tokens(record.sequence)[sequence_position],
        pos=pos,
        sequence_position=sequence_position,
        edge_index=edge_index.long(),
        edge_attr=dist.float().unsqueeze(-1),
        num_residues=record.length,
        record_id=record.id,
    )


def batch_graphs(records: Sequence[ProteinRecord], config: GraphConfig = GraphConfig()) -> Batch:
    """One PyG ``Batch`` of the records' graphs (``batch`` maps each node to its record)."""
    return Batch.from_data_list([record_to_graph(r, config) for r in records])
