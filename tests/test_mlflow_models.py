"""Exported stages as MLflow Models on a real ``mlflow server``: log + register + alias, resolve
``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``runs:/ID/model`` back to the folder, answer
through ``mlflow.pyfunc``, and serve from the alias (an in-process model replica)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from sepit.tracking import start_run
from sepit.tracking.models import ModelURIError, localize_model, log_model, pin_model_uri

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["What is the function of <protein>?", "Where is <protein> located in the cell?"]
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MSDNELKQLLEQAG"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, request):
    """A private $SEPIT_CACHE_DIR for this module (downloads land there)."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("cache")
    mp.setenv("SEPIT_CACHE_DIR", str(path))
    request.addfinalizer(mp.undo)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny SEPIT model saved as a stage export (model + processor save_pretrained, lineage.json)."""
    import torch
    from lm_support import build_lm, save_lm

    torch.manual_seed(0)
    model, processor = build_lm()
    folder = save_lm(model.eval(), processor, tmp_path_factory.mktemp("export") / "model")
    (folder / "lineage.json").write_text(json.dumps({"stage": "stage2", "mlflow_run_id": None}))
    return folder


@pytest.fixture(scope="module")
def registered(mlflow_server, exported, cache):
    """The export logged twice as ``model`` of two runs of a fresh registered model: versions 1, 2."""
    name = f"sepit-test-{uuid.uuid4().hex[:8]}"
    logged = []
    for i in range(2):
        with start_run(f"stage2-{i}", tracking_uri=mlflow_server, system_metrics=False) as run:
            logged.append((run.info.run_id,
                           log_model(exported, registered_name=name, metadata={"sepit_stage": "stage2"})))
    return name, logged


def test_export_is_registered_with_latest_alias(mlflow_server, registered, exported):
    from mlflow.tracking import MlflowClient

    name, logged = registered
    (run1, first), (run2, second) = logged
    assert (first.version, second.version) == ("1", "2")
    client = MlflowClient(mlflow_server)
    newest = client.get_model_version_by_alias(name, "newest")
    assert newest.version == "2" and newest.run_id == run2  # the alias moved to the newest export
    assert client.get_model_version(name, "1").run_id == run1
    assert client.get_run(run2).data.tags["mlflow.runName"] == "stage2-1"
    folder = localize_model(f"models:/{name}@latest", tracking_uri=mlflow_server)
    mlmodel = (folder.parent.parent / "MLmodel").read_text()  # <model>/artifacts/model -> <model>/MLmodel
    assert "signature:" in mlmodel and "question" in mlmodel and "max_new_tokens" in mlmodel
    requirements = (folder.parent.parent / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements) and any(r.startswith("sepit==") for r in requirements)
    assert first.seconds > 0 and second.seconds > 0  # cost: evals/bench_mlflow_models.py


def test_alias_version_and_run_uris_resolve_to_the_export(mlflow_server, registered, exported):
    from sepit.models.sepit_lm import SepitForConditionalGeneration
    from sepit.processing import SepitProcessor

    name, logged = registered
    run1 = logged[0][0]
    by_alias = localize_model(f"models:/{name}@latest", tracking_uri=mlflow_server)
    by_version = localize_model(f"models:/{name}/1", tracking_uri=mlflow_server)
    by_run = localize_model(f"runs:/{run1}/model", tracking_uri=mlflow_server)
    for folder in (by_alias, by_version, by_run):
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in exported.iterdir())
        assert (folder / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()
    assert pin_model_uri(f"models:/{name}@latest", mlflow_server) == f"models:/{name}/2"  # highest version
    assert pin_model_uri(f"models:/{name}@newest", mlflow_server) == f"models:/{name}/2"  # the stored alias
    assert localize_model(f"models:/{name}/latest", tracking_uri=mlflow_server) == by_alias
    # a registered version never changes: the second call reuses the cached copy
    stamp = (by_version / "config.json").stat().st_mtime_ns
    assert localize_model(f"models:/{name}/1", tracking_uri=mlflow_server) == by_version
    assert (by_version / "config.json").stat().st_mtime_ns == stamp
    model = SepitForConditionalGeneration.from_pretrained(by_alias)  # loads offline from the downloaded folder
    processor = SepitProcessor.from_pretrained(by_alias)
    assert processor.vocab_size == model.config.llm.vocab_size and sum(p.numel() for p in model.parameters()) > 0


def test_pyfunc_answers_like_the_model(mlflow_server, registered, exported, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    from lm_support import load_lm

    from sepit.processing import generate_answers

    name, _ = registered
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)  # the artifacts come through the server too
    try:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@newest")  # MLflow's own resolution of the alias
    finally:
        mlflow.set_tracking_uri(before)
    out = pyfunc.predict(pd.DataFrame({"question": QUESTIONS, "sequence": SEQUENCES}), params={"max_new_tokens": 5})
    direct = generate_answers(*load_lm(exported), QUESTIONS, [(s, None, None) for s in SEQUENCES], max_new_tokens=5)
    assert list(out["answer"]) == direct
    with pytest.raises(Exception, match="sequence"):
        pyfunc.predict(pd.DataFrame({"question": QUESTIONS}))


def test_unknown_model_alias_or_run_is_a_clear_error(mlflow_server, registered, monkeypatch):
    from sepit.train.lineage import ParentNotFoundError, resolve_parent

    name, _ = registered
    with pytest.raises(ModelURIError, match=f"registered model '{name}' at .* has no alias 'best' .*newest"):
        localize_model(f"models:/{name}@best", tracking_uri=mlflow_server)
    with pytest.raises(ModelURIError, match="no registered model 'no-such-model'"):
        localize_model("models:/no-such-model@latest", tracking_uri=mlflow_server)
    with pytest.raises(ModelURIError, match="has no version '9'"):
        localize_model(f"models:/{name}/9", tracking_uri=mlflow_server)
    with pytest.raises(ModelURIError, match="no run '0+'"):
        localize_model(f"runs:/{'0' * 32}/model", tracking_uri=mlflow_server)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ModelURIError, match="no MLflow tracking URI"):
        localize_model(f"models:/{name}@latest")
    with pytest.raises(ParentNotFoundError, match="--init models:/.*has no alias 'best'"):
        resolve_parent(f"models:/{name}@best", mlflow_server)


def test_init_accepts_a_registered_model(mlflow_server, registered, tmp_path):
    from sepit.train.lineage import resolve_parent

    name, logged = registered
    parent = resolve_parent(f"models:/{name}@latest", mlflow_server, download_to=tmp_path / "parent")
    assert Path(parent.path).is_relative_to(tmp_path / "parent") and (Path(parent.path) / "config.json").is_file()
    assert parent.stage == "stage2" and parent.uri == f"models:/{name}@latest"
    by_run = resolve_parent(logged[0][0], mlflow_server)  # a bare run id = runs:/ID/model
    assert by_run.run_id == logged[0][0] and (Path(by_run.path) / "model.safetensors").is_file()


def test_evaluate_takes_registered_models(mlflow_server, registered, tmp_path):
    from sepit.evaluation.run import EvaluateConfig, localize_inputs, read_lineage, resolve_model_dir

    name, _ = registered
    cfg = localize_inputs(EvaluateConfig(model=f"models:/{name}@latest", compare_model=f"models:/{name}/1",
                                         data=str(tmp_path), out=str(tmp_path / "eval"), tracking_uri=mlflow_server))
    model_dir, compare_dir = resolve_model_dir(cfg.model), resolve_model_dir(cfg.compare_model)
    assert model_dir != compare_dir and read_lineage(model_dir)["stage"] == "stage2"
    assert (model_dir / "model.safetensors").read_bytes() == (compare_dir / "model.safetensors").read_bytes()


def test_serve_replica_loads_the_model_from_its_alias(mlflow_server, registered, monkeypatch):
    """``sepit serve --model models:/NAME@latest``: the alias is pinned to a version once, and the
    replica (built here in-process, as Serve would) resolves that version on its node and answers."""
    from sepit.serve.config import ServeConfig
    from sepit.serve.model_runner import SepitModelRunner
    from sepit.serve.protocol import GenerationItem

    name, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # what the replica's environment carries
    config = ServeConfig(model_dir=pin_model_uri(f"models:/{name}@latest"), warmup_question=QUESTIONS[0],
                         warmup_sequence=SEQUENCES[0]).require_model_dir()
    assert config.model_dir == f"models:/{name}/2"
    runner = SepitModelRunner(config)
    try:
        assert runner.ready_state()["warm"]
        [result] = asyncio.run(runner.generate([GenerationItem(question=QUESTIONS[1], sequence=SEQUENCES[1],
                                                               max_new_tokens=5)], 30.0))
        assert result.error is None and isinstance(result.text, str)
    finally:
        runner.batcher.stop()


def test_dataset_splits_are_run_inputs(mlflow_server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from sepit.tracking.datasets import log_split_inputs
    from sepit.train.lineage import dataset_fingerprint

    data = tmp_path / "data"
    for split, n in (("train", 5), ("val", 2)):
        (data / "stage2").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": [f"{split}{i}" for i in range(n)]}), data / "stage2" / f"{split}.parquet")
    fp = dataset_fingerprint(data, "stage2")
    with start_run("stage2", tracking_uri=mlflow_server, system_metrics=False) as run:
        assert log_split_inputs(fp["dataset_dir"], fp["files"], {"train": 5, "val": 2}) == 2
    inputs = MlflowClient(mlflow_server).get_run(run.info.run_id).inputs.dataset_inputs
    got = {}
    for di in inputs:
        tags = {t.key: t.value for t in di.tags}
        got[tags["mlflow.data.context"]] = (di.dataset.name, di.dataset.digest, tags.get("rows"), di.dataset.source)
    assert set(got) == {"train", "val"}
    assert got["train"][:3] == ("stage2/train", fp["files"]["stage2/train.parquet"][:16], "5")
    assert str(data / "stage2" / "val.parquet") in got["val"][3]
