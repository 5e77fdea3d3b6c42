"""MMseqs2 as the candidate search for large protein sets: which pairs are worth aligning.

MMseqs2 (Steinegger & Soeding 2017) finds homologs with spaced, *similar* (not only identical)
k-mer matches, an ungapped and then a gapped local alignment, in C++ with SIMD and threads.  Here
it only proposes pairs: every hit ``(query, target)`` of an all-against-all ``mmseqs easy-search``
is re-aligned by :func:`sepit.data.identity.pair_identities`, so the identity that decides
clusters is the project's one (identical residues / shorter length, semi-global) in every mode.
MMseqs2's own ``fident`` is identical residues / *alignment columns* of its *local* alignment,
so it is higher than ours for a short local hit inside two longer proteins and cannot be
compared with the threshold directly; its hit list is what we use.

Install: ``apt-get install -y mmseqs2`` (Debian bookworm ships release 14-7e284, 24 MB download,
about 10 s to install), or any ``mmseqs`` binary on ``PATH``, or ``SEPIT_MMSEQS=/path/to/mmseqs``.
Without one, :func:`find_mmseqs` returns None and :func:`mmseqs_hit_pairs` raises
:class:`MmseqsNotFound` saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sepit.errors import SepitError

#: Environment variable naming the mmseqs binary (else ``mmseqs`` on PATH).
MMSEQS_ENV = "SEPIT_MMSEQS"
INSTALL_HINT = ("install MMseqs2 (Debian/Ubuntu: `apt-get install -y mmseqs2`), put `mmseqs` on PATH "
                f"or set {MMSEQS_ENV}=/path/to/mmseqs")


class MmseqsNotFound(SepitError, FileNotFoundError):
    """The MMseqs2 search was asked for but no ``mmseqs`` binary can be found."""


class MmseqsError(SepitError, RuntimeError):
    """``mmseqs`` ran and failed."""


@dataclass(frozen=True)
class MmseqsParams:
    sensitivity: float = 7.5
    """``-s``: 1 (fast) .. 7.5 (most sensitive); more similar k-mers per position are tried."""
    max_seqs: int = 1000
    """``--max-seqs``: hits kept per query after the prefilter (MMseqs2's default is 300)."""
    evalue: float = 1000.0
    """``-e``: hits up to this E-value are reported.  Loose on purpose: our own alignment then
    decides, and a 60-residue protein at 40% identity has a weak E-value."""
    kmer: int = 0
    """``-k``: k-mer length of the prefilter index; 0 = MMseqs2's choice (6 or 7 here).  Its index
    table has 21^k entries, a fixed cost of seconds (k=6: ~85 M) that small sets do not amortise."""
    threads: int = 0
    """``--threads``; 0 = every CPU of this machine."""

    def __post_init__(self) -> None:
        if not 1.0 <= self.sensitivity <= 7.5:
            raise ValueError(f"sensitivity={self.sensitivity} must be in [1, 7.5]")
        if self.max_seqs < 1 or self.evalue <= 0 or self.threads < 0 or self.kmer not in (0, *range(5, 8)):
            raise ValueError("max_seqs must be >= 1, evalue > 0, threads >= 0 and kmer 0 or 5-7")


def find_mmseqs() -> Optional[str]:
    """Path of the mmseqs binary (``$SEPIT_MMSEQS``, else ``mmseqs`` on PATH), or None."""
    named = os.environ.get(MMSEQS_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("mmseqs")


def _write_fasta(path: Path, sequences: Sequence[str]) -> None:
    with open(path, "w") as fh:
        for i, s in enumerate(sequences):
            if s:  # an empty sequence has identity 0 with everything
                fh.write(f">{i}\n{s}\n")


def mmseqs_hit_pairs(sequences: Sequence[str], params: MmseqsParams = MmseqsParams(),
                     binary: Optional[str] = None) -> np.ndarray:
    """``[m, 2]`` int64 array of pairs ``i < j`` that an all-against-all MMseqs2 search reports
    (either direction), sorted and unique."""
    binary = binary or find_mmseqs()
    if binary is None:
        raise MmseqsNotFound(f"the MMseqs2 homology search needs the mmseqs binary: {INSTALL_HINT}")
    if len(sequences) < 2:
        return np.empty((0, 2), np.int64)
    with tempfile.TemporaryDirectory(prefix="sepit-mmseqs-") as tmp:
        d = Path(tmp)
        _write_fasta(d / "seqs.fasta", sequences)
        cmd = [binary, "easy-search", str(d / "seqs.fasta"), str(d / "seqs.fasta"), str(d / "hits.tsv"), str(d / "work"),
               "-s", str(params.sensitivity), "--max-seqs", str(params.max_seqs), "-e", str(params.evalue),
               "--threads", str(params.threads or os.cpu_count() or 1), "--format-output", "query,target", "-v", "1"]
        if params.kmer:
            cmd += ["-k", str(params.kmer)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise MmseqsError(f"{' '.join(cmd[:2])} failed with exit code {proc.returncode}: {' | '.join(tail)}")
        hits = np.loadtxt(d / "hits.tsv", dtype=np.int64, ndmin=2) if (d / "hits.tsv").stat().st_size else None
    if hits is None or len(hits) == 0:
        return np.empty((0, 2), np.int64)
    hits = np.sort(hits[:, :2], axis=1)
    return np.unique(hits[hits[:, 0] != hits[:, 1]], axis=0)
