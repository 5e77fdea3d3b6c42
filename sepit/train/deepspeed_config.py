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

A user's own DeepSpeed config (``train.deepspeed``: a mapping or a JSON file, as HF Trainer and
Accelerate accept one) is merged over the generated one (:func:`merge_user_deepspeed`).  Keys
in :data:`PLATFORM_KEYS` are values sepit derives from ``train.*`` fields and relies on
elsewhere (the loop feeds micro-batches of ``train.micro_batch_size``, steps after
``train.grad_accum_steps`` of them, checkpoints and exports by ``train.zero_stage``, builds the
optimizer per parameter group): a user's value must equal the derived one, or be ``"auto"``.
``optimizer`` and ``scheduler`` (:data:`REFUSED_KEYS`) are refused: sepit builds both per
parameter group.  Everything else passes through (bucket sizes, ``overlap_comm``,
``contiguous_gradients``, ``stage3_*``, ``offload_param``, ``communication_data_type``, fp16
loss scaling, ``comms_logger``, ``flops_profiler`` ...).  The MoE ZeRO check and the batch-size
arithmetic run again on the merged result; every error names the ``train.deepspeed.`` key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

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


def _generated_config(cfg: TrainConfig, precision: str) -> dict[str, Any]:
    """The DeepSpeed config sepit writes from ``cfg`` alone (before a user's ``train.deepspeed``)."""
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


def build_deepspeed_config(cfg: TrainConfig, *, precision: str, moe: bool = False,
                           world_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for one worker of this run: the generated config with the
    user's ``train.deepspeed`` merged over it and checked (``world_size`` defaults to
    ``train.num_workers``, which is Ray Train's world size)."""
    generated = _generated_config(cfg, precision)
    user = read_user_deepspeed(cfg.deepspeed)
    if user is None:
        if moe:
            check_zero_for_moe(cfg.zero_stage)
        return generated
    return merge_user_deepspeed(generated, user, cfg, precision=precision, moe=moe,
                                world_size=cfg.num_workers if world_size is None else world_size)


# --------------------------------------------------------------------------- a user's own config
#: Where a user's DeepSpeed config sits in the config tree; every error names keys under it.
USER_KEY = "train.deepspeed"
#: A user's value meaning "the value sepit derives" (HF Trainer's convention).
AUTO = "auto"

#: DeepSpeed keys sepit derives from ``train.*`` and relies on elsewhere: dotted key -> (where
#: the value comes from, why sepit owns it).  A user's value must equal the derived one or be "auto".
PLATFORM_KEYS: dict[str, tuple[str, str]] = {
    "train_micro_batch_size_per_gpu": (
        "train.micro_batch_size", "sepit's data feeder cuts micro-batches of that many examples"),
    "gradient_accumulation_steps": (
        "train.grad_accum_steps", "the loop feeds that many micro-batches per optimizer step"),
    "zero_optimization.stage": (
        "train.zero_stage", "checkpoints, the resume check and the model export depend on the stage"),
    "zero_optimization.offload_optimizer.device": (
        "train.offload_optimizer", "sepit hands DeepSpeed a torch AdamW unless the optimizer is offloaded"),
    "gradient_clipping": ("train.grad_clip", "one source for the clipping norm"),
    "bf16.enabled": ("train.precision", "one source for the precision"),
    "fp16.enabled": ("train.precision", "one source for the precision"),
    "zero_allow_untested_optimizer": (
        "sepit's client torch.optim.AdamW", "ZeRO must accept that optimizer"),
}
#: The derived value of a platform key that the generated config leaves out.
_ABSENT_DEFAULTS = {"zero_optimization.offload_optimizer.device": "none"}
#: Top-level keys refused outright: sepit builds these objects itself.
REFUSED_KEYS: dict[str, str] = {
    "optimizer": "sepit builds the optimizer per parameter group (each stage's learning-rate ratios); "
                 "set train.lr, train.adam_betas, train.adam_eps and train.weight_decay instead "
                 "(train.offload_optimizer=true for DeepSpeed's CPU Adam)",
    "scheduler": "sepit builds the per-group learning-rate schedule; set train.warmup_steps, "
                 "train.decay and train.min_lr_ratio instead",
}
#: DeepSpeed derives it (micro batch x accumulation x data-parallel ranks); checked when given.
BATCH_KEY = "train_batch_size"


def read_user_deepspeed(value: Any, field: str = USER_KEY) -> dict[str, Any] | None:
    """``train.deepspeed`` as given -> a plain JSON-like dict (None stays None).

    A mapping is copied; a string is the path of a JSON file, read now.
    """
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{field}={str(value)!r}: no such file (give a DeepSpeed JSON file or a mapping)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{field}={str(value)!r}: not a readable JSON file ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{field}={str(value)!r}: the file must hold a JSON object, got {type(data).__name__}")
        return data
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field}: expected a mapping or the path of a DeepSpeed JSON file, "
                          f"got {type(value).__name__} {value!r}")
    try:
        return json.loads(json.dumps(value))  # a deep copy that also proves DeepSpeed can take it
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}: DeepSpeed configs hold JSON values only ({exc})") from None


