"""The Ray Train worker loop shared by all stages: DeepSpeed engine, accumulation, schedule,
clipping, validation, checkpoints, resume.

Every rank runs :func:`train_worker`.  The control flow is identical on all ranks (same number
of micro-batches, evaluations and ``ray.train.report`` calls), which Ray Train V2 and the
collective ops of gloo/NCCL/ZeRO require.  Only rank 0 logs metrics and writes the export.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepit.errors import SepitError

from .checkpoint import (EXPORT_SUBDIR, TrainerState, best_weights_file, has_export, load_checkpoint, rng_state,
                         save_checkpoint, set_rng_state)
from .config import TrainConfig
from .data import EpochFeeder, ValidationRows, worker_shard
from .deepspeed_config import (
    build_deepspeed_config,
    register_zero3_child_parameters,
    resolve_device,
    resolve_precision,
)
from .schedule import build_scheduler
from .step_log import StepLog
from .task import TrainTask, to_device

#: Offset of the per-rank RNG seeds (dropout, masking) from the model-init seed.
_RANK_SEED_OFFSET = 1_000_003
#: Fixed seed for validation so every evaluation sees the same masks/noise.
_EVAL_SEED_OFFSET = 7_919


class TrainGroupError(SepitError, ValueError):
    """A task's parameter groups are inconsistent with its model."""


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_dir_name(step: int, suffix: str = "") -> str:
    return f"checkpoint_step{step:07d}{suffix}"


