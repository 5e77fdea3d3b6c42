"""Percentile bootstrap 95% confidence intervals, seeded and vectorised.

Samples (not tokens) are resampled with replacement ``n_resamples`` times; the interval is the
(α/2, 1-α/2) percentile of the statistic over resamples.  The same seed gives the same interval,
and metrics of one report share resample indices so their intervals are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sepit.config.base import check_range


@dataclass
class BootstrapConfig:
    n_resamples: int = 1000
    """Bootstrap resamples per interval (0 turns intervals off)."""
    confidence: float = 0.95
    """Two-sided confidence level of the percentile interval."""
    seed: int = 0
    """Seed of the resampling RNG (numpy PCG64)."""

    def __post_init__(self) -> None:
        check_range(self.n_resamples, "bootstrap.n_resamples", lo=0)
        check_range(self.confidence, "bootstrap.confidence", lo=0.0, hi=1.0, lo_inclusive=False, hi_inclusive=False)


def resample_indices(n: int, config: BootstrapConfig) -> np.ndarray:
    """[n_resamples, n] int indices drawn with replacement (the same for a given seed and n)."""
    rng = np.random.default_rng(config.seed)
    return rng.integers(0, n, size=(config.n_resamples, n))


def _interval(stats: np.ndarray, config: BootstrapConfig) -> tuple[float, float]:
    alpha = 1.0 - config.confidence
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def mean_ci(values, config: BootstrapConfig) -> dict[str, float]:
    """``{"mean", "ci_low", "ci_high", "n"}`` of per-sample values (NaN interval when n < 2)."""
    v = np.asarray(values, dtype=float)
    out = {"mean": float(v.mean()) if v.size else float("nan"), "n": int(v.size)}
    if v.size < 2 or config.n_resamples == 0:
        out.update(ci_low=float("nan"), ci_high=float("nan"))
        return out
    idx = resample_indices(v.size, config)
    lo, hi = _interval(v[idx].mean(axis=1), config)
    out.update(ci_low=lo, ci_high=hi)
    return out


def statistic_ci(
    per_sample: np.ndarray, statistic: Callable[[np.ndarray], float], config: BootstrapConfig
) -> dict[str, float]:
    """CI of a corpus statistic computed from summed per-sample rows (e.g. corpus BLEU stats)."""
    rows = np.asarray(per_sample)
    n = rows.shape[0]
    out = {"value": float(statistic(rows.sum(axis=0))) if n else float("nan"), "n": int(n)}
    if n < 2 or config.n_resamples == 0:
        out.update(ci_low=float("nan"), ci_high=float("nan"))
        return out
    idx = resample_indices(n, config)
    stats = np.array([statistic(rows[i].sum(axis=0)) for i in idx])
    lo, hi = _interval(stats, config)
    out.update(ci_low=lo, ci_high=hi)
    return out
