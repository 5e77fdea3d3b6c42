"""Homology-aware splits: cluster proteins by sequence identity, then split whole clusters.

Method (documented in ``docs/datasets.md``):

1. the pairs to align come from the homology search (:func:`sepit.data.homology.search_pairs`:
   every pair, the k-mer prefilter's candidates or MMseqs2's hits; ``auto`` picks by size);
2. alignment identity of each of those pairs (in process, or on Ray for large inputs);
3. single-linkage clustering: connected components of the graph of pairs with identity >=
   ``threshold`` (``scipy.sparse.csgraph.connected_components``);
4. clusters visited in a seeded order keyed by their smallest protein id (so the result does not
   depend on input order) and each given to the split furthest below its target share of proteins;
   with ``strata`` (e.g. has-a-structure), a cluster's stratum is the highest of its members' and
   each stratum is filled towards the target shares on its own, so every split gets its share of
   the rare stratum (proteins with coordinates) while clusters stay whole: stratification never
   breaks the homology rule.

A protein is one entry of the ``keys`` list; it lands in exactly one split.  The report gives the
maximum identity between any two proteins of different splits *over the aligned pairs*: every
pair in ``exhaustive`` mode, else only the pairs the search proposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from sepit.data.homology import EXHAUSTIVE_MAX_PROTEINS, search_pairs
from sepit.data.identity import PrefilterParams, alignment_progress, pair_identities
from sepit.data.mmseqs import MmseqsParams
from sepit.data.questions import rng_for

SPLITS = ("train", "val", "test")

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
    search: dict = field(default_factory=dict)
    """The homology search that ran (:meth:`sepit.data.homology.PairSearch.info`)."""

    def as_dict(self) -> dict:
        mode = self.search.get("mode", "prefilter")
        found_by = {"exhaustive": "every pair aligned (exhaustive)",
                    "prefilter": "k-mer cosine prefilter candidates",
                    "mmseqs": "MMseqs2 all-against-all hits"}[mode]
        over = ("every pair of proteins was aligned" if mode == "exhaustive" else
                f"maximum identity is over the pairs the {mode} search proposed; pairs it dropped were not aligned")
        return {
            "stratified_by": "has_structure" if self.strata else None, "proteins_per_stratum": self.strata,
            "method": f"{found_by} -> semi-global BLOSUM62 alignment identity (identical residues / shorter "
                      "length) -> single-linkage clustering -> clusters to splits",
            "threshold": self.threshold, "n_clusters": self.n_clusters,
            "n_candidate_pairs_aligned": self.n_candidate_pairs, "n_pairs_at_or_above_threshold": self.n_pairs_at_threshold,
            "max_cross_split_identity": self.max_cross_identity, "max_cross_split_pair": self.max_cross_pair,
            "n_cross_split_pairs_aligned": self.n_cross_pairs, "homology_search": self.search,
            "prefilter": self.prefilter if mode == "prefilter" else None, "note": over,
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
    import pandas as pd

    parts, done = [], 0
    bar = alignment_progress(len(pairs), "align candidate pairs (Ray)")
    for part in ds.iter_batches(batch_size=None, batch_format="pandas"):  # one block at a time, as they finish
        parts.append(part)
        done += len(part)
        if bar is not None:
            bar.update(done)
    if bar is not None:
        bar.close()
    out = pd.concat(parts).sort_values("row")
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
    strata: Sequence[int] | None = None, search: str = "auto", mmseqs: MmseqsParams = MmseqsParams(),
    exhaustive_max_proteins: int = EXHAUSTIVE_MAX_PROTEINS,
) -> SplitReport:
    """Cluster ``sequences`` at ``threshold`` identity and split the clusters by ``ratios``
    (within each stratum when ``strata`` is given, e.g. 1 for proteins with coordinates).
    ``search`` picks the pairs that are aligned (:data:`sepit.data.homology.SEARCH_MODES`)."""
    if len(keys) != len(sequences):
        raise ValueError(f"{len(keys)} keys but {len(sequences)} sequences")
    if strata is not None and len(strata) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(strata)} strata")
    if len(set(keys)) != len(keys):
        raise ValueError("protein keys must be unique")
    found = search_pairs(sequences, search, prefilter=prefilter, mmseqs=mmseqs, use_ray=use_ray,
                         exhaustive_max_proteins=exhaustive_max_proteins)
    pairs, identities = found.pairs, found.identities
    linked = identities >= threshold
    cluster_of = single_linkage(len(keys), pairs[linked])
    split_of = assign_clusters(cluster_of.tolist(), keys, ratios, seed, strata)
    report = SplitReport(split_of, cluster_of.tolist(), threshold, int(cluster_of.max(initial=-1)) + 1, len(pairs),
                         int(linked.sum()), search=found.info(),
                         prefilter={"k": prefilter.k, "top_m": prefilter.top_m, "min_cosine": prefilter.min_cosine})
    if strata is not None:
        report.strata = {str(v): {s: sum(1 for k, x in enumerate(strata) if x == v and split_of[k] == s) for s in SPLITS}
                         for v in sorted(set(int(x) for x in strata))}
    cross = cross_split_pairs(pairs, identities, split_of, keys)
    for name, (best, best_pair, count) in cross.items():
        report.max_cross_identity[name] = round(best, 4)
        report.max_cross_pair[name] = best_pair
        report.n_cross_pairs[name] = count
    return report


def single_linkage(n: int, linked_pairs: np.ndarray) -> np.ndarray:
    """Cluster index per item (int64 ``[n]``): connected components of the graph whose edges are
    ``linked_pairs`` (``[m, 2]``), numbered by first appearance in item order."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    linked_pairs = np.asarray(linked_pairs, np.int64).reshape(-1, 2)
    graph = sp.coo_matrix((np.ones(len(linked_pairs), np.int8), (linked_pairs[:, 0], linked_pairs[:, 1])), shape=(n, n))
    _count, labels = connected_components(graph, directed=False)
    # renumber: the component of item 0 is 0, the next new component met in item order is 1, ...
    _uniq, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[labels]


