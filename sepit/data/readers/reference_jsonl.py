"""The SEPIT reference's JSONL (``stage{0,1,2}/train.jsonl``, ``stage2/qa_test.jsonl``) -> :class:`QAItem`.

Two record shapes (docs/method.md §5): ``{"id", "caption"}`` (stage 0) and
``{"id", "conversation": [{"role": "user", "content": "...<protein>..."},
{"role": "assistant", "content": "..."}, ...]}``.  ``id`` is the UniProt accession that keys
``pdb.h5``.  Each user/assistant pair becomes one item.  The stage comes from the folder name
(``stage1/train.jsonl`` -> 1; default 2).  Records written by :mod:`sepit.data.reference_layout`
also carry ``task``/``category``/``choices``/``answer_letter``; without them the task is inferred
(caption for stages 0-1; yes/no when the answer is Yes/No; open otherwise).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Optional

from sepit.data.annotations import CATEGORIES, TASKS, AnnotationFormatError, QAItem
from sepit.data.questions import CAPTION_QUESTION, choice_letter
from sepit.data.readers.text_io import read_json_lines

SOURCE = "sepit_reference"


def stage_of(path: str | Path) -> int:
    m = re.fullmatch(r"stage([012])", Path(path).parent.name)
    return int(m.group(1)) if m else 2


def _conversation_pairs(path: str, no: int, conv: object) -> list[tuple[str, str]]:
    if not isinstance(conv, list) or not conv:
        raise AnnotationFormatError(path, no, "'conversation' must be a non-empty list of turns")
    pairs, pending = [], None
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise AnnotationFormatError(path, no, f"turn {i} must be an object with 'role' and 'content'")
        role = turn.get("role")
        if role == "user":
            if pending is not None:
                raise AnnotationFormatError(path, no, f"turn {i}: two user turns in a row")
            pending = turn["content"]
        elif role == "assistant":
            if pending is None:
                raise AnnotationFormatError(path, no, f"turn {i}: assistant turn without a user turn before it")
            pairs.append((pending, turn["content"]))
            pending = None
        else:
            raise AnnotationFormatError(path, no, f"turn {i}: role {role!r} is not 'user' or 'assistant'")
    if pending is not None:
        raise AnnotationFormatError(path, no, "conversation ends with an unanswered user turn")
    return pairs


def _item(path, no, row, stage, question, answer, turn) -> QAItem:
    task = row.get("task")
    category = row.get("category")
    choices = row.get("choices")
    if task is not None and task not in TASKS:
        raise AnnotationFormatError(path, no, f"task {task!r} is not one of {TASKS}")
    if category is not None and category not in CATEGORIES:
        raise AnnotationFormatError(path, no, f"category {category!r} is not one of {CATEGORIES}")
    if task is None:
        if stage < 2:
            task = "caption"
        elif answer.strip().rstrip(".").lower() in ("yes", "no"):
            task = "yes_no"
        else:
            task = "open"
    if task == "multiple_choice":
        letter = row.get("answer_letter")
        if not isinstance(choices, list) or not choices or not isinstance(letter, str):
            raise AnnotationFormatError(path, no, "multiple-choice record needs 'choices' and 'answer_letter'")
        idx = ord(letter) - ord("A")
        if not 0 <= idx < len(choices) or answer != f"{choice_letter(idx)}) {choices[idx]}":
            raise AnnotationFormatError(path, no, f"answer {answer[:40]!r} does not match answer_letter {letter!r}")
        answer = choices[idx]
    return QAItem(
        source=row.get("source") or SOURCE, source_file=path, record=f"line {no}",
        question=question, answer=answer, task=task,
        category=category or ("caption" if task == "caption" else "other"),
        accession=row["id"], choices=choices if task == "multiple_choice" else None, stage=stage,
        item_id=row.get("example_id") or (f"{row['id']}:{turn}" if turn is not None else None),
    )


def read_reference_jsonl(path: str | Path, errors: Optional[list] = None) -> Iterator[QAItem]:
    path = str(path)
    stage = stage_of(path)

    def parse(no: int, row: Any) -> Iterator[QAItem]:
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            raise AnnotationFormatError(path, no, "record needs a non-empty string 'id'")
        if "caption" in row:
            if not isinstance(row["caption"], str) or not row["caption"].strip():
                raise AnnotationFormatError(path, no, "'caption' must be a non-empty string")
            yield _item(path, no, {**row, "task": row.get("task", "caption")}, stage if stage < 2 else 0,
                        row.get("question") or CAPTION_QUESTION, row["caption"], None)
        elif "conversation" in row:
            pairs = _conversation_pairs(path, no, row["conversation"])
            for turn, (question, answer) in enumerate(pairs):
                yield _item(path, no, row, stage, question, answer, turn)
        else:
            raise AnnotationFormatError(path, no, "record has neither 'caption' nor 'conversation'")

    return read_json_lines(path, errors, parse)
