"""The stage-independent training config: optimisation, distribution, checkpoints, tracking.

Every stage config (``Stage0JobConfig`` ...) holds one :class:`TrainConfig` under ``train``; the
generic worker loop (:mod:`sepit.train.loop`) reads nothing else.  Steps are *optimizer* steps:
one step = ``grad_accum_steps`` micro-batches of ``micro_batch_size`` examples on every worker,
so the global batch is ``micro_batch_size * grad_accum_steps * num_workers`` examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from sepit.config.base import ConfigError, check_range


@dataclass
class TrainConfig:
    output_dir: str = "runs/stage"
    """Folder of this stage's run: exported model, checkpoints (ray_results), logs, MLflow store.
    Re-running with the same folder resumes from its latest checkpoint."""
    run_name: str = "stage"
    """Name of the Ray Train run (its folder under ``<output_dir>/ray_results``) and MLflow run."""

    # ------------------------------------------------------------------ distribution
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves; fractional values leave room for Ray Data on small boxes."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` = one GPU per worker when CUDA is available, else CPU (gloo)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto`` = bf16 on GPUs that support it (fp16 otherwise), fp32 on CPU."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (stage 2 with MoE allows at most 2)."""
    offload_optimizer: bool = False
    """ZeRO optimizer-state offload to CPU (needs ZeRO >= 1; compiles DeepSpeed's CPU Adam)."""
    ray_address: Optional[str] = None
    """Ray cluster to join; default ``RAY_ADDRESS`` or a local Ray on loopback."""
    deepspeed: Optional[Any] = None
    """Your own DeepSpeed config merged over the generated one: a mapping, or the path of a JSON
    file (read when this config is built, so the run's saved config holds its contents).  Keys
    sepit derives from the fields here must agree with them or be ``"auto"`` (micro batch,
    accumulation, ZeRO stage, optimizer offload, clipping, precision); ``optimizer`` and
    ``scheduler`` are refused; the rest passes through (bucket sizes, ``overlap_comm``,
    ``stage3_*``, ...).  See :mod:`sepit.train.deepspeed_config`.  (Typed ``Any`` for the config
    loader, which takes one type besides null; the check is in ``__post_init__``.)"""

    # ------------------------------------------------------------------ optimisation
    micro_batch_size: int = 4
    """Examples per worker per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 100
    """Optimizer steps to train in total (a resumed run continues up to this number)."""
    lr: float = 1e-4
    """Base learning rate; stages scale it per parameter group (docs/method.md ratios)."""
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 10
    """Linear warm-up from 0 to the group's lr over this many optimizer steps."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, down to ``min_lr_ratio * lr`` at ``max_steps``."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    seed: int = 0
    """Seeds model init, data order and dropout; training is deterministic for a given seed."""

    # ------------------------------------------------------------------ data feeding
    bucket_window: int = 16
    """Micro-batches per length-sorting window: rows are read in windows of
    ``bucket_window * micro_batch_size``, sorted by length, cut into batches, and the batches
    shuffled, so each batch pads only to its own longest example."""
    prefetch_batches: int = 2
    """Micro-batches read and collated ahead by a background thread (0 = inline, in the loop)."""
    shuffle_rows: int = 4096
    """Rows held by each worker's seeded shuffle buffer (re-shuffled every epoch; 0 = file order)."""
    materialize_mb: float = 64.0
    """Splits whose Parquet file is at most this size are read once into Ray's object store as
    one Arrow table that each worker reads its share of (fast start, epochs and restarts, no Ray
    Data execution); larger ones are Ray Datasets that stream from storage every epoch (0 = always
    stream)."""
    max_residues: int = 1022
    """Longest protein fed to the encoder; longer ones are cut (sequence and coordinates together)."""

    # ------------------------------------------------------------------ evaluation/checkpoints
    eval_every: int = 50
    """Validate every N optimizer steps (and at the end); 0 = only at the end."""
    eval_at_start: bool = False
    """Also validate the untrained model (logged at step 0) so the curve shows where it started."""
    eval_max_batches: int = 0
    """Cap on validation micro-batches per worker (0 = the whole validation shard)."""
    select_best: Optional[str] = None
    """Export the model of the validation point with the best value of this validation metric
    (e.g. ``val_closed_acc``: higher is better; a name ending in ``loss`` is lower-is-better)
    instead of the last step's; None = the last step.  Rank 0 (the rank that exports) keeps those
    weights in memory and in every checkpoint (``best_rank0.pt``), so a resumed run still has them."""
    checkpoint_every: int = 50
    """Save a checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in ``ray_results`` (older ones are deleted)."""
    max_failures: int = 2
    """Worker failures Ray Train recovers from (restarting from the latest checkpoint)."""
    log_every: int = 1
    """Log training metrics every N optimizer steps."""

    # ------------------------------------------------------------------ tracking
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` else sqlite in ``output_dir``."""
    experiment: str = "sepit"
    """MLflow experiment name."""
    parent_run_id: Optional[str] = None
    """MLflow run to nest this stage's run under (the pipeline run)."""
    registered_model: Optional[str] = None
    """MLflow registered model the export becomes a new version of (alias ``@newest`` moves to
    it); default ``sepit-<stage>``; "" logs the MLflow Model without registering it."""

    def __post_init__(self) -> None:
        check_range(self.num_workers, "train.num_workers", lo=1)
        check_range(self.cpus_per_worker, "train.cpus_per_worker", lo=0, lo_inclusive=False)
        check_range(self.zero_stage, "train.zero_stage", lo=0, hi=3)
        check_range(self.micro_batch_size, "train.micro_batch_size", lo=1)
        check_range(self.grad_accum_steps, "train.grad_accum_steps", lo=1)
        check_range(self.max_steps, "train.max_steps", lo=1)
        check_range(self.lr, "train.lr", lo=0, lo_inclusive=False)
        check_range(self.weight_decay, "train.weight_decay", lo=0)
        check_range(self.warmup_steps, "train.warmup_steps", lo=0)
        check_range(self.min_lr_ratio, "train.min_lr_ratio", lo=0, hi=1)
        check_range(self.grad_clip, "train.grad_clip", lo=0)
        check_range(self.bucket_window, "train.bucket_window", lo=1)
        check_range(self.shuffle_rows, "train.shuffle_rows", lo=0)
        check_range(self.prefetch_batches, "train.prefetch_batches", lo=0)
        check_range(self.materialize_mb, "train.materialize_mb", lo=0)
        check_range(self.max_residues, "train.max_residues", lo=1, hi=1022)
        check_range(self.eval_every, "train.eval_every", lo=0)
        check_range(self.eval_max_batches, "train.eval_max_batches", lo=0)
        check_range(self.checkpoint_every, "train.checkpoint_every", lo=1)
        check_range(self.keep_checkpoints, "train.keep_checkpoints", lo=1)
        if self.select_best is not None:
            if not self.select_best.startswith("val_"):
                raise ConfigError(f"train.select_best={self.select_best!r} must name a validation metric (val_...)")
        check_range(self.max_failures, "train.max_failures", lo=-1)
        check_range(self.log_every, "train.log_every", lo=1)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas={self.adam_betas!r} must be two numbers in [0, 1)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("train.offload_optimizer=true needs train.zero_stage >= 1")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("train.precision=fp16 is not supported on CPU; use fp32 (or bf16 on GPU)")
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"train.run_name={self.run_name!r} must be a non-empty name without '/'")
        if self.deepspeed is not None:
            from .deepspeed_config import check_user_deepspeed, read_user_deepspeed

            self.deepspeed = read_user_deepspeed(self.deepspeed)  # a path is read once, here
            check_user_deepspeed(self)

    # ------------------------------------------------------------------ derived paths
    @property
    def out_path(self) -> Path:
        """The run's local folder: ``output_dir`` itself, or for an object-store ``output_dir``
        (``s3://...``) its local staging folder (:func:`sepit.storage.staging_dir`), whose model,
        logs and config :func:`sepit.train.launch.run_training` uploads to the URI."""
        from sepit.storage import staging_dir

        return staging_dir(self.output_dir)

    @property
    def storage_path(self) -> Path:
        """Ray Train storage (checkpoints + run snapshot) inside the output folder."""
        return self.out_path / "ray_results"

    @property
    def model_dir(self) -> Path:
        """The exported, self-contained model folder of this stage."""
        return self.out_path / "model"

    @property
    def train_log(self) -> Path:
        """JSON-lines log of per-step metrics written by rank 0 (also sent to MLflow)."""
        return self.out_path / "train_log.jsonl"
