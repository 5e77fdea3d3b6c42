"""The preprocess job: structure / sequence files -> a validated protein store, on Ray Data.

    sepit preprocess INPUT... --out DIR [--workers N] [--summary]
    python jobs/preprocess.py INPUT... --out DIR                       (starts a local Ray)
    ray job submit --working-dir . -- python jobs/preprocess.py ...   (joins the cluster)

Flow: the driver lists input files (sorted) and cuts them into work units (one per file; a
``pdb.h5`` is cut into group ranges); Ray Data parses the units in parallel tasks
(:func:`parse_work_units`, ``num_workers`` at a time) with ``preserve_order`` so results come back
in input order whatever the parallelism; the driver streams them into fixed-size Parquet shards,
rejects duplicates, checks that the counts reconcile, and only then writes ``manifest.json``.
Everything is written to a temporary sibling folder that replaces ``--out`` at the end, so a
crashed run never leaves a half store, and a re-run on the same inputs writes the same shard
bytes (the manifest differs only in ``created_at`` and ``elapsed_s``).

Counting rules (asserted before the manifest is written):
``n_input_files = n_files_with_records + n_files_without_records``, every file without records
has at least one reject row, and every work unit came back exactly once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from sepit.config.base import ConfigError, check_choice, check_range, load_config, to_dict
from sepit.errors import SepitError
from sepit.structure.formats import FILE_FORMATS
from sepit.structure.inputs import Discovery, default_inputs, discover_inputs, is_hdf5
from sepit.structure.parse import ParseOptions, parse_file, sha256_file
from sepit.structure.reference_h5 import h5_group_names, records_from_h5
from sepit.structure.result import ParseResult, Reject
from sepit.structure import store as st

OUTCOME_SCHEMA = pa.schema(list(st.STORE_SCHEMA) + [
    ("unit", pa.int64()), ("reason", pa.string()), ("stage", pa.string()),
])


class PreprocessError(SepitError, RuntimeError):
    """The job cannot run (no inputs, unsafe output folder) or its counts failed to reconcile."""


@dataclass
class PreprocessConfig:
    inputs: list[str] = field(default_factory=list)
    """Files or folders (searched recursively); empty = the bundled real structures (``default_inputs()``)."""
    out: str = "outputs/protein_store"
    """Output store folder; replaced atomically (refused if it exists and is not a protein store)."""
    chain_policy: str = "all"
    """all: one record per protein chain; first: only the first protein chain of each file."""
    chain: Optional[str] = None
    """Keep only this chain id in every structure file (files without it get a reject)."""
    sequence_source: str = "seqres"
    """seqres: the file's stated full sequence, unmodelled residues masked; model: modelled residues only."""
    formats: list[str] = field(default_factory=lambda: list(FILE_FORMATS))
    """Formats picked up when searching folders (pdb, mmcif, fasta, h5); named files are always read."""
    max_residues: int = 100_000
    """Reject records longer than this as absurd; the store keeps full length (models truncate at batching)."""
    max_file_mb: float = 256.0
    """Reject files (or their decompressed content) larger than this; pdb.h5 files are exempt."""
    strict_extension: bool = False
    """Reject files whose content is another format than their extension says (default: content wins)."""
    num_workers: int = 2
    """Parallel parse tasks (Ray Data task pool size), one CPU each."""
    shard_size: int = 1000
    """Records per Parquet shard."""
    h5_groups_per_unit: int = 2000
    """pdb.h5 groups parsed per work unit."""
    ray_address: Optional[str] = None
    """Ray cluster to join; None = ``RAY_ADDRESS`` (set by ``ray job submit``) or a local Ray."""

    def __post_init__(self) -> None:
        check_choice(self.chain_policy, "chain_policy", ["all", "first"])
        check_choice(self.sequence_source, "sequence_source", ["seqres", "model"])
        for f in self.formats:
            check_choice(f, "formats[]", FILE_FORMATS)
        check_range(self.max_residues, "max_residues", lo=1)
        check_range(self.max_file_mb, "max_file_mb", lo=0, lo_inclusive=False)
        check_range(self.num_workers, "num_workers", lo=1)
        check_range(self.shard_size, "shard_size", lo=1)
        check_range(self.h5_groups_per_unit, "h5_groups_per_unit", lo=1)
        if not self.out:
            raise ConfigError("out: an output folder is required")

    def parse_options(self) -> ParseOptions:
        return ParseOptions(
            chain=self.chain, chain_policy=self.chain_policy, sequence_source=self.sequence_source,
            max_residues=self.max_residues, max_file_bytes=int(self.max_file_mb * 2**20),
            strict_extension=self.strict_extension,
        )


