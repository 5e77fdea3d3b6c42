"""`sepit score` on the reference's output format reproduces the reference's own metric recipe."""

from __future__ import annotations

import gzip
import json
import re
import warnings

import pytest

from sepit.evaluation.score_predictions import extract_response_answer, read_any_predictions, score_file
from sepit.resources import data_path

SYSTEM = "You are a helpful biological assistant."


def _reference_rows() -> list[dict]:
    """Reference-format inference output built from real bundled QA records.

    Open answers are predicted with a neighbouring record's answer (real text, partial overlap);
    the response echoes the Llama-2 prompt, as the reference's decoded outputs do.
    """
    qa = [json.loads(line) for line in gzip.open(data_path("derived", "qa.jsonl.gz"), "rt")]
    open_rows = [r for r in qa if r["task_type"] in ("open_qa", "function_description") and len(r["answer"]) < 400][:24]
    yn = [r for r in qa if r["task_type"] == "yes_no" and not re.search(r"\b(yes|no)\b", r["question"], re.I)][:10]
    rows = []
    for i, r in enumerate(open_rows):
        pred = open_rows[(i + 1) % len(open_rows)]["answer"] if i % 3 else r["answer"]
        rows.append((r, pred))
    for i, r in enumerate(yn):
        rows.append((r, ("Yes, it is." if i % 2 else "No.")))
    out = []
    for r, pred in rows:
        q = f"<protein>\n{r['question']}"
        response = f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n\n{r['question']} [/INST] {pred}"
        out.append({"id": r["id"], "conversation": [{"role": "user", "content": q},
                                                   {"role": "assistant", "content": r["answer"]}],
                    "response": response})
    return out


def _reference_recipe(rows: list[dict], tokenizer, wordnet) -> dict[str, float]:
    """The reference evaluate_task's per-sample recipe, written out from its description."""
    import bert_score
    from nltk.translate.bleu_score import corpus_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    from sepit.evaluation.bertscore import default_encoder_path

    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    weights = {"bleu1": (1, 0, 0, 0), "bleu2": (0.5, 0.5, 0, 0), "bleu3": (0.33, 0.33, 0.33, 0), "bleu4": (0.25,) * 4}
    sums: dict[str, float] = {}
    cands, refs = [], []
    for row in rows:
        answer = row["conversation"][1]["content"]
        output = row["response"].split("[/INST]", 1)[1].strip()
        c, r = tokenizer.tokenize(output), tokenizer.tokenize(answer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k, w in weights.items():
                sums[k] = sums.get(k, 0) + 100 * corpus_bleu([[r]], [c], weights=w)
        s = rouge.score(output, answer)
        for k in ("rouge1", "rouge2", "rougeL"):
            sums[k] = sums.get(k, 0) + 100 * s[k].fmeasure
        sums["meteor"] = sums.get("meteor", 0) + 100 * meteor_score([r], c, wordnet=wordnet)
        cut = lambda t: tokenizer.decode(tokenizer.encode(t, max_length=500, truncation=True, add_special_tokens=False))  # noqa: E731
        cands.append(cut(output))
        refs.append(cut(answer))
    P, R, F = bert_score.score(cands, refs, model_type=str(default_encoder_path()), num_layers=6)
    n = len(rows)
    out = {k: v / n for k, v in sums.items()}
    out.update(bertscore_p=100 * P.mean().item(), bertscore_r=100 * R.mean().item(), bertscore_f1=100 * F.mean().item())
    return out


def test_reference_format_reproduces_the_reference_recipe(tmp_path):
    pytest.importorskip("bert_score")
    rows = _reference_rows()
    path = tmp_path / "qa_test_output.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = score_file({"predictions": str(path), "out": str(tmp_path / "scored"), "mlflow": False,
                         "bootstrap": {"n_resamples": 100}})
    assert result["data"]["format"] == "reference"
    tasks = result["systems"]["model"]["tasks"]
    assert tasks["open"]["n"] == 24 and tasks["yes_no"]["n"] == 10

    from sepit.evaluation.metrics import TextMetrics

    tm = TextMetrics.cached()
    expected = _reference_recipe([r for r in rows if r["id"] in {x["id"] for x in rows[:24]}],
                                 tm.bertscorer.tokenizer, tm.wordnet)
    for k, v in expected.items():
        assert tasks["open"]["metrics"][k]["mean"] == pytest.approx(v, abs=1e-4 if k.startswith("bert") else 1e-9), k
    # yes/no: half the responses say "Yes, it is.", half "No."; accuracy against the real labels.
    gold = [r["conversation"][1]["content"].lower() for r in rows[24:]]
    said = ["yes" if "Yes" in r["response"].split("[/INST]")[1] else "no" for r in rows[24:]]
    assert tasks["yes_no"]["accuracy"]["mean"] == pytest.approx(100 * sum(g == s for g, s in zip(gold, said)) / 10)
    assert tasks["yes_no"]["unparsed"] == 0


def test_our_format_scores_identically_through_the_cli(tmp_path):
    from sepit.cli import main

    rows = _reference_rows()[20:30]
    ref_path = tmp_path / "ref.jsonl"
    ref_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = score_file({"predictions": str(ref_path), "out": str(tmp_path / "a"), "mlflow": False,
                      "bootstrap": {"n_resamples": 50}})
    ours_path = tmp_path / "a" / "predictions.jsonl"  # the normalised records, in our format
    rc = main(["score", "--predictions", str(ours_path), "--out", str(tmp_path / "b"), "--bootstrap", "50",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert rc == 0
    ours = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ours["data"]["format"] == "sepit"
    assert ref["data"]["n_evaluated"] == ours["data"]["n_evaluated"] == 10
    assert ours["systems"] == json.loads((tmp_path / "a" / "metrics.json").read_text())["systems"]
    assert ours["mlflow_run_id"] and (tmp_path / "b" / "report.md").is_file()


def test_response_extraction_is_literal_and_bad_files_fail_clearly(tmp_path, capsys):
    from sepit.cli import main

    q = "<protein>\nIs this protein (e.g. a kinase) found in the membrane? Answer briefly."
    resp = "[INST] Is this protein (e.g. a kinase) found in the membrane? Answer briefly. [/INST] Yes."
    assert extract_response_answer(q, resp) == "Yes."
    # The reference's unescaped pattern would treat "(e.g. a kinase)" as a group and "?" as a quantifier.
    assert extract_response_answer("What is <protein> for?", "It binds ATP.") == "It binds ATP."
    bad = tmp_path / "mixed.jsonl"
    bad.write_text(json.dumps({"id": "1", "conversation": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}], "response": "r"})
                   + "\n" + json.dumps({"id": "2", "task": "open", "question": "q", "reference": "a", "prediction": "b"}) + "\n")
    assert main(["score", "--predictions", str(bad), "--out", str(tmp_path / "o"), "--no-mlflow"]) == 2
    assert "mixes sepit rows into a reference predictions file" in capsys.readouterr().err
    assert main(["score", "--predictions", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    dup = tmp_path / "dup.jsonl"
    row = {"id": "1", "task": "open", "question": "q", "reference": "a", "prediction": "b"}
    dup.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="appears more than once"):
        read_any_predictions(dup)
