"""Our QA JSON lines (``derived/qa.jsonl`` schema) -> :class:`QAItem`, imported as they are.

Fields: ``id, task_type, source, answer_origin, accession, sequence, structure_file,
structure_chain, question, answer`` and, for multiple choice, ``choices`` (the answer is one
of them).  ``task_type`` gives the task and category (table below); unknown task types are
rejected rather than guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from sepit.data.annotations import AnnotationFormatError, QAItem
from sepit.data.readers.text_io import read_json_lines

#: task_type -> (task, category)
TASK_TYPES = {
    "function_description": ("open", "function"),
    "subcellular_location": ("open", "location"),
    "subcellular_location_mc": ("multiple_choice", "location"),
    "keywords": ("open", "keywords"),
    "domain_motif": ("open", "domains_motifs"),
    "catalytic_activity": ("open", "catalytic_activity"),
    "ec_number": ("open", "ec"),
    "family": ("open", "family"),
    "go_terms": ("open", "go"),
    "open_qa": ("open", "other"),
    "yes_no": ("yes_no", None),  # category from the metric / question (below)
    "multiple_choice": ("multiple_choice", "other"),
}
_METRIC_CATEGORY = {"in_membrane": "location", "in_nucleus": "location", "in_mitochondria": "location",
                    "is_enzyme": "ec"}
YES_NO_ANSWERS = {"yes": "Yes", "no": "No"}


def _yes_no_category(row: dict) -> str:
    if row.get("metric") in _METRIC_CATEGORY:
        return _METRIC_CATEGORY[row["metric"]]
    q = row.get("question", "").lower()
    if "membrane" in q or "located" in q or "localiz" in q:
        return "location"
    if "enzyme" in q:
        return "ec"
    return "other"


def parse_qa_row(path: str, no: int, row: object) -> QAItem:
    if not isinstance(row, dict):
        raise AnnotationFormatError(path, no, f"expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer", "task_type"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise AnnotationFormatError(path, no, f"field {key!r} is missing or empty")
    task_type = row["task_type"]
    if task_type not in TASK_TYPES:
        raise AnnotationFormatError(path, no, f"unknown task_type {task_type!r}; known: {sorted(TASK_TYPES)}")
    task, category = TASK_TYPES[task_type]
    answer = row["answer"].strip()
    choices = row.get("choices")
    if task == "yes_no":
        if answer.lower().rstrip(".") not in YES_NO_ANSWERS:
            raise AnnotationFormatError(path, no, f"yes/no answer is {answer[:40]!r}, not Yes or No")
        answer = YES_NO_ANSWERS[answer.lower().rstrip(".")]
        category = _yes_no_category(row)
    if task == "multiple_choice":
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise AnnotationFormatError(path, no, "multiple-choice record needs a 'choices' list of >= 2 strings")
        if answer not in choices:
            raise AnnotationFormatError(path, no, f"answer {answer[:40]!r} is not one of the choices {choices}")
    elif choices is not None:
        raise AnnotationFormatError(path, no, f"'choices' given for task_type {task_type!r}")
    sequence = row.get("sequence")
    if sequence is not None and not isinstance(sequence, str):
        raise AnnotationFormatError(path, no, "field 'sequence' must be a string or null")
    return QAItem(
        source=row.get("source") or "qa_jsonl", source_file=path, record=f"line {no}",
        question=row["question"].strip(), answer=answer, task=task, category=category,
        accession=row.get("accession") or None, sequence=sequence.strip().upper() if sequence else None,
        choices=list(choices) if task == "multiple_choice" else None,
        structure_file=row.get("structure_file") or None, structure_chain=row.get("structure_chain") or None,
        item_id=str(row["id"]) if row.get("id") is not None else None,
    )


def read_qa_jsonl(path: str | Path, errors: Optional[list] = None) -> Iterator[QAItem]:
    path = str(path)
    return read_json_lines(path, errors, lambda no, row: [parse_qa_row(path, no, row)])
