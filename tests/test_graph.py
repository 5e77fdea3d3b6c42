"""Residue graphs on real structures: invariance, masked residues, edges, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from sepit.resources import DATA_DIR
from sepit.structure import load_records, parse_structure_text
from sepit.structure.graph import RESIDUE_VOCAB, GraphConfig, batch_graphs, record_to_graph
from sepit.structure.record import ProteinRecord


@pytest.fixture(scope="module")
def rec_5zng():
    return load_records(DATA_DIR / "biotite_testdata/5zng.pdb.gz", chain="A")[0]  # 137 residues, 79 modelled


def _moved(rec: ProteinRecord, seed: int = 0) -> ProteinRecord:
    g = np.random.default_rng(seed)
    q, _ = np.linalg.qr(g.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # proper rotation
    coords = rec.coords.astype(np.float64) @ q.T + g.normal(scale=50.0, size=3)
    return ProteinRecord(id=rec.id, sequence=rec.sequence, coords=coords, coord_mask=rec.coord_mask)


def _edge_set(g, skip_near: float | None = None):
    d = g.edge_attr[:, 0].tolist()
    return {(int(s), int(t), round(x, 2)) for (s, t), x in zip(g.edge_index.t().tolist(), d)
            if skip_near is None or abs(x - skip_near) > 1e-3}


@pytest.mark.parametrize("config", [GraphConfig(mode="radius", cutoff=10.0), GraphConfig(mode="knn", k=8)])
def test_graph_is_invariant_to_rotation_and_translation(rec_5zng, config):
    a, b = record_to_graph(rec_5zng, config), record_to_graph(_moved(rec_5zng), config)
    assert torch.equal(a.x, b.x) and torch.equal(a.sequence_position, b.sequence_position)
    if config.mode == "radius":
        assert _edge_set(a, config.cutoff) == _edge_set(b, config.cutoff)
    else:  # per node: the same sorted neighbour distances (ties could swap equal-distance neighbours)
        for g in (a, b):
            assert torch.equal(torch.bincount(g.edge_index[1]), torch.full((g.num_nodes,), config.k))
        da = a.edge_attr[:, 0].reshape(-1, config.k).sort(dim=1).values
        db = b.edge_attr[:, 0].reshape(-1, config.k).sort(dim=1).values
        torch.testing.assert_close(da, db, atol=1e-3, rtol=0)
    assert not torch.allclose(a.pos, b.pos)


def test_nodes_are_residues_with_coordinates_and_map_back_to_the_sequence(rec_5zng):
    g = record_to_graph(rec_5zng)
    mask = rec_5zng.coord_mask
    assert g.num_nodes == int(mask.sum()) == 79 and g.num_residues == rec_5zng.length == 137
    assert g.sequence_position.tolist() == np.nonzero(mask)[0].tolist()
    assert "".join(RESIDUE_VOCAB[t] for t in g.x.tolist()) == "".join(a for a, m in zip(rec_5zng.sequence, mask) if m)
    torch.testing.assert_close(g.pos, torch.as_tensor(rec_5zng.coords[mask]))


def test_radius_edges_match_brute_force_distances(rec_5zng):
    g = record_to_graph(rec_5zng, GraphConfig(cutoff=8.0, block_size=16))  # several row blocks
    pos = rec_5zng.coords[rec_5zng.coord_mask].astype(np.float64)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    want = {(j, i) for i in range(len(pos)) for j in range(len(pos)) if i != j and d[i, j] < 8.0}
    got = {tuple(e) for e in g.edge_index.t().tolist()}
    assert got == want
    for (s, t), x in zip(g.edge_index.t().tolist(), g.edge_attr[:, 0].tolist()):
        assert math.isclose(x, d[t, s], abs_tol=1e-4)
    consecutive = [(i, i + 1) for i in range(len(pos) - 1) if g.sequence_position[i + 1] == g.sequence_position[i] + 1]
    assert all((i, j) in got for i, j in consecutive)  # bonded Cα neighbours (~3.8 Å) are always edges


def test_batching_keeps_each_graph_and_its_sequence_positions():
    records = load_records(DATA_DIR / "biotite_testdata/5zng.pdb.gz") + load_records(DATA_DIR / "biotite_testdata/1aki.pdb.gz")
    batch = batch_graphs(records)
    assert isinstance(batch, Batch) and batch.num_graphs == 3
    assert batch.record_id == ["5zng:A", "5zng:C", "1aki:A"]
    for k, rec in enumerate(records):
        one = batch.get_example(k)
        assert torch.equal(one.sequence_position, torch.nonzero(torch.as_tensor(rec.coord_mask)).reshape(-1))
        assert torch.equal(one.edge_index, record_to_graph(rec).edge_index)
    # edges never cross graphs
    assert torch.equal(batch.batch[batch.edge_index[0]], batch.batch[batch.edge_index[1]])


def test_sequence_only_records_and_bad_configs_are_refused():
    fasta = parse_structure_text(">P1\nMKV\n", "fasta", "x.fasta").records[0]
    with pytest.raises(ValueError, match="P1: has no Cα coordinates"):
        record_to_graph(fasta)
    with pytest.raises(ValueError, match="mode='grid' is not allowed"):
        GraphConfig(mode="grid")
    single = ProteinRecord(id="one", sequence="M", coords=np.zeros((1, 3)) + 1.0, coord_mask=np.ones(1, bool))
    assert record_to_graph(single, GraphConfig(mode="knn")).edge_index.shape == (2, 0)