def _log(msg: str) -> None:
    # Details for RUN/logs/ (sepit.console); the console shows the progress display and summary.
    logging.getLogger("sepit.preprocess").info(msg)


# --------------------------------------------------------------------------- work units
def plan_units(found: Discovery, groups_per_unit: int) -> list[dict[str, Any]]:
    """One unit per file; pdb.h5 files become ranges of groups (hashed once, here)."""
    units: list[dict[str, Any]] = []
    for file_index, f in enumerate(found.files):
        names: list[str] = []
        checksum = ""
        if is_hdf5(f.path):
            try:
                names = h5_group_names(f.path)
                checksum = sha256_file(Path(f.path))
            except (OSError, ValueError):
                names = []  # unreadable: parse_file in the worker turns it into a reject
        chunks = [names[i:i + groups_per_unit] for i in range(0, len(names), groups_per_unit)] or [[]]
        for chunk in chunks:
            units.append({"unit": len(units), "file": file_index, "path": f.path, "source": f.source,
                          "h5_names": chunk, "checksum": checksum})
    return units


def parse_work_units(batch: pa.Table, options: ParseOptions) -> pa.Table:
    """Ray Data task: parse each unit of ``batch`` into outcome rows (records and rejects)."""
    rows: list[dict[str, Any]] = []
    for unit in batch.to_pylist():
        try:
            if unit["h5_names"]:
                result = records_from_h5(unit["path"], unit["source"], unit["checksum"],
                                         names=unit["h5_names"], max_residues=options.max_residues)
            else:
                result = parse_file(unit["path"], options=options, source=unit["source"])
        except Exception as exc:  # noqa: BLE001 - a parser bug on one file is that file's reject, not a crash
            result = ParseResult(rejects=[Reject(unit["source"], None, f"internal error while parsing: {type(exc).__name__}: {exc}", "parse")])
        if not result.records and not result.rejects:
            result.rejects.append(Reject(unit["source"], None, "no protein records found", "parse"))
        for rec in result.records:
            rows.append({**rec.to_row(), "unit": unit["unit"]})
        for rej in result.rejects:
            rows.append({**rej.to_row(), "unit": unit["unit"]})
    return pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA)


# --------------------------------------------------------------------------- output folder
def _prepare_out(out: Path) -> Path:
    if out.exists() and not (out / st.MANIFEST).is_file() and any(out.iterdir()):
        raise PreprocessError(f"refusing to replace {out}: it exists, is not empty and is not a protein store")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (tmp / st.PROTEINS_DIR).mkdir(parents=True)
    return tmp


