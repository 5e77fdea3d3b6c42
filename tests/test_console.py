"""What a user sees: one progress display per step and summaries; Ray's own output in RUN/logs/."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sepit.console import Progress, capture_logs, report

ROOT = Path(__file__).resolve().parents[1]
# What Ray/MLflow/DeepSpeed print when they reach the console (the flood this module removes).
LIBRARY_NOISE = re.compile(r"\bINFO\b|\(pid=|pid=\d+\)|\(raylet\)|RayTrainWorker|TrainController|"
                           r"worker processes have been started|logging_progress|streaming_executor")


def test_plain_stream_progress_is_one_line_per_update_without_carriage_returns():
    out = io.StringIO()  # not a terminal: CI, pipes
    bar = Progress("stage1", 100, unit="step", stream=out, every_s=3600)
    for step in range(1, 101):
        bar.update(step, loss=2.0 / step, **{"tok/s": 1234.0})
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # rate-limited: the first update and the last one, not 100 lines
    assert len(lines) == 2, lines
    assert re.fullmatch(r"  stage1  step 1/100 \(1%\)  loss 2  1,234 tok/s  elapsed 0:00  ETA \S+", lines[0]), lines[0]
    assert lines[1].startswith("  stage1  step 100/100 (100%)  loss 0.02  1,234 tok/s  elapsed ")
    assert "ETA" not in lines[1]


def test_progress_eta_counts_from_the_first_update_of_a_resumed_run():
    out = io.StringIO()
    bar = Progress("stage2", 100, unit="step", stream=out, every_s=0)
    bar.update(50)  # resumed at step 50
    bar.t0 -= 10.0  # 10 s later, 10 more steps: 1 step/s, 40 to go
    bar.update(60)
    assert bar.eta_s() == pytest.approx(40, rel=0.05)
    assert out.getvalue().splitlines()[-1].endswith("ETA 0:40")


def test_callback_progress_closes_at_total_and_restarts_on_a_new_count():
    out = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, out
    try:
        for done in (2, 4):
            report("evaluate", done, 4, unit="answers")
        report("evaluate", 1, 2, unit="answers")  # the compare model's pass starts a new display
        report("evaluate", 2, 2, unit="answers")
    finally:
        sys.stdout = sys_stdout
    lines = out.getvalue().splitlines()
    assert [ln.split("elapsed")[0].strip() for ln in lines] == [
        "evaluate  2/4 answers (50%)", "evaluate  4/4 answers (100%)",
        "evaluate  1/2 answers (50%)", "evaluate  2/2 answers (100%)"]


def test_capture_sends_ray_worker_output_and_library_logs_to_run_logs(ray_local, tmp_path, capsys):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def chatty() -> int:
        print("hello from a ray worker")
        print("ERROR something in the worker broke", file=sys.stderr)
        return 1

    ray_handlers_before = list(logging.getLogger("ray").handlers)
    with capture_logs(tmp_path) as logs:
        logging.getLogger("ray.data").info("a Ray Data INFO line")
        logging.getLogger("mlflow").warning("an MLflow warning")
        assert ray.get(chatty.remote()) == 1
        deadline = time.time() + 20  # worker output reaches the driver asynchronously
        while time.time() < deadline and "broke" not in (logs / "ray-workers.log").read_text():
            time.sleep(0.2)
    shown = capsys.readouterr()
    assert logs == tmp_path.absolute() / "logs"
    workers = (logs / "ray-workers.log").read_text()
    assert "hello from a ray worker" in workers and "pid=" in workers
    assert "a Ray Data INFO line" in (logs / "ray.log").read_text()
    assert "an MLflow warning" in (logs / "mlflow.log").read_text()
    assert "hello from a ray worker" not in shown.out + shown.err
    assert "a Ray Data INFO line" not in shown.out + shown.err
    # a real problem still reaches the console, in one line that says where the details are
    problem = [ln for ln in shown.out.splitlines() if "broke" in ln]
    assert len(problem) == 1 and str(logs / "ray-workers.log") in problem[0]
    assert problem[0].startswith("  ! chatty: ERROR something in the worker broke"), problem
    assert not LIBRARY_NOISE.search(problem[0].replace("ERROR", ""))  # no "(chatty pid=...)" prefix
    # the capture is undone: library loggers print as before
    assert logging.getLogger("ray").handlers == ray_handlers_before


def test_driver_draws_training_steps_reported_by_rank0(ray_local, tmp_path, capsys):
    from sepit.train.step_log import StepLog, training_progress

    ray = ray_local

    @ray.remote(num_cpus=0)
    def rank0(queue, path: str) -> None:
        log = StepLog(Path(path), tracking_uri=None, run_id=None, progress=queue)
        for step in range(1, 4):
            log.log(step, {"loss": 3.0 - step, "tokens_per_s": 500.0, "lr": 1e-3})
        log.log(3, {"val_loss": 0.5}, kind="val")

    with training_progress("stage1", 3) as queue:
        ray.get(rank0.remote(queue, str(tmp_path / "train_log.jsonl")))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("  stage1  step 3/3 (100%)  loss 0  val_loss 0.5  500 tok/s  elapsed "), lines


def test_cli_run_shows_progress_and_summary_not_ray_output(tmp_path):
    """A real `sepit pipeline` (preprocess step on a few bundled structures) through a pipe."""
    from sepit.resources import DATA_DIR

    inputs = sorted((DATA_DIR / "biotite_testdata").glob("*.gz"))[:4]
    out = tmp_path / "run"
    env = dict(os.environ, SEPIT_PROGRESS_EVERY_S="0")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sepit.cli", "pipeline", "--preset", "tiny", "--steps", "preprocess",
         "--out", str(out), f"preprocess.inputs=[{','.join(map(str, inputs))}]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "\r" not in proc.stdout
    noise = [ln for ln in (proc.stdout + proc.stderr).splitlines() if LIBRARY_NOISE.search(ln)]
    assert not noise, noise[:10]
    assert "[1/1] preprocess ..." in proc.stdout
    assert re.search(r"  preprocess  4/4 units \(100%\)  records \d+  rejected \d+  elapsed ", proc.stdout), proc.stdout
    assert re.search(r"\[1/1\] preprocess: done in \d+ s  \d+ protein records from 4 files", proc.stdout)
    assert "sepit pipeline finished" in proc.stdout
    logs = out / "logs"
    assert "Started a local Ray instance" in (logs / "ray.log").read_text()
    assert "Starting execution of Dataset" in (logs / "ray.log").read_text()
    assert "Creating initial MLflow database tables" in (logs / "mlflow.log").read_text()
    assert "input files" in (logs / "run.log").read_text()  # sepit's own detail lines
