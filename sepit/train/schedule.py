"""Learning-rate schedule: linear warm-up, then cosine or linear decay to a floor.

The schedule is a multiplier on each parameter group's own lr (so docs/method.md's per-module lr
ratios survive), stepped once per *optimizer* step by DeepSpeed, and saved/restored with the
DeepSpeed checkpoint.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def lr_multiplier(
    step: int, *, max_steps: int, warmup_steps: int, decay: str = "cosine", min_lr_ratio: float = 0.1
) -> float:
    """Multiplier for the lr used by optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` so the first step already moves (a 0 lr step would be
    wasted).  Decay: progress ``p`` runs 0 -> 1 from the end of warm-up to ``max_steps - 1``;
    the multiplier goes 1 -> ``min_lr_ratio`` (half-cosine or straight line) and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, max_steps - 1 - warmup_steps)
    p = min(1.0, max(0.0, (step - warmup_steps) / span))
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    elif decay == "linear":
        shape = 1.0 - p
    else:
        raise ValueError(f"unknown decay {decay!r}; choose cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, max_steps: int, warmup_steps: int, decay: str, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier` to every parameter group."""
    fn = partial(
        lr_multiplier, max_steps=max_steps, warmup_steps=warmup_steps, decay=decay, min_lr_ratio=min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
