"""StructureBias: chunked == naive (values and gradients), masks, invariance, sparse variants."""

from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest
import torch

from sepit.config.base import ConfigError
from sepit.models.structure_bias import StructureBias, StructureBiasConfig, StructureInputError
from sepit.resources import data_path


def read_ca(name: str) -> np.ndarray:
    """Cα coordinates (Å) of the first chain of a bundled AlphaFold DB model."""
    st = gemmi.read_structure(str(data_path("chlamatlas_afdb", "afdb_models", name)))
    return np.array([[*r.find_atom("CA", "*").pos.tolist()] for r in st[0][0]], np.float32)


@pytest.fixture(scope="module")
def real_ca():
    return torch.from_numpy(read_ca("AF-O84102-F1-model_v4.cif.gz"))  # 119 residues


def make_batch(real_ca: torch.Tensor, lengths: list[int], missing_every: int = 7):
    """Padded batch of real Cα prefixes; every ``missing_every``-th residue lacks a coordinate."""
    L = max(lengths)
    coords = torch.zeros(len(lengths), L, 3)
    mask = torch.zeros(len(lengths), L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        coords[b, :n] = real_ca[b : b + n]
        mask[b, :n] = True
        mask[b, ::missing_every] = False
    coords[~mask] = 1e4  # garbage under the mask must not matter
    return coords, mask


def module(chunk: int, graph: str = "dense", **kw) -> StructureBias:
    torch.manual_seed(0)
    return StructureBias(StructureBiasConfig(num_heads=4, embed_dim=24, num_rbf=16, chunk_size=chunk, graph=graph, **kw))


@pytest.mark.parametrize("lengths", [[5], [33, 20], [64, 64], [100, 57, 81]])
def test_chunked_equals_naive_values_and_gradients(real_ca, lengths):
    sb = module(chunk=16)
    coords, mask = make_batch(real_ca, lengths)
    w_bias = torch.randn(len(lengths), 4, max(lengths), max(lengths))
    w_edge = torch.randn(len(lengths), max(lengths), 24)

    def run(fn):
        sb.zero_grad()
        out = fn(coords, mask)
        ((out.attn_bias * w_bias).sum() + (out.edge_embedding * w_edge).sum()).backward()
        return out, {n: p.grad.clone() for n, p in sb.named_parameters()}

    chunked, g_chunked = run(sb)  # checkpointed chunks under autograd
    naive, g_naive = run(sb.naive)
    torch.testing.assert_close(chunked.attn_bias, naive.attn_bias, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked.edge_embedding, naive.edge_embedding, atol=1e-6, rtol=1e-5)
    for name in g_naive:
        torch.testing.assert_close(g_chunked[name], g_naive[name], atol=1e-5, rtol=1e-4, msg=name)


def test_matches_the_written_formula_for_one_pair(real_ca):
    sb = module(chunk=4)
    coords, mask = make_batch(real_ca, [10], missing_every=100)
    out = sb(coords, mask)
    i, j = 2, 7
    d = float(np.linalg.norm(coords[0, i].numpy() - coords[0, j].numpy()))
    mu = sb.gaussian.mu.detach().double()
    sigma = sb.gaussian.sigma.detach().double().abs() + 1e-3
    phi = torch.exp(-0.5 * ((d - mu) / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
    lin1, lin2 = sb.pair_mlp[0], sb.pair_mlp[2]
    hidden = torch.nn.functional.gelu(lin1.weight.double() @ phi + lin1.bias.double())
    expected = lin2.weight.double() @ hidden + lin2.bias.double()
    torch.testing.assert_close(out.attn_bias[0, :, i, j].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.attn_bias[0, :, i, j], out.attn_bias[0, :, j, i])  # symmetric in d


def test_pairs_without_both_coordinates_get_no_bias_and_rows_no_edge(real_ca):
    sb = module(chunk=8)
    coords, mask = make_batch(real_ca, [30, 12])
    out = sb(coords, mask)
    pair_ok = mask[:, :, None] & mask[:, None, :]
    bias = out.attn_bias.permute(0, 2, 3, 1)  # [B, L, L, H]
    assert (bias[~pair_ok] == 0).all()
    assert (bias[pair_ok].abs().sum(-1) > 0).all()
    assert (out.edge_embedding[~mask] == 0).all()
    assert out.attn_bias.dtype == torch.float32 and out.attn_bias.shape == (2, 4, 30, 30)


def test_rotation_and_translation_invariance(real_ca):
    sb = module(chunk=32)
    coords, mask = make_batch(real_ca, [90, 60])
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3)))
    moved = torch.where(mask[..., None], coords @ q.T + torch.tensor([12.0, -40.0, 7.5]), coords)
    a, b = sb(coords, mask), sb(moved, mask)
    torch.testing.assert_close(a.attn_bias, b.attn_bias, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.edge_embedding, b.edge_embedding, atol=1e-4, rtol=1e-4)


