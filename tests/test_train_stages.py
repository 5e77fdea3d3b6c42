"""Stages 0 -> 1 -> 2 on the bundled real data, tracked in one MLflow store under a pipeline parent
run, and a stage submitted as `ray job submit -- python jobs/stage2.py` to a real head node.

The stages come from the session's tiny pipeline (``tiny_pipeline`` in conftest.py: made once,
shared with test_pipeline.py and test_sweep.py). The chain exercises both ways a stage names its
parent (the pipeline passes the previous export's folder; the job passes stage 1's MLflow run
id), 2-rank DeepSpeed under ZeRO-2 in stages 1 and 2 (MoE in 2), and shows the learning is real:
on every stage the training loss falls well below where it started and the validation loss
beats the untrained model's (``eval_at_start``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sepit.config.base import ConfigError
from sepit.pipeline import command_config
from sepit.train.lineage import git_commit
from sepit.train.step_log import read_step_log
from ray_head import RAY_CLI

REPO = Path(__file__).resolve().parents[1]


def test_stage2_refuses_zero3_at_config_time(capsys):
    with pytest.raises(ConfigError, match=r"train.zero_stage=3.*ZeRO-3"):
        command_config("stage2", "tiny", overrides=["init=x", "train.zero_stage=3"])
    from sepit.cli import main

    # The command fails before touching Ray, data or MLflow, with a one-line reason.
    assert main(["stage2", "--init", "/nonexistent", "train.zero_stage=3"]) == 2
    assert "DeepSpeed does not support under ZeRO-3" in capsys.readouterr().err


def test_zero3_with_structure_bias_is_accepted_for_stages_0_and_1():
    # ZeRO-3 trains a structure-biased encoder (tests/test_zero3_structure_bias.py: equal to
    # ZeRO-2); only stage 2 refuses ZeRO-3 (DeepSpeed MoE, above).
    for stage in ("stage0", "stage1"):
        cfg = command_config(stage, "tiny", overrides=["train.zero_stage=3"])
        assert cfg.train.zero_stage == 3 and cfg.model.encoder.use_structure


STEPS = 20  # the tiny pipeline's steps per stage (validation at 0, 10 and 20)


def assert_learned(out: Path, stage: str, min_drop: float) -> dict:
    train, val = read_step_log(out / "train_log.jsonl"), read_step_log(out / "train_log.jsonl", "val")
    assert list(train) == list(range(1, STEPS + 1)), f"{stage}: steps {list(train)}"
    first = sum(train[s]["loss"] for s in range(1, 6)) / 5
    last = sum(train[s]["loss"] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - min_drop, f"{stage}: training loss {first:.3f} -> {last:.3f}"
    assert sorted(val) == [0, STEPS // 2, STEPS]
    assert val[STEPS]["val_loss"] < val[0]["val_loss"], f"{stage}: val loss {val[0]['val_loss']} -> {val[STEPS]['val_loss']}"
    return {"train": train, "val": val}


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _pipeline_parent(client) -> str:
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r.info.run_id for r in runs if r.data.tags.get("sepit.kind") == "pipeline"]
    return parent


@pytest.mark.slow
def test_stages_learn_and_record_lineage(tiny_pipeline):
    """Stages 0 -> 1 -> 2 of the session's tiny pipeline (stages 1 and 2 on 2 DeepSpeed ranks under
    ZeRO-2, see ``TINY_PIPELINE_OVERRIDES``): each learned, each is an MLflow child run of the
    pipeline with its lineage, and the exported stage-2 model needs no DeepSpeed."""
    from mlflow.tracking import MlflowClient

    out = {n: tiny_pipeline.out / f"stage{n}" for n in range(3)}
    client = MlflowClient(tiny_pipeline.tracking_uri)
    parent = _pipeline_parent(client)
    commit = git_commit(REPO)  # what the pipeline saw: the checkout's commit (+dirty if edited)
    runs = {}
    for n in range(3):
        assert_learned(out[n], f"stage{n}", min_drop={0: 1.0, 1: 0.3, 2: 0.1}[n])
        run_id = tiny_pipeline.run_id(f"stage{n}")
        run = client.get_run(run_id)
        runs[n] = run
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["sepit.stage"] == f"stage{n}"
        lineage = json.loads((out[n] / "model" / "lineage.json").read_text())
        assert lineage["stage"] == f"stage{n}" and lineage["mlflow_run_id"] == run_id
        assert lineage["git_commit"] == commit
        assert set(lineage["data"]["files"]) == {f"stage{n}/{s}.parquet" for s in ("train", "val", "test")}
        assert {"lineage.json", "config.yaml", "loss_curve.png", "model"} <= {a.path for a in client.list_artifacts(run_id)}
    # each stage names its parent: the previous stage's export and MLflow run
    for n in (1, 2):
        lineage = json.loads((out[n] / "model" / "lineage.json").read_text())
        assert lineage["parent"]["stage"] == f"stage{n - 1}" and lineage["parent"]["run_id"] == runs[n - 1].info.run_id

    # stage 0: retrieval accuracy over the whole validation split (20 tiny steps leave it near
    # chance, so only its presence and range are checked here)
    val0 = read_step_log(out[0] / "train_log.jsonl", "val")
    n_val = round(1 / val0[STEPS]["val_retrieval_chance"])
    assert n_val >= 40 and all(0 <= val0[STEPS][k] <= 1 for k in ("val_p2t_top1", "val_t2p_top1", "val_p2t_top5"))
    assert val0[STEPS]["val_clip_loss"] < val0[0]["val_clip_loss"]
    # stage 2: aux loss in the loss, tokens per expert per layer logged, 4 experts top-1
    m2 = runs[2].data.metrics
    assert m2["aux_loss"] > 0 and {f"moe/layer{i}/expert{e}_tokens" for i in (0, 1) for e in range(4)} <= set(m2)
    step = read_step_log(out[2] / "train_log.jsonl")[STEPS]
    routed = sum(step[f"moe/layer0/expert{e}_tokens"] for e in range(4))
    assert routed > 0 and routed == sum(step[f"moe/layer1/expert{e}_tokens"] for e in range(4))

    # the exported stage-2 model needs no DeepSpeed: plain MoE blocks, and it answers
    from lm_support import load_lm

    from sepit.models.moe import MoEFeedForward, moe_blocks
    from sepit.processing import generate_answers

    model, processor = load_lm(out[2] / "model")
    blocks = list(moe_blocks(model))
    assert len(blocks) == 2 and all(isinstance(b, MoEFeedForward) for _, b in blocks)
    answers = generate_answers(model, processor, ["What is the function of <protein>?"],
                               [("MKTAYIAKQRQISFVKSHFSRQ", None, None)], max_new_tokens=8)
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.slow
def test_pipeline_model_is_served_from_its_registry_alias(tiny_pipeline):
    """(Before the job below registers another stage-2 version.) Every stage the pipeline trained
    is a registered MLflow Model; `sepit serve --model
    models:/sepit-stage2@latest` pins the alias to that version, and a Serve model replica (built
    in-process, as Serve would on its node) loads it from the registry and answers."""
    import asyncio

    import mlflow
    from mlflow.tracking import MlflowClient

    from sepit.serve.config import ServeConfig
    from sepit.serve.model_runner import SepitModelRunner
    from sepit.serve.protocol import GenerationItem
    from sepit.tracking.models import pin_model_uri

    client = MlflowClient(tiny_pipeline.tracking_uri)
    for n in range(3):
        version = client.get_model_version_by_alias(f"sepit-stage{n}", "newest")
        assert version.run_id == tiny_pipeline.run_id(f"stage{n}")
    # A replica is a fresh process whose environment carries the store; this test process may
    # have another store set by an earlier test (mlflow.set_tracking_uri wins over the variable).
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tiny_pipeline.tracking_uri)  # also sets MLFLOW_TRACKING_URI, as the replica's environment
    pinned = pin_model_uri("models:/sepit-stage2@latest", tracking_uri=tiny_pipeline.tracking_uri)
    assert pinned == f"models:/sepit-stage2/{client.get_model_version_by_alias('sepit-stage2', 'newest').version}"
    runner = SepitModelRunner(ServeConfig(model_dir=pinned, warmup_question="What is the function of this protein?",
                                          warmup_sequence="MKTAYIAKQRQISFVKSHFSRQ").require_model_dir())
    try:
        assert runner.ready_state()["warm"]
        [result] = asyncio.run(runner.generate([GenerationItem(
            question="Where is this protein located?", sequence="MSDNGPQNQRNAPRITFGGPSDSTGSNQNGERS",
            max_new_tokens=5)], 60.0))
        assert result.error is None and isinstance(result.text, str)
    finally:
        runner.batcher.stop()
        mlflow.set_tracking_uri(previous)


JOB_STEPS = 4


@pytest.mark.slow
def test_stage2_as_a_ray_job_on_a_head_node(tiny_pipeline, ray_head_node, tmp_path):
    """`ray job submit -- python jobs/stage2.py` against a real head node: DeepSpeed MoE under
    ZeRO-2 (one rank: the pipeline above trains stage 2 on two), the parent named by its MLflow run
    id (fetched from the store), the run a child of the pipeline's run, and the commit passed by the
    submitter (the uploaded working dir has no .git)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny_pipeline.tracking_uri)
    parent = _pipeline_parent(client)
    stage1_run = tiny_pipeline.run_id("stage1")
    out, commit = tmp_path / "stage2", _commit()
    job = subprocess.run(
        [RAY_CLI, "job", "submit", "--address", ray_head_node.address, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"env_vars": {"SEPIT_GIT_COMMIT": commit}}), "--",
         "python", "jobs/stage2.py", "--preset", "tiny", "--out", str(out), "--init", stage1_run,
         "--data", str(tiny_pipeline.out / "dataset"), "--tracking-uri", tiny_pipeline.tracking_uri,
         "--parent-run-id", parent, f"train.max_steps={JOB_STEPS}", f"train.eval_every={JOB_STEPS}",
         f"train.checkpoint_every={JOB_STEPS}", "train.max_failures=0", "train.zero_stage=2"],
        env=ray_head_node.env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output, output[-5000:]
    assert "Started a local Ray instance" not in output  # the job joined the head node
    assert "sepit stage2: done" in output

    assert list(read_step_log(out / "train_log.jsonl")) == list(range(1, JOB_STEPS + 1))
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["sepit.lineage.parent"] == stage1_run
    lineage = json.loads((out / "model" / "lineage.json").read_text())
    assert lineage["stage"] == "stage2" and lineage["mlflow_run_id"] == run_id and lineage["git_commit"] == commit
    assert lineage["parent"]["stage"] == "stage1" and lineage["parent"]["run_id"] == stage1_run

