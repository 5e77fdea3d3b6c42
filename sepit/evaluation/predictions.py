"""``predictions.jsonl``: one line per evaluated example, written so that runs resume safely.

Layout under an output folder::

    predictions.jsonl          finished rows, one JSON object per line, in input order
    predictions.parts/         journal of the current run: part-000001.jsonl, ... one per batch

Each batch of generated answers is written to a new part file through a temporary file,
``fsync`` and ``os.replace``, so a part is either complete or absent, whatever kills the
process.  :meth:`PredictionsStore.finalize` merges the finished file and the parts (first row of
an id wins), writes ``predictions.jsonl`` the same atomic way and deletes the journal.  A rerun
reads both to learn which ids are done: it never writes an id twice and never regenerates one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from sepit.errors import SepitError

PREDICTIONS_FILE = "predictions.jsonl"


class PredictionsError(SepitError, ValueError):
    """A predictions file is unreadable; the message names the file, line and reason."""


@dataclass
class PredictionRecord:
    id: str
    task: str
    """caption | open | yes_no | multiple_choice"""
    category: str
    question: str
    reference: str
    prediction: str
    """Decoded generated tokens only (never the prompt)."""
    protein_id: str | None = None
    structure_used: bool = False
    """True when the model received coordinates for this example."""
    accession: str | None = None
    length: int | None = None
    """Protein length in residues."""
    choices: list[str] | None = None
    answer_letter: str | None = None
    n_new_tokens: int | None = None
    """Generated tokens (LLM tokenizer) for this answer, when the generator reports it."""
    options: list[str] | None = None
    """Closed-set rows scored by likelihood: the option texts, in order (``sepit.evaluation.likelihood``)."""
    option_logprob: list[float] | None = None
    """Per option: summed log-probability of its tokens and the end token given the prompt."""
    option_tokens: list[int] | None = None
    """Per option: the number of scored tokens."""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "PredictionRecord":
        missing = [k for k in ("id", "task", "question", "reference", "prediction") if k not in d]
        if missing:
            raise PredictionsError(f"{where}: prediction row lacks {missing}")
        known = {f for f in cls.__dataclass_fields__}
        extra = {k: v for k, v in d.items() if k not in known}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("category", "other")
        kw["extra"] = {**(kw.get("extra") or {}), **extra}
        return cls(**kw)


def _atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path, tolerate_torn_tail: bool = True) -> Iterator[tuple[int, dict]]:
    """(line number, object) per line; a torn last line (no newline, bad JSON) is skipped."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as exc:
            if tolerate_torn_tail and i == len(lines) and not line.endswith("\n"):
                return
            raise PredictionsError(f"{path}:{i}: not valid JSON ({exc.msg})") from None


class PredictionsStore:
    """The predictions of one output folder (see the module docstring)."""

    def __init__(self, out_dir: str | Path, name: str = PREDICTIONS_FILE) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / name
        self.parts_dir = self.out_dir / (Path(name).stem + ".parts")

    def _part_files(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.glob("part-*.jsonl"))

    def records(self) -> list[PredictionRecord]:
        """Finished file first, then parts in order; the first row of each id wins."""
        seen: dict[str, PredictionRecord] = {}
        sources = ([self.path] if self.path.is_file() else []) + self._part_files()
        for src in sources:
            for line_no, obj in read_jsonl(src):
                rec = PredictionRecord.from_dict(obj, where=f"{src}:{line_no}")
                seen.setdefault(rec.id, rec)
        return list(seen.values())

    def done_ids(self) -> set[str]:
        return {r.id for r in self.records()}

    def write_part(self, records: Sequence[PredictionRecord]) -> Path:
        """Journal one batch atomically; returns the part path."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        existing = self._part_files()
        index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 1
        path = self.parts_dir / f"part-{index:06d}.jsonl"
        _atomic_write_lines(path, (r.to_json() for r in records))
        return path

    def finalize(self, order: Sequence[str] | None = None) -> list[PredictionRecord]:
        """Merge parts into ``predictions.jsonl`` (in ``order`` of ids when given) and clear the journal.

        Ids not in ``order`` (rows of a different data file) are dropped from the merged file.
        """
        records = self.records()
        if order is not None:
            rank = {rid: i for i, rid in enumerate(order)}
            records = sorted((r for r in records if r.id in rank), key=lambda r: rank[r.id])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_lines(self.path, (r.to_json() for r in records))
        for part in self._part_files():
            part.unlink()
        if self.parts_dir.is_dir():
            for stale in self.parts_dir.glob(".part-*.tmp-*"):  # left by a process killed mid-write
                stale.unlink()
            if not any(self.parts_dir.iterdir()):
                self.parts_dir.rmdir()
        return records


def write_predictions(path: str | Path, records: Sequence[PredictionRecord]) -> None:
    """Write a complete predictions file atomically (baselines, re-scored files)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_lines(p, (r.to_json() for r in records))
