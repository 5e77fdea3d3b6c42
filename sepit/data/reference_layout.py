"""Export to and import from the SEPIT reference's data layout (docs/method.md §5).

Layout written by :func:`export_reference`::

    pdb.h5                     one group per protein id (the UniProt accession where known):
                                 sequence       1-element byte-string dataset
                                 node_position  [n, 3] float32 Cα (Å), one row per residue
    stage0/train.jsonl         {"id", "caption"}
    stage1/train.jsonl         {"id", "conversation": [{"role": "user", ...}, {"role": "assistant", ...}]}
    stage2/train.jsonl         same shape
    stage2/qa_test.jsonl       stage 2 test split, same shape
    stageN/val.jsonl, stage0/test.jsonl, stage1/test.jsonl   our other splits, same shapes

The reference layout has no coordinate mask: a residue without coordinates is an **all-zero
row** of ``node_position`` (the reference's own convention, and what
:mod:`sepit.structure.reference_h5` reads back as ``coord_mask=False``); a sequence-only protein
is all zeros.  Records also carry ``example_id``, ``task``, ``category``, ``source`` and, for
multiple choice, ``choices``/``answer_letter``; the reference's loader ignores unknown keys, and
:func:`import_reference` uses them to restore our records exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np
import pyarrow.parquet as pq

from sepit.data.instruction_schema import STAGES, row_protein, stage_split_path
from sepit.data.readers.reference_jsonl import read_reference_jsonl
from sepit.data.splits import SPLITS
from sepit.errors import SepitError


class ReferenceLayoutError(SepitError, ValueError):
    """A reference-layout folder is incomplete or disagrees with itself."""


def jsonl_name(stage: int, split: str) -> str:
    if split == "train":
        return "train.jsonl"
    if stage == 2 and split == "test":
        return "qa_test.jsonl"
    return f"{split}.jsonl"


def _record(row: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": row["protein_id"]}
    if row["stage"] == 0:
        rec["caption"] = row["answer"]
    else:
        rec["conversation"] = [{"role": "user", "content": row["question"]},
                               {"role": "assistant", "content": row["answer"]}]
    rec.update(example_id=row["id"], task=row["task"], category=row["category"], source=row["source"])
    if row["task"] == "multiple_choice":
        rec.update(choices=list(row["choices"]), answer_letter=row["answer_letter"])
    if row["stage"] == 0 and row["question"]:
        rec["question"] = row["question"]
    return rec


def export_reference(dataset_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write a built dataset in the reference layout; returns counts per file."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proteins: dict[str, tuple[str, Optional[np.ndarray], Optional[np.ndarray]]] = {}
    counts: dict[str, int] = {}
    for stage in STAGES:
        (out_dir / f"stage{stage}").mkdir(exist_ok=True)
        for split in SPLITS:
            path = stage_split_path(dataset_dir, stage, split)
            if not path.is_file():
                raise ReferenceLayoutError(f"{path} is missing; is {dataset_dir} a built dataset?")
            rows = pq.read_table(path).to_pylist()
            name = f"stage{stage}/{jsonl_name(stage, split)}"
            with open(out_dir / name, "w") as fh:
                for row in rows:
                    fh.write(json.dumps(_record(row), ensure_ascii=False) + "\n")
                    if row["protein_id"] not in proteins:
                        proteins[row["protein_id"]] = row_protein(row)
            counts[name] = len(rows)
    with h5py.File(out_dir / "pdb.h5", "w") as h5:
        for pid in sorted(proteins):
            seq, coords, mask = proteins[pid]
            group = h5.create_group(pid)
            group.create_dataset("sequence", data=np.array([seq.encode("ascii")]))
            pos = np.zeros((len(seq), 3), np.float32)  # all-zero row = no coordinate (reference convention)
            if coords is not None:
                pos[mask] = coords[mask]
            group.create_dataset("node_position", data=pos)
    counts["pdb.h5"] = len(proteins)
    return counts


@dataclass
class ReferenceData:
    proteins: dict[str, tuple[str, Optional[np.ndarray], Optional[np.ndarray]]] = field(default_factory=dict)
    """protein id -> (sequence, coords [n,3] or None, coord_mask [n] or None)."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """stage, split, protein_id, question, answer, task, category, choices, answer_letter, example_id, source."""


def import_reference(ref_dir: str | Path) -> ReferenceData:
    """Read a reference-layout folder (ours or the reference's own) back into memory."""
    from sepit.structure.reference_h5 import records_from_h5

    ref_dir = Path(ref_dir)
    h5_path = ref_dir / "pdb.h5"
    if not h5_path.is_file():
        raise ReferenceLayoutError(f"{h5_path} is missing")
    parsed = records_from_h5(h5_path, str(h5_path))
    if parsed.rejects:
        raise ReferenceLayoutError(f"{h5_path}: unreadable groups: {[(r.chain, r.reason) for r in parsed.rejects][:5]}")
    data = ReferenceData()
    for rec in parsed.records:
        data.proteins[rec.id] = (rec.sequence, rec.coords, rec.coord_mask)
    for stage in STAGES:
        for split in SPLITS:
            path = ref_dir / f"stage{stage}" / jsonl_name(stage, split)
            if not path.is_file():
                continue
            raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            items = list(read_reference_jsonl(path))
            if len(items) != len(raw):
                raise ReferenceLayoutError(f"{path}: {len(raw)} lines but {len(items)} question/answer pairs")
            for item, row in zip(items, raw):
                if item.accession not in data.proteins:
                    raise ReferenceLayoutError(f"{path} ({item.record}): id {item.accession} has no group in pdb.h5")
                answer = item.answer
                if item.task == "multiple_choice":
                    answer = f"{row['answer_letter']}) {item.answer}"
                data.examples.append({
                    "stage": stage, "split": split, "protein_id": item.accession, "question": item.question,
                    "answer": answer, "task": item.task, "category": item.category, "choices": item.choices,
                    "answer_letter": row.get("answer_letter"), "example_id": row.get("example_id"),
                    "source": row.get("source"),
                })
    return data
