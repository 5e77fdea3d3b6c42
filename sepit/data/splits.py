"""Homology-aware splits: cluster proteins by sequence identity, then split whole clusters.

Method (documented in ``docs/datasets.md``):

1. candidate pairs from the k-mer prefilter (:func:`sepit.data.identity.candidate_pairs`);
2. alignment identity of every candidate pair (in process, or as a Ray Data ``map_batches``
   step for large inputs);
3. single-linkage clustering: union-find over pairs with identity >= ``threshold``;
4. clusters visited in a seeded order keyed by their smallest protein id (so the result does not
   depend on input order) and each given to the split furthest below its target share of proteins;
   with ``strata`` (e.g. has-a-structure), a cluster's stratum is the highest of its members' and
   each stratum is filled towards the target shares on its own, so every split gets its share of
   the rare stratum (proteins with coordinates) while clusters stay whole: stratification never
   breaks the homology rule.

A protein is one entry of the ``keys`` list; it lands in exactly one split.  The report gives the
maximum identity between any two proteins of different splits *over the aligned candidate
pairs* (pairs the prefilter dropped were never aligned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from sepit.data.identity import PrefilterParams, candidate_pairs, pair_identities
from sepit.data.questions import rng_for

SPLITS = ("train", "val", "test")


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class SplitReport:
    split_of: list[str]
    """Split name per protein, aligned with the input keys."""
    cluster_of: list[int]
    """Cluster index per protein (clusters numbered by first appearance in key order)."""
    threshold: float
    n_clusters: int
    n_candidate_pairs: int
    n_pairs_at_threshold: int
    max_cross_identity: dict[str, float] = field(default_factory=dict)
    """``"train-test"`` etc. -> max identity over aligned candidate pairs across those splits."""
    max_cross_pair: dict[str, list[str]] = field(default_factory=dict)
    """The protein keys of that pair."""
    n_cross_pairs: dict[str, int] = field(default_factory=dict)
    """How many aligned candidate pairs straddle each pair of splits."""
    prefilter: dict = field(default_factory=dict)
    strata: dict[str, dict[str, int]] = field(default_factory=dict)
    """Stratum value -> proteins per split, when the split was stratified."""

    def as_dict(self) -> dict:
        return {
            "stratified_by": "has_structure" if self.strata else None, "proteins_per_stratum": self.strata,
            "method": "k-mer cosine prefilter -> semi-global BLOSUM62 alignment identity (identical "
                      "residues / shorter length) -> single-linkage clustering -> clusters to splits",
            "threshold": self.threshold, "n_clusters": self.n_clusters,
            "n_candidate_pairs_aligned": self.n_candidate_pairs, "n_pairs_at_or_above_threshold": self.n_pairs_at_threshold,
            "max_cross_split_identity": self.max_cross_identity, "max_cross_split_pair": self.max_cross_pair,
            "n_cross_split_pairs_aligned": self.n_cross_pairs, "prefilter": self.prefilter,
            "note": "maximum identity is over candidate pairs that passed the k-mer prefilter; pairs it "
                    "dropped were not aligned",
        }


def align_candidates(sequences: Sequence[str], pairs: np.ndarray, use_ray: bool = False,
                     rows_per_block: int = 2000) -> np.ndarray:
    """Identity of each candidate pair; with ``use_ray`` the pairs are aligned by Ray Data tasks."""
    if len(pairs) == 0:
        return np.empty(0, np.float32)
    if not use_ray:
        return pair_identities(sequences, pairs)
    import ray

    from sepit.ray_runtime import init_ray

    init_ray()
    seq_ref = ray.put(list(sequences))

    def align_batch(batch: dict) -> dict:
        seqs = ray.get(seq_ref)
        ij = np.stack([batch["i"], batch["j"]], axis=1)
        return {"row": batch["row"], "identity": pair_identities(seqs, ij)}

    table = {"row": np.arange(len(pairs)), "i": pairs[:, 0], "j": pairs[:, 1]}
    n_blocks = max(1, -(-len(pairs) // rows_per_block))
    ds = ray.data.from_items([{k: int(v[r]) for k, v in table.items()} for r in range(len(pairs))])
    ds = ds.repartition(n_blocks).map_batches(align_batch, batch_format="numpy")
    out = ds.to_pandas().sort_values("row")
    if len(out) != len(pairs):
        raise RuntimeError(f"Ray alignment returned {len(out)} of {len(pairs)} pairs")
    return out["identity"].to_numpy(np.float32)


def assign_clusters(cluster_of: Sequence[int], keys: Sequence[str], ratios: Sequence[float], seed: int,
                    strata: Sequence[int] | None = None) -> list[str]:
    """Split name per protein: whole clusters, seeded order, greedy fill towards ``ratios``,
    separately within each stratum (a cluster's stratum = the maximum over its members)."""
    ratios = np.asarray(ratios, float)
    members: dict[int, list[int]] = {}
    for idx, c in enumerate(cluster_of):
        members.setdefault(c, []).append(idx)
    stratum = {c: max(int(strata[i]) for i in m) if strata is not None else 0 for c, m in members.items()}
    order = sorted(members, key=lambda c: rng_for(seed, "cluster", min(keys[i] for i in members[c])).random())
    filled: dict[int, np.ndarray] = {}
    split_of = [""] * len(keys)
    for c in order:
        f = filled.setdefault(stratum[c], np.zeros(len(ratios)))
        # the split with the largest deficit against its target share (in this stratum) gets the cluster
        deficit = ratios * (f.sum() + len(members[c])) - f
        deficit[ratios == 0] = -np.inf
        s = int(np.argmax(deficit))
        f[s] += len(members[c])
        for i in members[c]:
            split_of[i] = SPLITS[s]
    return split_of


def homology_split(
    keys: Sequence[str], sequences: Sequence[str], threshold: float = 0.4,
    ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
    prefilter: PrefilterParams = PrefilterParams(), use_ray: bool = False,
    strata: Sequence[int] | None = None,
) -> SplitReport:
    """Cluster ``sequences`` at ``threshold`` identity and split the clusters by ``ratios``
    (within each stratum when ``strata`` is given, e.g. 1 for proteins with coordinates)."""
    if len(keys) != len(sequences):
        raise ValueError(f"{len(keys)} keys but {len(sequences)} sequences")
    if strata is not None and len(strata) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(strata)} strata")
    if len(set(keys)) != len(keys):
        raise ValueError("protein keys must be unique")
    pairs = candidate_pairs(sequences, prefilter)
    identities = align_candidates(sequences, pairs, use_ray=use_ray)
    uf = UnionFind(len(keys))
    linked = identities >= threshold
    for i, j in pairs[linked]:
        uf.union(int(i), int(j))
    roots = [uf.find(i) for i in range(len(keys))]
    renumber: dict[int, int] = {}
    cluster_of = [renumber.setdefault(r, len(renumber)) for r in roots]
    split_of = assign_clusters(cluster_of, keys, ratios, seed, strata)
    report = SplitReport(split_of, cluster_of, threshold, len(renumber), len(pairs), int(linked.sum()),
                         prefilter={"k": prefilter.k, "top_m": prefilter.top_m, "min_cosine": prefilter.min_cosine})
    if strata is not None:
        report.strata = {str(v): {s: sum(1 for k, x in enumerate(strata) if x == v and split_of[k] == s) for s in SPLITS}
                         for v in sorted(set(int(x) for x in strata))}
    for a_i, a in enumerate(SPLITS):
        for b in SPLITS[a_i + 1:]:
            name = f"{a}-{b}"
            best, best_pair, count = 0.0, [], 0
            for (i, j), ident in zip(pairs, identities):
                si, sj = split_of[i], split_of[j]
                if {si, sj} == {a, b}:
                    count += 1
                    if ident > best:
                        best, best_pair = float(ident), [keys[i], keys[j]]
            report.max_cross_identity[name] = round(best, 4)
            report.max_cross_pair[name] = best_pair
            report.n_cross_pairs[name] = count
    return report


def cross_split_violations(report: SplitReport) -> Optional[str]:
    """A message if any aligned cross-split pair reaches the threshold (must never happen)."""
    bad = {k: v for k, v in report.max_cross_identity.items() if v >= report.threshold}
    return f"cross-split identity at or above {report.threshold}: {bad}" if bad else None
