"""Rank 0's per-step metric sink: a JSON-lines log in the output folder, MLflow metrics and the
driver's progress display.

MLflow writes are batched (one ``log_batch`` per ``flush_every`` steps, and at every checkpoint)
so a sqlite store is not hit once per step.  The JSON-lines log is what the loss-curve plot and
the kill/resume comparisons read; a restarted run appends, and readers keep the last value per
step (:func:`read_step_log`).

The console display is drawn by the driver, not by worker prints: :func:`training_progress`
opens a Ray queue, rank 0's :class:`StepLog` puts a few fields of every logged step on it, and a
driver thread turns them into one :class:`sepit.console.Progress` (step k/n, loss, tok/s, ETA).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Iterator

#: The fields of a step that travel to the driver's display (the rest stays in the log/MLflow).
PROGRESS_FIELDS = ("loss", "val_loss", "tokens_per_s")


class StepLog:
    def __init__(self, path: Path, *, tracking_uri: str | None, run_id: str | None, flush_every: int = 20,
                 progress: Any = None):
        self.path = Path(path)
        self.progress = progress  # a ray.util.queue.Queue from training_progress, or None
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
        self._to_driver(step, clean, kind)
        if self._mlflow is None:
            return
        self._mlflow.add(step, clean)
        if kind != "train" or step % self.flush_every == 0:
            self.flush()

    def _to_driver(self, step: int, metrics: dict[str, float], kind: str) -> None:
        if self.progress is None:
            return
        try:
            self.progress.put_nowait({"kind": kind, "step": step,
                                      **{k: metrics[k] for k in PROGRESS_FIELDS if k in metrics}})
        except Exception:  # noqa: BLE001 - a full/gone display queue must never stop training
            self.progress = None

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


@contextlib.contextmanager
def training_progress(label: str, max_steps: int, poll_s: float = 0.5) -> Iterator[Any]:
    """Driver side: yields the queue to hand rank 0 (``StepLog(progress=...)``) and draws its steps
    as one progress display until the block ends."""
    from ray.util.queue import Empty, Queue

    from sepit.console import Progress

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    bar = Progress(label, max_steps, unit="step", order=("loss", "val_loss", "tok/s"))
    stop = threading.Event()

    def show(item: dict[str, Any]) -> None:
        fields = {"loss": item.get("loss"), "val_loss": item.get("val_loss"), "tok/s": item.get("tokens_per_s")}
        if item.get("kind") == "val":  # a validation result: keep the train fields, add val_loss
            fields = {"val_loss": item.get("val_loss")}
        bar.update(int(item["step"]), **fields)

    def drain(block: bool) -> None:
        while True:
            try:
                show(queue.get(block=block, timeout=poll_s if block else None))
            except Empty:
                return
            except Exception:  # noqa: BLE001 - Ray shut down under us: stop drawing
                stop.set()
                return
            block = False

    def pump() -> None:
        while not stop.is_set():
            drain(block=True)

    thread = threading.Thread(target=pump, name="sepit-training-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=5 * poll_s)
        drain(block=False)
        bar.close()
        with contextlib.suppress(Exception):
            queue.shutdown()
