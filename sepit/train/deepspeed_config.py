"""DeepSpeed configs built from :class:`TrainConfig`, and the ZeRO checks stages rely on.

ZeRO-3 gathers each submodule's parameters collectively when that submodule runs, so every rank
must run the same submodules, in the same order, in every forward (training and no-grad
validation).  Models keep to that: the encoder calls its structure bias even for a batch without
coordinates, and the structure bias calls none of its submodules per row chunk (their number
depends on the sequence length); it reads their parameters directly instead, and
:func:`register_zero3_child_parameters` makes ZeRO-3 gather them when the bias module runs.
(Not a ZeRO-3 "leaf module": DeepSpeed reduces a leaf's gradients in a full backward hook, which
fires before the parameter gradients exist when no input of the module needs a gradient, and a
bias gradient was left unreduced that way.)

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


def register_zero3_child_parameters(model: Any) -> int:
    """Register, under ZeRO-3, the parameters a module reads without calling their submodules.

    A module whose class sets ``ZERO3_READS_CHILD_PARAMETERS = True`` (the structure bias) uses its
    submodules' parameters in its own forward; ZeRO-3 would otherwise gather them only when those
    submodules are called, which they never are.  Registered as external parameters of that
    module they are gathered for its forward and its backward, once per call.  Returns the
    number of parameters registered.  Call after ``deepspeed.initialize`` (parameters are then
    ZeRO-3 parameters, identical objects to the model's).
    """
    import deepspeed

    n = 0
    for module in model.modules():
        if getattr(module, "ZERO3_READS_CHILD_PARAMETERS", False):
            for param in module.parameters():
                deepspeed.zero.register_external_parameter(module, param)
                n += 1
    return n


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
