"""The dataset card: ``card.json`` (machine-readable), ``card.md`` (for people), ``lengths.png``.

Counts per stage / split / task / source / category, share of examples and proteins with a
structure, the split report (clusters, maximum cross-split identity over the aligned candidate
pairs), and the input ledger: every annotation record is used or skipped, and protein-store
records are used or unused, with both sums checked here.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sepit.data.instruction_schema import STAGES
from sepit.data.splits import SPLITS


def _length_stats(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"n": 0}
    return {"n": len(lengths), "min": min(lengths), "median": statistics.median(lengths),
            "mean": round(statistics.fmean(lengths), 1), "max": max(lengths)}


def _plot_lengths(path: Path, lengths_by_split: dict[str, list[int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max((max(v) for v in lengths_by_split.values() if v), default=1)
    bins = list(range(0, top + 50, 50))
    for split, lengths in lengths_by_split.items():
        if lengths:
            ax.hist(lengths, bins=bins, alpha=0.55, label=f"{split} (n={len(lengths)})")
    ax.set_xlabel("protein length (residues, after truncation)")
    ax.set_ylabel("proteins")
    ax.set_title("Protein lengths per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_card(out: Path, *, tables, proteins, split_of, report, ledger, skipped, store_records, store_ids_used,
               config, elapsed_s) -> dict[str, Any]:
    examples: dict[str, Any] = {}
    for stage in STAGES:
        rows = [r for split in SPLITS for r in tables.get((stage, split), [])]
        yes_no = Counter(r["answer"] for r in rows if r["task"] == "yes_no")
        examples[f"stage{stage}"] = {
            "total": len(rows),
            "by_split": {s: len(tables.get((stage, s), [])) for s in SPLITS},
            "by_task": dict(sorted(Counter(r["task"] for r in rows).items())),
            "by_source": dict(sorted(Counter(r["source"] for r in rows).items())),
            "by_category": dict(sorted(Counter(r["category"] for r in rows).items())),
            "with_structure": sum(r["has_structure"] for r in rows),
            "share_with_structure": round(sum(r["has_structure"] for r in rows) / len(rows), 4) if rows else 0.0,
            "yes_no_answers": dict(sorted(yes_no.items())),
            "proteins": len({r["protein_id"] for r in rows}),
        }
    per_file = ledger.per_file()
    n_in, n_used = len(ledger.seen), len(ledger.used)
    reasons = Counter(f"{r['stage']}: " + re.sub(r"\d+", "N", r["reason"])[:100] for r in skipped)
    store_unused = sorted(set(store_records) - set(store_ids_used))
    lengths_by_split = {s: sorted(len(p.sequence) for k, p in proteins.items() if split_of[k] == s) for s in SPLITS}
    card = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed_s, 2),
        "format": {
            "files": "stage{0,1,2}/{train,val,test}.parquet, skipped.parquet, card.json, card.md, lengths.png",
            "multiple_choice": "question lists 'A) ...' options; choices = option texts; answer = 'B) text'; answer_letter = 'B'",
            "yes_no": "answer is exactly 'Yes' or 'No'",
            "coordinates": "flat [3n] float32 Cα (Å) on the row's sequence; coord_mask False rows hold 0 and carry no position",
        },
        "inputs": {
            "records": n_in, "used": n_used, "skipped": len(skipped),
            "reconciles": n_in == n_used + len(skipped),
            "notes": list(getattr(ledger, "notes", [])),
            "per_file": per_file,
            "skipped_by_stage": dict(sorted(Counter(r["stage"] for r in skipped).items())),
            "top_skip_reasons": reasons.most_common(12),
        },
        "store": {
            "path": config.get("proteins"), "records": len(store_records), "used": len(store_ids_used),
            "unused": len(store_unused), "reconciles": len(store_records) == len(store_ids_used) + len(store_unused),
            "unused_ids": store_unused[:200],
        },
        "proteins": {
            "total": len(proteins),
            "by_split": {s: len(v) for s, v in lengths_by_split.items()},
            "with_structure": sum(p.has_structure for p in proteins.values()),
            "share_with_structure": round(sum(p.has_structure for p in proteins.values()) / max(len(proteins), 1), 4),
            "with_structure_by_split": {s: sum(proteins[k].has_structure for k in proteins if split_of[k] == s)
                                        for s in SPLITS},
            "share_with_structure_by_split": {
                s: round(sum(proteins[k].has_structure for k in proteins if split_of[k] == s) / max(len(v), 1), 4)
                for s, v in lengths_by_split.items()},
            "truncated_to_max_residues": sum(p.truncated_from is not None for p in proteins.values()),
            "length_by_split": {s: _length_stats(v) for s, v in lengths_by_split.items()},
        },
        "examples": examples,
        "splits": report.as_dict(),
        "config": config,
    }
    if not card["inputs"]["reconciles"] or not card["store"]["reconciles"]:
        raise RuntimeError(f"dataset card counts do not reconcile: inputs {card['inputs']}, store {card['store']}")
    (out / "card.json").write_text(json.dumps(card, indent=2, default=str))
    (out / "card.md").write_text(render_markdown(card))
    _plot_lengths(out / "lengths.png", lengths_by_split)
    return card


def summary_lines(card: dict[str, Any]) -> list[str]:
    i, p, s = card["inputs"], card["proteins"], card["splits"]
    lines = [
        f"inputs: {i['records']} records = {i['used']} used + {i['skipped']} skipped",
        f"proteins: {p['total']} ({p['by_split']}), with structure {p['with_structure']} "
        f"({100 * p['share_with_structure']:.1f}%; by split {p['with_structure_by_split']}), "
        f"truncated {p['truncated_to_max_residues']}",
    ]
    lines += [f"note: {n}" for n in i.get("notes", [])]
    for stage, e in card["examples"].items():
        lines.append(f"{stage}: {e['total']} examples {e['by_split']} tasks {e['by_task']}")
    lines.append(f"splits: {s['n_clusters']} clusters at identity {s['threshold']}; max cross-split identity "
                 f"(aligned candidate pairs) {s['max_cross_split_identity']}")
    return lines


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(card: dict[str, Any]) -> str:
    i, st, p, sp = card["inputs"], card["store"], card["proteins"], card["splits"]
    parts = [
        "# SEPIT instruction dataset card", "",
        f"Built {card['created_at']} in {card['elapsed_s']} s, seed {card['config']['seed']}.", "",
        "## Inputs", "",
        f"{i['records']} annotation records read = **{i['used']} used + {i['skipped']} skipped** "
        f"(reconciles: {i['reconciles']}); reasons in `skipped.parquet`.", "",
        _table(["file", "records", "used", "skipped"],
               [[Path(f).name, c["records"], c["used"], c["skipped"]] for f, c in sorted(i["per_file"].items())]), "",
        *[f"Note: {n}" for n in i.get("notes", [])], "",
        "Most frequent skip reasons:", "",
        _table(["count", "stage: reason"], [[n, r] for r, n in i["top_skip_reasons"]]), "",
        f"Protein store: {st['records']} records = {st['used']} used + {st['unused']} without any annotation "
        f"(path: {st['path']}).", "",
        "## Proteins", "",
        f"{p['total']} proteins; {p['with_structure']} with a structure "
        f"({100 * p['share_with_structure']:.1f}%); {p['truncated_to_max_residues']} truncated to "
        f"{card['config']['max_residues']} residues.", "",
        _table(["split", "proteins", "with structure", "share with structure", "min", "median", "mean", "max"],
               [[s, v.get("n", 0), p["with_structure_by_split"][s], f"{100 * p['share_with_structure_by_split'][s]:.1f}%",
                 v.get("min", "-"), v.get("median", "-"), v.get("mean", "-"), v.get("max", "-")]
                for s, v in p["length_by_split"].items()]), "",
        "![protein lengths](lengths.png)", "",
        "## Examples", "",
    ]
    for stage, e in card["examples"].items():
        parts += [f"### {stage}: {e['total']} examples, {e['proteins']} proteins, "
                  f"{100 * e['share_with_structure']:.1f}% with structure", "",
                  _table(["split"] + list(e["by_split"]), [["examples"] + list(e["by_split"].values())]), "",
                  _table(["task", "n"], sorted(e["by_task"].items())), "",
                  _table(["category", "n"], sorted(e["by_category"].items())), "",
                  _table(["source", "n"], sorted(e["by_source"].items())), ""]
        if e["yes_no_answers"]:
            parts += [f"Yes/no answers: {e['yes_no_answers']}", ""]
    parts += [
        "## Splits", "",
        f"Method: {sp['method']}. Threshold {sp['threshold']}; {sp['n_clusters']} clusters; "
        f"{sp['n_candidate_pairs_aligned']} candidate pairs aligned, {sp['n_pairs_at_or_above_threshold']} at or "
        "above the threshold.", "",
        _table(["splits", "max identity", "pair", "pairs aligned"],
               [[k, v, " / ".join(sp["max_cross_split_pair"][k]), sp["n_cross_split_pairs_aligned"][k]]
                for k, v in sp["max_cross_split_identity"].items()]), "",
        f"Note: {sp['note']}.", "",
    ]
    return "\n".join(parts)
