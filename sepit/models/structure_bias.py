"""Pairwise-distance structure bias for ESM-2 attention (docs/method.md §1).

For one Cα per token (Å) with an explicit validity mask:

    d_ij   = |x_i - x_j|                                         (fp32)
    φ_k(d) = exp(-½((d - μ_k)/σ_k)²) / (√(2π)·σ_k),  σ = |σ| + 1e-3,  μ, σ ~ U(0, 3) at init
    bias_ij = MLP(φ(d_ij))  ∈ R^H   (Linear K→K, GELU, Linear K→H), one value per head,
              computed once per forward and shared by every layer; 0 unless both i and j are valid
    edge_i  = edge_scale · Linear(Σ_{valid j} φ(d_ij))  ∈ R^D, added to token i's embedding
              (0 when i itself has no coordinate)

Only distances enter, so everything is invariant to rotations and translations.

Memory.  The naive form materialises [B, L, L, K] (512 MB per protein at L = 1024, K = 128,
fp32) several times (φ, the MLP hidden, its GELU).  The dense mode computes rows in chunks of
``chunk_size`` so the working set is O(chunk·L·K); under autograd each chunk is recomputed in the
backward pass (activation checkpointing) so training peaks at O(chunk·L·K) too.  The output bias
itself is [B, H, L, L], which dense attention needs anyway.

Sparse modes (``graph="radius"`` / ``"knn"``) evaluate φ and the MLP only on residue-graph edges
(valid pairs with d_ij ≤ ``radius``, or each row's ``k`` nearest valid residues including itself).
Semantics: φ is truncated to 0 off the graph, i.e. a valid pair that is not an edge gets
MLP(0) (the constant the dense formula converges to once the Gaussians underflow) and adds
nothing to the edge feature; invalid pairs still get 0.  With a radius above the largest
distance (or k ≥ L) the sparse result equals the dense one.  Memory: O(E·K) features for E edges
plus the [B, H, L, L] output; the graph is built with chunked distance rows (O(chunk·L)), in
pure torch (torch-geometric's radius/knn graph needs pyg-lib or torch-cluster, absent here).

ZeRO-3.  DeepSpeed ZeRO-3 gathers a module's partitioned parameters when the module is called,
and every data-parallel rank must call the same modules in the same order.  The chunk count
depends on L, which differs across ranks, so :meth:`StructureBias.forward` calls none of its
submodules: it reads their parameters directly (``gaussian_basis``, ``_linear32``), and a ZeRO-3
trainer registers them as external parameters of this module (``ZERO3_READS_CHILD_PARAMETERS``;
see ``sepit.train.deepspeed_config.register_zero3_child_parameters``), so they are gathered once
per forward (and once for its backward), whatever L is.  The output is a NamedTuple so ZeRO-3's
hooks see its tensors (it re-gathers the parameters when their gradient arrives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sepit.config.base import check_choice, check_range
from sepit.errors import SepitError

GRAPH_MODES = ("dense", "radius", "knn")


class StructureInputError(SepitError, ValueError):
    """Coordinates / masks handed to the structure bias have the wrong shape or type."""


@dataclass
class StructureBiasConfig:
    num_heads: int
    """Attention heads H of the encoder (one bias value per head)."""
    embed_dim: int
    """Encoder hidden size D (the edge feature's output size)."""
    num_rbf: int = 128
    """K, number of learned Gaussian basis functions."""
    chunk_size: int = 64
    """Rows per chunk in dense mode; peak memory grows linearly with it."""
    edge_scale: float = 0.01
    """Scale of the edge feature added to the token embeddings."""
    graph: str = "dense"
    """dense | radius | knn (see module docstring for the sparse semantics)."""
    radius: float = 16.0
    """Å, neighbour cut-off for graph='radius'."""
    knn: int = 32
    """Neighbours per residue (self included) for graph='knn'."""
    checkpoint_chunks: bool = True
    """Recompute dense chunks in backward so training memory stays O(chunk·L·K)."""

    def __post_init__(self) -> None:
        for name in ("num_heads", "embed_dim", "num_rbf", "chunk_size", "knn"):
            check_range(getattr(self, name), name, lo=1)
        check_range(self.radius, "radius", lo=0.0, lo_inclusive=False)
        check_choice(self.graph, "graph", GRAPH_MODES)


class StructureBiasOutput(NamedTuple):
    attn_bias: torch.Tensor
    """[B, H, L, L] float32 additive attention bias (0 on pairs lacking a coordinate)."""
    edge_embedding: torch.Tensor
    """[B, L, D] float32, already scaled by edge_scale (0 on rows lacking a coordinate)."""


class GaussianBasis(nn.Module):
    """φ_k(d) with learned centres μ and widths σ (both Å), always evaluated in fp32."""

    def __init__(self, num_rbf: int):
        super().__init__()
        self.mu = nn.Parameter(torch.empty(num_rbf))
        self.sigma = nn.Parameter(torch.empty(num_rbf))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.mu, 0.0, 3.0)
        nn.init.uniform_(self.sigma, 0.0, 3.0)

    def forward(self, d: torch.Tensor) -> torch.Tensor:  # d: [...] Å -> [..., K]
        return gaussian_basis(d, self.mu, self.sigma)


