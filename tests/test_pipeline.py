"""The README's main job: the whole pipeline on the bundled real data (tiny preset here)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from sepit.config import ConfigError
from sepit.pipeline import command_config
from sepit.pipeline import validate


def test_presets_validate_every_step(tmp_path):
    for preset in ("tiny", "small", "paper"):
        cfg = command_config("pipeline", preset, overrides=[f"out={tmp_path}"])
        typed = validate(cfg)
        assert list(typed) == ["preprocess", "dataset", "stage0", "stage1", "stage2", "evaluate"]
    s = validate(command_config("pipeline", "tiny", overrides=[f"out={tmp_path}"]))
    # wiring: each stage starts from the previous one's exported model
    assert s["stage1"].init == str(tmp_path.resolve() / "stage0" / "model")
    assert s["stage2"].init == str(tmp_path.resolve() / "stage1" / "model")
    assert s["evaluate"].model == str(tmp_path.resolve() / "stage2" / "model")


def _command_config(command: str, argv: list[str]):
    """The typed config ``sepit <command> <argv>`` would run with (parsed, resolved; nothing runs)."""
    import argparse

    from sepit.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"sepit {command}")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    if command.startswith("stage"):
        from sepit.train.stage_common import config_from_args

        return config_from_args(args, command)
    if command == "evaluate":
        from sepit.pipeline import command_config

        return command_config("evaluate", args.preset, args.config, module._cli_flags(args), args.overrides)
    return module.config_from_args(args)


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_commands_and_pipeline_resolve_a_preset_identically(tmp_path, preset):
    """A preset means the same hyperparameters everywhere: each stage command, evaluate and the
    sweep's shared stage 2, given the pipeline's paths, resolve to the pipeline's section."""
    from sepit.config import from_dict, merge, to_dict
    from sepit.train.stage2 import Stage2JobConfig

    out = tmp_path.resolve()
    pipe = validate(command_config("pipeline", preset, overrides=[f"out={out}"]))
    data = ["--preset", preset, "--data", str(out / "dataset")]
    argv = {
        "stage0": [*data, "--out", str(out / "stage0")],
        "stage1": [*data, "--out", str(out / "stage1"), "--init", str(out / "stage0" / "model")],
        "stage2": [*data, "--out", str(out / "stage2"), "--init", str(out / "stage1" / "model")],
        "evaluate": [*data, "--model", str(out / "stage2" / "model"), "--out", str(out / "eval"),
                     "--compare-model", str(out / "stage1" / "model")],
    }
    for command, words in argv.items():
        assert to_dict(_command_config(command, words)) == to_dict(pipe[command]), command
    sweep = _command_config("sweep-experts", argv["stage2"][:-4] + ["--init", str(out / "stage1" / "model")])
    shared = from_dict(Stage2JobConfig, merge(sweep.stage2_dict(),
                                              {"train": {"output_dir": str(out / "stage2"), "run_name": "stage2"}}))
    assert to_dict(shared) == to_dict(pipe["stage2"])


def test_small_is_the_default_preset_of_every_command(tmp_path):
    assert _command_config("stage1", ["--out", str(tmp_path)]).llm_lr_ratio == 1.0  # small.yaml's
    assert _command_config("stage0", []).train.max_steps == 30
    assert _command_config("evaluate", []).limit == 400
    assert _command_config("sweep-experts", ["--init", "x"]).preset == "small"
    with pytest.raises(ConfigError, match=r"--preset='huge' is not allowed; choose one of \['tiny', 'small', 'paper'\]"):
        command_config("stage1", "huge")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("steps=[preprocess,train]", "steps[]='train' is not allowed"),
        ("stage2.train.zero_stage=3", "ZeRO"),
        ("stage1.train.max_stepz=3", "unknown field(s) ['max_stepz']"),
        ("dataset.identity_threshold=2", "identity_threshold"),
    ],
)
def test_bad_config_fails_before_running(tmp_path, override, needle):
    with pytest.raises(ConfigError) as exc:
        validate(command_config("pipeline", "tiny", overrides=[f"out={tmp_path}", override]))
    assert needle in str(exc.value)
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tiny_pipeline):
    """README command 1 on the tiny preset (run once per session by the ``tiny_pipeline`` fixture,
    a fresh process with its own local Ray and MLflow store)."""
    out, stdout, stderr = tiny_pipeline.out, tiny_pipeline.stdout, tiny_pipeline.stderr
    # the final report says where everything is
    assert f"model (stage 2)  {out.resolve() / 'stage2' / 'model'}" in stdout
    assert "MLflow store     sqlite:///" in stdout
    # the console: step headers, one progress display per step and summaries, no library output
    # (Ray/DeepSpeed/MLflow go to RUN/logs/; test_console.py covers the parts)
    from test_console import LIBRARY_NOISE

    noise = [ln for ln in (stdout + stderr).splitlines() if LIBRARY_NOISE.search(ln)]
    assert not noise, noise[:10]
    assert "\r" not in stdout
    for stage in ("stage0", "stage1", "stage2"):
        assert re.search(rf"^  {stage}  step 20/20 \(100%\)  loss \S+  val_loss \S+", stdout, re.M), stage
    assert "RayTrainWorker" in (out / "logs" / "ray-workers.log").read_text()
    assert "Started a local Ray instance" in (out / "logs" / "ray.log").read_text()

    manifest = json.loads((out / "store" / "manifest.json").read_text())
    assert manifest["n_records"] > 100 and manifest["n_input_files"] == 108
    card = json.loads((out / "dataset" / "card.json").read_text())
    assert card  # the dataset card exists and is JSON
    for stage, parent in (("stage0", None), ("stage1", "stage0"), ("stage2", "stage1")):
        model = out / stage / "model"
        assert (model / "config.json").is_file(), stage
        lineage = json.loads((model / "lineage.json").read_text())
        assert lineage["stage"] == stage
        if parent:
            assert Path(lineage["parent"]["path"]).resolve() == (out / parent / "model").resolve()
    stage2_cfg = json.loads((out / "stage2" / "model" / "config.json").read_text())
    assert "moe" in json.dumps(stage2_cfg)
    # stage 2 reports closed-set validation accuracy and exports its best validation point
    # (train.select_best: val_closed_acc): the export holds exactly the kept best weights
    summary = re.search(r"^\[\d/6\] stage2: done.*$", stdout, re.M).group(0)
    assert "val closed-set acc (first token)" in summary and "(best val_closed_acc" in summary, summary
    import torch

    from sepit.models.moe import plain_moe_state_dict
    from sepit.models.sepit_lm import SepitForConditionalGeneration

    last = sorted((out / "stage2" / "ray_results" / "stage2").glob("checkpoint_step*"))[-1]
    best = plain_moe_state_dict(torch.load(last / "best_rank0.pt", map_location="cpu"))
    exported = SepitForConditionalGeneration.from_pretrained(out / "stage2" / "model").state_dict()
    assert set(exported) <= set(best)
    assert all(torch.equal(exported[k], best[k]) for k in exported)

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert (out / "eval" / "report.md").is_file()
    text = json.dumps(metrics)
    assert "majority" in text and "nearest_neighbour" in text

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{(out / 'mlflow.db').resolve()}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("sepit.kind") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) >= 4, [r.info.run_name for r in runs]
