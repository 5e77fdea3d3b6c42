"""Training, resume and evaluation against a real S3-compatible server (moto, on loopback).

A moto server runs in this process on 127.0.0.1; sepit reaches it through the standard AWS
variables (``AWS_ENDPOINT_URL``, keys, region), as it would MinIO or AWS.  The built tiny dataset
is uploaded to the bucket; stage 1 trains with ``train.output_dir`` and ``data.dataset_dir`` on
S3, the local staging folder is then deleted, and a second run with more steps must resume from
the checkpoint stored in S3 (step counter continues).  Evaluation then reads the model and the
test split from S3.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import pytest

from dataset_support import small_build
from sepit.storage import StorageError, localize_dir, resolve, upload_dir

BUCKET = "sepit-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback, the AWS variables pointing at it, and one empty bucket."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "sepit-test-key")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "sepit-test-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("SEPIT_CACHE_DIR", str(tmp_path_factory.mktemp("sepit_cache")))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        pafs.S3FileSystem(endpoint_override=endpoint, access_key="k", secret_key="s", region="us-east-1",
                          allow_bucket_creation=True).create_dir(BUCKET)
        yield endpoint
    server.stop()


def test_folders_round_trip_and_errors_name_the_uri(s3, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01" * 1000)
    dst = upload_dir(src, f"s3://{BUCKET}/folders/m")
    assert dst.join("sub", "w.bin").size() == 2000
    local = localize_dir(f"s3://{BUCKET}/folders/m")
    assert (local / "sub" / "w.bin").read_bytes() == b"\x00\x01" * 1000
    # A changed remote folder (listing: sizes, last-modified) is downloaded again; an unchanged one is reused.
    dst.join("config.json").write_text('{"a": 22}')
    assert json.loads((localize_dir(dst) / "config.json").read_text()) == {"a": 22}
    assert localize_dir(dst) == local

    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        localize_dir("s3://no-such-bucket/x")
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/nothing/here: no such folder"):
        localize_dir(f"s3://{BUCKET}/nothing/here")
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/folders/m/missing.json: no such file"):
        resolve(f"s3://{BUCKET}/folders/m/missing.json").read_text()
    with pytest.raises(StorageError, match="unsupported storage scheme 'ftp'"):
        resolve("ftp://host/x")

    from sepit.train.data import DatasetNotFoundError, count_rows

    with pytest.raises(DatasetNotFoundError, match=rf"s3://{BUCKET}/nodata/stage1/train.parquet does not exist"):
        count_rows(f"s3://{BUCKET}/nodata", "stage1", "train")


def _stage1_config(tmp: Path, tokenizer: str, max_steps: int):
    from sepit.pipeline import command_config

    return command_config("stage1", "tiny", overrides=[
        f"train.output_dir=s3://{BUCKET}/run", f"data.dataset_dir=s3://{BUCKET}/data",
        f"model.tokenizer_path={tokenizer}", f"train.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"train.max_steps={max_steps}", "train.checkpoint_every=2", "train.eval_every=2",
        "train.eval_max_batches=1", "train.warmup_steps=1", "train.micro_batch_size=4", "max_answer_tokens=32",
    ])


def test_stage_trains_resumes_and_evaluates_on_s3(s3, ray_local, tmp_path_factory):
    import pyarrow.parquet as pq

    from sepit.evaluation.run import evaluate
    from sepit.models.sepit_lm import SepitConfig
    from sepit.train.stage1 import prepare_tokenizer, run_stage1
    from sepit.train.step_log import read_step_log

    tmp = tmp_path_factory.mktemp("s3_run")
    upload_dir(small_build(tmp_path_factory.getbasetemp()), f"s3://{BUCKET}/data")
    tokenizer = prepare_tokenizer(SepitConfig.preset("tiny"), tmp)  # outside the staging folder we delete
    run = resolve(f"s3://{BUCKET}/run")
    ckpts = run.join("ray_results", "stage1")

    first = run_stage1(_stage1_config(tmp, tokenizer, max_steps=2))
    assert first["model_dir"] == f"s3://{BUCKET}/run/model"
    assert json.loads(ckpts.join("checkpoint_step0000002", "trainer_state.json").read_text())["step"] == 2
    assert run.join("model", "config.json").is_file() and run.join("model", "lineage.json").is_file()
    staging = _stage1_config(tmp, tokenizer, 2).train.out_path
    assert not (staging / "ray_results").exists()  # checkpoints live only in the bucket

    # A fresh machine: nothing local but the tokenizer and the MLflow store; raise max_steps.
    shutil.rmtree(staging)
    second = run_stage1(_stage1_config(tmp, tokenizer, max_steps=4))
    marker = json.loads((staging / "workers" / "rank0.json").read_text())
    assert marker["resumed_step"] == 2  # restored from the checkpoint stored in S3
    assert json.loads(ckpts.join("checkpoint_step0000004", "trainer_state.json").read_text())["step"] == 4
    log = run.join("train_log.jsonl").read_text()
    (tmp / "log.jsonl").write_text(log)
    assert list(read_step_log(tmp / "log.jsonl")) == [1, 2, 3, 4]  # earlier steps fetched back, then 3, 4
    lineage = json.loads(run.join("model", "lineage.json").read_text())
    assert lineage["checkpoint"] == f"s3://{BUCKET}/run/ray_results/stage1/checkpoint_step0000004"
    assert lineage["data"]["dataset_dir"] == f"s3://{BUCKET}/data"
    assert lineage["mlflow_run_id"] == first["mlflow_run_id"] == second["mlflow_run_id"]  # same MLflow run, resumed

    result = evaluate({
        "model": f"s3://{BUCKET}/run", "data": f"s3://{BUCKET}/data", "split": "stage1/test",
        "out": str(tmp / "eval"), "limit": 3, "structured_slice": False, "sequence_only_ablation": False,
        "baselines": [], "mlflow": False, "bootstrap": {"n_resamples": 0}, "metrics": {"bertscore_enabled": False},
        "generation": {"max_new_tokens": 4, "batch_size": 4, "num_replicas": 1},
    })
    assert result["complete"] and result["data"]["n_evaluated"] == 3
    assert result["model"]["run_id"] == first["mlflow_run_id"]  # lineage read from the S3 model
    test_rows = pq.read_table(localize_dir(f"s3://{BUCKET}/data/stage1") / "test.parquet").num_rows
    assert result["data"]["n_input"] == test_rows


def test_protein_store_and_dataset_build_on_s3(s3, tmp_path):
    """The builder reads a protein store from S3 and writes its dataset there (built locally,
    uploaded whole); a non-empty prefix that is not a dataset is refused."""
    import pyarrow.parquet as pq

    from dataset_support import write_small_store
    from sepit.data.build import BuildConfig, BuildError, build_dataset
    from sepit.resources import DATA_DIR
    from sepit.structure.store import ProteinStore
    from sepit.train.data import count_rows

    local = ProteinStore(write_small_store(tmp_path / "store"))
    upload_dir(local.path, f"s3://{BUCKET}/store")
    remote = ProteinStore(f"s3://{BUCKET}/store")
    remote.verify()  # the cached copy hashes like the manifest says
    assert len(remote) == len(local) and remote.uri == f"s3://{BUCKET}/store"

    string_info = str(DATA_DIR / "string_v12_ctrachomatis" / "string_ct_protein_info_v12.txt.gz")
    card = build_dataset(BuildConfig(proteins=f"s3://{BUCKET}/store", annotations=[string_info],
                                     out=f"s3://{BUCKET}/built", executor="local", seed=7))
    built = resolve(f"s3://{BUCKET}/built")
    assert built.join("card.json").is_file()
    rows = {s: count_rows(built.uri, "stage1", s) for s in ("train", "val", "test")}
    assert sum(rows.values()) > 0
    test_rows = pq.read_table(localize_dir(built.join("stage1")) / "test.parquet").to_pylist()
    assert any(r["has_structure"] for r in test_rows + pq.read_table(
        localize_dir(built.join("stage1")) / "train.parquet").to_pylist())  # structures joined from the S3 store
    assert json.loads(built.join("card.json").read_text()) == json.loads(json.dumps(card, default=str))

    resolve(f"s3://{BUCKET}/not_a_dataset/notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match=rf"s3://{BUCKET}/not_a_dataset is not empty and holds no previous build"):
        build_dataset(BuildConfig(proteins=f"s3://{BUCKET}/store", annotations=[string_info],
                                  out=f"s3://{BUCKET}/not_a_dataset", executor="local"))


def test_serving_loads_a_model_from_s3(s3, tmp_path):
    """`sepit serve --model s3://...`: the config accepts the URI and each replica loads the model
    from its node's cache; answers equal the local folder's."""
    import torch

    from lm_support import build_lm, save_lm

    from sepit.serve.config import ServeConfig
    from sepit.serve.model_runner import ModelLoadError, load_exported_model

    torch.manual_seed(0)
    model, processor = build_lm()
    save_lm(model.eval(), processor, tmp_path / "m")
    uri = f"s3://{BUCKET}/served/model"
    upload_dir(tmp_path / "m", uri)
    ServeConfig(model_dir=uri).require_model_dir()
    remote, remote_processor = load_exported_model(uri, "cpu")
    q, p = ["What does <protein> do?"], [("MSLEQKKGADIISKILQIQNSIGK", None, None)]
    assert (remote.generate(**remote_processor.generation_inputs(q, p), max_new_tokens=5)
            == model.generate(**processor.generation_inputs(q, p), max_new_tokens=5))
    with pytest.raises(ModelLoadError, match=rf"s3://{BUCKET}/served/none"):
        load_exported_model(f"s3://{BUCKET}/served/none", "cpu")
