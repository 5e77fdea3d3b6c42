"""Sequence identity, the k-mer prefilter and homology-aware splits on real bundled sequences."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from sepit.data.identity import candidate_pairs, nearest_neighbour, pair_identities, sequence_identity
from sepit.data.splits import align_candidates, assign_clusters, homology_split
from sepit.resources import data_path


@pytest.fixture(scope="module")
def proteins():
    """(accession, sequence) of the bundled UniProt, STRING and Pika proteins, cut to 1022 residues."""
    seen, out = set(), []
    with gzip.open(data_path("derived", "proteins.jsonl.gz"), "rt") as fh:
        for line in fh:
            row = json.loads(line)
            seq = (row.get("sequence") or "")[:1022]
            if seq and row["accession"] not in seen:
                seen.add(row["accession"])
                out.append((row["accession"], seq))
    return sorted(out)


def _mutate(seq: str, share: float, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") if rng.random() < share else c for c in seq)


def test_identity_definition(proteins):
    a = proteins[10][1]
    assert sequence_identity(a, a) == 1.0
    assert sequence_identity(a[20:120], a) == 1.0  # a fragment of a longer protein
    half = sequence_identity(_mutate(a, 0.5, 1), a)
    assert 0.45 < half < 0.65  # ~50% kept + chance matches among the replaced residues
    unrelated = [sequence_identity(proteins[i][1], proteins[i + 300][1]) for i in range(0, 40, 4)]
    assert max(unrelated) < 0.3


def test_prefilter_keeps_homologs_and_identical_copies(proteins):
    seqs = [s for _a, s in proteins[:200]]
    seqs += [_mutate(seqs[3], 0.4, 2), seqs[7]]  # a ~60%-identity homolog and an exact copy
    pairs = {tuple(p) for p in candidate_pairs(seqs).tolist()}
    assert (3, 200) in pairs and (7, 201) in pairs


def test_no_cross_split_pair_at_threshold_exhaustive(proteins):
    """Split 120 real proteins (prefilter and exhaustive search), then align *every* pair and look
    for leaks; the exhaustive report's cross-split maxima are the brute-force ones."""
    keys = [a for a, _ in proteins[:120]]
    seqs = [s for _, s in proteins[:120]]
    all_pairs = np.array([(i, j) for i in range(120) for j in range(i + 1, 120)])
    ident = pair_identities(seqs, all_pairs)
    for search in ("prefilter", "exhaustive"):
        report = homology_split(keys, seqs, threshold=0.4, seed=3, search=search)
        assert report.search["mode"] == search
        cross = [ident[k] for k, (i, j) in enumerate(all_pairs) if report.split_of[i] != report.split_of[j]]
        assert max(cross) < 0.4
        assert max(report.max_cross_identity.values()) < 0.4
        assert sorted(set(report.split_of)) == ["test", "train", "val"]
    assert report.n_candidate_pairs == len(all_pairs) and report.as_dict()["note"] == "every pair of proteins was aligned"
    for name, best in report.max_cross_identity.items():
        a, b = name.split("-")
        brute = max(ident[k] for k, (i, j) in enumerate(all_pairs) if {report.split_of[i], report.split_of[j]} == {a, b})
        assert best == round(float(brute), 4)


def test_split_on_all_bundled_annotation_proteins(proteins):
    keys, seqs = [a for a, _ in proteins], [s for _, s in proteins]
    report = homology_split(keys, seqs, threshold=0.4, seed=0, search="prefilter")  # 758 proteins: exhaustive is minutes
    assert len(report.split_of) == len(keys) and report.n_clusters < len(keys)
    assert max(report.max_cross_identity.values()) < 0.4
    counts = {s: report.split_of.count(s) for s in ("train", "val", "test")}
    assert abs(counts["train"] / len(keys) - 0.8) < 0.05 and counts["val"] > 0 and counts["test"] > 0
    # members of one cluster share a split
    by_cluster: dict[int, set] = {}
    for c, s in zip(report.cluster_of, report.split_of):
        by_cluster.setdefault(c, set()).add(s)
    assert all(len(v) == 1 for v in by_cluster.values())


