"""Ray Train + DeepSpeed + MLflow for real: a worker killed mid-run, a stopped run resumed in
its output folder, and an MLflow tracking server on loopback.

One uninterrupted 2-worker ZeRO-3 run (the baseline, tracked by a real ``mlflow server``) is the
reference; the interrupted runs must end at the same step with the same loss trajectory.
Training is deterministic (seeds, fixed data order, data position and RNG states restored), so
the tolerance is tight: |Δloss| <= 1e-4 at every step (gloo all-reduces of 2 ranks and CPU fp32
kernels are reproducible; the slack only covers summation-order noise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray.cloudpickle

import train_support
from sepit.train.config import TrainConfig
from sepit.train.launch import run_training
from sepit.train.lineage import resolve_parent
from sepit.train.step_log import read_step_log

ray.cloudpickle.register_pickle_by_value(train_support)  # Ray workers cannot import tests/
pytestmark = pytest.mark.slow

LOSS_TOLERANCE = 1e-4
MAX_STEPS = 24
KILL_AT_STEP = 11  # after the step-8 checkpoint, before the step-16 one


@dataclass
class ToyStageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)


def toy_config(out: Path, **kw) -> ToyStageConfig:
    # 355 rows per worker = 45 micro-batches per epoch; 24 steps x 2 accumulated micro-batches
    # cross an epoch boundary, so the restored data position must include the epoch.
    base = dict(output_dir=str(out), run_name="toy", num_workers=2, cpus_per_worker=0.5, zero_stage=3,
                micro_batch_size=8, grad_accum_steps=2, max_steps=MAX_STEPS, warmup_steps=3, lr=3e-3,
                eval_every=8, checkpoint_every=8, max_failures=1, bucket_window=4)
    base.update(kw)
    return ToyStageConfig(TrainConfig(**base))


def wait_for_step(log: Path, step: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        done = read_step_log(log)
        if done and max(done) >= step:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited (rc={proc.returncode}) before step {step}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached within {timeout} s")


def assert_same_trajectory(log: Path, reference: Path) -> None:
    got, ref = read_step_log(log), read_step_log(reference)
    assert list(got) == list(range(1, MAX_STEPS + 1)) == list(ref)
    worst = max(abs(got[s]["loss"] - ref[s]["loss"]) for s in ref)
    assert worst <= LOSS_TOLERANCE, f"loss trajectories differ by up to {worst}"
    vgot, vref = read_step_log(log, "val"), read_step_log(reference, "val")
    assert list(vgot) == list(vref) == [8, 16, 24]
    assert max(abs(vgot[s]["val_loss"] - vref[s]["val_loss"]) for s in vref) <= LOSS_TOLERANCE


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return train_support.write_sequence_dataset(tmp_path_factory.mktemp("toy_data"))


@pytest.fixture(scope="module")
def baseline(ray_local, toy_data, tmp_path_factory, mlflow_server):
    out = tmp_path_factory.mktemp("baseline")
    cfg = toy_config(out, tracking_uri=mlflow_server)
    outcome = run_training(train_support.ResidueLMTask(), cfg.train, dataset_dir=toy_data, data_stage="toy",
                           stage_config=cfg)
    # The resume test extends this run later; keep the uninterrupted trajectory aside.
    shutil.copy(out / "train_log.jsonl", out / "reference_log.jsonl")
    return outcome


def test_run_is_tracked_on_a_real_mlflow_server(baseline, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(baseline.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "3" and run.data.params["train.num_workers"] == "2"
    assert run.data.tags["sepit.stage"] == "toy" and run.data.tags["sepit.lineage.parent"] == "none"
    assert "sys.torch" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, MAX_STEPS + 1))
    for key in ("lr", "tokens_per_s", "data_wait_share", "lm_loss"):
        assert len(client.get_metric_history(run.info.run_id, key)) == MAX_STEPS, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [8, 16, 24]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"lineage.json", "config.yaml", "loss_curve.png", "model"} <= artifacts
    # a later stage names this one by run id: the model artifact comes back through the server
    parent = resolve_parent(run.info.run_id, mlflow_server, download_to=baseline.output_dir / "parent_copy")
    assert parent.run_id == run.info.run_id and parent.stage == "toy"
    assert (Path(parent.path) / "weights.pt").read_bytes() == (baseline.model_dir / "weights.pt").read_bytes()
    lineage = json.loads((baseline.model_dir / "lineage.json").read_text())
    assert lineage["mlflow_run_id"] == run.info.run_id and lineage["stage"] == "toy"
    assert set(lineage["data"]["files"]) == {"toy/train.parquet", "toy/val.parquet"}
    assert lineage["config"]["train"]["max_steps"] == MAX_STEPS
    # lr schedule: warm-up then decay; the head group runs at twice the body's lr
    lr = read_step_log(baseline.output_dir / "reference_log.jsonl")
    assert lr[1]["lr"] == pytest.approx(1e-3) and lr[3]["lr"] == pytest.approx(3e-3)
    assert lr[MAX_STEPS]["lr"] < lr[10]["lr"] and lr[5]["lr/body"] == pytest.approx(lr[5]["lr/head"] / 2)
    assert lr[MAX_STEPS]["epoch"] == 1.0  # crossed into the second epoch


def test_killed_worker_restarts_from_checkpoint_with_same_trajectory(baseline, toy_data, tmp_path):
    cfg = toy_config(tmp_path / "killed")
    marker = tmp_path / "killed" / "workers" / "rank1.json"
    killed: dict = {}

    def killer():
        try:
            wait_for_step(cfg.train.train_log, KILL_AT_STEP, timeout=300)
            pid = json.loads(marker.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)  # a real crash of the rank-1 training worker process
            killed["pid"] = pid
        except Exception as exc:  # surfaced by the assertions below
            killed["error"] = exc

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    outcome = run_training(train_support.ResidueLMTask(), cfg.train, dataset_dir=toy_data, data_stage="toy",
                           stage_config=cfg)
    t.join(timeout=10)
    assert "error" not in killed, killed.get("error")
    after = json.loads(marker.read_text())
    assert after["pid"] != killed["pid"] and after["resumed_step"] in (8, 16)
    raw = [json.loads(x) for x in cfg.train.train_log.read_text().splitlines()]
    train_steps = [r["step"] for r in raw if r["kind"] == "train"]
    assert len(train_steps) > MAX_STEPS  # steps after the checkpoint really ran twice
    assert outcome.metrics["step"] == MAX_STEPS
    assert_same_trajectory(cfg.train.train_log, baseline.output_dir / "reference_log.jsonl")


def test_stopped_run_resumes_with_more_steps_in_the_same_folder(baseline, toy_data, mlflow_server):
    """The finished baseline (stopped at max_steps) is re-run in its folder with 6 more steps: it
    continues from its last ZeRO-3 checkpoint (RNG, data position), keeps its MLflow run on the
    server, and exports again."""
    out = baseline.output_dir
    weights_before = (baseline.model_dir / "weights.pt").read_bytes()
    cfg = toy_config(out, tracking_uri=mlflow_server, max_steps=MAX_STEPS + 6)
    resumed = run_training(train_support.ResidueLMTask(), cfg.train, dataset_dir=toy_data, data_stage="toy",
                           stage_config=cfg)
    assert json.loads((out / "workers" / "rank0.json").read_text())["resumed_step"] == MAX_STEPS
    raw = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw if r["kind"] == "train"] == list(range(1, MAX_STEPS + 7))  # none ran twice
    assert resumed.mlflow_run_id == baseline.mlflow_run_id and resumed.metrics["step"] == MAX_STEPS + 6
    assert Path(resumed.checkpoint).name == f"checkpoint_step{MAX_STEPS + 6:07d}"
    assert (resumed.model_dir / "weights.pt").read_bytes() != weights_before

    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server).get_run(baseline.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sepit.resumed"] == "true"
    assert run.data.tags["resumed_with.train.max_steps"] == str(MAX_STEPS + 6)
    assert len(MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "loss")) == MAX_STEPS + 6