def test_fp32_even_when_the_module_is_bf16(real_ca):
    sb = module(chunk=16).to(torch.bfloat16)
    coords, mask = make_batch(real_ca, [20])
    out = sb(coords.to(torch.bfloat16), mask)
    assert out.attn_bias.dtype == torch.float32 and torch.isfinite(out.attn_bias).all()


@pytest.mark.parametrize("graph,kw", [("radius", {"radius": 1e4}), ("knn", {"knn": 1000})])
def test_sparse_graph_covering_every_pair_equals_dense(real_ca, graph, kw):
    dense = module(chunk=16)
    sparse = module(chunk=16, graph=graph, **kw)
    sparse.load_state_dict(dense.state_dict())
    coords, mask = make_batch(real_ca, [70, 45])
    a, b = dense(coords, mask), sparse(coords, mask)
    torch.testing.assert_close(b.attn_bias, a.attn_bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.edge_embedding, a.edge_embedding, atol=1e-5, rtol=1e-4)


def test_radius_graph_semantics(real_ca):
    sb = module(chunk=16, graph="radius", radius=8.0)
    coords, mask = make_batch(real_ca, [80])
    bi, i, j = sb.residue_graph(coords, mask)
    d = (coords[0, :, None] - coords[0, None]).norm(dim=-1)
    want = (mask[0, :, None] & mask[0, None, :]) & (d <= 8.0)
    got = torch.zeros_like(want)
    got[i, j] = True
    assert torch.equal(got, want) and (bi == 0).all()
    assert want.sum() < 0.3 * mask.sum() ** 2  # really sparse on a folded protein
    out = sb(coords, mask)
    off_graph = sb.pair_bias(torch.zeros(1, 16))[0].detach()
    pair_ok = mask[0, :, None] & mask[0, None, :]
    bias = out.attn_bias[0].permute(1, 2, 0)
    torch.testing.assert_close(bias[pair_ok & ~want], off_graph.expand(int((pair_ok & ~want).sum()), 4))
    assert (bias[~pair_ok] == 0).all()
    bias.sum().backward()
    assert sb.gaussian.mu.grad is not None and sb.gaussian.mu.grad.abs().sum() > 0


def test_knn_graph_degree(real_ca):
    sb = module(chunk=16, graph="knn", knn=6)
    coords, mask = make_batch(real_ca, [50], missing_every=1000)
    _, i, _ = sb.residue_graph(coords, mask)
    want = torch.where(mask[0], 6, 0)  # k nearest (self included) for every residue with a coordinate
    assert mask[0].sum() == 49 and torch.equal(torch.bincount(i, minlength=50), want)


def test_bad_inputs_and_config_raise_clear_errors(real_ca):
    sb = module(chunk=8)
    coords, mask = make_batch(real_ca, [10])
    with pytest.raises(StructureInputError, match="coords must be"):
        sb(coords[0], mask)
    with pytest.raises(StructureInputError, match="bool"):
        sb(coords, mask.float())
    with pytest.raises(StructureInputError, match="does not match"):
        sb(coords, mask[:, :5])
    with pytest.raises(ConfigError, match="graph"):
        StructureBiasConfig(num_heads=2, embed_dim=8, graph="voronoi")
    with pytest.raises(ConfigError, match="chunk_size"):
        StructureBiasConfig(num_heads=2, embed_dim=8, chunk_size=0)


def _peak_tensor_bytes(fn) -> int:
    """Peak live tensor bytes allocated during fn(), from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def test_chunking_bounds_training_memory(real_ca):
    # L = 112, K = 32, chunk 8: the naive form holds several [L, L, K] tensors for backward;
    # checkpointed chunks hold O(chunk · L · K) plus the [H, L, L] output.
    torch.manual_seed(0)
    sb = StructureBias(StructureBiasConfig(num_heads=4, embed_dim=24, num_rbf=32, chunk_size=8))
    coords, mask = make_batch(real_ca, [112], missing_every=1000)

    def train(fn):
        def step():
            out = fn(coords, mask)
            (out.attn_bias.square().mean() + out.edge_embedding.square().mean()).backward()
            sb.zero_grad(set_to_none=True)
        return step

    naive, chunked = _peak_tensor_bytes(train(sb.naive)), _peak_tensor_bytes(train(sb))
    one_phi = 112 * 112 * 32 * 4
    assert naive > 3 * one_phi
    assert chunked < 0.3 * naive, (chunked, naive)
