"""Prediction records -> the metrics block of a report (per task, per category, with 95% CIs).

Open-ended tasks ("open", "caption") get the text metrics of :mod:`sepit.evaluation.metrics`;
closed-set tasks ("yes_no", "multiple_choice") get accuracy from the parsed generated answer
(:mod:`sepit.evaluation.answer_parsing`); the question text is never parsed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from sepit.evaluation.answer_parsing import gold_letter, normalize_yes_no, parse_choice, parse_yes_no
from sepit.evaluation.likelihood import OptionScores, option_index
from sepit.evaluation.bootstrap import BootstrapConfig, mean_ci, statistic_ci
from sepit.evaluation.metrics import OPEN_METRICS, TextMetrics, bleu_from_stats, corpus_bleu_stats
from sepit.evaluation.predictions import PredictionRecord

OPEN_TASKS = ("open", "caption")
CLOSED_TASKS = ("yes_no", "multiple_choice")
TASK_ORDER = ("caption", "open", "yes_no", "multiple_choice")


def closed_set_outcome(rec: PredictionRecord) -> tuple[str | None, str | None, bool]:
    """(parsed answer, gold answer, correct) of a yes/no or multiple-choice record.

    Parses ``rec.prediction`` only; ``rec.question`` is not read, so a question that itself
    says "yes" or "no" can never score.
    """
    if rec.task == "yes_no":
        gold = normalize_yes_no(rec.reference)
        parsed = parse_yes_no(rec.prediction)
    elif rec.task == "multiple_choice":
        gold = gold_letter(rec.reference, rec.choices, rec.answer_letter)
        parsed = parse_choice(rec.prediction, rec.choices or [])
    else:
        raise ValueError(f"{rec.id}: task {rec.task!r} is not closed-set")
    return parsed, gold, parsed is not None and parsed == gold


def likelihood_outcome(rec: PredictionRecord, gold: str | None) -> dict:
    """``ll_choice``/``ll_correct``/``ll_norm_correct`` (100 or 0) of a record whose options were
    scored by likelihood; ``{}`` when they were not.  ``gold`` is read only here, after scoring."""
    if not rec.options or not rec.option_logprob or len(rec.option_logprob) != len(rec.options):
        return {}
    sc = OptionScores(list(rec.options), list(rec.option_logprob), list(rec.option_tokens or []))
    want = option_index(rec.task, rec.options, gold)
    pick, pick_norm = sc.best(normalised=False), sc.best(normalised=True)
    return {"ll_choice": rec.options[pick], "ll_norm_choice": rec.options[pick_norm],
            "ll_correct": 100.0 if pick == want else 0.0, "ll_norm_correct": 100.0 if pick_norm == want else 0.0}


class RecordScorer:
    """Scores lists of :class:`PredictionRecord` with one loaded :class:`TextMetrics`."""

    def __init__(self, text_metrics: TextMetrics, bootstrap: BootstrapConfig | None = None) -> None:
        self.text = text_metrics
        self.bootstrap = bootstrap or BootstrapConfig()

    # ------------------------------------------------------------------ per sample
    def per_sample(self, records: Sequence[PredictionRecord]) -> list[dict]:
        """One row per record: id, task, category, length, structure_used and its scores (×100)."""
        rows: list[dict] = []
        open_idx = [i for i, r in enumerate(records) if r.task in OPEN_TASKS]
        open_scores = self.text.score(
            [records[i].prediction for i in open_idx], [records[i].reference for i in open_idx]
        ) if open_idx else {}
        pos = {i: k for k, i in enumerate(open_idx)}
        for i, r in enumerate(records):
            row = {
                "id": r.id, "task": r.task, "category": r.category or "other", "length": r.length,
                "structure_used": bool(r.structure_used),
            }
            if r.task in OPEN_TASKS:
                row.update({m: float(v[pos[i]]) for m, v in open_scores.items()})
            elif r.task in CLOSED_TASKS:
                parsed, gold, correct = closed_set_outcome(r)
                row.update(parsed=parsed, gold=gold, correct=100.0 if correct else 0.0)
                row.update(likelihood_outcome(r, gold))
            else:
                raise ValueError(f"{r.id}: unknown task {r.task!r}")
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ aggregates
    def _open_block(self, rows: list[dict], records: list[PredictionRecord]) -> dict:
        metrics = {m: mean_ci([r[m] for r in rows], self.bootstrap) for m in OPEN_METRICS if m in rows[0]}
        stats = corpus_bleu_stats([r.prediction for r in records], [r.reference for r in records], self.text.config)
        cb = statistic_ci(stats, lambda s: bleu_from_stats(s, self.text.config), self.bootstrap)
        return {"n": len(rows), "metrics": metrics, "corpus_bleu": cb}

    def _closed_block(self, rows: list[dict]) -> dict:
        block = {
            "n": len(rows),
            "accuracy": mean_ci([r["correct"] for r in rows], self.bootstrap),
            "unparsed": sum(1 for r in rows if r["parsed"] is None),
        }
        scored = [r for r in rows if r.get("ll_correct") is not None]
        if scored:  # systems that generate but cannot score options (the baselines) have none
            block["n_likelihood"] = len(scored)
            block["likelihood_accuracy"] = mean_ci([r["ll_correct"] for r in scored], self.bootstrap)
            block["likelihood_accuracy_norm"] = mean_ci([r["ll_norm_correct"] for r in scored], self.bootstrap)
        return block

    def aggregate(self, records: Sequence[PredictionRecord], rows: list[dict]) -> dict:
        """``{task: {n, metrics|accuracy, ..., by_category: {...}}}`` for the tasks present."""
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_task[r["task"]].append(i)
        out: dict = {}
        for task in TASK_ORDER:
            idx = by_task.get(task)
            if not idx:
                continue
            block = self._task_block(task, [rows[i] for i in idx], [records[i] for i in idx])
            cats: dict[str, list[int]] = defaultdict(list)
            for i in idx:
                cats[rows[i]["category"]].append(i)
            block["by_category"] = {
                c: self._task_block(task, [rows[i] for i in ci], [records[i] for i in ci]) for c, ci in sorted(cats.items())
            }
            out[task] = block
        return out

    def _task_block(self, task: str, rows: list[dict], records: list[PredictionRecord]) -> dict:
        return self._open_block(rows, records) if task in OPEN_TASKS else self._closed_block(rows)

    def score(self, records: Sequence[PredictionRecord]) -> tuple[dict, list[dict]]:
        """(aggregate metrics, per-sample rows)."""
        records = list(records)
        rows = self.per_sample(records)
        return {"n": len(records), "tasks": self.aggregate(records, rows)}, rows


def headline(metrics: dict) -> dict[str, float]:
    """Flat ``{"open.rougeL": 12.3, "yes_no.accuracy": 55.0, ...}`` of overall means (for MLflow)."""
    flat: dict[str, float] = {}
    for task, block in metrics.get("tasks", {}).items():
        if "metrics" in block:
            for m, v in block["metrics"].items():
                flat[f"{task}.{m}"] = v["mean"]
            flat[f"{task}.corpus_bleu"] = block["corpus_bleu"]["value"]
        if "accuracy" in block:
            flat[f"{task}.accuracy"] = block["accuracy"]["mean"]
        for k in ("likelihood_accuracy", "likelihood_accuracy_norm"):
            if k in block:
                flat[f"{task}.{k}"] = block[k]["mean"]
    return {k: float(v) for k, v in flat.items() if v is not None and np.isfinite(v)}


def score_systems(
    systems: dict[str, Sequence[PredictionRecord]], scorer: RecordScorer
) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Score several systems' records: ({system: metrics block}, {system: per-sample rows})."""
    scored, per_sample = {}, {}
    for name, records in systems.items():
        scored[name], per_sample[name] = scorer.score(records)
    return scored, per_sample


