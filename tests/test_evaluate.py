"""`sepit evaluate` end to end on CPU: tiny model, real bundled records and structures, Ray Data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from sepit.evaluation.baselines import constant_baseline, majority_baseline, nearest_neighbour_baseline
from sepit.evaluation.examples import load_eval_data
from sepit.evaluation.predictions import PredictionRecord, PredictionsStore
from sepit.resources import data_path

# Real bundled QA records: short AFDB-modelled proteins (function captions, with structures),
# DeepLoc multiple choice (with a PDB structure), Pika yes/no and open questions.
TEST_IDS = [
    "string_v12_ctrachomatis:00531", "string_v12_ctrachomatis:00927", "string_v12_ctrachomatis:00898",
    "deeploc_lightattention:00934", "pika_sample_metrics:00011", "pika_sample_metrics:00012",
    "pika_sample:00000", "pika_sample:00002", "pika_sample:00010",
]
LONG_ID = "pika_sample_metrics:00109"  # 2435 residues: above the model's max_residues, rejected up front
STRUCTURES = {  # record id -> (bundled structure file, chain)
    "string_v12_ctrachomatis:00531": ("chlamatlas_afdb/afdb_models/AF-O84224-F1-model_v4.cif.gz", "A"),
    "string_v12_ctrachomatis:00927": ("chlamatlas_afdb/afdb_models/AF-P65106-F1-model_v4.cif.gz", "A"),
    "string_v12_ctrachomatis:00898": ("chlamatlas_afdb/afdb_models/AF-P0CC05-F1-model_v4.cif.gz", "A"),
    "deeploc_lightattention:00934": ("graphein_testdata/1lds.pdb.gz", "A"),
}


def _qa_rows() -> list[dict]:
    return [json.loads(line) for line in gzip.open(data_path("derived", "qa.jsonl.gz"), "rt")]


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """``DATA/stage2/{train,test}.parquet`` in the contract columns, with real coordinates."""
    from sepit.structure.parse import load_records

    tmp = tmp_path_factory.mktemp("data")
    qa = _qa_rows()
    test = [r for r in qa if r["id"] in TEST_IDS or r["id"] == LONG_ID]
    test_acc = {r["accession"] for r in test}
    train = [r for r in qa if r["accession"] not in test_acc and (
        r["source"] in ("pika_sample", "pika_sample_metrics") or r["task_type"] == "subcellular_location_mc"
        or (r["task_type"] == "function_description" and r["source"] == "string_v12_ctrachomatis" and len(r["sequence"]) < 120))]
    splits = {}
    for name, qa_rows in (("test", test), ("train", train)):
        src = tmp / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
        splits[name] = load_eval_data(src).rows
    for row in splits["test"]:
        if row["id"] in STRUCTURES:
            file, chain = STRUCTURES[row["id"]]
            rec = load_records(data_path(*file.split("/")), chain=chain)[0]
            row.update(sequence=rec.sequence, coords=rec.coords.reshape(-1).tolist(),
                       coord_mask=rec.coord_mask.tolist(), has_structure=True)
    for name, rows in splits.items():
        _write_parquet([{**r, "split": name} for r in rows], tmp / "DATA" / "stage2" / f"{name}.parquet")
    return tmp / "DATA"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, str, str]:
    """A tiny dense model with a lineage.json naming its (real, local) MLflow run, and its MoE upcycle."""
    import torch

    from lm_support import build_lm, save_lm

    from sepit.models.moe import upcycle_to_moe
    from sepit.tracking import start_run

    tmp = tmp_path_factory.mktemp("models")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    torch.manual_seed(0)
    model, processor = build_lm()
    dense = save_lm(model.eval(), processor, tmp / "stage1")
    with start_run("stage1", tracking_uri=uri) as run:
        run_id = run.info.run_id
    (dense / "lineage.json").write_text(json.dumps({"stage": "stage1", "mlflow_run_id": run_id, "tracking_uri": uri}))
    upcycle_to_moe(model, num_experts=2, top_k=1, use_deepspeed=False)
    moe = save_lm(model, processor, tmp / "stage2")
    return dense, moe, uri, run_id


def _config(dataset_dir, models, out, max_batches=None) -> dict:
    dense, moe, uri, _ = models
    return {
        "model": str(dense), "data": str(dataset_dir), "out": str(out), "compare_model": str(moe),
        "tracking_uri": uri,
        "generation": {"max_new_tokens": 6, "batch_size": 4, "num_replicas": 1, "max_batches": max_batches},
        "bootstrap": {"n_resamples": 200},
    }


def test_evaluate_resumes_and_reports(ray_local, dataset_dir, models, tmp_path, monkeypatch):
    import mlflow

    from sepit.cli import main
    from sepit.evaluation.run import evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "eval"
    # 1. Interrupted after one batch: journalled answers survive, nothing is scored yet.
    first = evaluate(_config(dataset_dir, models, out, max_batches=1))
    assert first["complete"] is False
    partial = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert 0 < len(partial) < len(TEST_IDS)

    # 2. The rerun resumes: finished rows are not regenerated, the rest are.
    result = evaluate(_config(dataset_dir, models, out))
    assert result["complete"] is True
    summary = result["generation"]["summary"]
    assert summary["model"]["n_resumed"] == len(partial)
    assert summary["model"]["n_generated"] == len(TEST_IDS) - len(partial)
    assert summary["sequence_only"]["n_rows"] == len(STRUCTURES)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [i for i in load_eval_data(dataset_dir).ids if i != LONG_ID]  # input order, once
    assert {p["id"] for p in partial} <= {p["id"] for p in preds}
    for p in preds:
        assert p["structure_used"] is (p["id"] in STRUCTURES)
        assert p["question"].count("<protein>") == 1 and p["n_new_tokens"] <= 6
        assert set(p) >= {"id", "task", "category", "question", "reference", "prediction", "protein_id", "structure_used"}
    ablated = [json.loads(x) for x in (out / "ablations" / "sequence_only" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(a["id"] for a in ablated) == sorted(STRUCTURES) and not any(a["structure_used"] for a in ablated)

    # 3. metrics.json: every system, tasks with CIs, definitions stated.
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["systems"]) == {"model", "model_sequence_only", "compare_model", "majority", "nearest_neighbour",
                                       "constant"}
    model_tasks = metrics["systems"]["model"]["tasks"]
    assert set(model_tasks) == {"open", "yes_no", "multiple_choice"}
    rl = model_tasks["open"]["metrics"]["rougeL"]
    assert rl["ci_low"] <= rl["mean"] <= rl["ci_high"] and rl["n"] == 5
    assert "bleu4" in model_tasks["open"]["by_category"]["function"]["metrics"]
    assert metrics["systems"]["majority"]["tasks"].keys() == {"yes_no", "multiple_choice"}
    assert metrics["data"] == {"source": str(dataset_dir / "stage2" / "test.parquet"), "n_input": 10, "n_rejected": 1,
                               "n_evaluated": 9, "n_sample": 9, "n_with_structure": 4, "limit": None}
    reject = json.loads((out / "rejects.jsonl").read_text())
    assert reject["id"] == LONG_ID and "2435 residues, above max_residues=1022" in reject["reason"]
    sl = metrics["structured_slice"]
    assert sl["n"] == len(STRUCTURES) and set(sl["systems"]) >= {"model", "model_sequence_only"}
    assert "model_sequence_only" in next(iter(sl["comparisons"].values()))
    # Closed-set rows carry option likelihoods; generative and likelihood accuracy both reported.
    yn = model_tasks["yes_no"]
    assert yn["n_likelihood"] == yn["n"] and 0 <= yn["likelihood_accuracy"]["mean"] <= 100
    assert all(p["option_logprob"] and len(p["option_logprob"]) == len(p["options"])
               for p in preds if p["task"] in ("yes_no", "multiple_choice"))
    line = next(v for k, v in metrics["summary"].items() if k.startswith("yes_no"))
    assert line.startswith("model gen ") and " / lik " in line and "majority" in line
    assert any(k.startswith("structured slice") for k in metrics["summary"])
    assert "tok:13a|smooth:exp" in metrics["metric_definitions"]["corpus_bleu"]["signature"]
    report = (out / "report.md").read_text()
    for text in ("### open", "### yes_no", "nearest neighbour", "model, structures dropped", "comparison model",
                 "METEOR", "all-MiniLM-L6-v2", "## Structured slice", "## Verdict", "likelihood accuracy"):
        assert text in report, text
    for png in ("metric_bars.png", "by_length.png", "structure.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"

    # 4. The MLflow run is linked to the model's run and holds metrics and artifacts.
    _, _, uri, model_run = models
    run = mlflow.MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["sepit.model_run_id"] == model_run
    assert run.data.metrics["model.open.rougeL"] == pytest.approx(rl["mean"])
    assert "yes_no.accuracy" in {k.split(".", 1)[1] for k in run.data.metrics}

    # 5. A third run through the CLI regenerates nothing and duplicates nothing.
    before = (out / "predictions.jsonl").read_bytes()
    rc = main(["evaluate", "--model", str(models[0]), "--data", str(dataset_dir), "--out", str(out),
               "--compare-model", str(models[1]), "--tracking-uri", uri, "--max-new-tokens", "6",
               "--batch-size", "4", "--bootstrap", "200"])
    assert rc == 0
    assert (out / "predictions.jsonl").read_bytes() == before
    again = json.loads((out / "metrics.json").read_text())
    assert all(s["n_generated"] == 0 for s in again["generation"]["summary"].values())
    assert again["systems"]["model"] == metrics["systems"]["model"]  # seeded bootstrap: same numbers


def test_predictions_store_survives_torn_writes(tmp_path):
    store = PredictionsStore(tmp_path)
    recs = [PredictionRecord(id=f"r{i}", task="open", category="other", question="<protein> q",
                             reference="a", prediction="b") for i in range(5)]
    store.write_part(recs[:2])
    store.write_part(recs[1:3])  # r1 again: first row wins
    (store.parts_dir / ".part-000003.jsonl.tmp-123").write_text('{"id": "r9", "task"')  # killed mid-write
    assert store.done_ids() == {"r0", "r1", "r2"}
    merged = store.finalize(order=["r2", "r1", "r0", "r4"])
    assert [r.id for r in merged] == ["r2", "r1", "r0"]
    assert not store.parts_dir.exists()
    with open(store.path, "a") as f:  # a torn trailing line (no newline) is ignored on resume
        f.write('{"id": "r3", "task": "op')
    assert store.done_ids() == {"r0", "r1", "r2"}


def test_loader_rejects_bad_rows_with_reasons(tmp_path):
    good = {"id": "a", "task": "yes_no", "category": "location", "question": "Is <protein> membrane-bound?",
            "answer": "Yes", "sequence": "MKTAYIAK"}
    bad = [
        {**good, "id": "b", "sequence": "MK1"},
        {**good, "id": "c", "answer": "Maybe"},
        {**good, "id": "d", "coords": [0.0] * 5},
        {**good, "id": "e", "question": "<protein> and <protein>?"},
        {**good, "id": "f", "task": "multiple_choice", "choices": ["X", "Y"], "answer": "Z"},
        good,
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]) + "{not json\n")
    data = load_eval_data(path)
    assert data.ids == ["a"]
    reasons = {r["id"]: r["reason"] for r in data.rejects}
    assert "protein alphabet" in reasons["b"] and "yes/no answer" in reasons["c"]
    assert "coords hold 5 numbers" in reasons["d"] and "2 times" in reasons["e"]
    assert "matches no option" in reasons["f"] and reasons["a"] == "duplicate id"
    assert data.n_input == len(data.rows) + len(data.rejects) == 8


def test_bundled_qa_jsonl_loads_completely():
    data = load_eval_data(data_path("derived", "qa.jsonl.gz"))
    assert data.n_input == 1183 == len(data.rows) + len(data.rejects)
    mc = next(r for r in data.rows if r["task"] == "multiple_choice")
    assert "\nOptions:\nA) Cell membrane" in mc["question"] and mc["answer"].startswith(mc["answer_letter"] + ") ")


def test_baselines_answer_from_training_proteins():
    seq = "MSLEQKKGADIISKILQIQNSIGKTTSPSTLKTKLSEISRKEQENARIQSKLSDLQ"
    train = [
        {"id": "t1", "protein_id": "P1", "task": "yes_no", "category": "location", "question": "<protein> Is it in a membrane?",
         "answer": "Yes", "sequence": seq},
        {"id": "t2", "protein_id": "P2", "task": "yes_no", "category": "location", "question": "<protein> Is it in a membrane?",
         "answer": "No", "sequence": "GGGGHHHHWWWW"},
        {"id": "t3", "protein_id": "P3", "task": "yes_no", "category": "location", "question": "<protein> Is it in a membrane?",
         "answer": "No", "sequence": "PPPPWWWWGGGG"},
        {"id": "t4", "protein_id": "P1", "task": "open", "category": "function", "question": "<protein> What does it do?",
         "answer": "It represses transcription.", "sequence": seq},
    ]
    evals = [
        {"id": "e1", "protein_id": "Q1", "task": "yes_no", "category": "location", "question": "<protein>\nIs it in a membrane?",
         "answer": "Yes", "sequence": seq[:-3] + "AAA"},
        {"id": "e2", "protein_id": "Q1", "task": "open", "category": "function", "question": "<protein> Describe its role.",
         "answer": "A repressor.", "sequence": seq[:-3] + "AAA"},
    ]
    recs, how = nearest_neighbour_baseline(train, evals)
    nn = {r.id: r for r in recs}
    assert "identity" in how
    assert nn["e1"].prediction == "Yes" and nn["e1"].extra["neighbour"] == "P1"
    assert 0.9 < nn["e1"].extra["identity"] < 1.0
    assert nn["e2"].prediction == "It represses transcription." and nn["e2"].extra["match"] == "category"
    maj = majority_baseline(train, evals)
    assert [r.id for r in maj] == ["e1"] and maj[0].prediction == "No"  # 2 of 3 training answers
    const = {r.id: r.prediction for r in constant_baseline(train, evals)}
    assert const == {"e1": "No", "e2": "It represses transcription."}  # one answer per task, whatever the row


def test_reference_conversation_jsonl_takes_proteins_from_pdb_h5(tmp_path):
    import h5py
    import numpy as np

    from sepit.structure.parse import load_records

    rec = load_records(data_path("chlamatlas_afdb", "afdb_models", "AF-O84171-F1-model_v4.cif.gz"), chain="A")[0]
    with h5py.File(tmp_path / "pdb.h5", "w") as f:  # the reference's layout: one group per accession
        g = f.create_group("O84171")
        g["sequence"] = np.array([rec.sequence.encode()])
        g["node_position"] = rec.coords
    conv = {"id": "O84171", "conversation": [
        {"role": "user", "content": "What is the function of <protein>?"},
        {"role": "assistant", "content": "Aporepressor of the trp operon."},
        {"role": "user", "content": "Is <protein> an enzyme?"},
        {"role": "assistant", "content": "No"}]}
    path = tmp_path / "stage2" / "qa_test.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(conv) + "\n" + json.dumps({"id": "P99999", "conversation": conv["conversation"][:2]}) + "\n")
    data = load_eval_data(path, pdb_h5=str(tmp_path / "pdb.h5"))
    assert [r["task"] for r in data.rows] == ["open", "yes_no"]
    assert all(r["has_structure"] and len(r["coords"]) == 3 * rec.length for r in data.rows)
    assert data.rejects == [{"id": "P99999:0", "reason": "no protein sequence (reference JSONL rows need pdb_h5)"}]
    assert data.n_input == 3
