"""Paired comparisons between systems and the verdict paragraph that opens ``report.md``.

Systems are scored on the same rows, so a comparison is a *paired* one: per row, the model's
score minus the other system's, and a bootstrap CI of the mean difference.  The difference is
called "above" / "below" only when its 95% CI excludes 0; otherwise the two are
"indistinguishable on these n rows" -- the words a reader needs before the tables.

Headline per task: likelihood accuracy (sum) for closed-set tasks when the model has option
scores (generative accuracy otherwise, and always for baselines, whose "generation" is the
answer text itself), ROUGE-L for open tasks.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from sepit.evaluation.bootstrap import BootstrapConfig, mean_ci
from sepit.evaluation.task_metrics import CLOSED_TASKS, TASK_ORDER

TASK_WORDS = {"yes_no": "yes/no", "multiple_choice": "multiple choice", "open": "open questions",
              "caption": "captions"}


def row_value(row: dict, task: str, likelihood: bool = True) -> float | None:
    """The headline per-row score of one per-sample row (None when it has none)."""
    if task in CLOSED_TASKS:
        if likelihood and row.get("ll_correct") is not None:
            return float(row["ll_correct"])
        return float(row["correct"]) if row.get("correct") is not None else None
    v = row.get("rougeL")
    return None if v is None else float(v)


def paired_difference(a: Sequence[dict], b: Sequence[dict], task: str, config: BootstrapConfig,
                      ids: set[str] | None = None) -> dict | None:
    """Mean over shared rows of (a - b) on ``task``'s headline score, with a bootstrap CI."""
    by_id = {r["id"]: r for r in b if r["task"] == task}
    diffs = []
    for r in a:
        if r["task"] != task or r["id"] not in by_id or (ids is not None and r["id"] not in ids):
            continue
        va, vb = row_value(r, task), row_value(by_id[r["id"]], task)
        if va is not None and vb is not None:
            diffs.append(va - vb)
    if not diffs:
        return None
    return mean_ci(diffs, config)


def compare(per_sample: dict[str, list[dict]], reference: str, others: Sequence[str], config: BootstrapConfig,
            ids: set[str] | None = None) -> dict[str, dict[str, dict]]:
    """``{task: {other: difference block}}`` of ``reference`` minus each other system."""
    out: dict[str, dict[str, dict]] = {}
    if reference not in per_sample:
        return out
    for task in TASK_ORDER:
        for other in others:
            if other in per_sample:
                d = paired_difference(per_sample[reference], per_sample[other], task, config, ids)
                if d is not None:
                    out.setdefault(task, {})[other] = d
    return out


def judge(d: dict) -> str:
    lo, hi = d.get("ci_low", math.nan), d.get("ci_high", math.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not testable (too few rows)"
    if lo > 0:
        return "above"
    if hi < 0:
        return "below"
    return "indistinguishable from"


def _diff(d: dict, unit: str) -> str:
    return f"{d['mean']:+.1f} {unit} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"


def _level(block: dict, task: str, likelihood: bool = True) -> str:
    b = block["tasks"][task]
    if task in CLOSED_TASKS:
        v = b["likelihood_accuracy"] if likelihood and "likelihood_accuracy" in b else b["accuracy"]
    else:
        v = b["metrics"]["rougeL"]
    lo, hi = v.get("ci_low", math.nan), v.get("ci_high", math.nan)
    ci = f" [{lo:.1f}, {hi:.1f}]" if np.isfinite(lo) else ""
    return f"{v['mean']:.1f}{ci}"


def verdict(result: dict) -> str:
    """One paragraph in words: does the model beat each baseline (with CIs), does structure help."""
    systems = result.get("systems", {})
    model = systems.get("model")
    if not model:
        return "No model predictions were scored."
    comps = result.get("comparisons", {})
    sentences = []
    for task in TASK_ORDER:
        if task not in model.get("tasks", {}):
            continue
        unit = "pts" if task in CLOSED_TASKS else "ROUGE-L"
        metric = ("likelihood accuracy" if "likelihood_accuracy" in model["tasks"][task] else "generative accuracy") \
            if task in CLOSED_TASKS else "ROUGE-L"
        parts = []
        for other, d in comps.get(task, {}).items():
            if other in systems and task in systems[other].get("tasks", {}):
                name = {"majority": "the majority class", "nearest_neighbour": "nearest neighbour",
                        "compare_model": "the stage-1 model", "constant": "a constant answer"}.get(other, other)
                parts.append(f"{judge(d)} {name} ({_level(systems[other], task)}; difference {_diff(d, unit)})")
        n = model["tasks"][task]["n"]
        text = f"On {TASK_WORDS.get(task, task)} (n={n}) the model's {metric} is {_level(model, task)}%" \
            if task in CLOSED_TASKS else f"On {TASK_WORDS.get(task, task)} (n={n}) the model's ROUGE-L is {_level(model, task)}"
        if task in CLOSED_TASKS and "likelihood_accuracy" in model["tasks"][task]:
            b = model["tasks"][task]
            text += f" (generative {b['accuracy']['mean']:.1f}%, {b['unparsed']} answers unparsable)"
        if parts:
            text += ": " + "; ".join(parts)
        sentences.append(text + ".")
    sl = result.get("structured_slice")
    if sl and sl.get("comparisons"):
        bits = []
        for task, block in sl["comparisons"].items():
            d = block.get("model_sequence_only")
            if d is not None:
                unit = "pts" if task in CLOSED_TASKS else "ROUGE-L"
                word = {"above": "helps", "below": "hurts", "indistinguishable from": "makes no measurable difference"}.get(
                    judge(d), "cannot be judged")
                bits.append(f"{TASK_WORDS.get(task, task)}: {word} (with minus without coordinates {_diff(d, unit)}, "
                            f"n={d['n']})")
        sentences.append(f"Structure, on the structured slice ({sl['n']} rows of {sl['n_proteins']} proteins with "
                         "coordinates, the same rows scored with coordinates dropped): " + "; ".join(bits) + ".")
    elif sl is not None:
        sentences.append(f"Structure: the structured slice has {sl.get('n', 0)} rows, too few to compare.")
    else:
        sentences.append("Structure: no evaluated row has coordinates, so its effect cannot be measured here.")
    sentences.append("Differences are paired (same rows), 95% bootstrap CIs; 'indistinguishable' means the CI "
                     "of the difference includes 0.")
    return " ".join(sentences)


def short_verdict(comparisons: dict[str, dict[str, dict]], others: Sequence[str] = ("majority", "nearest_neighbour")
                  ) -> str:
    """One console line: per closed-set task, the model (likelihood) against each baseline in words."""
    bits = []
    for task in CLOSED_TASKS:
        for other in others:
            d = comparisons.get(task, {}).get(other)
            if d is not None:
                name = {"majority": "majority", "nearest_neighbour": "nearest neighbour"}.get(other, other)
                bits.append(f"{task} {judge(d)} {name} ({_diff(d, 'pts')})")
    return "; ".join(bits)
