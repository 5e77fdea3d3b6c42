"""``sepit sweep-experts``: a Ray Tune sweep of stage 2 over expert counts (and top-k, capacity,
aux-loss coefficient, lr), every trial a full stage-2 training run from the same stage-1 model.

    sepit sweep-experts --init runs/p/stage1/model --data runs/p/dataset --out runs/sweep \\
        space.num_experts=[2,4,8] space.lr='{loguniform: [1e-5, 1e-3]}' num_samples=2 \\
        max_concurrent_trials=2 scheduler=asha grace_period=20 stage2.train.max_steps=200
    python jobs/sweep_experts.py ...     (same; under ``ray job submit`` it joins the cluster)

:func:`run_sweep` validates every candidate trial's stage-2 config, opens the sweep's MLflow run,
runs the Tune trials (:mod:`sepit.tune.trial`; each one an MLflow run nested under the sweep run,
its outputs in ``<out>/trials/<trial_id>``), then writes ``sweep_results.csv``, ``best.json`` and
``sweep.md`` (:mod:`sepit.tune.results`) and logs them and the best trial to the sweep run.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

from sepit.config.base import RUN_CONFIG, to_dict
from sepit.errors import SepitError

from .config import SweepConfig, load_sweep, local_cpus_needed, resolve_inputs, validate_sweep
from .results import (METRIC_COLUMNS, attach_trial_files, best_record, best_row, sort_rows, summary_markdown,
                      trial_rows, write_csv)
from .trial import run_trial

TUNE_DIR = "tune"
RESULTS_CSV = "sweep_results.csv"
BEST_JSON = "best.json"
SUMMARY_MD = "sweep.md"


class SweepError(SepitError, RuntimeError):
    """The sweep cannot run (e.g. its output folder already holds a sweep)."""


def sweep_config_dict(cfg: SweepConfig) -> dict[str, Any]:
    """The config as YAML-ready data that ``--config`` reads back."""
    data = to_dict(cfg)
    data["space"] = {name: {spec.kind: list(spec.values)} for name, spec in cfg.space.specs().items()
                     if "." not in name}
    data["space"]["extra"] = {path: {spec.kind: list(spec.values)} for path, spec in cfg.space.extra.items()}
    for name in ("top_k", "capacity_factor", "aux_loss_coef", "lr", "num_experts"):
        data["space"].setdefault(name, None)
    return data


def _start_ray(cfg: SweepConfig, stage: Any) -> None:
    from sepit.ray_runtime import cluster_address, init_ray

    remote = cluster_address(cfg.ray_address)
    num_cpus = cfg.num_cpus
    if not remote and num_cpus is None:
        num_cpus = max(os.cpu_count() or 1, local_cpus_needed(cfg, stage))
    init_ray(address=cfg.ray_address, num_cpus=None if remote else num_cpus)


def _tuner(cfg: SweepConfig, stage: Any, tracking_uri: str, run_id: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .placement_groups import ReleaseOrphanedPlacementGroups
    from .progress import TrialProgress

    trainable = tune.with_parameters(
        run_trial, sweep={"config": cfg, "tracking_uri": tracking_uri, "parent_run_id": run_id})
    scheduler = None
    if cfg.scheduler == "asha":
        # time_attr "step": rungs are optimizer steps, judged at the stage's validation steps.
        scheduler = ASHAScheduler(time_attr="step", max_t=stage.train.max_steps, grace_period=cfg.grace_period,
                                  reduction_factor=cfg.reduction_factor)
    return tune.Tuner(
        tune.with_resources(trainable, {"CPU": cfg.trial_cpus}),
        param_space=cfg.space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples, scheduler=scheduler,
            # One process per trial: a stopped trial's process ends (see _wait_for_trial_processes).
            reuse_actors=False,
            # The generator caps concurrency itself (Tune ignores max_concurrent_trials beside it).
            search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials),
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=str(cfg.out_path),
            failure_config=tune.FailureConfig(max_failures=cfg.trial_max_failures),
            callbacks=[TrialProgress(cfg.metric), ReleaseOrphanedPlacementGroups()], verbose=1,
        ),
    )


def _release_after_sweep(timeout_s: float = 30.0) -> None:
    """When fit() returns every trial is over, but a stopped trial's Ray Train controller may
    still be dying: wait (bounded) until no actor-created group of this job has a live creator,
    releasing the orphaned ones."""
    import time

    from .placement_groups import actor_placement_groups, release_orphaned_placement_groups

    deadline = time.monotonic() + timeout_s
    while True:
        release_orphaned_placement_groups()
        if not actor_placement_groups() or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def _wait_for_trial_processes(rows: list[dict[str, Any]], out: Path, timeout_s: float = 60.0) -> None:
    """Wait (bounded) until the Tune actors that ran unfinished trials are gone.

    ``Tuner.fit()`` can return while a stopped trial's process is still unwinding; that process
    may still write its ``trial.json`` and end the stage's MLflow run as FAILED when its Ray Train
    run is torn down, which would land after (and overwrite) what the driver settles next."""
    import time

    import ray

    from .trial import read_trial_file

    deadline = time.monotonic() + timeout_s
    here = ray.get_runtime_context().get_node_id()
    for row in rows:
        if row["status"] == "TERMINATED":
            continue
        actor_id = (read_trial_file(out / "trials" / str(row["trial_id"])) or {}).get("actor_id")
        if not actor_id:
            continue
        while not _trial_process_gone(actor_id, here) and time.monotonic() <= deadline:
            time.sleep(0.2)
        if not _trial_process_gone(actor_id, here):
            warnings.warn(f"trial {row['trial_id']}: its process was still alive {timeout_s:.0f} s after the "
                          "sweep ended; its files and MLflow run status may still change", stacklevel=2)


def _trial_process_gone(actor_id: str, node_id: str) -> bool:
    """Ray reports the trial's actor DEAD, and, when it ran on this node (``node_id``), its process
    has exited too: Ray marks an actor DEAD once its worker disconnects, while the process may
    still be exiting (and its stage thread closing the MLflow run) for a moment."""
    from ray._private.state import actors

    info = actors(actor_id=actor_id) or {}
    if info.get("State", "DEAD") != "DEAD":
        return False
    pid, node = info.get("Pid"), (info.get("Address") or {}).get("NodeID")
    return not (pid and node == node_id and _process_alive(pid))


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs (a zombie counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _close_trial_runs(rows: list[dict[str, Any]], tracking_uri: str) -> None:
    """A trial stopped by the scheduler leaves its MLflow run RUNNING (process ended) or FAILED
    (its stage saw the workers vanish first): mark it KILLED (called once the trial's process is
    gone, see :func:`_wait_for_trial_processes`).  A failed trial whose process died before its
    run could close is marked FAILED."""
    from sepit.tracking import end_run_as, run_status

    for row in rows:
        if not row["mlflow_run_id"] or row["status"] == "TERMINATED":
            continue
        status = run_status(row["mlflow_run_id"], tracking_uri)
        if row["status"] == "STOPPED" and status != "KILLED":
            end_run_as(row["mlflow_run_id"], tracking_uri, "KILLED")
        elif row["status"] == "ERROR" and status == "RUNNING":
            end_run_as(row["mlflow_run_id"], tracking_uri, "FAILED")


def _log_to_mlflow(out: Path, rows: list[dict[str, Any]], best: dict[str, Any] | None, cfg: SweepConfig,
                   param_keys: list[str]) -> None:
    from sepit.tracking import log_artifact, log_metrics, log_params, set_tags

    counts = {s: sum(r["status"] == s for r in rows) for s in ("TERMINATED", "STOPPED", "ERROR")}
    log_metrics({"trials": len(rows), "trials_finished": counts["TERMINATED"],
                 "trials_stopped": counts["STOPPED"], "trials_failed": counts["ERROR"]})
    if best is not None:
        log_metrics({f"best_{cfg.metric}": best["objective"]})
        log_params({"best": {k: best[k] for k in param_keys}})
        set_tags({"sepit.best_trial_id": best["trial_id"], "sepit.best_run_id": best["mlflow_run_id"],
                  "sepit.best_model_dir": best["model_dir"]})
        best_metrics = {f"best.{k}": best[k] for k in METRIC_COLUMNS if best.get(k) is not None}
        if best_metrics:
            log_metrics(best_metrics)
    for name in (RESULTS_CSV, BEST_JSON, SUMMARY_MD, RUN_CONFIG):
        log_artifact(out / name)


def run_sweep(cfg: SweepConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep; returns {out, results_csv, best_json, summary_md, best, trials, counts,
    mlflow_run_id, tracking_uri}.  Failed trials are rows with their error, not exceptions."""
    import yaml

    from sepit.tracking import log_params, resolve_tracking_uri, start_run

    out = cfg.out_path
    if (out / TUNE_DIR).exists():
        raise SweepError(f"{out} already holds a sweep ({out / TUNE_DIR}); choose a new output folder")
    uri = resolve_tracking_uri(cfg.tracking_uri, out)
    cfg = resolve_inputs(cfg, uri)
    stages = validate_sweep(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(yaml.safe_dump(sweep_config_dict(cfg), sort_keys=False))
    param_keys = list(cfg.space.specs())
    log(f"[sweep] {cfg.n_trials} trial(s) over {', '.join(f'{k}={s.describe()}' for k, s in cfg.space.specs().items())}; "
        f"{cfg.max_concurrent_trials} at a time; objective {cfg.metric} ({cfg.mode})")
    _start_ray(cfg, stages[0])
    with start_run(cfg.run_name, tracking_uri=uri, experiment=cfg.experiment, parent_run_id=cfg.parent_run_id,
                   tags={"sepit.kind": "sweep", "sepit.stage": "stage2", "sepit.sweep_out": str(out)}) as run:
        run_id = run.info.run_id
        log_params({"sweep": {k: v for k, v in sweep_config_dict(cfg).items() if k != "stage2"},
                    "stage2": cfg.stage2_dict(), "n_trials": cfg.n_trials})
        grid = _tuner(cfg, stages[0], uri, run_id).fit()
        _release_after_sweep()
        rows = trial_rows(grid, param_keys, cfg.metric, out)
        _wait_for_trial_processes(rows, out)
        attach_trial_files(rows, out)
        _close_trial_runs(rows, uri)
        rows = sort_rows(rows, cfg.mode)
        best = best_row(rows, cfg.mode)
        write_csv(rows, out / RESULTS_CSV)
        best_rec = best_record(best, param_keys, cfg.metric, cfg.mode, run_id, uri)
        (out / BEST_JSON).write_text(json.dumps(best_rec, indent=2, default=str))
        header = {"stage-1 model": cfg.stage2.init, "dataset": stages[0].data.dataset_dir,
                  "objective": f"{cfg.metric} ({cfg.mode})", "scheduler": cfg.scheduler,
                  "space": ", ".join(f"{k}={s.describe()}" for k, s in cfg.space.specs().items()),
                  "MLflow sweep run": f"{run_id} ({uri})"}
        (out / SUMMARY_MD).write_text(summary_markdown(rows, best, param_keys, cfg.metric, cfg.mode, header))
        _log_to_mlflow(out, rows, best, cfg, param_keys)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("TERMINATED", "STOPPED", "ERROR")}
    if len(rows) != cfg.n_trials:
        log(f"[sweep] warning: {len(rows)} trial results for {cfg.n_trials} planned trials")
    return {"out": str(out), "results_csv": str(out / RESULTS_CSV), "best_json": str(out / BEST_JSON),
            "summary_md": str(out / SUMMARY_MD), "best": best_rec, "trials": rows, "counts": counts,
            "n_planned": cfg.n_trials, "mlflow_run_id": run_id, "tracking_uri": uri}


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sepit.config.recipes import DEFAULT_PRESET, PRESETS

    parser.add_argument("--config", help="YAML file with SweepConfig fields (stage2, space, num_samples, ...)")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help=f"recipe whose stage-2 section the stage2 section goes on top of (= preset; "
                        f"default: the config file's, else {DEFAULT_PRESET})")
    parser.add_argument("--init", help="stage-1 model folder or MLflow run id (= stage2.init)")
    parser.add_argument("--data", help="dataset folder from sepit build-dataset (= stage2.data.dataset_dir)")
    parser.add_argument("--out", help="output folder (default runs/sweep)")
    parser.add_argument("--dry-run", action="store_true", help="validate every candidate trial and stop")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. space.num_experts=[2,4,8] stage2.train.max_steps=100")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    flags = {"preset": args.preset, "stage2.init": args.init, "stage2.data.dataset_dir": args.data, "out": args.out}
    return load_sweep(args.preset, args.config, flags, args.overrides)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if args.dry_run:
            n = len(validate_sweep(resolve_inputs(cfg, cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))))
            print(f"sepit sweep-experts: configuration valid; {cfg.n_trials} trial(s) planned, "
                  f"{n} candidate stage-2 config(s) checked")
            return 0
        from sepit.console import capture_logs
        from sepit.storage import staging_dir

        with capture_logs(staging_dir(cfg.out)):  # Ray Tune/Train/MLflow output -> <out>/logs/
            result = run_sweep(cfg)
    except SepitError as exc:
        print(f"sepit sweep-experts: {exc}")
        return 2
    c = result["counts"]
    print(f"\nsweep finished: {c['TERMINATED']} finished, {c['STOPPED']} stopped early, {c['ERROR']} failed")
    print(f"  table     {result['summary_md']}  and  {result['results_csv']}")
    best = result["best"]
    if best.get("trial_id") is None:
        print("  no trial finished: see the errors in the table")
        return 1
    print(f"  best      {best['trial_id']} {best['metric']}={best['objective']:.4f} {best['params']}")
    print(f"  model     {best['model_dir']}")
    print(f"  MLflow    {result['tracking_uri']} (sweep run {result['mlflow_run_id']})")
    return 0
