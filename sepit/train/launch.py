"""Driver side of a training stage: Ray, the TorchTrainer, the MLflow run, export and lineage.

:func:`run_training` is what every ``run_stageN`` calls.  It starts (or joins) Ray, opens the
stage's MLflow run (resuming the run recorded in the output folder when the folder is reused),
runs a ``TorchTrainer`` whose workers execute :func:`sepit.train.loop.train_worker`, then copies
the final checkpoint's exported model to ``<output_dir>/model`` with ``lineage.json`` and the
run config, and logs config, lineage, loss curve, the dataset splits (as run inputs) and the
model folder to MLflow, the latter as an MLflow Model registered as a new version of
``sepit-<stage>`` (:mod:`sepit.tracking.models`).

Resuming: Ray Train keeps a run snapshot in ``<output_dir>/ray_results/<run_name>``; a second
``fit()`` with the same storage path and name restarts from its latest checkpoint (ours holds
model, optimizer, scheduler, step, RNG and data position), so re-running a stage with the same
output folder continues where it stopped (including after ``max_steps`` was raised).

Object stores: ``train.output_dir`` may be ``s3://bucket/prefix`` (or ``gs://``; see
:mod:`sepit.storage`).  Ray Train then keeps its run snapshot and checkpoints at
``<output_dir>/ray_results`` on the store (workers save DeepSpeed state to a local temporary
folder and ``ray.train.report`` uploads it; a resume downloads it), and everything else is
written to the local staging folder ``cfg.out_path`` and uploaded at the end: ``model/`` (with
``lineage.json``), ``config.yaml``, ``train_log.jsonl``, ``loss_curve.png``, ``mlflow_run.json``.
A re-run on another machine fetches ``train_log.jsonl`` and ``mlflow_run.json`` back first.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sepit.config.base import RUN_CONFIG, ConfigError, save_yaml, to_dict, write_run_config
from sepit.errors import SepitError

from .checkpoint import EXPORT_SUBDIR
from .config import TrainConfig
from .curves import plot_loss_curve
from .data import EmptySplitError, data_config, ray_datasets, table_splits, training_datasets
from .lineage import ParentRef, build_lineage, dataset_fingerprint, write_lineage
from .step_log import read_step_log
from .task import TrainTask

MLFLOW_RUN_FILE = "mlflow_run.json"


class TrainingError(SepitError, RuntimeError):
    """A training run failed (after Ray Train's retries); the message carries the worker error."""


@dataclass
class TrainingOutcome:
    output_dir: Path | str
    """The run's output folder (its URI when ``train.output_dir`` is an object store)."""
    model_dir: Path | str
    """The exported model folder (``<output_dir>/model``; a URI on an object store)."""
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint: str | None
    lineage: dict[str, Any] = field(default_factory=dict)
    registered_model: str | None = None
    """``models:/NAME/VERSION`` of the export in the MLflow registry (None when not registered)."""

    def as_dict(self) -> dict[str, Any]:
        """The ``run_stageN`` return value: output_dir, model_dir, mlflow_run_id, metrics, ..."""
        return {"output_dir": str(self.output_dir), "model_dir": str(self.model_dir),
                "mlflow_run_id": self.mlflow_run_id, "tracking_uri": self.tracking_uri,
                "metrics": self.metrics, "checkpoint": self.checkpoint, "registered_model": self.registered_model}


def ensure_ray(cfg: TrainConfig) -> None:
    """Join ``train.ray_address`` / ``RAY_ADDRESS``, or start a local Ray sized for this run.

    A local Ray gets at least ``workers * cpus_per_worker + 2`` logical CPUs so the Ray Data
    feeding tasks never starve behind the training workers (they deadlock otherwise).
    """
    from sepit.ray_runtime import cluster_address, init_ray, set_local_defaults

    set_local_defaults()  # before Ray is imported: it reads the loopback switch at import time
    import ray

    if ray.is_initialized():
        return
    need = math.ceil(cfg.num_workers * cfg.cpus_per_worker) + 2
    init_ray(address=cfg.ray_address, num_cpus=None if cluster_address(cfg.ray_address) else max(os.cpu_count() or 1, need))


def _check_cpus_for_streaming(cfg: TrainConfig, dataset_dir: str | Path, data_stage: str) -> None:
    """A split too big to materialise is read by Ray Data tasks *while* the workers hold their
    CPUs; with no CPU left those tasks never start and training hangs.  Refuse that up front."""
    import ray

    from .data import split_path

    streamed = [s for s in ("train", "val") if split_path(dataset_dir, data_stage, s).size()
                > cfg.materialize_mb * 2**20]
    free = ray.cluster_resources().get("CPU", 0.0) - cfg.num_workers * cfg.cpus_per_worker
    if streamed and free < 1:
        raise ConfigError(
            f"{data_stage} {streamed} split(s) are larger than train.materialize_mb={cfg.materialize_mb} and are "
            f"streamed by Ray Data tasks during training, but {cfg.num_workers} worker(s) x "
            f"{cfg.cpus_per_worker} CPU leave {free:g} of the cluster's CPUs free; lower train.cpus_per_worker, "
            f"raise train.materialize_mb, or start Ray with more (logical) CPUs")


def _previous_run_id(out: Path, tracking_uri: str) -> str | None:
    """The MLflow run this output folder used before (same store), so a resume continues it."""
    f = out / MLFLOW_RUN_FILE
    if not f.is_file():
        return None
    rec = json.loads(f.read_text())
    if rec.get("tracking_uri") != tracking_uri:
        return None
    from sepit.tracking import run_params

    # A deleted run (or a store reset) starts a new run instead.
    return rec["run_id"] if run_params(rec["run_id"], tracking_uri) is not None else None


def _log_params_once(run_id: str, tracking_uri: str, params: dict[str, Any]) -> None:
    """Log params; on a resumed run, values that changed (e.g. max_steps) go to tags instead
    (MLflow refuses to overwrite a param)."""
    from sepit.tracking import flatten, log_params, run_params, set_tags

    existing = run_params(run_id, tracking_uri) or {}
    flat = flatten(params)
    new = {k: v for k, v in flat.items() if k not in existing}
    changed = {f"resumed_with.{k}": v for k, v in flat.items() if k in existing and existing[k] != v}
    if new:
        log_params(new)
    if changed:
        set_tags({k[:250]: v for k, v in changed.items()})


def _trainer(task: TrainTask, cfg: TrainConfig, datasets: dict, counts: dict, tracking: dict, progress: Any = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sepit.ray_runtime import train_worker_runtime_env
    from sepit.storage import resolve

    from .deepspeed_config import resolve_device
    from .loop import train_worker

    ray_results = resolve(cfg.output_dir).join("ray_results")
    device = resolve_device(cfg.device)
    resources = {"CPU": cfg.cpus_per_worker}
    if device == "cuda":
        resources["GPU"] = 1
    handled = ray_datasets(datasets)
    return TorchTrainer(
        train_worker,
        train_loop_config={"task": task, "train": _worker_config(cfg), "mlflow": tracking, "val_rows": counts.get("val", 0),
                           "progress": progress, "tables": table_splits(datasets)},
        torch_config=TorchConfig(backend="nccl" if device == "cuda" else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=device == "cuda",
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=ray_results.path,
            storage_filesystem=None if ray_results.is_local else ray_results.filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env=train_worker_runtime_env(),
        ),
        datasets=handled,
        dataset_config=data_config(handled),
    )


def _final_metrics(cfg: TrainConfig, reported: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in (reported or {}).items() if isinstance(v, (int, float))}
    train, val = read_step_log(cfg.train_log, "train"), read_step_log(cfg.train_log, "val")
    if train:
        last = train[max(train)]
        first = train[min(train)]
        out.setdefault("loss", last.get("loss"))
        out["first_loss"] = first.get("loss")
        out.setdefault("step", float(max(train)))
    if val:
        steps = sorted(val)
        out.update({k: v for k, v in val[steps[-1]].items() if k.startswith("val_")})
        if "val_loss" in val[steps[0]]:
            out["first_val_loss"] = val[steps[0]]["val_loss"]
    return {k: float(v) for k, v in out.items() if v is not None}


def _worker_config(cfg: TrainConfig) -> TrainConfig:
    """The config the workers get: with a remote ``output_dir`` their step log and markers go to
    the driver's staging folder (an explicit path, so workers need not share its environment)."""
    from sepit.storage import is_remote

    return replace(cfg, output_dir=str(cfg.out_path)) if is_remote(cfg.output_dir) else cfg


#: Run files that live beside ``model/`` in the output folder and follow it to an object store.
RUN_FILES = (RUN_CONFIG, "train_log.jsonl", "loss_curve.png", MLFLOW_RUN_FILE)


def _pull_run_files(cfg: TrainConfig) -> None:
    """Remote output: fail early on a missing bucket / bad credentials (before Ray starts), and
    fetch the step log and MLflow run record of an earlier run into an empty staging folder."""
    from sepit.storage import is_remote, require_bucket, resolve

    if not is_remote(cfg.output_dir):
        return
    output = resolve(cfg.output_dir)
    require_bucket(output)
    for name in ("train_log.jsonl", MLFLOW_RUN_FILE):
        remote, local = output.join(name), cfg.out_path / name
        if not local.exists() and remote.is_file():
            local.write_bytes(remote.read_bytes())


def _publish_outputs(cfg: TrainConfig) -> str:
    """Remote output: upload the exported model and the run files; returns where the model is."""
    from sepit.storage import is_remote, resolve, upload_dir

    if not is_remote(cfg.output_dir):
        return str(cfg.model_dir)
    output = resolve(cfg.output_dir)
    for name in RUN_FILES:
        if (cfg.out_path / name).is_file():
            output.join(name).write_bytes((cfg.out_path / name).read_bytes())
    return upload_dir(cfg.model_dir, output.join("model")).uri


def run_training(
    task: TrainTask,
    cfg: TrainConfig,
    *,
    dataset_dir: str | Path,
    data_stage: str,
    stage_config: Any,
    parent: ParentRef | None = None,
) -> TrainingOutcome:
    """Train ``task`` on ``<dataset_dir>/<data_stage>/{train,val}.parquet``; see the module doc.

    Ray, DeepSpeed and MLflow output goes to ``<output_dir>/logs/`` (unless an outer command,
    e.g. the pipeline, already captures it); the console shows one progress display.
    """
    from sepit.console import capture_logs

    if cfg.select_best and cfg.zero_stage == 3:
        # (stage 2 never gets here with ZeRO-3: its config refuses ZeRO-3 for MoE first)
        raise ConfigError(f"train.select_best={cfg.select_best!r} needs train.zero_stage <= 2: under ZeRO-3 "
                          f"no rank holds the whole weights it would keep")

    out = cfg.out_path
    out.mkdir(parents=True, exist_ok=True)
    with capture_logs(out):
        return _run_training(task, cfg, dataset_dir=dataset_dir, data_stage=data_stage,
                             stage_config=stage_config, parent=parent)


def _run_training(task: TrainTask, cfg: TrainConfig, *, dataset_dir: str | Path, data_stage: str,
                  stage_config: Any, parent: ParentRef | None) -> TrainingOutcome:
    from sepit.console import rerouted
    from sepit.storage import download_dir, is_remote, location_of, resolve
    from sepit.tracking import (
        import_mlflow,
        log_artifact,
        log_dict_artifact,
        log_metrics,
        resolve_tracking_uri,
        set_tags,
        start_run,
    )
    from sepit.tracking.datasets import log_split_inputs
    from sepit.tracking.models import default_registered_name, log_model

    from .step_log import training_progress

    import_mlflow()
    rerouted()  # MLflow configured its logger at import
    out = cfg.out_path
    config_dict = to_dict(stage_config)
    write_run_config(stage_config, out)
    _pull_run_files(cfg)
    uri = resolve_tracking_uri(cfg.tracking_uri, out)
    previous = _previous_run_id(out, uri)
    ensure_ray(cfg)
    datasets, counts = training_datasets(dataset_dir, data_stage, seed=cfg.seed, columns=task.columns,
                                         materialize_mb=cfg.materialize_mb)
    _check_cpus_for_streaming(cfg, dataset_dir, data_stage)
    if counts["train"] < cfg.num_workers:
        # Ray would hand some worker an empty shard; fail here instead of after the retries.
        raise EmptySplitError(f"{data_stage}/train.parquet in {dataset_dir} has {counts['train']} rows, fewer than "
                              f"train.num_workers={cfg.num_workers}")
    data_fp = dataset_fingerprint(dataset_dir, data_stage)
    tags = {"sepit.stage": task.stage}
    if parent:
        tags.update({"sepit.parent_path": parent.path, "sepit.parent_run_id": parent.run_id or "",
                     "sepit.parent_stage": parent.stage or ""})
    with start_run(cfg.run_name, tracking_uri=uri, experiment=cfg.experiment, parent_run_id=cfg.parent_run_id,
                   run_id=previous, tags=tags) as run:
        run_id = run.info.run_id
        (out / MLFLOW_RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
        _log_params_once(run_id, uri, {**config_dict, "task": task.describe(),
                                       "data.rows": counts, "data.files": data_fp["files"]})
        if previous:
            set_tags({"sepit.resumed": "true"})
        log_split_inputs(data_fp["dataset_dir"], data_fp["files"], counts)
        try:
            with training_progress(f"{task.stage}", cfg.max_steps) as progress:
                trainer = _trainer(task, cfg, datasets, counts, {"tracking_uri": uri, "run_id": run_id}, progress)
                result = trainer.fit()
        except Exception as exc:
            raise TrainingError(f"{task.stage} training in {out} failed: {exc}") from exc
        ckpt = result.checkpoint
        if ckpt is None:
            raise TrainingError(f"{task.stage}: Ray Train finished without a checkpoint in {cfg.output_dir}/ray_results")
        ckpt_loc = location_of(ckpt.filesystem, ckpt.path)
        export = ckpt_loc.join(EXPORT_SUBDIR)
        if not export.is_dir():
            raise TrainingError(f"{task.stage}: the final checkpoint {ckpt_loc} holds no exported model")
        model_dir = cfg.model_dir  # local; uploaded to <output_dir>/model when that is remote
        download_dir(export, model_dir)
        metrics = _final_metrics(cfg, result.metrics)
        lineage = build_lineage(stage=task.stage, config=config_dict, parent=parent, data=data_fp,
                                mlflow_run_id=run_id, tracking_uri=uri, metrics=metrics, checkpoint=ckpt_loc.uri)
        write_lineage(model_dir, lineage)
        save_yaml(stage_config, model_dir / "run_config.yaml")
        set_tags({"sepit.lineage.parent": (parent.run_id or parent.path) if parent else "none",
                   "sepit.model_dir": str(model_dir) if not is_remote(cfg.output_dir)
                   else f"{cfg.output_dir.rstrip('/')}/model"})
        log_metrics({f"final.{k}": v for k, v in metrics.items()})
        log_dict_artifact(lineage, "lineage.json")
        log_artifact(out / RUN_CONFIG)
        png = plot_loss_curve(cfg.train_log, out / "loss_curve.png", f"{task.stage}: {cfg.run_name}")
        if png:
            log_artifact(png)
        logged = log_model(model_dir, registered_name=default_registered_name(task.stage)
                           if cfg.registered_model is None else cfg.registered_model,
                           metadata={"sepit_stage": task.stage})
        set_tags({"sepit.model_uri": logged.model_uri, "sepit.registered_model": logged.version_uri or "none"})
        published = _publish_outputs(cfg)
    remote = is_remote(cfg.output_dir)
    return TrainingOutcome(output_dir=resolve(cfg.output_dir).uri if remote else out,
                           model_dir=published if remote else model_dir, mlflow_run_id=run_id, tracking_uri=uri,
                           metrics=metrics, checkpoint=ckpt_loc.uri, lineage=lineage,
                           registered_model=logged.version_uri)
