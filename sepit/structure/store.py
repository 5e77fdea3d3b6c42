"""The protein store on disk (pure pyarrow, no Ray): schema, shard writing, reading, summary.

Layout of ``STORE/`` (written by :mod:`sepit.data.preprocess`)::

    proteins/part-00000.parquet ...  rows = ProteinRecord.to_row(), schema STORE_SCHEMA
    rejects.parquet                  one row per rejected file or chain: source, chain, reason, stage
    manifest.json                    counts (reconciled), config, sha256 per shard, created_at, version

Readers: ``ProteinStore(path).records()``, ``.by_accession()``, ``.table()``, ``.rejects()``,
``.manifest``, ``.verify()`` (re-hashes shards against the manifest), ``.summary()``.  ``path``
may be an ``s3://`` / ``gs://`` URI: the store is then read from a local cached copy
(:func:`sepit.storage.localize_dir`, downloaded once and re-used while the remote is unchanged).
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from sepit.errors import SepitError
from sepit.structure.record import ProteinRecord

STORE_SCHEMA = pa.schema([
    ("id", pa.string()), ("accession", pa.string()), ("chain", pa.string()),
    ("sequence", pa.string()), ("length", pa.int64()),
    ("coords", pa.list_(pa.float32())),  # flat [3n] Cα x,y,z in Å, null for sequence-only records
    ("coord_mask", pa.list_(pa.bool_())), ("plddt", pa.list_(pa.float32())),
    ("has_structure", pa.bool_()), ("source", pa.string()), ("source_format", pa.string()),
    ("checksum", pa.string()), ("meta", pa.string()),
])
REJECT_SCHEMA = pa.schema([
    ("source", pa.string()), ("chain", pa.string()), ("reason", pa.string()), ("stage", pa.string()),
])
MANIFEST = "manifest.json"
REJECTS = "rejects.parquet"
PROTEINS_DIR = "proteins"


class StoreError(SepitError, ValueError):
    """A folder is not a readable protein store, or its files disagree with its manifest."""


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_table(table: pa.Table, path: Path) -> str:
    """Write one Parquet file deterministically (same rows -> same bytes); returns its sha256."""
    pq.write_table(table, path, compression="zstd", row_group_size=512, write_statistics=True)
    return sha256_path(path)


def records_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=STORE_SCHEMA)


def rejects_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=REJECT_SCHEMA)


class ProteinStore:
    """Read-only view of a protein store folder."""

    def __init__(self, path: str | Path):
        from sepit.storage import StorageError, is_remote, localize_dir

        self.uri = str(path)
        """Where the store was opened from (its URI when remote; ``path`` is then the local copy)."""
        try:
            self.path = localize_dir(self.uri) if is_remote(self.uri) else Path(path)
        except StorageError as exc:
            raise StoreError(f"cannot read the protein store: {exc}") from None
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise StoreError(f"{self.path} is not a protein store: {MANIFEST} is missing (run `sepit preprocess`)")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{manifest}: not valid JSON ({exc})") from None
        missing = [s["file"] for s in self.manifest.get("shards", []) if not (self.path / s["file"]).is_file()]
        if missing:
            raise StoreError(f"{self.path}: shard(s) listed in the manifest are missing: {missing}")

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest.get("shards", [])]

    def __len__(self) -> int:
        return int(self.manifest["n_records"])

    def table(self, columns: Optional[list[str]] = None) -> pa.Table:
        tables = [pq.read_table(p, columns=columns) for p in self.shard_paths]
        if not tables:
            schema = STORE_SCHEMA if columns is None else pa.schema([STORE_SCHEMA.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def iter_rows(self, batch_size: int = 256) -> Iterator[dict[str, Any]]:
        for p in self.shard_paths:
            for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_size):
                yield from batch.to_pylist()

    def records(self) -> Iterator[ProteinRecord]:
        """Every record, in store order (validated again on the way in)."""
        for row in self.iter_rows():
            yield ProteinRecord.from_row(row)

    def by_accession(self) -> dict[str, list[ProteinRecord]]:
        """UniProt accession -> its records (records without an accession are left out)."""
        out: dict[str, list[ProteinRecord]] = defaultdict(list)
        for rec in self.records():
            if rec.accession:
                out[rec.accession].append(rec)
        return dict(out)

    def get(self, record_id: str) -> ProteinRecord:
        for row in self.iter_rows():
            if row["id"] == record_id:
                return ProteinRecord.from_row(row)
        raise KeyError(f"{record_id!r} is not in the protein store {self.path}")

    def rejects(self) -> pa.Table:
        path = self.path / REJECTS
        return pq.read_table(path) if path.is_file() else REJECT_SCHEMA.empty_table()

    def verify(self) -> None:
        """Raise :class:`StoreError` if any shard's bytes differ from the manifest's sha256."""
        bad = [s["file"] for s in self.manifest.get("shards", []) if sha256_path(self.path / s["file"]) != s["sha256"]]
        rej = self.manifest.get("rejects_sha256")
        if rej and sha256_path(self.path / REJECTS) != rej:
            bad.append(REJECTS)
        if bad:
            raise StoreError(f"{self.path}: file(s) changed since the manifest was written: {bad}")

    def summary(self) -> dict[str, Any]:
        return summarize(self.table(["source", "source_format", "has_structure", "length"]), self.rejects(), self.manifest)


def _folder(source: str) -> str:
    parent = str(PurePosixPath(source.replace("\\", "/")).parent)
    return parent if parent not in ("", ".") else "(top level)"


def summarize(records: pa.Table, rejects: pa.Table, manifest: dict[str, Any]) -> dict[str, Any]:
    """Counts by format, by source folder, with/without structure, length statistics, reject reasons."""
    rec = records.to_pydict()
    rej = rejects.to_pydict()
    lengths = rec.get("length", [])
    by_folder: dict[str, Counter] = defaultdict(Counter)
    for src in rec.get("source", []):
        by_folder[_folder(src)]["records"] += 1
    for src in rej.get("source", []):
        by_folder[_folder(src)]["rejected"] += 1
    n_struct = sum(bool(x) for x in rec.get("has_structure", []))
    # group reasons that differ only in numbers (line numbers, residue counts)
    reasons = Counter(re.sub(r"\d+(\.\d+)?", "N", r)[:90] for r in rej.get("reason", []))
    return {
        "n_input_files": manifest.get("n_input_files"),
        "n_records": len(lengths),
        "n_rejected": len(rej.get("reason", [])),
        "n_files_with_records": manifest.get("n_files_with_records"),
        "by_format": dict(sorted(Counter(rec.get("source_format", [])).items())),
        "by_folder": {k: dict(v) for k, v in sorted(by_folder.items())},
        "with_structure": n_struct,
        "sequence_only": len(lengths) - n_struct,
        "length": {
            "min": min(lengths), "median": statistics.median(lengths),
            "mean": round(statistics.fmean(lengths), 1), "max": max(lengths),
        } if lengths else {},
        "rejects_by_stage": dict(sorted(Counter(rej.get("stage", [])).items())),
        "top_reject_reasons": reasons.most_common(8),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of :func:`summarize`'s output for the terminal."""
    lines = [
        f"protein store: {summary['n_records']} records from {summary['n_files_with_records']} of "
        f"{summary['n_input_files']} input files; {summary['n_rejected']} rejected",
        f"  with structure: {summary['with_structure']}   sequence only: {summary['sequence_only']}",
    ]
    if summary["length"]:
        ln = summary["length"]
        lines.append(f"  length (residues): min {ln['min']}  median {ln['median']}  mean {ln['mean']}  max {ln['max']}")
    lines.append("  by format: " + ", ".join(f"{k} {v}" for k, v in summary["by_format"].items()))
    lines.append("  by source folder:                          records  rejected")
    for folder, c in summary["by_folder"].items():
        lines.append(f"    {folder[:40]:<40} {c.get('records', 0):>8} {c.get('rejected', 0):>9}")
    if summary["rejects_by_stage"]:
        lines.append("  rejects by stage: " + ", ".join(f"{k} {v}" for k, v in summary["rejects_by_stage"].items()))
        for reason, n in summary["top_reject_reasons"]:
            lines.append(f"    {n:>5} × {reason}")
    return "\n".join(lines)