def _lookup(tree: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _merge(generated: Mapping[str, Any], user: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Mappings merge key by key, other values replace; "auto" keeps the generated value."""
    out = dict(generated)
    for key, value in user.items():
        here = f"{path}.{key}"
        if value == AUTO:
            if key not in generated:
                raise ConfigError(f"{here}='auto': sepit fills 'auto' only for keys it generates; "
                                  f"here it generates {sorted(generated)}")
            continue
        if isinstance(generated.get(key), Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{here}: expected a mapping (a DeepSpeed section), got "
                                  f"{type(value).__name__} {value!r}")
            out[key] = _merge(generated[key], value, here)
        else:
            out[key] = value
    return out


def merge_user_deepspeed(generated: Mapping[str, Any], user: Mapping[str, Any], cfg: TrainConfig, *,
                         precision: str | None, moe: bool, world_size: int) -> dict[str, Any]:
    """``user`` merged deep over ``generated``, then the stage's checks on the result.

    ``precision`` None (config time, ``train.precision=auto``: resolved only on the worker)
    skips the precision keys.  Raises :class:`ConfigError` naming the ``train.deepspeed.`` key.
    """
    for key, why in REFUSED_KEYS.items():
        if key in user:
            raise ConfigError(f"{USER_KEY}.{key} is not accepted: {why}")
    user_batch = user.get(BATCH_KEY)
    merged = _merge(generated, {k: v for k, v in user.items() if k != BATCH_KEY}, USER_KEY)

    # The MoE refusal first, on the merged stage, named by where that stage came from.
    stage = _lookup(merged, "zero_optimization.stage")
    user_stage = _lookup(user, "zero_optimization.stage")
    if moe and isinstance(stage, int):
        check_zero_for_moe(stage, field=f"{USER_KEY}.zero_optimization.stage"
                           if user_stage not in (None, AUTO) else "train.zero_stage")

    for key, (source, why) in PLATFORM_KEYS.items():
        if precision is None and key in ("bf16.enabled", "fp16.enabled"):
            continue
        theirs = _lookup(user, key, AUTO)
        if theirs == AUTO:
            continue
        ours = _lookup(generated, key, _ABSENT_DEFAULTS.get(key))
        if theirs != ours or isinstance(theirs, bool) != isinstance(ours, bool):  # 1.0 == 1, True != 1
            given = _source_value(cfg, source, precision)
            raise ConfigError(
                f"{USER_KEY}.{key}={theirs!r} disagrees with {source}{given} (which gives {key}={ours!r}): "
                f"{why}. Set {source} instead, or leave the key out (or 'auto')."
                if source.startswith("train.") else
                f"{USER_KEY}.{key}={theirs!r}: must be {ours!r} ({why}); leave the key out (or 'auto').")

    expected = cfg.micro_batch_size * cfg.grad_accum_steps * world_size
    if user_batch is not None:
        if user_batch != AUTO and (isinstance(user_batch, bool) or user_batch != expected):
            raise ConfigError(
                f"{USER_KEY}.{BATCH_KEY}={user_batch!r} but train.micro_batch_size ({cfg.micro_batch_size}) "
                f"x train.grad_accum_steps ({cfg.grad_accum_steps}) x data-parallel workers ({world_size}, "
                f"train.num_workers) = {expected}; DeepSpeed requires that product. Change those train "
                f"fields, or leave {BATCH_KEY} out (or 'auto').")
        merged[BATCH_KEY] = expected
    return merged


def _source_value(cfg: TrainConfig, source: str, precision: str | None) -> str:
    if source == "train.precision" and precision is not None and cfg.precision != precision:
        return f"={cfg.precision!r} (resolved to {precision})"
    name = source.removeprefix("train.")
    return f"={getattr(cfg, name)!r}" if hasattr(cfg, name) else ""


def check_user_deepspeed(cfg: TrainConfig) -> None:
    """Config-time check of ``cfg.deepspeed`` (already read to a dict) against the other fields:
    refused keys, platform keys, batch-size arithmetic over ``train.num_workers``.  The MoE
    refusal and ``train.precision=auto`` wait for :func:`build_deepspeed_config` on the worker
    (stage configs check MoE themselves)."""
    if cfg.deepspeed is None:
        return
    precision = None if cfg.precision == "auto" else cfg.precision
    generated = _generated_config(cfg, precision or "fp32")
    merge_user_deepspeed(generated, cfg.deepspeed, cfg, precision=precision, moe=False,
                         world_size=cfg.num_workers)
