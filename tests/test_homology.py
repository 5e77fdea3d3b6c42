"""Homology search modes: exhaustive alignment, MMseqs2 hits, mode choice, clustering and the
cross-split check, on real bundled sequences (plus planted homologs)."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from sepit.config.base import ConfigError
from sepit.data import identity
from sepit.data.homology import resolve_mode, search_pairs
from sepit.data.identity import all_pairs, exhaustive_identities, pair_identities
from sepit.data.mmseqs import MMSEQS_ENV, MmseqsNotFound, MmseqsParams, find_mmseqs
from sepit.data.splits import SPLITS, cross_split_pairs, single_linkage
from sepit.resources import data_path


@pytest.fixture(scope="module")
def sequences():
    """60 bundled proteins (cut to 300 residues, so the tests stay fast) + planted relatives:
    a ~55%-identity mutant, an exact copy, a fragment, and a ~45%-identity mutant."""
    seen, out = set(), []
    with gzip.open(data_path("derived", "proteins.jsonl.gz"), "rt") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("sequence") and row["accession"] not in seen:
                seen.add(row["accession"])
                out.append((row["accession"], row["sequence"][:300]))
    seqs = [s for _a, s in sorted(out)[:60]]
    return seqs + [_mutate(seqs[3], 0.5, 1), seqs[7], seqs[11][40:160], _mutate(seqs[20], 0.6, 2)]


def _mutate(seq: str, share: float, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") if rng.random() < share else c for c in seq)


class UnionFind:
    """The union-find the splits used before connected_components (the reference here)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def union_find_clusters(n: int, pairs) -> list[int]:
    uf = UnionFind(n)
    for i, j in pairs:
        uf.union(int(i), int(j))
    renumber: dict[int, int] = {}
    return [renumber.setdefault(uf.find(i), len(renumber)) for i in range(n)]


def loop_cross_split(pairs, identities, split_of, keys) -> dict:
    """The per-pair loop the vectorised cross-split check replaced (the reference here)."""
    out = {}
    for a_i, a in enumerate(SPLITS):
        for b in SPLITS[a_i + 1:]:
            best, best_pair, count = 0.0, [], 0
            for (i, j), ident in zip(pairs, identities):
                if {split_of[i], split_of[j]} == {a, b}:
                    count += 1
                    if ident > best:
                        best, best_pair = float(ident), [keys[i], keys[j]]
            out[f"{a}-{b}"] = (best, best_pair, count)
    return out


def test_exhaustive_equals_brute_force_over_every_pair(sequences):
    n = len(sequences)
    brute = np.array([[i, j] for i in range(n) for j in range(i + 1, n)])
    np.testing.assert_array_equal(all_pairs(n), brute)
    expected = pair_identities(sequences, brute)  # one sequence_identity call per pair
    got = exhaustive_identities(sequences)
    np.testing.assert_array_equal(got, expected)
    # the planted relatives are among the pairs at >= 0.4
    close = {tuple(p) for p in brute[got >= 0.4].tolist()}
    assert {(3, 60), (7, 61), (11, 62), (20, 63)} <= close
    found = search_pairs(sequences, "exhaustive")
    assert found.mode == "exhaustive" and found.info()["n_pairs_aligned"] == len(brute)
    np.testing.assert_array_equal(found.pairs, brute)
    # a block of rows gives the same values as that slice of the whole
    rows = exhaustive_identities(sequences, 10, 20)
    sel = (brute[:, 0] >= 10) & (brute[:, 0] < 20)
    np.testing.assert_array_equal(rows, expected[sel])


def test_connected_components_equal_union_find(sequences):
    rng = np.random.default_rng(0)
    for n, m in ((1, 0), (5, 0), (300, 150), (300, 400), (2000, 1800)):
        pairs = np.sort(rng.integers(0, n, size=(m, 2)), axis=1)
        assert single_linkage(n, pairs).tolist() == union_find_clusters(n, pairs)
    n = len(sequences)
    pairs = all_pairs(n)
    linked = pairs[exhaustive_identities(sequences) >= 0.4]
    clusters = single_linkage(n, linked)
    assert clusters.tolist() == union_find_clusters(n, linked) and clusters.max() + 1 < n


