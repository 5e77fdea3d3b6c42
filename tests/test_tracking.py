import mlflow
import pytest

from sepit.tracking import flatten, log_params, start_run


def test_sqlite_store_nested_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with start_run("pipeline", out_dir=tmp_path) as parent:
        log_params({"model": {"layers": 2, "dims": [1, 2]}})
        pid = parent.info.run_id
        with start_run("stage0", out_dir=tmp_path, parent_run_id=pid) as child:
            mlflow.log_metric("loss", 1.5, step=3)
            cid = child.info.run_id
    assert (tmp_path / "mlflow.db").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = client.get_run(cid)
    assert c.data.tags["mlflow.parentRunId"] == pid
    assert c.data.metrics["loss"] == 1.5
    assert client.get_run(pid).data.params["model.dims"] == "[1, 2]"
    assert "sys.torch" in c.data.tags


def test_flatten():
    assert flatten({"a": {"b": 1}, "c": (1, 2)}) == {"a.b": "1", "c": "[1, 2]"}


def test_a_store_used_earlier_in_the_process_does_not_capture_later_runs(tmp_path, monkeypatch):
    from sepit.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with start_run("first", out_dir=tmp_path / "a"):
        pass
    # mlflow has now written MLFLOW_TRACKING_URI=<a>; a new job folder still gets its own store
    assert resolve_tracking_uri(None, tmp_path / "b").endswith(str(tmp_path / "b" / "mlflow.db"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None, tmp_path / "b") == "http://127.0.0.1:5999"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the tests below (creating its tables costs ~1-2 s)."""
    return tmp_path_factory.mktemp("store")


def test_parent_given_by_id_and_system_metrics(store, monkeypatch):
    """A parent that is not the active run (a pipeline in another process) is recorded by MLflow
    itself from parent_run_id; system metrics are sampled while a run is open."""
    import time

    from mlflow.system_metrics import set_system_metrics_sampling_interval

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with start_run("pipeline", out_dir=store, system_metrics=False) as parent:
        pid = parent.info.run_id
    set_system_metrics_sampling_interval(0.2)
    try:
        with start_run("stage1", out_dir=store, parent_run_id=pid, system_metrics=True) as child:
            time.sleep(0.5)  # > one sampling interval: the first sample is logged
            cid = child.info.run_id
    finally:
        set_system_metrics_sampling_interval(None)
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run = client.get_run(cid)
    assert run.data.tags["mlflow.parentRunId"] == pid
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0


def test_more_than_a_batch_of_params_and_async_step_metrics(store, monkeypatch):
    from sepit.tracking import MetricBatch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with start_run("stage0", out_dir=store, system_metrics=False) as run:
        log_params({"grid": {f"p{i}": i for i in range(250)}})  # MLflow sends 100 params per request
    uri = f"sqlite:///{store / 'mlflow.db'}"
    sink = MetricBatch(uri, run.info.run_id)
    for step in range(1, 31):
        sink.add(step, {"loss": 1.0 / step, "lr": 1e-3})
    sink.flush()
    client = mlflow.MlflowClient(uri)
    data = client.get_run(run.info.run_id).data
    assert len([k for k in data.params if k.startswith("grid.")]) == 250 and data.params["grid.p249"] == "249"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 31))
    assert {m.step: m.value for m in history}[4] == 0.25