def _replace_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the job
class _ShardWriter:
    """Streams record tables into ``part-XXXXX.parquet`` files of exactly ``size`` rows (last: fewer)."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = folder, size
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.n_pending += table.num_rows
        while self.n_pending >= self.size:
            self._flush(self.size)

    def close(self) -> None:
        if self.n_pending:
            self._flush(self.n_pending)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending).combine_chunks()
        shard, rest = table.slice(0, n), table.slice(n)
        name = f"{st.PROTEINS_DIR}/part-{len(self.shards):05d}.parquet"
        sha = st.write_table(shard, self.folder / name)
        self.shards.append({"file": name, "n_records": shard.num_rows, "sha256": sha})
        self.pending, self.n_pending = ([rest] if rest.num_rows else []), rest.num_rows
        _log(f"wrote {name} ({shard.num_rows} records)")


def run_preprocess(config: PreprocessConfig) -> dict[str, Any]:
    """Build the protein store at ``config.out``; returns the manifest (also written to disk)."""
    import ray
    from ray.data import DataContext, TaskPoolStrategy

    from sepit import __version__
    from sepit.console import report
    from sepit.ray_runtime import init_ray

    t0 = time.time()
    inputs = list(config.inputs) or default_inputs()
    found = discover_inputs(inputs, config.formats)
    if not found.files and not found.missing:
        raise PreprocessError(f"no input files found in {inputs} (formats {config.formats})")
    from sepit.storage import is_remote, staging_dir, upload_dir

    # An object-store store is written to a local staging folder, then uploaded whole.
    out = staging_dir(config.out) if is_remote(config.out) else Path(config.out).absolute()
    tmp = _prepare_out(out)
    units = plan_units(found, config.h5_groups_per_unit)
    unit_file = [u["file"] for u in units]
    _log(f"{len(found.files)} input files ({len(found.ignored)} other files ignored), {len(units)} work units, "
         f"{config.num_workers} workers -> {out}")
    try:
        init_ray(address=config.ray_address)
        ctx = DataContext.get_current()
        previous_order = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True  # input order in = row order out: deterministic shards
        rejects: list[dict[str, Any]] = [
            Reject(m, None, "input path does not exist", "read").to_row() for m in found.missing
        ]
        seen_ids: dict[str, str] = {}
        units_seen: Counter = Counter()
        file_records: Counter = Counter()
        file_rejects: Counter = Counter()
        writer = _ShardWriter(tmp, config.shard_size)
        n_duplicates = 0
        last_log = 0.0
        try:
            if units:
                n_blocks = max(1, min(len(units), max(4 * config.num_workers, math.ceil(len(units) / 64))))
                ds = ray.data.from_items(units, override_num_blocks=n_blocks).map_batches(
                    parse_work_units, fn_kwargs={"options": config.parse_options()}, batch_format="pyarrow",
                    batch_size=None, compute=TaskPoolStrategy(size=config.num_workers), num_cpus=1,
                )
                report("preprocess", 0, len(units), unit="units")
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    for u in set(batch.column("unit").to_pylist()):
                        units_seen[u] += 1
                    is_record = pc.is_null(batch.column("reason"))
                    recs = batch.filter(is_record)
                    keep = []
                    for rid, chain, src, unit in zip(*(recs.column(c).to_pylist() for c in ("id", "chain", "source", "unit"))):
                        if rid in seen_ids:  # ids are the store's key: the first in input order wins
                            keep.append(False)
                            n_duplicates += 1
                            reason = f"duplicate record id {rid!r}: already produced by {seen_ids[rid]}"
                            rejects.append(Reject(src, chain or rid, reason, "dedupe").to_row())
                            file_rejects[unit_file[unit]] += 1
                        else:
                            keep.append(True)
                            seen_ids[rid] = src
                            file_records[unit_file[unit]] += 1
                    writer.add(recs.filter(pa.array(keep, pa.bool_())).select(st.STORE_SCHEMA.names))
                    rej = batch.filter(pc.invert(is_record))
                    for row in rej.select(["source", "chain", "reason", "stage", "unit"]).to_pylist():
                        file_rejects[unit_file[row.pop("unit")]] += 1
                        rejects.append(row)
                    if time.time() - last_log > 2.0:
                        last_log = time.time()
                        report("preprocess", sum(units_seen.values()), len(units), unit="units",
                               records=len(seen_ids), rejected=len(rejects))
            if units:
                report("preprocess", sum(units_seen.values()), len(units), unit="units",
                       records=len(seen_ids), rejected=len(rejects))
            writer.close()
        finally:
            ctx.execution_options.preserve_order = previous_order
        manifest = _reconcile_and_manifest(
            config, inputs, found, units, units_seen, file_records, file_rejects, writer, rejects,
            n_duplicates, tmp, __version__, t0,
        )
        (tmp / st.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out)
        if is_remote(config.out):
            upload_dir(out, config.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"done: {manifest['n_records']} records, {manifest['n_rejected']} rejected, "
         f"{len(writer.shards)} shards in {manifest['elapsed_s']} s -> {out}")
    return manifest


def _reconcile_and_manifest(config, inputs, found, units, units_seen, file_records, file_rejects,
                            writer, rejects, n_duplicates, tmp, version, t0) -> dict[str, Any]:
    lost = [u["unit"] for u in units if units_seen[u["unit"]] != 1]
    if lost:
        raise PreprocessError(f"counts do not reconcile: work units {lost[:10]} came back {[units_seen[u] for u in lost[:10]]} times (expected once)")
    n_records = sum(s["n_records"] for s in writer.shards)
    if n_records != sum(file_records.values()):
        raise PreprocessError(f"counts do not reconcile: {n_records} records in shards, {sum(file_records.values())} kept")
    n_files = len(found.files) + len(found.missing)
    with_records = sum(1 for i in range(len(found.files)) if file_records[i] > 0)
    silent = [found.files[i].source for i in range(len(found.files)) if file_records[i] == 0 and file_rejects[i] == 0]
    if silent:
        raise PreprocessError(f"counts do not reconcile: files with neither records nor rejects: {silent[:10]}")
    rejects_sha = st.write_table(st.rejects_table(rejects), tmp / st.REJECTS)
    return {
        "format": "sepit-protein-store/1",
        "n_input_files": n_files,
        "n_records": n_records,
        "n_rejected": len(rejects),
        "n_files_with_records": with_records,
        "n_files_without_records": n_files - with_records,
        "n_duplicates_rejected": n_duplicates,
        "n_ignored_files": len(found.ignored),
        "n_work_units": len(units),
        "rejects_by_stage": dict(sorted(Counter(r["stage"] for r in rejects).items())),
        "reconciliation": "n_input_files = n_files_with_records + n_files_without_records; every file without "
                          "records has >= 1 row in rejects.parquet; n_records = sum of shard rows",
        "shards": writer.shards,
        "rejects_sha256": rejects_sha,
        "config": {**to_dict(config), "inputs": [str(p) for p in inputs]},
        "sepit_version": version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - t0, 2),
    }


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="files or folders (default: the bundled real structures)")
    parser.add_argument("--out", help="output store folder (default outputs/protein_store)")
    parser.add_argument("--config", help="YAML file with PreprocessConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--workers", type=int, help="parallel parse tasks (num_workers)")
    parser.add_argument("--chain", help="keep only this chain id of every structure file")
    parser.add_argument("--chain-policy", choices=["all", "first"], help="which protein chains become records")
    parser.add_argument("--max-residues", type=int, help="reject longer records as absurd")
    parser.add_argument("--max-file-mb", type=float, help="reject larger files")
    parser.add_argument("--shard-size", type=int, help="records per Parquet shard")
    parser.add_argument("--strict-extension", action="store_true", default=None, help="reject content/extension mismatches")
    parser.add_argument("--address", help="Ray address to join (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--summary", action="store_true", help="print counts by format, folder, structure, length")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    cfg = load_config(PreprocessConfig, args.config, overrides=args.set)
    flags = {"inputs": args.inputs or None, "out": args.out, "num_workers": args.workers, "chain": args.chain,
             "chain_policy": args.chain_policy, "max_residues": args.max_residues, "max_file_mb": args.max_file_mb,
             "shard_size": args.shard_size, "strict_extension": args.strict_extension, "ray_address": args.address}
    return replace(cfg, **{k: v for k, v in flags.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from sepit.console import capture_logs
    from sepit.storage import staging_dir

    try:
        config = config_from_args(args)
        with capture_logs(staging_dir(config.out).parent):  # the store folder is replaced whole
            manifest = run_preprocess(config)
    except SepitError as exc:
        print(f"sepit preprocess: {exc}", file=sys.stderr)
        return 2
    store = st.ProteinStore(config.out)
    if args.summary:
        print(st.format_summary(store.summary()))
    else:
        print(f"{manifest['n_records']} records, {manifest['n_rejected']} rejected -> {store.path}")
    if manifest["n_records"] == 0:
        print("sepit preprocess: no protein record was produced; see rejects.parquet for the reasons", file=sys.stderr)
        return 1
    return 0