def test_vectorised_cross_split_check_equals_the_loop():
    rng = np.random.default_rng(1)
    n = 200
    keys = [f"P{i:03d}" for i in range(n)]
    split_of = [SPLITS[k] for k in rng.choice(3, size=n, p=[0.7, 0.2, 0.1])]
    pairs = np.unique(np.sort(rng.integers(0, n, size=(3000, 2)), axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    identities = np.round(rng.random(len(pairs)), 2).astype(np.float32)  # ties: the first pair wins
    assert cross_split_pairs(pairs, identities, split_of, keys) == loop_cross_split(pairs, identities, split_of, keys)
    zeros = np.zeros(len(pairs), np.float32)
    assert cross_split_pairs(pairs, zeros, split_of, keys) == loop_cross_split(pairs, zeros, split_of, keys)
    one_split = ["train"] * n
    assert cross_split_pairs(pairs, identities, one_split, keys) == loop_cross_split(pairs, identities, one_split, keys)


def test_auto_mode_by_size_and_binary(sequences, monkeypatch, capsys):
    assert resolve_mode("auto", 1500, 1500)[0] == "exhaustive"
    assert resolve_mode("prefilter", 10, 1500) == ("prefilter", "asked for")
    with pytest.raises(ValueError, match="not one of"):
        resolve_mode("blast", 10)
    monkeypatch.setenv(MMSEQS_ENV, "/nonexistent/mmseqs")
    mode, reason = resolve_mode("auto", 1501, 1500)
    assert mode == "prefilter" and "no mmseqs" in reason
    found = search_pairs(sequences, "auto", exhaustive_max_proteins=10)
    assert found.mode == "prefilter" and found.requested == "auto"
    err = capsys.readouterr().err
    assert err.startswith("warning: homology search:") and "apt-get install -y mmseqs2" in err
    with pytest.raises(MmseqsNotFound, match="apt-get install -y mmseqs2"):
        search_pairs(sequences, "mmseqs")
    with pytest.raises(ConfigError, match="homology"):
        from sepit.data.build import BuildConfig

        BuildConfig(homology="blast")


def test_progress_lines_when_not_a_terminal(sequences, monkeypatch, capsys):
    monkeypatch.setattr(identity, "PROGRESS_MIN_PAIRS", 100)
    exhaustive_identities(sequences[:30])
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("\r" not in ln for ln in lines)
    assert lines[-1].strip().startswith("align all pairs  435/435 pairs (100%)") and "pairs/s" in lines[-1]


@pytest.mark.skipif(find_mmseqs() is None, reason="mmseqs binary not installed (apt-get install -y mmseqs2)")
def test_mmseqs_hits_are_realigned_with_our_identity(sequences):
    # k=5: the default k=6 index table (21^6 entries) costs seconds that 64 proteins never amortise
    found = search_pairs(sequences, "mmseqs", mmseqs=MmseqsParams(kmer=5, threads=1))
    assert found.mode == "mmseqs" and len(found.pairs)
    np.testing.assert_array_equal(found.identities, pair_identities(sequences, found.pairs))
    hits = {tuple(p) for p in found.pairs.tolist()}
    assert {(3, 60), (7, 61), (11, 62), (20, 63)} <= hits
    # every pair exhaustive alignment puts at >= 0.4 here is among MMseqs2's hits
    brute = all_pairs(len(sequences))
    close = {tuple(p) for p in brute[exhaustive_identities(sequences) >= 0.4].tolist()}
    assert close <= hits


def test_exhaustive_on_ray_equals_in_process(sequences, ray_local):
    seqs = sequences[:40]
    local = exhaustive_identities(seqs)
    remote = search_pairs(seqs, "exhaustive", use_ray=True, ray_blocks=2)
    np.testing.assert_array_equal(remote.identities, local)
