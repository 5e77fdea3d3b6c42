"""DeepSpeed configs built from :class:`TrainConfig`, and the ZeRO checks stages rely on.

ZeRO-3 gathers each submodule's parameters collectively when that submodule runs, so every rank
must run the same submodules in every forward.  A model that skips a submodule depending on the
data (e.g. a structure bias skipped for a batch without coordinates) desynchronises the ranks'
gathers under ZeRO-3; such models train with ZeRO <= 2.

Optimizer: a client ``torch.optim.AdamW`` over the stage's parameter groups (no FusedAdam
compile; ``zero_allow_untested_optimizer`` lets ZeRO wrap it).  With optimizer offload
DeepSpeed needs its own CPU Adam, so the optimizer moves into the DeepSpeed config instead.
"""

from __future__ import annotations

from typing import Any

from sepit.config.base import ConfigError

from .config import TrainConfig

#: DeepSpeed MoE (stage 2) partitions experts itself and refuses ZeRO-3.
MAX_ZERO_STAGE_WITH_MOE = 2


def check_zero_for_moe(zero_stage: int, *, field: str = "train.zero_stage") -> None:
    """Fail at config time when an MoE stage asks for ZeRO-3 (DeepSpeed would fail much later)."""
    if zero_stage > MAX_ZERO_STAGE_WITH_MOE:
        raise ConfigError(
            f"{field}={zero_stage}: stage 2 trains DeepSpeed MoE layers, which DeepSpeed does not "
            f"support under ZeRO-3 (expert parameters are partitioned by expert parallelism, not "
            f"by ZeRO-3). Use {field}=0, 1 or 2."
        )


def check_zero3_structure_bias(zero_stage: int, has_structure_bias: bool, *,
                               field: str = "train.zero_stage") -> None:
    """Refuse ZeRO-3 for a model whose protein encoder has the structure bias.

    Measured on DeepSpeed 0.18 (2 CPU ranks, stage 1 tiny): with the bias module hooked
    normally, ranks whose batches differ in length call its submodules a different number of
    times and the partitioned-parameter gathers hang in validation; registered as a ZeRO-3 leaf
    module, a bias parameter's gradient is left unreduced at the optimizer step.  Until that is
    solved a clear error beats a hang; ZeRO 0-2 (or a sequence-only encoder) train these stages.
    """
    if zero_stage == 3 and has_structure_bias:
        raise ConfigError(
            f"{field}=3: ZeRO-3 is not supported for an encoder with the 3D structure bias (its "
            f"per-chunk module calls differ across ranks and ZeRO-3's parameter gathers would hang); "
            f"use {field}=0, 1 or 2, or a sequence-only encoder (encoder.use_structure=false)."
        )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; an explicit ``cuda`` without one fails."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible to this process")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        if device == "cpu" and precision != "fp32":
            raise ConfigError(f"train.precision={precision} is not supported on CPU; use fp32")
        return precision
    if device == "cpu":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_deepspeed_config(cfg: TrainConfig, *, precision: str, moe: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict for one worker of this run."""
    if moe:
        check_zero_for_moe(cfg.zero_stage)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        # Bucket sizes in elements; DeepSpeed's defaults (5e8) are sized for GPUs, not a 2-core box.
        zero.update(reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if cfg.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(5e6), stage3_param_persistence_threshold=int(1e5),
                    stage3_gather_16bit_weights_on_model_save=True)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 500},
        "steps_per_print": 10**9,  # we log ourselves (MLflow); keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": list(cfg.adam_betas), "eps": cfg.adam_eps,
                       "weight_decay": cfg.weight_decay},
        }
    return ds
