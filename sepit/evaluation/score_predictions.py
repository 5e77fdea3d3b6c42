"""``sepit score``: score an existing predictions file with the same metrics and report as ``evaluate``.

    sepit score --predictions PRED.jsonl --out DIR

Accepted files (told apart by their keys):

* ours (``predictions.jsonl`` of ``sepit evaluate``: id, task, question, reference, prediction, ...);
* the SEPIT reference's inference output (``id``, ``conversation`` [user, assistant turns],
  ``response``).  The gold answer is the assistant turn; the predicted answer is the response
  after the question: the reference located the question with an *unescaped* regex, we match
  it literally (``<protein>`` stands for any short span), then drop a leading chat-template
  marker (``[/INST]``, ``<|assistant|>``, ``ASSISTANT:``).  The task is yes/no when the gold
  answer is Yes/No, else open (``--task`` overrides).

Writes ``DIR/predictions.jsonl`` (the normalised records actually scored), ``DIR/scores.jsonl``,
``DIR/metrics.json``, ``DIR/report.md`` and plots; logs an MLflow run unless ``--no-mlflow``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sepit.config.base import ConfigError, check_choice, load_config, to_dict
from sepit.errors import SepitError
from sepit.evaluation.answer_parsing import normalize_yes_no
from sepit.evaluation.bootstrap import BootstrapConfig
from sepit.evaluation.metrics import MetricsConfig
from sepit.evaluation.predictions import PredictionRecord, PredictionsError, read_jsonl, write_predictions

_TEMPLATE_MARKER = re.compile(r"^\s*(?:\[/INST\]|<\|assistant\|>|ASSISTANT:|assistant\s*\n)\s*", re.IGNORECASE)


@dataclass
class ScoreConfig:
    predictions: str = ""
    """Predictions JSONL (ours or the reference's inference output)."""
    out: str = ""
    task: str = "auto"
    """auto | open | caption | yes_no: the task of reference-format rows."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    tracking_uri: str | None = None
    experiment: str = "sepit"
    mlflow: bool = True

    def __post_init__(self) -> None:
        for name in ("predictions", "out"):
            if not getattr(self, name):
                raise ConfigError(f"score.{name} is required")
        check_choice(self.task, "score.task", ("auto", "open", "caption", "yes_no"))


def _literal(text: str) -> str:
    """Regex matching ``text`` literally, any whitespace run matching any whitespace run."""
    return r"\s+".join(re.escape(w) for w in text.split())


def extract_response_answer(question: str, response: str) -> str:
    """The answer part of a reference ``response`` that may echo the prompt (see module docstring)."""
    before, placeholder, after = question.partition("<protein>")
    pattern = _literal(before)
    if placeholder:  # decoding drops the protein's special tokens; allow a short leftover span
        pattern += r".{0,64}?" + _literal(after)
    m = re.search(pattern, response, flags=re.DOTALL) if pattern else None
    text = response[m.end():] if m else response
    return _TEMPLATE_MARKER.sub("", text, count=1).strip()


def _from_reference(obj: dict, where: str, task: str) -> PredictionRecord:
    conv = obj.get("conversation")
    if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, dict) for t in conv[:2]):
        raise PredictionsError(f"{where}: 'conversation' must hold a user and an assistant turn")
    if not isinstance(obj.get("response"), str):
        raise PredictionsError(f"{where}: 'response' must be a string")
    question, reference = str(conv[0].get("content", "")), str(conv[1].get("content", ""))
    if task == "auto":
        task = "yes_no" if normalize_yes_no(reference) else "open"
    return PredictionRecord(
        id=str(obj.get("id")), task=task, category=str(obj.get("category") or "other"), question=question,
        reference=reference, prediction=extract_response_answer(question, obj["response"]),
        protein_id=str(obj.get("id")), extra={"response": obj["response"]},
    )


def read_any_predictions(path: str | Path, task: str = "auto") -> tuple[list[PredictionRecord], str]:
    """(records, format name) of our or the reference's predictions file; repeated ids are an error."""
    p = Path(path)
    if not p.is_file():
        raise PredictionsError(f"predictions file {p} does not exist")
    records, fmt = [], None
    for line_no, obj in read_jsonl(p):
        where = f"{p}:{line_no}"
        if not isinstance(obj, dict):
            raise PredictionsError(f"{where}: expected a JSON object")
        kind = "reference" if "conversation" in obj and "response" in obj else "sepit"
        if fmt is None:
            fmt = kind
        elif kind != fmt:
            raise PredictionsError(f"{where}: mixes {kind} rows into a {fmt} predictions file")
        records.append(_from_reference(obj, where, task) if kind == "reference" else PredictionRecord.from_dict(obj, where))
    if not records:
        raise PredictionsError(f"{p}: no predictions")
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise PredictionsError(f"{p}: id {r.id!r} appears more than once")
        seen.add(r.id)
    return records, fmt or "sepit"


def score_file(config: ScoreConfig | dict, parent_run_id: str | None = None) -> dict:
    """Score a predictions file; returns the result written to metrics.json."""
    from sepit.config.base import from_dict
    from sepit.evaluation.metrics import TextMetrics
    from sepit.evaluation.report import clean_json, write_report
    from sepit.evaluation.task_metrics import RecordScorer, headline, score_systems

    cfg = config if isinstance(config, ScoreConfig) else from_dict(ScoreConfig, config)
    out = Path(cfg.out)
    records, fmt = read_any_predictions(cfg.predictions, cfg.task)
    write_predictions(out / "predictions.jsonl", records)
    scorer = RecordScorer(TextMetrics.cached(cfg.metrics), cfg.bootstrap)
    scored, per_sample = score_systems({"model": records}, scorer)
    (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_sample["model"]))
    result = {
        "complete": True, "out_dir": str(out),
        "model": {"path": str(Path(cfg.predictions).resolve()), "run_id": None},
        "data": {"source": str(cfg.predictions), "format": fmt, "n_input": len(records), "n_rejected": 0,
                 "n_evaluated": len(records)},
        "systems": scored, "metric_definitions": scorer.text.describe(), "bootstrap": to_dict(cfg.bootstrap),
        "notes": [f"scored an existing {fmt} predictions file"]
                 + (["reference answers extracted from 'response' after the question"] if fmt == "reference" else []),
    }
    paths = write_report(out, result, per_sample)
    if cfg.mlflow:
        from sepit.tracking import log_metrics, log_params, log_report_files, start_run

        with start_run("score", tracking_uri=cfg.tracking_uri, out_dir=out, experiment=cfg.experiment,
                       parent_run_id=parent_run_id, tags={"sepit.stage": "score"}) as run:
            log_params(to_dict(cfg))
            log_metrics({f"model.{k}": v for k, v in headline(scored["model"]).items()})
            log_report_files(paths.values())
            result["mlflow_run_id"] = run.info.run_id
        (out / "metrics.json").write_text(json.dumps(clean_json(result), indent=1))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", help="predictions JSONL (ours or the reference's output)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--config", help="YAML file with ScoreConfig fields")
    parser.add_argument("--task", choices=["auto", "open", "caption", "yes_no"], help="task of reference-format rows")
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples (0 = no CIs)")
    parser.add_argument("--bertscore-model", help="local encoder folder for BERTScore (e.g. PubMedBERT)")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. metrics.bleu_smoothing=method1")


def run(args: argparse.Namespace) -> int:
    pairs = {"predictions": args.predictions, "out": args.out, "task": args.task, "tracking_uri": args.tracking_uri,
             "bootstrap.n_resamples": args.bootstrap, "metrics.bertscore.model_path": args.bertscore_model}
    overrides = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in pairs.items() if v is not None]
    if args.no_mlflow:
        overrides.append("mlflow=false")
    try:
        cfg = load_config(ScoreConfig, args.config, overrides=overrides + list(args.overrides))
        result = score_file(cfg)
    except SepitError as exc:
        print(f"sepit score: {exc}", file=sys.stderr)
        return 2
    print(f"sepit score: {result['data']['n_evaluated']} {result['data']['format']} predictions scored; "
          f"report in {result['out_dir']}/report.md")
    return 0