def test_split_is_deterministic_and_independent_of_input_order(proteins):
    sub = proteins[:120]
    keys, seqs = [a for a, _ in sub], [s for _, s in sub]
    base = dict(zip(keys, homology_split(keys, seqs, seed=5, search="prefilter").split_of))
    again = dict(zip(keys, homology_split(keys, seqs, seed=5, search="prefilter").split_of))
    order = list(range(len(sub)))
    random.Random(0).shuffle(order)
    shuffled = dict(zip([keys[i] for i in order], homology_split([keys[i] for i in order], [seqs[i] for i in order], seed=5,
                                                                 search="prefilter").split_of))
    other_seed = dict(zip(keys, homology_split(keys, seqs, seed=6, search="prefilter").split_of))
    assert base == again == shuffled
    assert base != other_seed


def test_identical_sequences_under_two_ids_share_a_split(proteins):
    keys = [a for a, _ in proteins[:60]] + ["COPY-OF-" + proteins[5][0]]
    seqs = [s for _, s in proteins[:60]] + [proteins[5][1]]
    report = homology_split(keys, seqs, seed=1)
    assert report.split_of[-1] == report.split_of[5] and report.cluster_of[-1] == report.cluster_of[5]


def test_assign_clusters_follows_ratios():
    keys = [f"P{i:04d}" for i in range(1000)]
    split = assign_clusters(list(range(1000)), keys, (0.6, 0.2, 0.2), seed=0)
    assert (split.count("train"), split.count("val"), split.count("test")) == (600, 200, 200)


def test_nearest_neighbour_finds_the_homolog(proteins):
    targets = [s for _, s in proteins[:100]]
    idx, ident = nearest_neighbour(_mutate(targets[42], 0.3, 4), targets)
    assert idx == 42 and ident > 0.6
    assert nearest_neighbour("MKV", []) == (None, 0.0)


def test_ray_alignment_matches_in_process(proteins, ray_local):
    seqs = [s for _, s in proteins[:80]]
    pairs = candidate_pairs(seqs)[:150]
    local = align_candidates(seqs, pairs, use_ray=False)
    remote = align_candidates(seqs, pairs, use_ray=True, rows_per_block=75)
    np.testing.assert_array_equal(local, remote)


def test_stratified_split_gives_every_split_its_share_of_structures(proteins):
    """The bundled proteins that have an AlphaFold/PDB structure reach every split in proportion,
    clusters stay whole and no cross-split pair reaches the threshold."""
    with gzip.open(data_path("derived", "overlap.csv.gz"), "rt") as fh:
        structured = {line.split(",")[0] for line in fh.read().splitlines()[1:]}
    keys, seqs = [a for a, _ in proteins], [s for _, s in proteins]
    strata = [int(a in structured) for a in keys]
    n_struct = sum(strata)
    assert n_struct >= 70  # the bundled AFDB/PDB proteins with an annotation
    report = homology_split(keys, seqs, threshold=0.4, seed=0, strata=strata, search="prefilter")
    assert max(report.max_cross_identity.values()) < 0.4
    by_cluster: dict[int, set] = {}
    for c, s in zip(report.cluster_of, report.split_of):
        by_cluster.setdefault(c, set()).add(s)
    assert all(len(v) == 1 for v in by_cluster.values())
    got = {s: sum(1 for k, x in enumerate(strata) if x and report.split_of[k] == s) for s in ("train", "val", "test")}
    assert got == report.strata["1"] and sum(got.values()) == n_struct
    # Within one largest structured cluster of the target share per split.
    biggest = max(sum(strata[i] for i, c in enumerate(report.cluster_of) if c == k) for k in by_cluster)
    for s, share in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
        assert abs(got[s] - share * n_struct) <= biggest + 1, (got, biggest)
    # The rest still follows the ratios overall.
    counts = {s: report.split_of.count(s) for s in ("train", "val", "test")}
    assert abs(counts["train"] / len(keys) - 0.8) < 0.05


def test_assign_clusters_strata_keep_clusters_whole():
    keys = [f"P{i:04d}" for i in range(200)]
    clusters = [i // 4 for i in range(200)]  # 50 clusters of 4
    strata = [1 if c < 10 and i % 4 == 0 else 0 for i, c in enumerate(clusters)]  # one structured member each
    split = assign_clusters(clusters, keys, (0.6, 0.2, 0.2), seed=0, strata=strata)
    for c in range(50):
        assert len({split[i] for i in range(200) if clusters[i] == c}) == 1
    structured_clusters = [split[4 * c] for c in range(10)]
    assert (structured_clusters.count("train"), structured_clusters.count("val"), structured_clusters.count("test")) == (6, 2, 2)
