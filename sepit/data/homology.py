"""Which protein pairs get aligned before clustering: the homology search modes.

* ``exhaustive``: every pair ``i < j`` is aligned, so every pair at or above any identity is
  found (recall 1.0 by construction).  Quadratic: ``n (n - 1) / 2`` alignments.
* ``prefilter``: pairs ranked by the cosine similarity of their 3-mer sets
  (:func:`sepit.data.identity.candidate_pairs`) are aligned; fast, misses weak homologs.
* ``mmseqs``: pairs reported by an all-against-all MMseqs2 search (:mod:`sepit.data.mmseqs`)
  are aligned; fast and sensitive, needs the ``mmseqs`` binary.
* ``auto``: ``exhaustive`` up to ``exhaustive_max_proteins`` proteins, else ``mmseqs`` when the
  binary is found, else ``prefilter`` with a warning line on stderr.

Every mode returns the project's own identity (:func:`sepit.data.identity.sequence_identity`)
for the pairs it aligned; only which pairs differs.  ``evals/homology_recall.py`` measures each
mode's recall against ``exhaustive`` on the bundled proteins (``docs/datasets.md``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sepit.data.identity import PrefilterParams, all_pairs, candidate_pairs, exhaustive_identities, pair_identities
from sepit.data.mmseqs import INSTALL_HINT, MmseqsParams, find_mmseqs, mmseqs_hit_pairs

SEARCH_MODES = ("auto", "exhaustive", "prefilter", "mmseqs")
#: ``auto`` aligns every pair up to this many proteins: 300 proteins are 44,850 pairs, ~17 s on one
#: core of the 2-core box at the ~2,600 pairs/s measured on bundled proteins (quiet box); cost grows
#: with n^2 (1,500 proteins: ~7 min quiet, 26 min measured on the loaded box,
#: evals/results/homology_recall.json).  The test suite's builds above 300 proteins keep their cost.
EXHAUSTIVE_MAX_PROTEINS = 300


@dataclass
class PairSearch:
    pairs: np.ndarray
    """``[m, 2]`` int64 pairs ``i < j`` that were aligned."""
    identities: np.ndarray
    """``[m]`` float32 identity of each pair."""
    mode: str
    """The mode that ran (``auto`` resolved)."""
    requested: str
    reason: str
    """Why this mode ran."""
    wall_s: float

    def info(self) -> dict:
        return {"mode": self.mode, "requested": self.requested, "reason": self.reason,
                "n_pairs_aligned": int(len(self.pairs)), "wall_s": round(self.wall_s, 2)}


def resolve_mode(requested: str, n_proteins: int, exhaustive_max_proteins: int = EXHAUSTIVE_MAX_PROTEINS) -> tuple[str, str]:
    """(mode to run, reason) for ``requested`` on ``n_proteins`` proteins."""
    if requested not in SEARCH_MODES:
        raise ValueError(f"homology search mode {requested!r} is not one of {list(SEARCH_MODES)}")
    if requested != "auto":
        return requested, "asked for"
    if n_proteins <= exhaustive_max_proteins:
        return "exhaustive", f"{n_proteins} proteins <= exhaustive_max_proteins={exhaustive_max_proteins}"
    if find_mmseqs() is not None:
        return "mmseqs", f"{n_proteins} proteins > exhaustive_max_proteins={exhaustive_max_proteins}; mmseqs found"
    return "prefilter", (f"{n_proteins} proteins > exhaustive_max_proteins={exhaustive_max_proteins} and no mmseqs "
                         "binary: k-mer prefilter, which misses weak homologs")


def _align_rows(sequences: Sequence[str], r0: int, r1: int) -> np.ndarray:
    return exhaustive_identities(sequences, r0, r1, label=None)


def _exhaustive_on_ray(sequences: Sequence[str], n_blocks: int) -> np.ndarray:
    """:func:`exhaustive_identities` split into row blocks of about equal pair counts, one Ray
    task each; same values, same order."""
    import ray

    from sepit.console import Progress
    from sepit.ray_runtime import init_ray

    init_ray()
    n = len(sequences)
    per_row = np.arange(n - 1, -1, -1)  # pairs in row i
    cum = np.cumsum(per_row)
    total = int(cum[-1]) if n else 0
    edges = sorted({0, n, *(int(np.searchsorted(cum, total * b / n_blocks)) + 1 for b in range(1, n_blocks))})
    seq_ref = ray.put(list(sequences))
    align = ray.remote(num_cpus=1)(_align_rows)
    futures = {align.remote(seq_ref, r0, r1): k for k, (r0, r1) in enumerate(zip(edges[:-1], edges[1:]))}
    parts: dict[int, np.ndarray] = {}
    t0 = time.time()
    with Progress("align all pairs (Ray)", total, "pairs", start=0) as bar:
        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            parts[futures[ready[0]]] = ray.get(ready[0])
            done = sum(len(p) for p in parts.values())
            bar.update(done, **{"pairs/s": done / max(time.time() - t0, 1e-9)})
    return np.concatenate([parts[k] for k in range(len(parts))]) if parts else np.empty(0, np.float32)


def search_pairs(
    sequences: Sequence[str], mode: str = "auto", *, prefilter: PrefilterParams = PrefilterParams(),
    mmseqs: MmseqsParams = MmseqsParams(), use_ray: bool = False,
    exhaustive_max_proteins: int = EXHAUSTIVE_MAX_PROTEINS, ray_blocks: int = 16,
) -> PairSearch:
    """Align the pairs that ``mode`` selects; see the module docstring for the modes."""
    from sepit.data.splits import align_candidates

    t0 = time.time()
    ran, reason = resolve_mode(mode, len(sequences), exhaustive_max_proteins)
    if mode == "auto" and ran == "prefilter":
        print(f"warning: homology search: {reason}; for every close pair {INSTALL_HINT}, or set "
              "homology=exhaustive (all pairs, quadratic time)", file=sys.stderr, flush=True)
    if ran == "exhaustive":
        pairs = all_pairs(len(sequences))
        identities = (_exhaustive_on_ray(sequences, ray_blocks) if use_ray and len(pairs)
                      else exhaustive_identities(sequences))
    elif ran == "prefilter":
        pairs = candidate_pairs(sequences, prefilter)
        identities = align_candidates(sequences, pairs, use_ray=use_ray)
    else:
        pairs = mmseqs_hit_pairs(sequences, mmseqs)
        identities = (align_candidates(sequences, pairs, use_ray=use_ray) if use_ray
                      else pair_identities(sequences, pairs, label="align MMseqs2 hit pairs"))
    return PairSearch(pairs, identities, ran, mode, reason, time.time() - t0)