SYSTEM_SHORT = {"model": "model", "model_sequence_only": "seq-only", "compare_model": "stage-1",
                "majority": "majority", "nearest_neighbour": "nearest-nbr",
                "constant": "constant"}


def _pct(v: dict) -> str:
    return f"{v['mean']:.1f} [{v['ci_low']:.1f}, {v['ci_high']:.1f}]" if np.isfinite(v.get("ci_low", np.nan)) \
        else f"{v['mean']:.1f}"


def summary_lines(systems: dict[str, dict], structured_slice: dict | None = None) -> dict[str, str]:
    """Console lines comparing systems per task, e.g.
    ``{"yes_no (n=98)": "model gen 55.0 / lik 71.2 | majority 61.2 | nearest-nbr 58.3"}``:
    closed-set tasks show generative accuracy and likelihood accuracy (sum), open tasks ROUGE-L."""
    out: dict[str, str] = {}
    for task in TASK_ORDER:
        parts, n = [], None
        for name, block in systems.items():
            b = block.get("tasks", {}).get(task)
            if b is None:
                continue
            n = b["n"] if n is None else n
            label = SYSTEM_SHORT.get(name, name)
            if task in CLOSED_TASKS:
                text = f"{label} gen {b['accuracy']['mean']:.1f}"
                if "likelihood_accuracy" in b:
                    text += f" / lik {b['likelihood_accuracy']['mean']:.1f}"
            else:
                text = f"{label} {b['metrics']['rougeL']['mean']:.1f}"
            parts.append(text)
        if parts:
            what = "accuracy %" if task in CLOSED_TASKS else "ROUGE-L"
            out[f"{task} {what} (n={n})"] = " | ".join(parts)
    if structured_slice:
        parts = []
        for task, block in structured_slice.get("comparisons", {}).items():
            d = block.get("model_sequence_only")
            if d is not None:
                ci = f" [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]" if np.isfinite(d.get("ci_low", np.nan)) else ""
                parts.append(f"{task} {d['mean']:+.1f}{ci}")
        key = f"structured slice (n={structured_slice['n']} rows, {structured_slice['n_proteins']} proteins)"
        out[key] = ("with - without coordinates: " + "; ".join(parts)) if parts else "no sequence-only ablation"
    return out
