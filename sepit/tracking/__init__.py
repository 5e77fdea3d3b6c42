"""MLflow, in one place.

Every sepit job is an MLflow run, and only this package imports ``mlflow``: the rest of sepit
logs through the functions here (``tests/test_one_place.py`` checks it).  The tracking URI is,
in order: an explicit argument / config value, ``MLFLOW_TRACKING_URI``, else a sqlite store
inside the job's output folder (the plain ``./mlruns`` file store is refused by recent MLflow
unless explicitly allowed; sqlite works offline and survives concurrent writers on one machine).

    with start_run("stage1", out_dir=out, parent_run_id=pipeline_run) as run:
        log_params(cfg_dict); log_metrics({"loss": 0.5}); log_artifact("report.md")

Exported models go to the model registry through :mod:`sepit.tracking.models`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from sepit.config.base import ConfigError

DEFAULT_EXPERIMENT = "sepit"
MLFLOW_DB = "mlflow.db"
#: ``0`` turns off MLflow's system metrics for runs started here (e.g. in short tests).
SYSTEM_METRICS_ENV = "SEPIT_SYSTEM_METRICS"


def default_tracking_uri(out_dir: str | Path) -> str:
    """``sqlite:///<out_dir>/mlflow.db`` (absolute path; the folder is created)."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / MLFLOW_DB}"


_URIS_WE_SET: set[str] = set()


def _set_uri(uri: str) -> None:
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI") != uri:
        _URIS_WE_SET.add(uri)
    mlflow.set_tracking_uri(uri)


def resolve_tracking_uri(uri: str | None = None, out_dir: str | Path | None = None) -> str:
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    # mlflow.set_tracking_uri() also writes MLFLOW_TRACKING_URI: a value we set ourselves for an
    # earlier run in this process is not the user's choice and must not capture later runs.
    if env and env not in _URIS_WE_SET:
        return env
    if out_dir is None:
        raise ConfigError("no MLflow tracking URI: pass one, set MLFLOW_TRACKING_URI, or give an output folder")
    return default_tracking_uri(out_dir)


def _artifact_location(uri: str) -> str | None:
    # With a sqlite store, keep artifacts beside the database instead of ./mlruns in the CWD.
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def get_or_create_experiment(name: str, uri: str) -> str:
    import mlflow

    _set_uri(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=_artifact_location(uri))
    except Exception:  # created concurrently by another process
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": v}`` with values MLflow accepts (lists as JSON, max 6000 chars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            if isinstance(v, (list, tuple)):
                v = json.dumps(list(v), default=str)
            s = str(v)
            out[key] = s[:6000]
    return out


def system_info() -> dict[str, str]:
    """What the run ran on (tags ``sys.*``): versions and machine size; MLflow's system metrics
    (psutil, like the memory size here) add the utilisation over time."""
    import psutil
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": str(torch.cuda.is_available()),
        "cpu_count": str(os.cpu_count()),
        "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = str(torch.cuda.device_count())
    for mod in ("ray", "deepspeed", "transformers", "mlflow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return info


@contextlib.contextmanager
def start_run(
    run_name: str,
    *,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    system_metrics: bool | None = None,
) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) an MLflow run; nested under ``parent_run_id`` if given.

    Logs the system info (package versions, platform) as tags and, while the run is open, MLflow's
    system metrics (CPU, memory, disk, network, GPU when present; every
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` s, 10 by default).  ``system_metrics=None`` follows
    ``$SEPIT_SYSTEM_METRICS`` (default on; ``0`` turns it off).  Yields the active
    ``mlflow.ActiveRun``; the run ends FAILED if the body raises.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri, out_dir)
    exp_id = get_or_create_experiment(experiment, uri)
    all_tags = {f"sys.{k}": v for k, v in system_info().items()}
    all_tags.update(tags or {})
    # Do not let a run left active in this process (e.g. a pipeline parent) swallow ours.
    active = mlflow.active_run()
    nested = active is not None
    parent = None if run_id else parent_run_id
    if parent and active is not None and active.info.run_id != parent:
        # MLflow nests a run under the active one only; another parent is recorded by its tag.
        all_tags["mlflow.parentRunId"], parent = parent, None
    if system_metrics is None:
        system_metrics = os.environ.get(SYSTEM_METRICS_ENV, "1") not in ("0", "false", "False", "")
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else exp_id,
        run_name=None if run_id else run_name,
        nested=nested,
        parent_run_id=parent,
        tags=all_tags if not run_id else None,
        log_system_metrics=system_metrics,
    ) as run:
        yield run


def log_params(params: Mapping[str, Any]) -> None:
    """Log a nested dict as flat params (MLflow splits it into batches of 100 itself)."""
    import mlflow

    mlflow.log_params(flatten(params))


def log_dict_artifact(data: Any, name: str) -> None:
    import mlflow

    mlflow.log_dict(data, name)


# --------------------------------------------------------------------------- the active run
def import_mlflow() -> None:
    """Import MLflow now: it configures its logger at import, so a caller about to reroute the
    loggers (:func:`sepit.console.capture_logs`) imports it first."""
    import mlflow  # noqa: F401


def log_metrics(metrics: Mapping[str, float]) -> None:
    """Log flat ``{name: value}`` metrics to the active run."""
    import mlflow

    mlflow.log_metrics(dict(metrics))


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run."""
    import mlflow

    mlflow.set_tags(dict(tags))


def log_artifact(path: str | Path, folder: str | None = None) -> None:
    """Attach a file to the active run, at the top of its artifacts or in ``folder``."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=folder)


def log_report_files(paths: Iterable[str | Path]) -> None:
    """Attach a report's files to the active run: PNG plots in ``plots/``, the rest at the top."""
    for p in map(Path, paths):
        log_artifact(p, "plots" if p.suffix == ".png" else None)


# --------------------------------------------------------------------------- used by training
def run_params(run_id: str, tracking_uri: str) -> dict[str, str] | None:
    """The params of an existing run, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return dict(MlflowClient(tracking_uri).get_run(run_id).data.params)
    except MlflowException:
        return None


def run_status(run_id: str, tracking_uri: str) -> str:
    """The status of an existing run: RUNNING, FINISHED, FAILED or KILLED."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).info.status


def end_run_as(run_id: str, tracking_uri: str, status: str) -> None:
    """Close a run another process left open (e.g. a trial the scheduler stopped) with ``status``."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status)


class MetricBatch:
    """Per-step metrics of one run, sent from any process given the URI with MLflow's asynchronous
    logging: ``add`` returns at once, MLflow's queue sends them (merging what arrives within
    ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` into one request when that is set) and ``flush``
    waits until everything added so far is stored (called at checkpoints and at the end)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._pending: list[Any] = []  # RunOperations of adds not yet known to be stored

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ops = self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()],
                                     synchronous=False)
        if ops is not None:
            self._pending.append(ops)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for ops in pending:
            ops.wait()