def cross_split_pairs(pairs: np.ndarray, identities: np.ndarray, split_of: Sequence[str],
                      keys: Sequence[str]) -> dict[str, tuple[float, list[str], int]]:
    """``"train-val"`` etc. -> (maximum identity over aligned pairs straddling those two splits,
    that pair's keys (the first such pair in ``pairs`` order; [] when none is above 0), how many
    aligned pairs straddle them)."""
    code = {s: k for k, s in enumerate(SPLITS)}
    split_idx = np.array([code[s] for s in split_of], np.int64)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    si, sj = split_idx[pairs[:, 0]], split_idx[pairs[:, 1]]
    lo, hi = np.minimum(si, sj), np.maximum(si, sj)
    out: dict[str, tuple[float, list[str], int]] = {}
    for a_i, a in enumerate(SPLITS):
        for b_i in range(a_i + 1, len(SPLITS)):
            rows = np.flatnonzero((lo == a_i) & (hi == b_i))
            best, best_pair = 0.0, []
            if len(rows):
                top = rows[int(np.argmax(identities[rows]))]  # first pair reaching the maximum
                if identities[top] > 0:
                    best, best_pair = float(identities[top]), [keys[pairs[top, 0]], keys[pairs[top, 1]]]
            out[f"{a}-{SPLITS[b_i]}"] = (best, best_pair, int(len(rows)))
    return out


def cross_split_violations(report: SplitReport) -> Optional[str]:
    """A message if any aligned cross-split pair reaches the threshold (must never happen)."""
    bad = {k: v for k, v in report.max_cross_identity.items() if v >= report.threshold}
    return f"cross-split identity at or above {report.threshold}: {bad}" if bad else None
