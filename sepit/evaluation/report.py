"""Write ``metrics.json``, ``report.md`` and PNG plots (matplotlib, Agg backend) for an evaluation.

The report holds one table per task with a row per system (the model, its ablations, the
comparison model, the baselines), every number as ``mean [95% CI]``, the per-category
breakdown of the model, and a section stating exactly how each metric was computed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from sepit.evaluation.task_metrics import CLOSED_TASKS, TASK_ORDER
from sepit.evaluation.verdict import judge, verdict

PLOT_DIR = "plots"
HEADLINE_OPEN = ("bleu4", "rougeL", "meteor", "bertscore_f1")
TABLE_OPEN = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "meteor", "bertscore_f1")
LENGTH_BINS = (0, 100, 200, 300, 500, 800, 100_000)
SYSTEM_LABELS = {
    "model": "model",
    "model_sequence_only": "model, structures dropped",
    "compare_model": "comparison model",
    "majority": "majority class",
    "nearest_neighbour": "nearest neighbour (seq. identity)",
    "constant": "constant answer",
}


def _fmt(v: dict | None) -> str:
    if not v:
        return "–"
    mean = v.get("mean", v.get("value"))
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    lo, hi = v.get("ci_low"), v.get("ci_high")
    if lo is None or math.isnan(lo):
        return f"{mean:.2f}"
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def _label(system: str) -> str:
    return SYSTEM_LABELS.get(system, system)


# --------------------------------------------------------------------------- tables
def task_tables(systems: dict[str, dict]) -> list[str]:
    """Markdown lines: one table per task, one row per system that has that task."""
    lines: list[str] = []
    for task in TASK_ORDER:
        present = [(s, m["tasks"][task]) for s, m in systems.items() if task in m.get("tasks", {})]
        if not present:
            continue
        lines.append(f"### {task}\n")
        if task in CLOSED_TASKS:
            lines.append("| system | n | generative accuracy (%) | unparsed | likelihood accuracy (%) | "
                         "likelihood, per-token normalised (%) |")
            lines.append("|---|---|---|---|---|---|")
            for s, b in present:
                lines.append(f"| {_label(s)} | {b['n']} | {_fmt(b['accuracy'])} | {b['unparsed']} | "
                             f"{_fmt(b.get('likelihood_accuracy'))} | {_fmt(b.get('likelihood_accuracy_norm'))} |")
        else:
            cols = [c for c in TABLE_OPEN if c in present[0][1]["metrics"]]
            lines.append("| system | n | " + " | ".join(cols) + " | corpus BLEU |")
            lines.append("|---|---|" + "---|" * (len(cols) + 1))
            for s, b in present:
                cells = [_fmt(b["metrics"].get(c)) for c in cols]
                lines.append(f"| {_label(s)} | {b['n']} | " + " | ".join(cells) + f" | {_fmt(b['corpus_bleu'])} |")
        lines.append("")
    return lines


def category_tables(metrics: dict) -> list[str]:
    lines: list[str] = []
    for task in TASK_ORDER:
        block = metrics.get("tasks", {}).get(task)
        if not block:
            continue
        lines.append(f"#### {task} by category\n")
        if task in CLOSED_TASKS:
            lines += ["| category | n | generative accuracy (%) | unparsed | likelihood accuracy (%) |",
                      "|---|---|---|---|---|"]
            for c, b in block["by_category"].items():
                lines.append(f"| {c} | {b['n']} | {_fmt(b['accuracy'])} | {b['unparsed']} | "
                             f"{_fmt(b.get('likelihood_accuracy'))} |")
        else:
            cols = [c for c in HEADLINE_OPEN if c in block["metrics"]]
            lines.append("| category | n | " + " | ".join(cols) + " |")
            lines.append("|---|---|" + "---|" * len(cols))
            for c, b in block["by_category"].items():
                lines.append(f"| {c} | {b['n']} | " + " | ".join(_fmt(b["metrics"].get(k)) for k in cols) + " |")
        lines.append("")
    return lines


def comparison_table(comparisons: dict[str, dict[str, dict]]) -> list[str]:
    """Rows: task x other system; the model's headline score minus the other's, with its CI."""
    lines = ["| task | versus | n | difference (model - other) | verdict |", "|---|---|---|---|---|"]
    for task, block in comparisons.items():
        unit = "accuracy pts (likelihood)" if task in CLOSED_TASKS else "ROUGE-L"
        for other, d in block.items():
            lines.append(f"| {task} | {_label(other)} | {d['n']} | {_fmt(d)} {unit} | {judge(d)} |")
    return lines + [""]


def definitions(defs: dict) -> list[str]:
    bleu, meteor, bs = defs["bleu"], defs["meteor"], defs["bertscore"]
    lines = [
        f"- **BLEU-1..4** (per sample, ×100, averaged): {bleu['implementation']}; weights "
        f"{bleu['weights']}; smoothing: {bleu['smoothing']}; tokens: {bleu['tokenization']}.",
        f"- **Corpus BLEU**: {defs['corpus_bleu']['implementation']}, signature `{defs['corpus_bleu']['signature']}`.",
        f"- **ROUGE-1/2/L**: {defs['rouge']['implementation']}, F-measure, Porter stemming.",
        f"- **METEOR**: {meteor['implementation']} on {meteor['tokenization']}. **{meteor['note']}**"
        + (f" ({meteor['wordnet_detail']})." if meteor.get("wordnet_detail") else "."),
    ]
    if bs.get("enabled", True):
        lines.append(
            f"- **BERTScore** (own implementation, bert-score conventions, no baseline rescaling): encoder "
            f"`{bs['encoder_name']}` ({bs['encoder_path']}), layer {bs['layer']} of {bs['num_hidden_layers']}, "
            f"idf={bs['idf']}."
        )
    else:
        lines.append("- **BERTScore**: not computed.")
    lines.append("- **Generative accuracy** (yes/no, multiple choice): parsed from the generated answer only; "
                 "unparsed = wrong.")
    lines.append("- **Likelihood accuracy**: every option (\"Yes\"/\"No\", or \"B) text\") is scored as the "
                 "assistant's answer to the same prompt (teacher forcing, summed log-probability of its tokens and the "
                 "end token); the most likely option is the answer. The normalised variant divides by the option's "
                 "token count. Baselines have no likelihoods: their generative accuracy is their accuracy.")
    return lines


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(systems: dict[str, dict], path: Path) -> Path | None:
    """Per task: grouped bars (one colour per system) with 95% CI error bars."""
    panels = []
    for task in TASK_ORDER:
        present = [(s, m["tasks"][task]) for s, m in systems.items() if task in m.get("tasks", {})]
        if present:
            names = ["accuracy"] if task in CLOSED_TASKS else [c for c in HEADLINE_OPEN if c in present[0][1]["metrics"]]
            panels.append((task, names, present))
    if not panels:
        return None
    plt = _plt()
    colours = {s: f"C{i}" for i, s in enumerate(systems)}  # one colour per system in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.4), squeeze=False)
    for ax, (task, names, present) in zip(axes[0], panels):
        width = 0.8 / len(present)
        for k, (system, block) in enumerate(present):
            vals = [block["accuracy"] if n == "accuracy" else block["metrics"][n] for n in names]
            means = np.array([v["mean"] for v in vals])
            lo = np.array([v["mean"] - v["ci_low"] if not math.isnan(v["ci_low"]) else 0 for v in vals])
            hi = np.array([v["ci_high"] - v["mean"] if not math.isnan(v["ci_high"]) else 0 for v in vals])
            ax.bar(np.arange(len(names)) + k * width, means, width, yerr=[lo, hi], capsize=3,
                   color=colours[system], label=_label(system))
        ax.set_xticks(np.arange(len(names)) + width * (len(present) - 1) / 2, names, rotation=20)
        ax.set_title(task)
        ax.set_ylabel("score (×100)")
        ax.set_ylim(0, 100)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in systems]
    fig.legend(handles, [_label(s) for s in systems], loc="lower center", ncol=min(len(systems), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def length_bins(per_sample: Sequence[dict], value: str) -> list[dict]:
    """Mean of ``value`` per protein-length bin (rows lacking the value are skipped)."""
    out = []
    for lo, hi in zip(LENGTH_BINS[:-1], LENGTH_BINS[1:]):
        vals = [r[value] for r in per_sample if r.get(value) is not None and r.get("length") is not None and lo <= r["length"] < hi]
        if vals:
            out.append({"bin": f"{lo}-{hi - 1}" if hi < LENGTH_BINS[-1] else f">={lo}", "n": len(vals), "mean": float(np.mean(vals))})
    return out


def plot_by_length(per_sample: dict[str, list[dict]], path: Path) -> tuple[Path | None, dict]:
    """Closed-set accuracy (else open ROUGE-L) by protein length, one line per system."""
    value = "correct" if any(r.get("correct") is not None for rows in per_sample.values() for r in rows) else "rougeL"
    table = {s: length_bins(rows, value) for s, rows in per_sample.items()}
    table = {s: b for s, b in table.items() if b}
    if not table:
        return None, {}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, bins in table.items():
        ax.plot([b["bin"] for b in bins], [b["mean"] for b in bins], marker="o", label=_label(s))
    ax.set_xlabel("protein length (residues)")
    ax.set_ylabel("closed-set accuracy (%)" if value == "correct" else "ROUGE-L (×100)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, {"value": value, "bins": table}


def plot_structure(with_s: dict, without_s: dict, path: Path) -> Path | None:
    """The model on proteins that have a structure: with vs without their coordinates."""
    return plot_metric_bars({"model": with_s, "model_sequence_only": without_s}, path)


# --------------------------------------------------------------------------- files
def write_report(out_dir: Path, result: dict, per_sample: dict[str, list[dict]]) -> dict[str, Path]:
    """Write metrics.json, report.md and plots/*.png; returns the written paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = out_dir / PLOT_DIR
    plots.mkdir(exist_ok=True)
    paths: dict[str, Path] = {}
    systems = result["systems"]
    if p := plot_metric_bars(systems, plots / "metric_bars.png"):
        paths["metric_bars"] = p
    p, by_len = plot_by_length(per_sample, plots / "by_length.png")
    if p:
        paths["by_length"] = p
        result["by_length"] = by_len
    sl = result.get("structured_slice")
    sub = (sl or {}).get("systems", {})
    if "model" in sub and "model_sequence_only" in sub:
        if p := plot_structure(sub["model"], sub["model_sequence_only"], plots / "structure.png"):
            paths["structure"] = p

    lines = ["# Evaluation report\n", "## Verdict\n", verdict(result), "",
             f"- model: `{result['model']['path']}`"]
    if result["model"].get("run_id"):
        lines.append(f"- model's MLflow run: `{result['model']['run_id']}`")
    if result["model"].get("compare_path"):
        lines.append(f"- comparison model: `{result['model']['compare_path']}`")
    d = result["data"]
    lines += [
        f"- data: `{d['source']}`: {d['n_input']} rows read, {d['n_rejected']} rejected, "
        f"{d['n_evaluated']} evaluated" + (f" (limit {d['limit']})" if d.get("limit") else ""),
    ]
    if g := result.get("generation"):
        st = g["settings"]
        mode = "greedy" if not st["do_sample"] else f"sampling (temperature {st['temperature']}, top-p {st['top_p']})"
        lines.append(f"- generation: {mode}, max {st['max_new_tokens']} new tokens, stop {st['stop'] or 'none'}, "
                     f"batch {st['batch_size']}, {st['num_replicas']} replica(s)")
        for name, s in g.get("summary", {}).items():
            lines.append(f"  - {name}: {s['n_rows']} rows ({s['n_resumed']} resumed, {s['n_generated']} generated, "
                         f"{s['new_tokens']} new tokens, {s['tokens_per_second']} tokens/s)")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "## Results by task\n", *task_tables(systems)]
    if "model" in systems:
        lines += ["## Model by category\n", *category_tables(systems["model"])]
    if result.get("comparisons"):
        lines += ["## Model minus each baseline, paired on the same rows\n", *comparison_table(result["comparisons"])]
    if sub:
        lines += [f"## Structured slice: {sl['n']} rows of {sl['n_proteins']} proteins with coordinates "
                  f"({sl['n_in_sample']} of them in the overall sample)\n",
                  "Every test row whose protein has coordinates, scored with them and with them dropped "
                  "(the same model, the same rows).\n", *task_tables(sub)]
        if sl.get("comparisons"):
            lines += ["Model minus each system on the slice, paired:\n", *comparison_table(sl["comparisons"])]
    if "by_length" in result:
        lines += ["## By protein length\n", "| system | " + " | ".join(b["bin"] for b in next(iter(result["by_length"]["bins"].values()))) + " |"]
        lines.append("|---|" + "---|" * len(next(iter(result["by_length"]["bins"].values()))))
        for s, bins in result["by_length"]["bins"].items():
            lines.append(f"| {_label(s)} | " + " | ".join(f"{b['mean']:.1f} (n={b['n']})" for b in bins) + " |")
        lines.append("")
    lines += ["## How the numbers were computed\n", *definitions(result["metric_definitions"]),
              f"- 95% CIs: percentile bootstrap over samples, {result['bootstrap']['n_resamples']} resamples, "
              f"seed {result['bootstrap']['seed']}.", ""]
    for name, p in paths.items():
        lines.append(f"![{name}]({PLOT_DIR}/{p.name})")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(clean_json(result), indent=1, default=_json_default))
    paths["report"] = out_dir / "report.md"
    paths["metrics"] = out_dir / "metrics.json"
    return paths


def clean_json(o):
    """NaN / inf -> None (strict JSON), numpy scalars -> Python, recursively."""
    if isinstance(o, dict):
        return {str(k): clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")
