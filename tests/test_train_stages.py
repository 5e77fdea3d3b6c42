"""Stages 0 -> 1 -> 2 on the bundled real data, each as `ray job submit -- python jobs/stageN.py`
against a real local head node, tracked in one MLflow store under a pipeline parent run.

The chain exercises both ways a stage names its parent (stage 1 gets stage 0's MLflow run id,
stage 2 gets stage 1's output folder), 2-worker DeepSpeed MoE under ZeRO-2 in stage 2, and
shows the learning is real: on every stage the
training loss falls well below where it started and the validation loss beats the untrained
model's (``eval_at_start``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sepit.config.base import ConfigError, load_config
from sepit.train.stage2 import Stage2JobConfig, stage2_preset
from sepit.train.step_log import read_step_log
from ray_head import RAY_CLI, ray_head

REPO = Path(__file__).resolve().parents[1]
STEPS = 30


def test_stage2_refuses_zero3_at_config_time(capsys):
    with pytest.raises(ConfigError, match=r"train.zero_stage=3.*ZeRO-3"):
        load_config(Stage2JobConfig, overrides=["init=x", "train.zero_stage=3"], base=stage2_preset("tiny"))
    from sepit.cli import main

    # The command fails before touching Ray, data or MLflow, with a one-line reason.
    assert main(["stage2", "--init", "/nonexistent", "train.zero_stage=3"]) == 2
    assert "DeepSpeed does not support under ZeRO-3" in capsys.readouterr().err


def test_zero3_with_structure_bias_is_accepted_for_stages_0_and_1():
    # ZeRO-3 trains a structure-biased encoder (tests/test_zero3_structure_bias.py: equal to
    # ZeRO-2); only stage 2 refuses ZeRO-3 (DeepSpeed MoE, above).
    from sepit.train.stage0 import Stage0JobConfig, stage0_preset
    from sepit.train.stage1 import Stage1JobConfig, stage1_preset

    for cls, base in ((Stage0JobConfig, stage0_preset("tiny")), (Stage1JobConfig, stage1_preset("tiny"))):
        cfg = load_config(cls, overrides=["train.zero_stage=3"], base=base)
        assert cfg.train.zero_stage == 3 and cfg.model.encoder.use_structure


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    """Protein store from the bundled structures, then a stage 0/1/2 dataset from the bundled
    UniProt and STRING annotations (the DeepLoc FASTA and QA files are left out for speed)."""
    from sepit.data.build import BuildConfig, build_dataset
    from sepit.data.build_inputs import default_annotation_files
    from sepit.data.preprocess import PreprocessConfig, run_preprocess

    root = tmp_path_factory.mktemp("stage_data")
    run_preprocess(PreprocessConfig(out=str(root / "store")))
    files = [f for f in default_annotation_files() if "deeploc" not in f and "qa.jsonl" not in f]
    build_dataset(BuildConfig(proteins=str(root / "store"), out=str(root / "dataset"), annotations=files,
                              executor="local"))
    return root / "dataset"


def assert_learned(out: Path, stage: str, min_drop: float) -> dict:
    train, val = read_step_log(out / "train_log.jsonl"), read_step_log(out / "train_log.jsonl", "val")
    assert list(train) == list(range(1, STEPS + 1)), f"{stage}: steps {list(train)}"
    first = sum(train[s]["loss"] for s in range(1, 6)) / 5
    last = sum(train[s]["loss"] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - min_drop, f"{stage}: training loss {first:.3f} -> {last:.3f}"
    assert sorted(val) == [0, STEPS // 2, STEPS]
    assert val[STEPS]["val_loss"] < val[0]["val_loss"], f"{stage}: val loss {val[0]['val_loss']} -> {val[STEPS]['val_loss']}"
    return {"train": train, "val": val}


@pytest.mark.slow
def test_three_stages_as_ray_jobs_learn_and_record_lineage(dataset, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    parent = MlflowClient(tracking).create_run(mlflow.create_experiment("sepit", artifact_location=(tmp_path / "art").as_uri()),
                                               run_name="pipeline").info.run_id

    out = {n: tmp_path / f"stage{n}" for n in range(3)}
    # The uploaded working dir has no .git: the submitter passes the commit for the lineage.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    options = ["--data", str(dataset), "--tracking-uri", tracking, "--parent-run-id", parent]
    overrides = [f"train.max_steps={STEPS}", f"train.eval_every={STEPS // 2}", f"train.checkpoint_every={STEPS // 2}",
                 "train.eval_at_start=true", "train.max_failures=0"]
    stage_args = {  # (options, overrides)
        0: ([], []),
        # stage 1 on 2 ranks with ZeRO-2 (encoder trained): a rank whose batch has no structure
        # still gives the structure bias a (zero) gradient, or the ranks' reduce buckets differ
        1: (["--init", None], ["train.num_workers=2", "train.zero_stage=2"]),  # --init: stage 0's MLflow run id
        2: (["--init", str(out[1])], ["train.num_workers=2", "train.zero_stage=2"]),
    }
    with ray_head(tmp_path / "head.log", num_cpus=4, object_store_bytes=200_000_000) as head:
        for n in range(3):
            stage_options, stage_overrides = stage_args[n]
            if n == 1:
                stage_options = ["--init", json.loads((out[0] / "mlflow_run.json").read_text())["run_id"]]
            job = subprocess.run(
                [RAY_CLI, "job", "submit", "--address", head.address, "--working-dir", str(REPO),
                 "--runtime-env-json", json.dumps({"env_vars": {"SEPIT_GIT_COMMIT": commit}}), "--",
                 "python", f"jobs/stage{n}.py", "--preset", "tiny", "--out", str(out[n]), *options, *stage_options,
                 *overrides, *stage_overrides],
                env=head.env, cwd=REPO, capture_output=True, text=True, timeout=600,
            )
            output = job.stdout + job.stderr
            assert job.returncode == 0 and "succeeded" in output, output[-5000:]
            assert "Started a local Ray instance" not in output  # the job joined the head node
            assert f"sepit stage{n}: done" in output

    client = MlflowClient(tracking)
    runs = {}
    for n in range(3):
        assert_learned(out[n], f"stage{n}", min_drop={0: 1.0, 1: 0.3, 2: 0.1}[n])
        run_id = json.loads((out[n] / "mlflow_run.json").read_text())["run_id"]
        run = client.get_run(run_id)
        runs[n] = run
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["sepit.stage"] == f"stage{n}"
        lineage = json.loads((out[n] / "model" / "lineage.json").read_text())
        assert lineage["stage"] == f"stage{n}" and lineage["mlflow_run_id"] == run_id
        assert lineage["git_commit"] == commit
        assert set(lineage["data"]["files"]) == {f"stage{n}/{s}.parquet" for s in ("train", "val", "test")}
        assert {"lineage.json", "config.yaml", "loss_curve.png", "model"} <= {a.path for a in client.list_artifacts(run_id)}
    # lineage chain: stage 1 named its parent by MLflow run id, stage 2 by folder
    assert runs[1].data.tags["sepit.lineage.parent"] == runs[0].info.run_id
    lin2 = json.loads((out[2] / "model" / "lineage.json").read_text())
    assert lin2["parent"]["stage"] == "stage1" and lin2["parent"]["run_id"] == runs[1].info.run_id

    # stage 0: retrieval accuracy over the whole validation split (30 tiny steps leave it near
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
    from sepit.models.moe import MoEFeedForward, moe_blocks
    from sepit.models.sepit_lm import SepitForConditionalGeneration

    model = SepitForConditionalGeneration.from_pretrained(out[2] / "model").eval()
    blocks = list(moe_blocks(model))
    assert len(blocks) == 2 and all(isinstance(b, MoEFeedForward) for _, b in blocks)
    answers = model.generate(["What is the function of <protein>?"], [("MKTAYIAKQRQISFVKSHFSRQ", None, None)],
                             max_new_tokens=8)
    assert len(answers) == 1 and isinstance(answers[0], str)