def gaussian_basis(d: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """φ(d) [..., K] for distances d [...] Å, centres mu [K] and raw widths sigma [K], in fp32."""
    mu = mu.float()
    sigma = sigma.float().abs() + 1e-3
    z = (d.float().unsqueeze(-1) - mu) / sigma
    return torch.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * sigma)


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # fp32 even when the module was cast to bf16/fp16 (the bias MLP is tiny; precision matters).
    b = None if layer.bias is None else layer.bias.float()
    return F.linear(x, layer.weight.float(), b)


class StructureBias(nn.Module):
    """Gaussian-basis distance features → shared per-head attention bias + edge embedding."""

    #: forward reads its submodules' parameters without calling them (see the module docstring).
    ZERO3_READS_CHILD_PARAMETERS = True

    def __init__(self, config: StructureBiasConfig):
        super().__init__()
        self.config = config
        k = config.num_rbf
        self.gaussian = GaussianBasis(k)
        # Same layout as nn.Sequential(Linear, GELU, Linear) so state-dict names read pair_mlp.0/.2
        self.pair_mlp = nn.Sequential(nn.Linear(k, k), nn.GELU(), nn.Linear(k, config.num_heads))
        self.edge_proj = nn.Linear(k, config.embed_dim)

    # ------------------------------------------------------------------ pieces of the formula
    def basis(self, d: torch.Tensor) -> torch.Tensor:  # [...] Å -> [..., K], no module call
        return gaussian_basis(d, self.gaussian.mu, self.gaussian.sigma)

    def pair_bias(self, phi: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., H]
        return _linear32(self.pair_mlp[2], F.gelu(_linear32(self.pair_mlp[0], phi)))

    def _rows(self, coords: torch.Tensor, mask: torch.Tensor, start: int, end: int):
        """Bias [B, c, L, H] and Σ_j φ [B, c, K] for query rows start:end (c = end - start)."""
        diff = coords[:, start:end, None, :] - coords[:, None, :, :]  # [B, c, L, 3]
        d = diff.square().sum(-1).sqrt()  # [B, c, L] Å
        valid = mask[:, start:end, None] & mask[:, None, :]  # [B, c, L] both ends have coords
        phi = self.basis(d).masked_fill(~valid.unsqueeze(-1), 0.0)  # [B, c, L, K]
        bias = self.pair_bias(phi).masked_fill(~valid.unsqueeze(-1), 0.0)  # [B, c, L, H]
        return bias, phi.sum(2)

    def _finish(self, attn_bias: torch.Tensor, phi_sum: torch.Tensor, mask: torch.Tensor) -> StructureBiasOutput:
        # attn_bias [B, H, L, L]; the edge feature only on rows that have a coordinate.
        edge = _linear32(self.edge_proj, phi_sum) * mask.unsqueeze(-1)
        return StructureBiasOutput(attn_bias=attn_bias, edge_embedding=self.config.edge_scale * edge)

    @staticmethod
    def _check(coords: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if coords.ndim != 3 or coords.shape[-1] != 3:
            raise StructureInputError(f"coords must be [B, L, 3], got {tuple(coords.shape)}")
        if mask.shape != coords.shape[:2]:
            raise StructureInputError(
                f"coord_mask shape {tuple(mask.shape)} does not match coords {tuple(coords.shape[:2])}"
            )
        if mask.dtype != torch.bool:
            raise StructureInputError(f"coord_mask must be a bool tensor, got {mask.dtype}")
        # Masked rows may hold anything (even NaN); zero them so they cannot leak through 0·NaN.
        coords = torch.where(mask.unsqueeze(-1), coords.float(), torch.zeros((), device=coords.device))
        return coords, mask

    # ------------------------------------------------------------------ public entry points
    def forward(self, coords: torch.Tensor, coord_mask: torch.Tensor) -> StructureBiasOutput:
        """coords [B, L, 3] Å, coord_mask [B, L] bool -> :class:`StructureBiasOutput`."""
        coords, mask = self._check(coords, coord_mask)
        with torch.autocast(device_type=coords.device.type, enabled=False):
            if self.config.graph != "dense":
                return self._forward_graph(coords, mask)
            L, step = coords.shape[1], self.config.chunk_size
            use_ckpt = (
                self.config.checkpoint_chunks and torch.is_grad_enabled()
                and any(p.requires_grad for p in self.parameters()) and L > step
            )
            B, H = coords.shape[0], self.config.num_heads
            # Written chunk by chunk into the output (no concatenated copy of [B, H, L, L]).
            bias = coords.new_empty(B, H, L, L)
            sums = []
            for start in range(0, L, step):
                end = min(start + step, L)
                if use_ckpt:
                    rows, phi_sum = checkpoint(self._rows, coords, mask, start, end, use_reentrant=False)
                else:
                    rows, phi_sum = self._rows(coords, mask, start, end)
                bias[:, :, start:end] = rows.permute(0, 3, 1, 2)
                sums.append(phi_sum)
            return self._finish(bias, torch.cat(sums, 1), mask)

    def naive(self, coords: torch.Tensor, coord_mask: torch.Tensor) -> StructureBiasOutput:
        """The unchunked formula (materialises [B, L, L, K]); the reference for tests/benchmarks."""
        coords, mask = self._check(coords, coord_mask)
        with torch.autocast(device_type=coords.device.type, enabled=False):
            bias, phi_sum = self._rows(coords, mask, 0, coords.shape[1])  # [B, L, L, H]
            return self._finish(bias.permute(0, 3, 1, 2).contiguous(), phi_sum, mask)

    # ------------------------------------------------------------------ sparse residue graph
    def residue_graph(self, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Edges [3, E] as (batch, row i, column j) of valid pairs in the radius / k-NN graph."""
        cfg, L = self.config, coords.shape[1]
        parts = []
        with torch.no_grad():
            for start in range(0, L, cfg.chunk_size):
                end = min(start + cfg.chunk_size, L)
                d = (coords[:, start:end, None, :] - coords[:, None, :, :]).square().sum(-1).sqrt()
                valid = mask[:, start:end, None] & mask[:, None, :]  # [B, c, L]
                if cfg.graph == "radius":
                    keep = valid & (d <= cfg.radius)
                else:
                    k = min(cfg.knn, L)
                    idx = d.masked_fill(~valid, float("inf")).topk(k, dim=-1, largest=False).indices
                    keep = torch.zeros_like(valid).scatter_(-1, idx, True) & valid
                b, i, j = keep.nonzero(as_tuple=True)
                parts.append(torch.stack([b, i + start, j]))
        return torch.cat(parts, 1)

    def _forward_graph(self, coords: torch.Tensor, mask: torch.Tensor) -> StructureBiasOutput:
        B, L = mask.shape
        b, i, j = self.residue_graph(coords, mask)
        d = (coords[b, i] - coords[b, j]).square().sum(-1).sqrt()  # [E] Å
        phi = self.basis(d)  # [E, K]
        zero_phi = phi.new_zeros(1, phi.shape[-1])
        off_graph = self.pair_bias(zero_phi)[0]  # [H]: MLP(0), the bias of a valid non-edge pair
        valid = mask[:, None, :, None] & mask[:, None, None, :]  # [B, 1, L, L]
        bias = valid * off_graph[None, :, None, None]  # [B, H, L, L]
        # scatter edge values through a [B, L, L, H] view; the result keeps the [B, H, L, L] layout
        bias = bias.permute(0, 2, 3, 1).index_put((b, i, j), self.pair_bias(phi)).permute(0, 3, 1, 2)
        phi_sum = phi.new_zeros(B, L, phi.shape[-1]).index_put((b, i), phi, accumulate=True)
        return self._finish(bias, phi_sum, mask)
