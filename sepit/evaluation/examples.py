"""Evaluation examples: rows with the instruction-dataset contract columns, from any input we accept.

Inputs (``--data``):

* a dataset folder written by the builder (``DATA/`` with ``stage2/test.parquet``; ``--split``
  picks ``stageN/split``), a stage folder (``DATA/stage2``) or one Parquet split file;
* a JSON-lines file (optionally gzipped) in one of three shapes, told apart by its keys: contract
  rows (``task``, ``question``, ``answer``, ``sequence``, ...), our QA JSONL (``task_type``; the
  bundled ``derived/qa.jsonl``), or the SEPIT reference's conversation JSONL (``conversation``;
  sequences and coordinates then come from the reference's ``pdb.h5`` via ``pdb_h5``).

Every row is validated; a bad row is rejected with its reason and loading goes on (counts
reconcile: rows = kept + rejected).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sepit.data.prompts import PLACEHOLDER, PromptError, normalize_question
from sepit.errors import SepitError
from sepit.evaluation.answer_parsing import gold_letter, normalize_yes_no
from sepit.structure.record import SEQUENCE_ALPHABET

TASKS = ("caption", "open", "yes_no", "multiple_choice")


class EvalDataError(SepitError, ValueError):
    """The evaluation data cannot be read at all (missing file, unknown format); names the path."""


@dataclass
class EvalData:
    rows: list[dict[str, Any]]
    """Valid examples in contract columns, in input order, ids unique."""
    rejects: list[dict[str, str]] = field(default_factory=list)
    """``{"id", "reason"}`` per rejected input row."""
    source: str = ""
    """The file the rows came from."""
    n_input: int = 0

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]


def resolve_split(path: str | Path, split: str = "stage2/test") -> Path:
    """The file to read for ``--data PATH`` and ``--split stageN/name`` (see the module docstring)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        stage, _, name = split.rpartition("/")
        for cand in (p / split, p / f"{split}.parquet", p / f"{name}.parquet", p / stage / f"{name}.parquet"):
            if cand.is_file():
                return cand
        raise EvalDataError(f"{p}: no split {split!r} (looked for {split}.parquet and {name}.parquet)")
    raise EvalDataError(f"evaluation data {p} does not exist")


# --------------------------------------------------------------------------- raw readers
def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise EvalDataError(f"{path}: not a readable Parquet file ({exc})") from None


def _first_json_row(path: Path) -> dict:
    from sepit.data.readers.text_io import numbered_lines

    for _no, line in numbered_lines(path):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{path}: first record is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}: records must be JSON objects")
            return row
    raise EvalDataError(f"{path}: no records")


def _qa_items_to_rows(items, proteins: dict[str, Any] | None) -> tuple[list[dict], list[dict]]:
    """QAItems (our QA JSONL, reference JSONL) -> contract rows; MC laid out as the builder does."""
    from sepit.data.questions import format_multiple_choice

    rows, rejects = [], []
    for k, it in enumerate(items):
        rid = it.item_id or f"{Path(it.source_file).name}:{it.record}"
        question, answer, letter, choices = it.question, it.answer, None, it.choices
        if it.task == "multiple_choice":
            if it.answer not in (it.choices or []):
                rejects.append({"id": rid, "reason": "multiple-choice answer is not one of its choices"})
                continue
            mc = format_multiple_choice(it.question, it.choices, it.choices.index(it.answer), it.category)
            question, answer, letter, choices = mc.question, mc.answer, mc.answer_letter, list(mc.choices)
        seq, coords, mask = it.sequence, None, None
        rec = (proteins or {}).get(it.accession or "")
        if rec is not None:
            seq = rec.sequence
            if rec.has_structure:
                coords, mask = rec.coords.reshape(-1).tolist(), rec.coord_mask.tolist()
        rows.append({
            "id": rid, "protein_id": it.accession or rid, "accession": it.accession, "task": it.task,
            "category": it.category, "question": question, "answer": answer, "choices": choices,
            "answer_letter": letter, "source": it.source, "sequence": seq, "coords": coords,
            "coord_mask": mask, "has_structure": coords is not None, "split": "eval",
        })
    return rows, rejects


