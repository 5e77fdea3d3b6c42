"""Ray Tune sweeps of stage 2 over expert counts (sepit.tune).

Fast tests: the search-space language and the checks a sweep runs before Ray starts (every
candidate trial's stage-2 config is built; bad values fail with the trial named).

Slow tests (real Ray Tune + Ray Train + DeepSpeed MoE + MLflow on CPU): the stage-1 model and
dataset of the session's tiny pipeline (``tiny_pipeline`` in conftest.py) are swept over
num_experts 2 vs 4; a second sweep holds a trial DeepSpeed refuses at
run time, which must come back as a reported failure; a third shows ASHA stopping a bad trial.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sepit.cli import main as cli_main
from sepit.config.base import ConfigError
from sepit.pipeline import command_config
from sepit.tune.config import SweepConfig, resolve_inputs, validate_sweep
from sepit.tune.results import best_row, sort_rows
from sepit.tune.space import ParamSpec, SearchSpace, stage_overrides


# --------------------------------------------------------------------------- search space
def test_param_spec_forms_and_tune_space():
    assert ParamSpec.parse([2, 4, 8], "n", integer=True) == ParamSpec("grid", (2, 4, 8))
    assert ParamSpec.parse(1, "k", integer=True) == ParamSpec("value", (1,))
    assert ParamSpec.parse({"choice": [1.0, 1.25]}, "c") == ParamSpec("choice", (1.0, 1.25))
    # YAML 1.1 reads 1e-5 as a string: still a number here
    assert ParamSpec.parse({"loguniform": ["1e-5", "1e-3"]}, "lr") == ParamSpec("loguniform", (1e-5, 1e-3))

    space = SearchSpace(num_experts=[2, 4], top_k=1, lr={"loguniform": [1e-5, 1e-3]},
                        extra={"train.warmup_steps": [0, 5]})
    tune_space = space.to_tune()
    assert tune_space["num_experts"] == {"grid_search": [2, 4]}
    assert tune_space["top_k"] == 1
    assert tune_space["train.warmup_steps"] == {"grid_search": [0, 5]}
    assert 1e-5 <= tune_space["lr"].sample() <= 1e-3
    assert space.grid_size() == 4
    cfg = SweepConfig(stage2={"init": "x"}, space=space, num_samples=3)
    assert cfg.n_trials == 12
    assert stage_overrides({"num_experts": 4, "lr": 1e-4, "train.warmup_steps": 5}) == {
        "moe": {"num_experts": 4}, "train": {"lr": 1e-4, "warmup_steps": 5}}


@pytest.mark.parametrize("raw, integer, message", [
    ({"uniform": [1, 8]}, True, "whole-number parameter"),
    ([2, 2.5], True, "must be whole numbers"),
    ({"loguniform": [0, 1e-3]}, False, "low end must be > 0"),
    ({"uniform": [1e-3, 1e-4]}, False, "low < high"),
    ({"grid": [2, 2]}, True, "repeats a value"),
    ({"random": [1, 2]}, False, "kind in"),
    ("four", True, "not a finite number"),
    ([], True, "at least one value"),
])
def test_param_spec_rejects_with_reason(raw, integer, message):
    with pytest.raises(ConfigError, match=message) as info:
        ParamSpec.parse(raw, "space.x", integer=integer)
    assert "space.x" in str(info.value)


def test_sweep_config_names_unknown_parameters_and_requires_init():
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['experts'\]"):
        command_config("sweep", overrides=["stage2.init=/m", "space.experts=[2,4]"])
    with pytest.raises(ConfigError, match="stage2.init is required"):
        command_config("sweep", overrides=["space.num_experts=[2,4]"])
    cfg = command_config("sweep", overrides=["stage2.init=/m", "space.num_experts=[2,4]", "space.lr={loguniform: [1e-5, 1e-3]}",
                                   "num_samples=2", "preset=tiny"])
    assert cfg.n_trials == 4 and cfg.space.lr.kind == "loguniform"
    assert cfg.stage2_dict()["train"]["max_steps"] == 20  # the tiny recipe's stage 2 underneath
    # the shared section is typed at load time: a wrong field fails before any trial is built
    from sepit.train.stage2 import Stage2JobConfig

    assert isinstance(cfg.stage2, Stage2JobConfig) and cfg.stage2.init == "/m"
    with pytest.raises(ConfigError, match=r"^stage2\..*max_stepz"):
        command_config("sweep", overrides=["stage2.init=/m", "stage2.train.max_stepz=3"])


# --------------------------------------------------------------------------- validation before Ray
def _cfg(tmp_path, **kw) -> SweepConfig:
    stage2 = {"init": str(tmp_path / "stage1"), "data": {"dataset_dir": str(tmp_path / "data")},
              "train": {"max_steps": 20, "eval_every": 5}}
    stage2.update(kw.pop("stage2", {}))
    return SweepConfig(out=str(tmp_path / "sweep"), stage2=stage2, **kw)


def test_validation_rejects_zero_experts(tmp_path):
    with pytest.raises(ConfigError, match=r"trial num_experts=0: stage2\.moe\.num_experts=0 is out of range"):
        validate_sweep(_cfg(tmp_path, space=SearchSpace(num_experts=[0, 2])))


def test_validation_rejects_top_k_above_num_experts(tmp_path):
    with pytest.raises(ConfigError, match=r"trial num_experts=1, top_k=2: .*top_k=2 is out of range"):
        validate_sweep(_cfg(tmp_path, space=SearchSpace(num_experts=[1, 4], top_k={"choice": [1, 2]})))


def test_validation_rejects_zero3_with_moe(tmp_path):
    with pytest.raises(ConfigError, match="zero_stage=3.*ZeRO-3"):
        validate_sweep(_cfg(tmp_path, stage2={"train": {"zero_stage": 3}}))


def test_validation_rejects_asha_without_intermediate_validation(tmp_path):
    with pytest.raises(ConfigError, match="needs intermediate validation"):
        validate_sweep(_cfg(tmp_path, scheduler="asha", stage2={"train": {"max_steps": 20, "eval_every": 0}}))
    with pytest.raises(ConfigError, match="grace_period=20 must be below"):
        validate_sweep(_cfg(tmp_path, scheduler="asha", grace_period=20))


def test_validation_rejects_missing_dataset_and_bad_init(tmp_path):
    with pytest.raises(ConfigError, match=r"stage2\.data\.dataset_dir: .*stage2/train\.parquet does not exist"):
        validate_sweep(_cfg(tmp_path))
    with pytest.raises(ConfigError, match="stage2.init: .* is neither an existing folder, an MLflow model URI .* nor an MLflow run id"):
        resolve_inputs(_cfg(tmp_path), None)
    not_a_model = tmp_path / "stage1"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "sepit_protein_encoder"}))
    with pytest.raises(ConfigError, match="stage2.init: .*expected a stage-1 SEPIT model export"):
        resolve_inputs(_cfg(tmp_path), None)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    rc = cli_main(["sweep-experts", "--init", str(tmp_path / "missing"), "--dry-run", "space.num_experts=[2,4]"])
    assert rc == 2
    assert "sepit sweep-experts: stage2.init:" in capsys.readouterr().out


def test_job_entry_point_is_the_cli():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "jobs" / "sweep_experts.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sepit sweep-experts" in proc.stdout and "--init" in proc.stdout


def test_best_trial_is_a_finished_one():
    rows = [
        {"trial_id": "a", "status": "TERMINATED", "objective": 2.5},
        {"trial_id": "b", "status": "STOPPED", "objective": 1.0},  # lower, but stopped early: no model
        {"trial_id": "c", "status": "ERROR", "objective": None},
        {"trial_id": "d", "status": "TERMINATED", "objective": 2.1},
    ]
    assert best_row(rows, "min")["trial_id"] == "d"
    assert best_row(rows, "max")["trial_id"] == "a"
    assert [r["trial_id"] for r in sort_rows(rows, "min")] == ["d", "a", "b", "c"]
    assert best_row([rows[2]], "min") is None


# --------------------------------------------------------------------------- real sweeps (slow)
STAGE2_TRAIN = {"max_steps": 4, "eval_every": 2, "eval_max_batches": 2, "checkpoint_every": 4, "warmup_steps": 1,
                "micro_batch_size": 4, "max_failures": 0}


@pytest.fixture(scope="module")
def dataset_dir(tiny_pipeline):
    """The session's tiny pipeline dataset (built by the dataset builder from bundled real
    annotations and structures)."""
    return tiny_pipeline.out / "dataset"


@pytest.fixture(scope="module")
def stage1_run(tiny_pipeline) -> dict:
    """The session's tiny pipeline stage-1 model (a real 20-step stage-1 run) and its MLflow run."""
    return {"model_dir": str(tiny_pipeline.out / "stage1" / "model"), "mlflow_run_id": tiny_pipeline.run_id("stage1"),
            "tracking_uri": tiny_pipeline.tracking_uri}


