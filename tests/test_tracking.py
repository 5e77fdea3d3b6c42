import mlflow

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