def _check_groups(model: torch.nn.Module, groups: list[dict[str, Any]]) -> None:
    seen: dict[int, str] = {}
    names = set()
    for g in groups:
        name = g.get("name")
        if not name or name in names:
            raise TrainGroupError(f"parameter groups need unique names; got {[x.get('name') for x in groups]}")
        names.add(name)
        for p in g["params"]:
            if not p.requires_grad:
                raise TrainGroupError(f"group {name!r} holds a frozen parameter (requires_grad=False)")
            if id(p) in seen:
                raise TrainGroupError(f"a parameter is in both groups {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise TrainGroupError(f"trainable parameters in no optimizer group: {missing[:5]} ...")


def promote_scalar_parameters(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """Reshape 0-dim parameters (e.g. a CLIP logit scale) to shape [1], in place.

    DeepSpeed 0.19's initial parameter broadcast views every parameter as bytes, which fails on
    0-dim tensors; a [1] tensor broadcasts against the same operands, so the model's maths is
    unchanged.  Returns what was changed so :func:`restore_scalar_parameters` can undo it for export.
    """
    changed = []
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(module, name, torch.nn.Parameter(p.data.reshape(1), requires_grad=p.requires_grad))
                changed.append((module, name))
    return changed


def restore_scalar_parameters(changed: list[tuple[torch.nn.Module, str]]) -> None:
    for module, name in changed:
        p = getattr(module, name)
        setattr(module, name, torch.nn.Parameter(p.data.reshape(()), requires_grad=p.requires_grad))


def _write_worker_marker(cfg: TrainConfig, rank: int, resumed_step: int | None) -> None:
    """``<output_dir>/workers/rank{r}.json``: which process is this rank now (ops, kill tests)."""
    d = cfg.out_path / "workers"
    d.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "resumed_step": resumed_step}
    tmp = d / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(d / f"rank{rank}.json")


def _export(engine: Any, task: TrainTask, out_dir: Path, rank: int, zero_stage: int) -> None:
    """Rank 0 writes the exported model; under ZeRO-3 all ranks first gather the full weights."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank == 0:
                task.export(module, out_dir)
    elif rank == 0:
        task.export(module, out_dir)


def _improves(metric: str, value: float, best: float | None) -> bool:
    """Is ``value`` of validation ``metric`` better than ``best`` (names ending in "loss": lower)?"""
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


def _module_weights(engine: Any) -> dict[str, torch.Tensor]:
    """A CPU copy of this rank's module weights (what the export would write from them)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}


def _group_lrs(optimizer: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for i, g in enumerate(optimizer.param_groups):
        out.setdefault(f"lr/{g.get('name', i)}", float(g["lr"]))
    out["lr"] = max(out.values())
    return out


def _build_engine(task: TrainTask, cfg: TrainConfig, precision: str):
    import deepspeed

    model = task.build_model()
    scalars = promote_scalar_parameters(model)
    groups = task.param_groups(model, cfg.lr)
    _check_groups(model, groups)
    if task.uses_moe:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    ds_config = build_deepspeed_config(cfg, precision=precision, moe=task.uses_moe)
    scheduler = partial(build_scheduler, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                        decay=cfg.decay, min_lr_ratio=cfg.min_lr_ratio)
    if cfg.offload_optimizer:  # DeepSpeed builds its CPU Adam over our groups
        engine, optimizer, _, sched = deepspeed.initialize(
            model=model, model_parameters=groups, lr_scheduler=scheduler, config=ds_config)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                      weight_decay=cfg.weight_decay)
        engine, optimizer, _, sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if cfg.zero_stage == 3:
        register_zero3_child_parameters(engine.module)  # e.g. the structure bias's MLP weights
    return engine, optimizer, sched, scalars


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; ``loop_config`` = {task, train, mlflow, val_rows}."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    task: TrainTask = loop_config["task"]
    cfg: TrainConfig = loop_config["train"]
    tracking = loop_config.get("mlflow") or {}
    val_rows = int(loop_config.get("val_rows") or 0)

    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    os.environ["LOCAL_RANK"] = str(local_rank)  # deepspeed.initialize reads it
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    import deepspeed.ops

    from sepit.ray_runtime import set_data_progress_bars

    set_data_progress_bars(False)

    # The shared-memory comm op would be compiled (~20 s) by every first initialize on CPU;
    # gloo through torch.distributed is what we use anyway.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    seed_all(cfg.seed)  # identical initial weights on every rank
    engine, optimizer, scheduler, scalars = _build_engine(task, cfg, precision)

    state = TrainerState(world_size=world, zero_stage=cfg.zero_stage)
    exported_already = False
    # train.select_best: the best validation point's module weights, kept by rank 0 only (the rank
    # that exports; ZeRO <= 2 leaves it the whole model)
    best_weights: dict[str, torch.Tensor] | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(engine, Path(d), rank, world, cfg.zero_stage)
            exported_already = has_export(Path(d))
            if cfg.select_best and rank == 0 and best_weights_file(Path(d), rank).is_file():
                best_weights = torch.load(best_weights_file(Path(d), rank), map_location="cpu")
    else:
        seed_all(cfg.seed + _RANK_SEED_OFFSET * (rank + 1))  # different dropout per rank
    _write_worker_marker(cfg, rank, state.step if ckpt is not None else None)

    tables = loop_config.get("tables") or {}
    feeder = EpochFeeder(worker_shard("train", tables, rank, world), task, micro_batch_size=cfg.micro_batch_size,
                         window_batches=cfg.bucket_window, seed=cfg.seed, rank=rank,
                         shuffle_rows=cfg.shuffle_rows, epoch=state.epoch, batch_in_epoch=state.batch_in_epoch,
                         prefetch=cfg.prefetch_batches)
    val_data = (ValidationRows(worker_shard("val", tables, rank, world), task, n_rows=val_rows, rank=rank, world=world)
                if val_rows else None)
    log = StepLog(cfg.train_log, tracking_uri=tracking.get("tracking_uri"), run_id=tracking.get("run_id"),
                  progress=loop_config.get("progress")) if rank == 0 else None
    if rank == 0 and ckpt is not None:
        print(f"[{task.stage}] resumed from step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})", flush=True)

    def evaluate() -> dict[str, float]:
        if val_data is None:
            return {}
        saved = rng_state()
        seed_all(cfg.seed + _EVAL_SEED_OFFSET)
        engine.eval()
        try:
            with torch.no_grad():
                batches = (to_device(b, dev) for b in val_data.batches(cfg.micro_batch_size, cfg.eval_max_batches))
                return task.evaluate(engine, batches)
        finally:
            engine.train()
            set_rng_state(saved)

    def checkpoint(metrics: dict[str, float], final: bool, name: str) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"sepit-ckpt-r{rank}-"))
        try:
            save_checkpoint(engine, tmp, state, rank, best_weights)
            if final:
                if best_weights is not None and state.best_step != state.step:
                    # train.select_best: rank 0 exports the best validation point's weights (the
                    # checkpoint's DeepSpeed state above stays the last step's, for resuming)
                    engine.module.load_state_dict(best_weights)
                    print(f"[{task.stage}] exporting the step-{state.best_step} model: best "
                          f"{cfg.select_best} {state.best_metric:.4g} (last step {state.step})", flush=True)
                if cfg.zero_stage < 3:  # ZeRO-3 params are partitioned placeholders; leave them
                    restore_scalar_parameters(scalars)  # the engine is not stepped again
                _export(engine, task, tmp / EXPORT_SUBDIR, rank, cfg.zero_stage)
            if log is not None:
                log.flush()
            ray.train.report(dict(metrics, step=state.step), checkpoint=Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=name)
            # Ray Train registers a report only once its controller has polled every rank (every
            # ~2 s); a rank dying before that would lose this checkpoint.  Wait until committed.
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if state.step >= cfg.max_steps:
        if not exported_already:  # e.g. max_steps lowered below the latest checkpoint
            checkpoint({}, final=True, name=checkpoint_dir_name(state.step, "_export"))
        return

    if cfg.eval_at_start and ckpt is None:
        val = evaluate()
        if log is not None and val:
            log.log(0, val, kind="val")
    print_every = max(1, cfg.max_steps // 10)
    engine.train()
    while state.step < cfg.max_steps:
        t0 = time.perf_counter()
        wait0 = feeder.wait_s
        lrs = _group_lrs(optimizer)
        sums: dict[str, float] = {}
        tokens = examples = 0
        for _ in range(cfg.grad_accum_steps):
            batch = feeder.next_batch()
            tokens += int(batch["num_tokens"])
            examples += int(batch["num_examples"])
            loss, parts = task.forward_loss(engine, to_device(batch, dev))
            engine.backward(loss)
            engine.step()  # DeepSpeed steps optimizer + scheduler at the accumulation boundary
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        state.step += 1
        state.epoch, state.batch_in_epoch = feeder.epoch, feeder.batch_in_epoch
        elapsed = time.perf_counter() - t0

        # One small all-reduce per step: mean loss parts, summed tokens/examples, mean data wait.
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys] + [tokens, examples, feeder.wait_s - wait0, elapsed],
                           dtype=torch.float64)
        if world > 1:
            vec = to_device(vec, dev)
            torch.distributed.all_reduce(vec)
            vec = vec.cpu()
        n_micro = cfg.grad_accum_steps * world
        metrics = {k: float(vec[i]) / n_micro for i, k in enumerate(keys)}
        g_tokens, g_examples = int(vec[-4]), int(vec[-3])
        wait_mean, elapsed_mean = float(vec[-2]) / world, float(vec[-1]) / world
        state.tokens_seen += g_tokens
        state.examples_seen += g_examples
        grad_norm = engine.get_global_grad_norm()
        metrics.update(lrs)
        metrics.update(
            tokens_per_s=g_tokens / max(elapsed_mean, 1e-9), examples_per_s=g_examples / max(elapsed_mean, 1e-9),
            data_wait_share=wait_mean / max(elapsed_mean, 1e-9), step_time_s=elapsed_mean,
            epoch=float(state.epoch), tokens_seen=float(state.tokens_seen),
        )
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update(task.step_metrics(engine))

        final = state.step >= cfg.max_steps
        if log is not None and (state.step % cfg.log_every == 0 or final):
            log.log(state.step, metrics)
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or final:
            val = evaluate()
            if val:
                best = state.best_val_loss
                if "val_loss" in val and (best is None or val["val_loss"] < best):
                    state.best_val_loss = val["val_loss"]
                if cfg.select_best:
                    if cfg.select_best not in val:
                        raise SepitError(f"train.select_best={cfg.select_best!r} is not a validation metric of "
                                         f"{task.stage}; it reports {sorted(val)}")
                    if _improves(cfg.select_best, val[cfg.select_best], state.best_metric):
                        state.best_metric, state.best_step = float(val[cfg.select_best]), state.step
                        if rank == 0:
                            best_weights = _module_weights(engine)
                    val["selected_step"] = float(state.best_step)
                    val[f"selected_{cfg.select_best}"] = float(state.best_metric)
                metrics.update(val)
                if log is not None:
                    log.log(state.step, val, kind="val")
        if rank == 0 and (state.step % print_every == 0 or final):
            val_txt = f" val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            print(f"[{task.stage}] step {state.step}/{cfg.max_steps} loss {metrics['loss']:.4f}{val_txt} "
                  f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s", flush=True)
        if state.step % cfg.checkpoint_every == 0 or final:
            checkpoint(metrics, final=final, name=checkpoint_dir_name(state.step))
    feeder.close()
    if log is not None:
        log.flush()
