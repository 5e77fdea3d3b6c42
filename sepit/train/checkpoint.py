"""Training checkpoints: DeepSpeed engine state + our trainer state, written by every rank.

A checkpoint folder (one per report, under ``<output_dir>/ray_results/<run>/checkpoint_step*``)
holds, merged from all ranks by Ray Train:

* ``ds/...``                 DeepSpeed's files: model (+ experts), optimizer partitions per rank,
                             lr scheduler, DeepSpeed step counters;
* ``trainer_state.json``     (rank 0) step, epoch, micro-batches consumed in the epoch (the data
                             position), counters, world size, ZeRO stage;
* ``rng_rank{r}.pt``         (every rank) Python / NumPy / torch (CPU and CUDA) RNG states, so
                             dropout and structure dropout continue exactly;
* ``best_rank0.pt``          (rank 0, with ``train.select_best``) the module weights of the
                             best validation point so far;
* ``export/``                (final checkpoint only, rank 0) the exported model folder (with
                             ``train.select_best``: of the best validation point).

Resume happens only at optimizer-step boundaries, so DeepSpeed's micro-step counter (not saved)
restarts aligned with gradient accumulation.

Storage: DeepSpeed writes only to local disk, so every rank saves into its own local temporary
folder and hands it to ``ray.train.report``, which uploads it to the run's storage (a shared
folder or an object store such as ``s3://``); on resume ``Checkpoint.as_directory()`` downloads
it to a local folder again, and the functions here only ever see local paths.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepit.errors import SepitError

DS_SUBDIR = "ds"
DS_TAG = "state"
STATE_FILE = "trainer_state.json"
EXPORT_SUBDIR = "export"


class CheckpointError(SepitError, RuntimeError):
    """A checkpoint cannot be used to resume this run; the message says why."""


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Current pass over the training data (0-based)."""
    batch_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (the data position)."""
    examples_seen: int = 0
    """Training examples consumed, summed over all ranks."""
    tokens_seen: int = 0
    """Non-padding tokens consumed, summed over all ranks."""
    world_size: int = 1
    zero_stage: int = 0
    best_val_loss: float | None = None
    best_metric: float | None = None
    """Best value so far of ``train.select_best`` (None when it is not set)."""
    best_step: int | None = None
    """Step of that value: its weights are ``best_rank<r>.pt`` in the checkpoint."""


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def best_weights_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / f"best_rank{rank}.pt"


def save_checkpoint(engine: Any, ckpt_dir: Path, state: TrainerState, rank: int,
                    best_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Every rank calls this (DeepSpeed's save is collective) into its own local folder."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir / DS_SUBDIR), tag=DS_TAG)
    torch.save(rng_state(), ckpt_dir / f"rng_rank{rank}.pt")
    if best_weights is not None:
        torch.save(best_weights, best_weights_file(ckpt_dir, rank))
    if rank == 0:
        (ckpt_dir / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))


def read_trainer_state(ckpt_dir: Path) -> TrainerState:
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {STATE_FILE}; it was not written by sepit")
    return TrainerState(**json.loads(path.read_text()))


def load_checkpoint(engine: Any, ckpt_dir: Path, rank: int, world_size: int, zero_stage: int) -> TrainerState:
    """Restore engine + RNG from ``ckpt_dir``; returns the trainer state to continue from."""
    ckpt_dir = Path(ckpt_dir)
    state = read_trainer_state(ckpt_dir)
    if state.zero_stage != zero_stage or (zero_stage >= 1 and state.world_size != world_size):
        # ZeRO optimizer partitions are per rank; DeepSpeed cannot re-partition them on load.
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was written by {state.world_size} worker(s) with ZeRO-{state.zero_stage}; "
            f"this run has {world_size} worker(s) with ZeRO-{zero_stage}. Resume with the same "
            f"train.num_workers and train.zero_stage, or start a new output folder."
        )
    load_path, _ = engine.load_checkpoint(str(ckpt_dir / DS_SUBDIR), tag=DS_TAG)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load its state from {ckpt_dir / DS_SUBDIR}")
    rng_file = ckpt_dir / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        # weights_only=False: the Python/NumPy RNG states are tuples with numpy arrays.
        set_rng_state(torch.load(rng_file, weights_only=False))
    state.world_size = world_size
    return state


def has_export(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / EXPORT_SUBDIR).is_dir()
