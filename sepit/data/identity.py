"""Sequence identity: a k-mer diagonal prefilter, then alignment identity on the survivors.

Identity of two sequences (:func:`sequence_identity`) is the number of identical aligned
residue pairs divided by the length of the *shorter* sequence (the CD-HIT convention: a
fragment contained in a longer protein has identity 1.0).  The alignment is global with free
end gaps (semi-global), BLOSUM62, gap open 11 / extend 1 (BLAST's protein defaults), computed
by parasail's SIMD semi-global aligner with statistics (``sg_stats_striped_16``: the match count
of the optimal path, no traceback), about 40x faster than a traceback aligner.  For unrelated
sequences several paths share the optimal score and the count depends on which is taken; for
homologs (the pairs that matter) the paths and counts agree.  :func:`aligner` (Biopython, with
traceback, same scoring) serves code that needs the aligned positions themselves.

Which pairs are aligned is the homology search's choice (:mod:`sepit.data.homology`):
:func:`exhaustive_identities` aligns every pair (row by row, with progress); :func:`candidate_pairs` is the fast k-mer prefilter, which ranks pairs by the cosine
similarity of their k-mer sets (a sparse matrix product, computed in row blocks) and keeps, for
every sequence, its ``top_m`` most similar partners plus every pair above ``min_cosine``.  The
prefilter misses weak homologs (``docs/datasets.md`` gives each mode's recall measured against
exhaustive alignment on the bundled data).  Alignment loops of at least
:data:`PROGRESS_MIN_PAIRS` pairs show a console progress display (:class:`sepit.console.Progress`:
a tqdm bar on a terminal, one line per update at most every 15 s otherwise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

STANDARD = "ACDEFGHIKLMNPQRSTVWY"
_LUT = np.full(256, -1, np.int64)
for _i, _c in enumerate(STANDARD):
    _LUT[ord(_c)] = _i
# BLOSUM62 (as shipped by Biopython) has B, Z, X but not U, O, J: map them to their closest
# standard residue for scoring only (selenocysteine ~ C, pyrrolysine ~ K, J = I/L).
ALIGN_TRANSLATE = str.maketrans({"U": "C", "O": "K", "J": "L"})
GAP_OPEN, GAP_EXTEND = 11, 1


@dataclass(frozen=True)
class PrefilterParams:
    k: int = 3
    """k-mer length (residues)."""
    top_m: int = 10
    """Each sequence keeps its ``top_m`` most k-mer-similar partners as candidates."""
    min_cosine: float = 0.3
    """Pairs whose k-mer-set cosine similarity reaches this are candidates whatever their rank."""
    block: int = 1024
    """Rows per block of the sparse similarity product (bounds memory at block x n floats)."""

    def __post_init__(self) -> None:
        if not 2 <= self.k <= 6:
            raise ValueError(f"k={self.k} must be between 2 and 6")
        if self.top_m < 0 or self.block < 1:
            raise ValueError("top_m must be >= 0 and block >= 1")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine={self.min_cosine} must be in (0, 1]")


@lru_cache(maxsize=1)
def aligner():
    """The shared semi-global BLOSUM62 aligner (built once per process)."""
    from Bio.Align import PairwiseAligner, substitution_matrices

    al = PairwiseAligner(mode="global", substitution_matrix=substitution_matrices.load("BLOSUM62"))
    al.open_gap_score = -float(GAP_OPEN)
    al.extend_gap_score = -float(GAP_EXTEND)
    al.end_gap_score = 0.0  # free end gaps: fragments align inside full-length proteins
    return al


def sequence_identity(a: str, b: str) -> float:
    """Identical aligned residues / length of the shorter sequence, in [0, 1]."""
    if not a or not b:
        return 0.0
    if a == b or (len(a) <= len(b) and a in b) or (len(b) < len(a) and b in a):
        return 1.0
    import parasail

    result = parasail.sg_stats_striped_16(
        a.translate(ALIGN_TRANSLATE), b.translate(ALIGN_TRANSLATE), GAP_OPEN, GAP_EXTEND, parasail.blosum62)
    return result.matches / min(len(a), len(b))


#: Alignment work below this many pairs shows no progress display (it takes a second or two).
PROGRESS_MIN_PAIRS = 20_000


def alignment_progress(total: int, label: Optional[str]):
    """A console progress display for ``total`` pairs; None when the work is too small to show or
    ``label`` is None (a Ray task: the driver shows the progress)."""
    if label is None or total < PROGRESS_MIN_PAIRS:
        return None
    from sepit.console import Progress

    return Progress(label, total, "pairs", start=0)


def pair_identities(sequences: Sequence[str], pairs: np.ndarray, label: Optional[str] = "align candidate pairs") -> np.ndarray:
    """Identity for each ``(i, j)`` row of ``pairs`` (float32 array, same order)."""
    pairs = np.asarray(pairs)
    out = np.empty(len(pairs), np.float32)
    bar, t0 = alignment_progress(len(pairs), label), time.time()
    for r, (i, j) in enumerate(pairs):
        out[r] = sequence_identity(sequences[i], sequences[j])
        if bar is not None and (r + 1) % 2000 == 0:
            bar.update(r + 1, **{"pairs/s": (r + 1) / max(time.time() - t0, 1e-9)})
    if bar is not None:
        bar.update(len(pairs), **{"pairs/s": len(pairs) / max(time.time() - t0, 1e-9)})
        bar.close()
    return out


def row_identities(sequences: Sequence[str], i: int) -> np.ndarray:
    """Identity of sequence ``i`` with every later sequence ``j > i`` (float32, ``j`` order).

    One :func:`sequence_identity` call per pair.  (parasail's query-profile API, which would
    reuse sequence ``i``'s profile for all its targets, segfaults in parasail 1.3.4's Python
    bindings for every ``*_profile_*`` aligner tried, so it is not used.)
    """
    a = sequences[i]
    return np.array([sequence_identity(a, b) for b in sequences[i + 1:]], np.float32)


def all_pairs(n: int, r0: int = 0, r1: Optional[int] = None) -> np.ndarray:
    """``[m, 2]`` int64 pairs ``(i, j)``, ``r0 <= i < r1``, ``i < j < n``, in row-major order."""
    r1 = n if r1 is None else r1
    rows = [np.stack([np.full(n - i - 1, i), np.arange(i + 1, n)], axis=1) for i in range(r0, min(r1, n))]
    return np.concatenate(rows).astype(np.int64) if rows else np.empty((0, 2), np.int64)


def exhaustive_identities(sequences: Sequence[str], r0: int = 0, r1: Optional[int] = None,
                          label: Optional[str] = "align all pairs") -> np.ndarray:
    """Identity of every pair ``(i, j)`` with ``r0 <= i < r1`` and ``i < j`` (float32, in the order of
    :func:`all_pairs`): no prefilter, so no pair at any identity is missed."""
    n = len(sequences)
    r1 = n if r1 is None else min(r1, n)
    total = sum(n - i - 1 for i in range(r0, r1))
    bar, t0, done, rows = alignment_progress(total, label), time.time(), 0, []
    for i in range(r0, r1):
        rows.append(row_identities(sequences, i))
        done += len(rows[-1])
        if bar is not None:
            bar.update(done, **{"pairs/s": done / max(time.time() - t0, 1e-9)})
    if bar is not None:
        bar.close()
    return np.concatenate(rows) if rows else np.empty(0, np.float32)


def _kmer_codes(seq: str, k: int) -> np.ndarray:
    """Distinct codes of the k-mers of ``seq`` made only of the 20 standard residues."""
    a = _LUT[np.frombuffer(seq.encode("ascii", "replace"), np.uint8)]
    if len(a) < k:
        return np.empty(0, np.int64)
    win = np.lib.stride_tricks.sliding_window_view(a, k)
    ok = (win >= 0).all(axis=1)
    codes = (win[ok] * (20 ** np.arange(k - 1, -1, -1))).sum(axis=1)
    return np.unique(codes)


def kmer_matrix(sequences: Sequence[str], k: int):
    """Sparse ``[n, 20^k]`` 0/1 matrix of k-mer presence, rows L2-normalised (float32 CSR)."""
    import scipy.sparse as sp

    rows, cols = [], []
    for i, s in enumerate(sequences):
        c = _kmer_codes(s, k)
        rows.append(np.full(len(c), i, np.int64))
        cols.append(c)
    rows_a = np.concatenate(rows) if rows else np.empty(0, np.int64)
    cols_a = np.concatenate(cols) if cols else np.empty(0, np.int64)
    counts = np.bincount(rows_a, minlength=len(sequences)).astype(np.float32)
    vals = 1.0 / np.sqrt(np.maximum(counts[rows_a], 1.0))
    return sp.csr_matrix((vals.astype(np.float32), (rows_a, cols_a)), shape=(len(sequences), 20 ** k))


def candidate_pairs(sequences: Sequence[str], params: PrefilterParams = PrefilterParams()) -> np.ndarray:
    """``[m, 2]`` int64 array of pairs ``i < j`` worth aligning, sorted.

    A pair is a candidate when the cosine similarity of the two k-mer sets reaches
    ``min_cosine`` or when either sequence ranks the other among its ``top_m`` most similar.
    Identical sequences always pass (cosine 1).
    """
    n = len(sequences)
    if n < 2:
        return np.empty((0, 2), np.int64)
    X = kmer_matrix(sequences, params.k)
    XT = X.T.tocsc()
    found = []
    m = min(params.top_m, n - 1)
    for r0 in range(0, n, params.block):
        sim = (X[r0:r0 + params.block] @ XT).toarray()  # [block, n] cosine similarities
        rows = np.arange(sim.shape[0])
        sim[rows, rows + r0] = -1.0  # never pair a sequence with itself
        hi_r, hi_c = np.nonzero(sim >= params.min_cosine)
        found.append(np.stack([hi_r + r0, hi_c], axis=1))
        if m > 0:
            top = np.argpartition(-sim, m - 1, axis=1)[:, :m]
            keep = np.take_along_axis(sim, top, axis=1) > 0
            found.append(np.stack([np.repeat(rows + r0, m)[keep.ravel()], top.ravel()[keep.ravel()]], axis=1))
    pairs = np.concatenate(found).astype(np.int64)
    pairs = np.sort(pairs, axis=1)
    pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)
    return pairs


def nearest_neighbour(
    query: str, targets: Sequence[str], k: int = 3, max_candidates: int = 20,
) -> tuple[Optional[int], float]:
    """(index of the most identical target, its identity); (None, 0.0) for no targets.

    The ``max_candidates`` targets with the most similar k-mer sets are aligned; used by
    baselines that answer with the nearest training protein's text.
    """
    if not targets:
        return None, 0.0
    X = kmer_matrix([query, *targets], k)
    sim = (X[0] @ X[1:].T).toarray().ravel()
    order = np.argsort(-sim, kind="stable")[:max_candidates]
    best, best_id = None, -1.0
    for idx in order:
        ident = sequence_identity(query, targets[idx])
        if ident > best_id:
            best, best_id = int(idx), ident
    return best, max(best_id, 0.0)