def _read_jsonl(path: Path, pdb_h5: str | None) -> tuple[list[dict], list[dict], int]:
    from sepit.data.annotations import AnnotationFormatError

    first = _first_json_row(path)
    errors: list[AnnotationFormatError] = []
    if "task" in first and "question" in first:  # contract rows
        from sepit.data.readers.text_io import numbered_lines

        rows, rejects = [], []
        for no, line in numbered_lines(path):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    rejects.append({"id": f"{path.name}:line {no}", "reason": f"not valid JSON ({exc.msg})"})
        return rows, rejects, len(rows) + len(rejects)
    if "task_type" in first:
        from sepit.data.readers.qa_jsonl import read_qa_jsonl as reader
    elif "conversation" in first or "caption" in first:
        from sepit.data.readers.reference_jsonl import read_reference_jsonl as reader
    else:
        raise EvalDataError(
            f"{path}: unknown JSONL shape (keys {sorted(first)}); expected contract rows, our QA JSONL "
            "(task_type) or the reference's conversation JSONL"
        )
    items = list(reader(path, errors))
    proteins = None
    if pdb_h5:
        from sepit.structure.reference_h5 import records_from_h5

        wanted = sorted({it.accession for it in items if it.accession})
        proteins = {r.id: r for r in records_from_h5(pdb_h5, source=str(pdb_h5), names=wanted).records}
    rows, rejects = _qa_items_to_rows(items, proteins)
    rejects += [{"id": f"{path.name}:{e.record}", "reason": e.reason} for e in errors]
    return rows, rejects, len(items) + len(errors)


# --------------------------------------------------------------------------- validation
def _validate(row: dict) -> str | None:
    """The reason a row cannot be evaluated, or None."""
    if not isinstance(row.get("id"), str) or not row["id"]:
        return "no id"
    if row.get("task") not in TASKS:
        return f"task {row.get('task')!r} is not one of {TASKS}"
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f"{key} is missing or empty"
    try:
        normalize_question(row["question"])
    except PromptError as exc:
        return str(exc)
    seq = row.get("sequence")
    if not isinstance(seq, str) or not seq:
        return "no protein sequence (reference JSONL rows need pdb_h5)"
    bad = sorted(set(seq) - SEQUENCE_ALPHABET)
    if bad:
        return f"sequence has characters outside the protein alphabet: {''.join(bad)!r}"
    coords, mask = row.get("coords"), row.get("coord_mask")
    if coords is not None:
        if len(coords) != 3 * len(seq):
            return f"coords hold {len(coords)} numbers for {len(seq)} residues (expected {3 * len(seq)})"
        if mask is not None and len(mask) != len(seq):
            return f"coord_mask has {len(mask)} entries for {len(seq)} residues"
    if row["task"] == "yes_no" and normalize_yes_no(row["answer"]) is None:
        return f"yes/no answer is {row['answer'][:40]!r}"
    if row["task"] == "multiple_choice":
        if not row.get("choices"):
            return "multiple-choice row without choices"
        if gold_letter(row["answer"], row["choices"], row.get("answer_letter")) is None:
            return "multiple-choice answer matches no option"
    return None


def _complete(row: dict) -> dict:
    row = dict(row)
    row.setdefault("category", "other")
    row["category"] = row["category"] or "other"
    row.setdefault("protein_id", row.get("accession") or row["id"])
    row.setdefault("accession", None)
    row.setdefault("choices", None)
    row.setdefault("answer_letter", None)
    row.setdefault("coords", None)
    row.setdefault("coord_mask", None)
    if row["coords"] is not None and row["coord_mask"] is None:
        row["coord_mask"] = [True] * len(row["sequence"])
    row["has_structure"] = row["coords"] is not None and any(row["coord_mask"])
    if PLACEHOLDER not in row["question"]:
        row["question"] = normalize_question(row["question"])
    return row


def load_eval_data(path: str | Path, split: str = "stage2/test", pdb_h5: str | None = None,
                   limit: int | None = None) -> EvalData:
    """Read, validate and de-duplicate evaluation rows (first row of a repeated id wins)."""
    file = resolve_split(path, split)
    name = file.name.lower()
    if name.endswith(".parquet"):
        raw, rejects = _read_parquet(file), []
        n_input = len(raw)
    elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        raw, rejects, n_input = _read_jsonl(file, pdb_h5)
    else:
        raise EvalDataError(f"{file}: unsupported data file (use a .parquet split or a .jsonl[.gz] file)")
    rows, seen = [], set()
    for row in raw:
        reason = _validate(row)
        if reason is None and row["id"] in seen:
            reason = "duplicate id"
        if reason is not None:
            rejects.append({"id": str(row.get("id")), "reason": reason})
            continue
        seen.add(row["id"])
        rows.append(_complete(row))
    if limit is not None:
        rows = rows[:limit]
    return EvalData(rows=rows, rejects=rejects, source=str(file), n_input=n_input)