@pytest.fixture(scope="module")
def stage1_model(stage1_run):
    return Path(stage1_run["model_dir"])


def _sweep_config(out: Path, stage1_model: Path, dataset_dir: Path, **kw) -> SweepConfig:
    stage2 = {"init": str(stage1_model), "data": {"dataset_dir": str(dataset_dir)}, "train": dict(STAGE2_TRAIN)}
    # An explicit store: mlflow.set_tracking_uri (run by the stage-1 fixture) exports
    # MLFLOW_TRACKING_URI, which the default resolution would otherwise pick up.
    return SweepConfig(out=str(out), preset="tiny", stage2=stage2, tracking_uri=f"sqlite:///{out}/mlflow.db", **kw)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sepit")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_sweep_over_expert_counts(ray_local, stage1_run, stage1_model, dataset_dir, tmp_path):
    from sepit.tune.sweep import run_sweep

    # The stage-1 model given as its MLflow run id: fetched once into <out>/init, then checked.
    rc = cli_main(["sweep-experts", "--preset", "tiny", "--init", stage1_run["mlflow_run_id"], "--data", str(dataset_dir),
                   "--out", str(tmp_path / "dry"), "--dry-run", "space.num_experts=[2,4]",
                   f"tracking_uri={stage1_run['tracking_uri']}"])
    assert rc == 0
    # <out>/init/model is the run's MLflow Model; the sepit export folder sits inside it
    from sepit.tracking.models import sepit_folder

    assert (sepit_folder(tmp_path / "dry" / "init" / "model") / "config.json").is_file()
    assert not (tmp_path / "dry" / "tune").exists()

    cfg = _sweep_config(tmp_path / "sweep", stage1_model, dataset_dir, space=SearchSpace(num_experts=[2, 4]),
                        max_concurrent_trials=2)
    result = run_sweep(cfg)
    out = Path(result["out"])

    rows = _read_csv(out / "sweep_results.csv")
    assert result["counts"] == {"TERMINATED": 2, "STOPPED": 0, "ERROR": 0}
    assert sorted(int(r["num_experts"]) for r in rows) == [2, 4]
    assert all(r["status"] == "TERMINATED" and r["error"] == "" for r in rows)
    objectives = [float(r["objective"]) for r in rows]
    assert objectives == sorted(objectives)  # the table is sorted by objective (min)
    for r in rows:
        assert float(r["val_lm_loss"]) == float(r["objective"])
        assert Path(r["output_dir"]) == out / "trials" / r["trial_id"]
        saved = json.loads((Path(r["model_dir"]) / "config.json").read_text())
        assert saved["sepit"]["moe"]["num_experts"] == int(r["num_experts"])  # the trial trained what it asked for
        # the step-2 validation reached Tune before the final one (what ASHA would judge)
        vals = [json.loads(line) for line in (Path(r["output_dir"]) / "train_log.jsonl").read_text().splitlines()]
        assert [v["step"] for v in vals if v["kind"] == "val"] == [2, 4]

    best = json.loads((out / "best.json").read_text())
    assert best["objective"] == min(objectives)
    best_row_ = next(r for r in rows if r["trial_id"] == best["trial_id"])
    assert float(best_row_["objective"]) == best["objective"]
    assert best["params"]["num_experts"] == int(best_row_["num_experts"])
    assert best["model_dir"] == best_row_["model_dir"] and Path(best["model_dir"]).is_dir()
    md = (out / "sweep.md").read_text()
    assert f"`{best['trial_id']}`" in md and md.index(rows[0]["trial_id"]) < md.index(rows[1]["trial_id"])

    client, runs = _mlflow_runs(result["tracking_uri"])
    sweep_run = client.get_run(result["mlflow_run_id"])
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert sorted(r.info.run_id for r in trial_runs) == sorted(r["mlflow_run_id"] for r in rows)
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    assert sorted(int(r.data.params["moe.num_experts"]) for r in trial_runs) == [2, 4]
    assert sweep_run.data.metrics["best_val_lm_loss"] == pytest.approx(best["objective"])
    assert sweep_run.data.tags["sepit.best_run_id"] == best["mlflow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    assert {"sweep_results.csv", "best.json", "sweep.md"} <= artifacts


@pytest.mark.slow
def test_failed_trial_is_reported_not_lost(ray_local, stage1_model, dataset_dir, tmp_path):
    """DeepSpeed refuses a capacity floor above the tokens in a batch, at the first forward."""
    from sepit.tune.sweep import run_sweep

    cfg = _sweep_config(tmp_path / "sweep", stage1_model, dataset_dir,
                        space=SearchSpace(num_experts=2, extra={"moe.min_capacity": 100000}))
    result = run_sweep(cfg)
    out = Path(result["out"])
    assert result["counts"] == {"TERMINATED": 0, "STOPPED": 0, "ERROR": 1}
    (row,) = _read_csv(out / "sweep_results.csv")
    assert row["status"] == "ERROR" and "min_capacity" in row["error"], row["error"]
    trial = json.loads((out / "trials" / row["trial_id"] / "trial.json").read_text())
    assert trial["status"] == "ERROR" and "min_capacity" in trial["traceback"]
    assert json.loads((out / "best.json").read_text())["trial_id"] is None
    assert "## Failed trials" in (out / "sweep.md").read_text()
    client, _ = _mlflow_runs(result["tracking_uri"])
    assert client.get_run(row["mlflow_run_id"]).info.status == "FAILED"


@pytest.mark.slow
def test_asha_stops_a_bad_trial_early(ray_local, stage1_model, dataset_dir, tmp_path):
    """Trials run one after the other; the second one's aux-loss coefficient of 100 puts its
    validation loss (lm + coef x aux) far above the first one's at the step-2 rung, so ASHA stops it
    there; the first trial finishes and is the best."""
    from sepit.tune.sweep import run_sweep

    cfg = _sweep_config(tmp_path / "sweep", stage1_model, dataset_dir, metric="val_loss", scheduler="asha",
                        grace_period=2, reduction_factor=2,
                        space=SearchSpace(num_experts=2, aux_loss_coef=[0.01, 100.0]))
    with pytest.warns(UserWarning, match="not compared on the same loss"):
        result = run_sweep(cfg)
    out = Path(result["out"])
    assert result["counts"] == {"TERMINATED": 1, "STOPPED": 1, "ERROR": 0}
    done, stopped = _read_csv(out / "sweep_results.csv")  # finished trials sort first
    assert (done["status"], float(done["aux_loss_coef"]), done["step"]) == ("TERMINATED", 0.01, "4.0")
    assert (stopped["status"], float(stopped["aux_loss_coef"]), stopped["step"]) == ("STOPPED", 100.0, "2.0")
    assert stopped["model_dir"] == "" and float(stopped["objective"]) > float(done["objective"])
    assert json.loads((out / "best.json").read_text())["trial_id"] == done["trial_id"]
    client, _ = _mlflow_runs(result["tracking_uri"])
    assert client.get_run(stopped["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(done["mlflow_run_id"]).info.status == "FINISHED"
    # Stopping the trial ended the Ray Train workers it had started: every CPU is free again.
    assert _cpus_in_use(timeout=60) < 1e-6


def _cpus_in_use(timeout: float) -> float:
    import time

    import ray

    deadline = time.time() + timeout
    while True:
        used = ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)
        if used < 1e-6 or time.time() > deadline:
            return used
        time.sleep(1)
