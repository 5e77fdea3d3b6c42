"""Reading the builder's annotation inputs, with a ledger of every input record's fate.

:class:`InputLedger` is what makes the dataset card's counts reconcile: every record a reader
yields (or rejects) is registered once, and at the end it is either *used* (at least one
instruction record came from it) or *skipped* with the first reason that stopped it.

Whole-file findings that a per-record reason does not convey (how many STRING ids an aliases
file left ambiguous; how many Mol-Instructions records per task name were not used) are written
as one ``warning:`` line each to stderr (straight to the console: a library logger would be
routed to a log file during a ``sepit`` command) and kept in :attr:`InputLedger.notes`.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sepit.console import report
from sepit.data.annotations import AnnotationFormatError, InputRecord
from sepit.data.readers import load_id_map, merge_id_maps, parse_annotation_arg, read_annotations
from sepit.data.readers.id_maps import IdMapping
from sepit.data.readers.mol_instructions import unused_task_counts
from sepit.resources import DATA_DIR

Key = tuple[str, str]  # (source file, record locator)


def default_annotation_files() -> list[str]:
    """The bundled real annotation files (``sepit/resources/data``), in a fixed order.

    UniProt entries shipped as both flat file and XML are taken once (flat file), so the same
    entry is not read twice.
    """
    swiss = DATA_DIR / "biopython_testdata" / "swissprot"
    texts = sorted(p for p in swiss.glob("*.txt.gz") if not p.name.startswith("README"))
    stems = {p.name.split(".")[0] for p in texts}
    xmls = sorted(p for p in swiss.glob("*.xml.gz") if p.name.split(".")[0] not in stems)
    return [str(p) for p in (
        *texts, *xmls,
        DATA_DIR / "string_v12_ctrachomatis" / "string_ct_protein_info_v12.txt.gz",
        DATA_DIR / "deeploc_lightattention" / "deeploc_test_set.fasta.gz",
        DATA_DIR / "deeploc_lightattention" / "deeploc_val_set.fasta.gz",
        DATA_DIR / "derived" / "qa.jsonl.gz",
    )]


def default_id_maps() -> list[str]:
    """Bundled id map: STRING ids -> UniProt accessions and sequences (``derived/proteins.jsonl``)."""
    return [str(DATA_DIR / "derived" / "proteins.jsonl.gz")]


@dataclass
class InputLedger:
    seen: dict[Key, Optional[str]] = field(default_factory=dict)
    """record -> accession (None when unknown)."""
    used: set[Key] = field(default_factory=set)
    reasons: dict[Key, tuple[str, str]] = field(default_factory=dict)
    """record -> (stage, reason): the first reason recorded."""
    notes: list[str] = field(default_factory=list)
    """Whole-file warnings (id maps, Mol-Instructions tasks not used, with counts per name)."""

    def note(self, line: str) -> None:
        self.notes.append(line)
        print(f"warning: {line}", file=sys.stderr, flush=True)

    def register(self, key: Key, accession: Optional[str] = None) -> None:
        self.seen.setdefault(key, accession)

    def skip(self, key: Key, stage: str, reason: str) -> None:
        self.register(key)
        self.reasons.setdefault(key, (stage, reason))

    def use(self, key: Key) -> None:
        self.used.add(key)

    def skipped_rows(self) -> list[dict]:
        rows = []
        for key, accession in self.seen.items():
            if key in self.used:
                continue
            stage, reason = self.reasons.get(key, ("generate", "no instruction record could be made from it"))
            rows.append({"source_file": key[0], "record": key[1], "accession": accession,
                         "stage": stage, "reason": reason})
        return rows

    def per_file(self) -> dict[str, dict[str, int]]:
        counts: dict[str, Counter] = defaultdict(Counter)
        for key in self.seen:
            counts[key[0]]["records"] += 1
            counts[key[0]]["used" if key in self.used else "skipped"] += 1
        return {f: {"records": c["records"], "used": c["used"], "skipped": c["skipped"]} for f, c in counts.items()}


class IdMap(dict):
    """id -> :class:`IdMapping`, with the maps' summary lines (``notes``) for the ledger."""

    def __init__(self, mappings: dict[str, IdMapping], notes: list[str]):
        super().__init__(mappings)
        self.notes = notes


def load_id_maps(paths: list[str]) -> IdMap:
    """All id maps merged field by field (e.g. STRING aliases -> accession + sequences -> sequence)."""
    notes: list[str] = []
    merged = merge_id_maps((load_id_map(p, notes) for p in paths), notes)
    return IdMap(merged, notes)


def read_inputs(annotation_args: list[str], id_map: dict[str, IdMapping], ledger: InputLedger) -> list[InputRecord]:
    """Every record of every annotation file; malformed ones go to the ledger as skipped."""
    for line in getattr(id_map, "notes", ()):
        ledger.note(line)
    out: list[InputRecord] = []
    report("dataset", 0, len(annotation_args), unit="files")
    for done, arg in enumerate(annotation_args, 1):
        fmt, path = parse_annotation_arg(arg)
        path = str(Path(path))
        errors: list[AnnotationFormatError] = []
        try:
            for rec in read_annotations(path, fmt, id_map=id_map, errors=errors):
                ledger.register((rec.source_file, rec.record), rec.accession)
                out.append(rec)
        except AnnotationFormatError as exc:  # the whole file is unusable (missing, unknown format)
            errors.append(exc)
        for err in errors:
            ledger.skip((path, err.record), "read", err.reason)
        unused = unused_task_counts(errors)
        if unused:
            per_task = ", ".join(f"{task!r}: {n}" for task, n in sorted(unused.items()))
            ledger.note(f"{path}: Mol-Instructions records skipped by task (not used or unknown): {per_task}")
        report("dataset", done, len(annotation_args), unit="files", records=len(out))
    return out
