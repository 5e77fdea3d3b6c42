"""Rank 0's per-step metric sink: a JSON-lines log in the output folder and MLflow metrics.

MLflow writes are batched (one ``log_batch`` per ``flush_every`` steps, and at every checkpoint)
so a sqlite store is not hit once per step.  The JSON-lines log is what the loss-curve plot and
the kill/resume comparisons read; a restarted run appends, and readers keep the last value per
step (:func:`read_step_log`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class StepLog:
    def __init__(self, path: Path, *, tracking_uri: str | None, run_id: str | None, flush_every: int = 20):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self._mlflow = None
        if tracking_uri and run_id:
            from sepit.tracking import MetricBatch

            self._mlflow = MetricBatch(tracking_uri, run_id)

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **clean}) + "\n")
        if self._mlflow is None:
            return
        self._mlflow.add(step, clean)
        if kind != "train" or step % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        if self._mlflow is not None:
            self._mlflow.flush()


def read_step_log(path: Path, kind: str = "train") -> dict[int, dict[str, float]]:
    """``{step: metrics}`` of one kind; a step logged twice (re-run after a restart) keeps the last."""
    out: dict[int, dict[str, float]] = {}
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == kind:
            out[int(rec["step"])] = rec
    return dict(sorted(out.items()))
