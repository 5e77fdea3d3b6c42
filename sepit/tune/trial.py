"""One sweep trial: a stage-2 training run inside a Ray Tune function trainable.

The trial runs :func:`sepit.train.stage2.run_stage2` (which drives its own Ray Train
``TorchTrainer``; the trial process itself only waits, so it reserves ~0 CPUs) in a helper
thread, and meanwhile forwards each validation result the stage writes to its step log
(``<trial>/train_log.jsonl``, ``kind: val``) to Tune with ``tune.report({metric, step})``.  Those
intermediate reports are what an ASHA scheduler judges; stopping a trial ends its process, and
with it the Ray Train controller and workers it owns.  The last report carries the finished
run's metrics, its model folder and ``completed: True``.

Each trial writes ``<out>/trials/<trial_id>/trial.json`` (params, status, error or result) so a
trial that fails is reported with its error, never lost.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from sepit.errors import SepitError

#: Seconds between reads of the stage's step log while it trains.
POLL_S = 1.0
TRIAL_FILE = "trial.json"


class TrialError(SepitError, RuntimeError):
    """A trial's stage-2 run failed or did not report the sweep's objective."""


def write_trial_file(trial_dir: Path, record: dict[str, Any]) -> None:
    trial_dir.mkdir(parents=True, exist_ok=True)
    tmp = trial_dir / f".{TRIAL_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(trial_dir / TRIAL_FILE)


def read_trial_file(trial_dir: Path) -> dict[str, Any] | None:
    f = Path(trial_dir) / TRIAL_FILE
    return json.loads(f.read_text()) if f.is_file() else None


class _StageThread(threading.Thread):
    """Runs ``run_stage2(config)``; keeps its result or exception for the trial thread."""

    def __init__(self, config: Any):
        super().__init__(name="sepit-stage2", daemon=True)
        self.config = config
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.error_text = ""

    def run(self) -> None:
        from sepit.train.stage2 import run_stage2

        try:
            self.result = run_stage2(self.config)
        except BaseException as exc:  # reported by the trial thread, with the traceback
            self.error = exc
            self.error_text = traceback.format_exc()


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_trial(params: dict[str, Any], *, sweep: dict[str, Any]) -> None:
    """Tune function trainable.  ``params`` = this trial's sampled values (see sepit.tune.space);
    ``sweep`` = {config: SweepConfig, tracking_uri, parent_run_id}."""
    import ray
    from ray import tune

    from sepit.config.base import from_dict
    from sepit.train.stage2 import Stage2JobConfig
    from sepit.train.step_log import read_step_log

    from .config import trial_stage_dict

    cfg = sweep["config"]
    metric = cfg.metric
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    trial_dir = cfg.out_path / "trials" / trial_id
    stage_cfg = from_dict(Stage2JobConfig, trial_stage_dict(
        cfg, params, output_dir=str(trial_dir), run_name=f"stage2-{trial_id}",
        tracking_uri=sweep["tracking_uri"], parent_run_id=sweep["parent_run_id"]))
    # The actor id lets the sweep driver wait for this process to be gone before it settles the
    # MLflow run's final status (a stopped trial may still be closing its run as FAILED).
    record: dict[str, Any] = {"trial_id": trial_id, "params": params, "status": "RUNNING",
                              "output_dir": str(trial_dir), "tune_dir": ctx.get_trial_dir(),
                              "actor_id": ray.get_runtime_context().get_actor_id(),
                              "started": time.time()}
    write_trial_file(trial_dir, record)

    max_steps = stage_cfg.train.max_steps
    step_log = stage_cfg.train.train_log
    reported: set[int] = set()

    def forward_validation() -> None:
        # The final validation (step max_steps) is reported below with the finished run's metrics.
        for step, rec in read_step_log(step_log, "val").items():
            if step in reported or step >= max_steps or metric not in rec:
                continue
            reported.add(step)
            tune.report({metric: float(rec[metric]), "step": step, "completed": False})

    stage = _StageThread(stage_cfg)
    stage.start()
    while stage.is_alive():
        stage.join(POLL_S)
        forward_validation()

    record["finished"] = time.time()
    record["wall_s"] = record["finished"] - record["started"]
    if stage.error is not None:
        record.update(status="ERROR", error=f"{type(stage.error).__name__}: {stage.error}",
                      traceback=stage.error_text)
        write_trial_file(trial_dir, record)
        raise TrialError(f"trial {trial_id} ({_describe(params)}) failed: "
                         f"{type(stage.error).__name__}: {stage.error}") from stage.error
    result = stage.result or {}
    metrics = _numeric(result.get("metrics") or {})
    if metric not in metrics:
        record.update(status="ERROR", error=f"the stage-2 run reported no {metric!r} (got {sorted(metrics)}); "
                                            "is the validation split empty?", result=result)
        write_trial_file(trial_dir, record)
        raise TrialError(f"trial {trial_id} ({_describe(params)}): {record['error']}")
    val_log = read_step_log(step_log, "val")
    best = [r[metric] for r in val_log.values() if metric in r]
    final = dict(metrics, step=int(metrics.get("step", max_steps)), completed=True,
                 model_dir=str(result.get("model_dir", "")), mlflow_run_id=str(result.get("mlflow_run_id", "")),
                 wall_s=record["wall_s"])
    if best:
        final[f"best_{metric}"] = float(min(best) if cfg.mode == "min" else max(best))
    record.update(status="TERMINATED", result={k: v for k, v in result.items() if k != "metrics"}, metrics=final)
    write_trial_file(trial_dir, record)
    tune.report(final)


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
