"""The dataset builder: protein store + annotation files -> stage 0/1/2 instruction data.

    sepit build-dataset --proteins STORE [--annotations FILE ...] --out DIR [--config YAML] [key=value ...]
    python jobs/build_dataset.py ...                  (same; under ``ray job submit`` joins the cluster)

``build_dataset(config)`` (the function the pipeline calls) does, in order: read every
annotation file (malformed records are skipped with a reason, never fatal); join each record's
protein to the store by structure file, accession or sequence (sequence-only when no structure);
generate stage 0 captions, stage 1 caption instructions and stage 2 open / yes-no / multiple-
choice questions (ready-made QA is imported as is); drop exact duplicates; cluster the proteins by
sequence identity and split whole clusters; write ``stageN/{train,val,test}.parquet``,
``skipped.parquet``, ``card.json``, ``card.md`` and ``lengths.png``.  Every input record ends up
used or in ``skipped.parquet``; the counts are checked before the card is written.

The identity alignments run on Ray Data (``executor=ray``, or ``auto`` with at least
``ray_min_proteins`` proteins); everything else is in-process and fast.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from sepit.config.base import ConfigError, check_choice, check_range, load_config, to_dict
from sepit.data.annotations import ANNOTATION_CATEGORIES, ProteinAnnotation
from sepit.data.build_inputs import (
    InputLedger, default_annotation_files, default_id_maps, load_id_maps, read_inputs,
)
from sepit.data.card import write_card
from sepit.data.examples import (
    Example, ProteinEntry, annotation_examples, check_text, finalize_protein_ids, label_pools, qa_example,
    resolve_protein, sha1,
)
from sepit.data.homology import EXHAUSTIVE_MAX_PROTEINS, SEARCH_MODES
from sepit.data.identity import PrefilterParams
from sepit.data.instruction_schema import INSTRUCTION_SCHEMA, SKIPPED_SCHEMA, STAGES, stage_split_path
from sepit.data.protein_join import StoreIndex
from sepit.data.questions import CLOSED_SET_CATEGORIES
from sepit.data.splits import SPLITS, cross_split_violations, homology_split
from sepit.errors import SepitError


class BuildError(SepitError, RuntimeError):
    """The build cannot run, or its counts failed to reconcile."""


@dataclass
class BuildConfig:
    proteins: Optional[str] = None
    """Protein store folder (``sepit preprocess`` output); None: sequence-only from the annotations."""
    annotations: list[str] = field(default_factory=list)
    """Annotation files, optionally ``FORMAT:PATH``; empty = the bundled files (default_annotation_files())."""
    id_maps: Optional[list[str]] = None
    """Files mapping table ids (STRING) to accessions/sequences; None = the bundled map, [] = none."""
    out: str = "outputs/dataset"
    """Output folder; replaced (atomically) when it holds a previous build (card.json), refused if other files."""
    seed: int = 0
    identity_threshold: float = 0.4
    """Proteins at or above this identity (identical residues / shorter length) share a split."""
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    stratify_structure: bool = True
    """Split proteins with and without a structure separately towards ``split_ratios`` (clusters
    stay whole, so there is still no homology leakage); off = one fill over all clusters."""
    """train, val, test shares of proteins."""
    open_categories: list[str] = field(default_factory=lambda: list(ANNOTATION_CATEGORIES))
    closed_categories: list[str] = field(default_factory=lambda: list(CLOSED_SET_CATEGORIES))
    yes_no_pairs: int = 1
    """Balanced (Yes, No) question pairs per protein and closed-set category."""
    mc_questions: int = 1
    """Multiple-choice questions per protein and closed-set category."""
    mc_choices: int = 4
    """Options per multiple-choice question (one correct)."""
    stage1_open: bool = False
    """Also put every protein's open questions (location, function, family, ...) into stage 1,
    next to its caption: a curriculum in which stage 1 learns to read the protein on direct
    questions before stage 2 adds the closed-set ones (the same rows stay in stage 2)."""
    max_residues: int = 1022
    """ESM-2's limit; longer proteins are truncated (sequence and coordinates together) or skipped."""
    long_sequences: str = "truncate"
    """truncate | skip"""
    min_structure_identity: float = 0.9
    """A store structure is mapped onto an annotation sequence only at or above this identity."""
    prefilter_k: int = 3
    """k-mer length of the identity prefilter."""
    prefilter_top_m: int = 10
    """Each protein's most k-mer-similar partners that get aligned."""
    prefilter_min_cosine: float = 0.3
    """Pairs at or above this k-mer cosine similarity are aligned whatever their rank."""
    executor: str = "auto"
    """auto | local | ray: where the identity alignments run."""
    ray_min_proteins: int = 2000
    """With executor=auto, Ray Data aligns when there are at least this many proteins."""
    homology: str = "auto"
    """auto | exhaustive | prefilter | mmseqs: which protein pairs are aligned for the splits
    (sepit/data/homology.py); auto = every pair up to ``exhaustive_max_proteins`` proteins, else
    MMseqs2's hits when ``mmseqs`` is installed, else the k-mer prefilter (with a warning)."""
    exhaustive_max_proteins: int = EXHAUSTIVE_MAX_PROTEINS
    """With homology=auto, every pair is aligned up to this many proteins (quadratic cost)."""

    def __post_init__(self) -> None:
        check_range(self.identity_threshold, "identity_threshold", 0.0, 1.0, lo_inclusive=False)
        if len(self.split_ratios) != 3 or any(r < 0 for r in self.split_ratios) or abs(sum(self.split_ratios) - 1) > 1e-6:
            raise ConfigError(f"split_ratios={self.split_ratios} must be 3 non-negative shares summing to 1")
        for c in self.open_categories:
            check_choice(c, "open_categories[]", ANNOTATION_CATEGORIES)
        for c in self.closed_categories:
            check_choice(c, "closed_categories[]", CLOSED_SET_CATEGORIES)
        check_range(self.yes_no_pairs, "yes_no_pairs", 0)
        check_range(self.mc_questions, "mc_questions", 0)
        check_range(self.mc_choices, "mc_choices", 2, 26)
        check_range(self.max_residues, "max_residues", 1)
        check_choice(self.long_sequences, "long_sequences", ("truncate", "skip"))
        check_range(self.min_structure_identity, "min_structure_identity", 0.0, 1.0)
        check_choice(self.executor, "executor", ("auto", "local", "ray"))
        check_range(self.prefilter_k, "prefilter_k", 2, 6)
        check_range(self.prefilter_top_m, "prefilter_top_m", 0)
        check_range(self.prefilter_min_cosine, "prefilter_min_cosine", 0.0, 1.0, lo_inclusive=False)
        check_choice(self.homology, "homology", SEARCH_MODES)
        check_range(self.exhaustive_max_proteins, "exhaustive_max_proteins", 0)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "card.json").is_file())):
        raise BuildError(f"output folder {out} is not empty and holds no previous build (card.json); refusing to overwrite")


def _replace_out(tmp: Path, out: Path) -> None:
    """Swap the finished build in, so a crash never leaves a half-written dataset at ``out``."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _generate(records, index: StoreIndex, cfg: BuildConfig, ledger: InputLedger) -> list[Example]:
    resolved: list[tuple[Any, ProteinEntry]] = []
    for rec in records:
        key = (rec.source_file, rec.record)
        entry = resolve_protein(rec, index, cfg.max_residues, cfg.long_sequences, cfg.min_structure_identity)
        if isinstance(entry, str):
            ledger.skip(key, "join", entry)
        else:
            resolved.append((rec, entry))
    annotations = [r for r, _ in resolved if isinstance(r, ProteinAnnotation)]
    pools = label_pools(annotations, cfg.closed_categories)
    examples: list[Example] = []
    for rec, entry in resolved:
        key = (rec.source_file, rec.record)
        if isinstance(rec, ProteinAnnotation):
            texts = annotation_examples(rec, entry.key, pools, cfg.seed, cfg.open_categories, cfg.closed_categories,
                                        cfg.yes_no_pairs, cfg.mc_questions, cfg.mc_choices,
                                        open_in_stage1=cfg.stage1_open)
            if not texts:
                ledger.skip(key, "generate", "no usable annotation (no function text and no category labels)")
        else:
            texts = [(rec.stage, qa_example(rec))]
        for stage, text in texts:
            checked, reason = check_text(text)
            if checked is None:
                ledger.skip(key, "generate", reason)
                continue
            examples.append(Example(stage, checked, entry, rec.source, rec.source_file, rec.record))
    return examples


def _unify(examples: list[Example], ledger: InputLedger) -> tuple[list[Example], dict[str, ProteinEntry]]:
    """Final protein ids, one entry (the best-resolved) per id, and exact duplicates dropped."""
    ids = finalize_protein_ids([e.protein for e in examples])
    proteins: dict[str, ProteinEntry] = {}
    for e in examples:
        pid = ids[id(e.protein)]
        best = proteins.get(pid)
        resolved = int(e.protein.coord_mask.sum()) if e.protein.has_structure else -1
        if best is None or resolved > (int(best.coord_mask.sum()) if best.has_structure else -1):
            proteins[pid] = e.protein
    kept, seen = [], {}
    for e in examples:
        pid = ids[id(e.protein)]
        dup_key = (e.stage, pid, e.text.question, e.text.answer)
        if dup_key in seen:
            ledger.skip((e.source_file, e.source_record), "dedupe", f"duplicate of an example from {seen[dup_key]}")
            continue
        seen[dup_key] = f"{e.source_file} ({e.source_record})"
        e.protein = proteins[pid]
        e.protein.key = pid
        ledger.use((e.source_file, e.source_record))
        kept.append(e)
    return kept, proteins


def _rows(examples: list[Example], split_of: dict[str, str]) -> dict[tuple[int, str], list[dict]]:
    tables: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for e in examples:
        p, t = e.protein, e.text
        split = split_of[p.key]
        row_id = f"s{e.stage}-{sha1(f'{p.key}|{t.task}|{t.question}|{t.answer}')[:16]}"
        tables[(e.stage, split)].append({
            "id": row_id, "protein_id": p.key, "accession": p.accession, "task": t.task, "category": t.category,
            "question": t.question, "answer": t.answer, "choices": list(t.choices) if t.choices else None,
            "answer_letter": t.answer_letter, "source": e.source, "has_structure": p.has_structure,
            "sequence": p.sequence,
            "coords": p.coords.reshape(-1).tolist() if p.has_structure else None,
            "coord_mask": p.coord_mask.tolist() if p.has_structure else None,
            "split": split, "stage": e.stage, "store_id": p.store_id,
            "source_file": e.source_file, "source_record": e.source_record,
        })
    return tables


def build_dataset(config: BuildConfig) -> dict[str, Any]:
    """Build the dataset described by ``config``; returns the card (also written as card.json)."""
    from sepit.storage import is_remote, resolve, staging_dir, upload_dir

    t0 = time.time()
    remote = resolve(config.out) if is_remote(config.out) else None
    if remote is not None and remote.is_dir() and not remote.join("card.json").is_file():
        raise BuildError(f"output folder {remote} is not empty and holds no previous build (card.json); refusing to overwrite")
    out = staging_dir(config.out) if remote else Path(config.out)  # object store: build locally, then upload
    _check_out(out)
    annotation_args = list(config.annotations) or default_annotation_files()
    id_maps = default_id_maps() if config.id_maps is None else list(config.id_maps)
    ledger = InputLedger()
    records = read_inputs(annotation_args, load_id_maps(id_maps), ledger)
    index = StoreIndex.from_store(config.proteins) if config.proteins else StoreIndex([])
    examples, proteins = _unify(_generate(records, index, config, ledger), ledger)
    if not examples:
        reasons = sorted({r["reason"] for r in ledger.skipped_rows()})[:5]
        raise BuildError(f"no instruction records could be made from {len(ledger.seen)} input records; "
                         f"reasons include: {reasons}")
    keys = sorted(proteins)
    use_ray = config.executor == "ray" or (config.executor == "auto" and len(keys) >= config.ray_min_proteins)
    prefilter = PrefilterParams(k=config.prefilter_k, top_m=config.prefilter_top_m, min_cosine=config.prefilter_min_cosine)
    # Stratified by has-a-structure: the few proteins with coordinates reach every split in
    # proportion, so the test split can measure what structure adds (whole clusters still).
    strata = [int(proteins[k].has_structure) for k in keys] if config.stratify_structure else None
    report = homology_split(keys, [proteins[k].sequence for k in keys], config.identity_threshold,
                            config.split_ratios, config.seed, prefilter, use_ray=use_ray, strata=strata,
                            search=config.homology, exhaustive_max_proteins=config.exhaustive_max_proteins)
    violation = cross_split_violations(report)
    if violation:
        raise BuildError(violation)
    split_of = dict(zip(keys, report.split_of))
    tables = _rows(examples, split_of)
    skipped = ledger.skipped_rows()
    n_in, n_used = len(ledger.seen), len(ledger.used)
    if n_in != n_used + len(skipped):
        raise BuildError(f"counts do not reconcile: {n_in} input records != {n_used} used + {len(skipped)} skipped")

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for stage in STAGES:
        (tmp / f"stage{stage}").mkdir()
        for split in SPLITS:
            rows = sorted(tables.get((stage, split), []), key=lambda r: r["id"])
            pq.write_table(pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA), stage_split_path(tmp, stage, split))
    pq.write_table(pa.Table.from_pylist(skipped, schema=SKIPPED_SCHEMA), tmp / "skipped.parquet")
    store_ids_used = {p.store_id for p in proteins.values() if p.store_id}
    card = write_card(
        tmp, tables=tables, proteins=proteins, split_of=split_of, report=report, ledger=ledger,
        skipped=skipped, store_records=[r.id for r in index.records], store_ids_used=store_ids_used,
        config=to_dict(config) | {"annotations": annotation_args, "id_maps": id_maps, "executor_used": "ray" if use_ray else "local"},
        elapsed_s=time.time() - t0,
    )
    _replace_out(tmp, out)
    if remote is not None:
        upload_dir(out, remote)
    return card


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proteins", help="protein store folder (from `sepit preprocess`)")
    parser.add_argument("--annotations", nargs="+", default=None, metavar="FILE",
                        help="annotation files, optionally FORMAT:PATH (default: the bundled real files)")
    parser.add_argument("--id-maps", nargs="*", default=None, metavar="FILE",
                        help="id -> accession maps for tables (default: the bundled STRING map)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--config", help="YAML file with BuildConfig fields")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--executor", choices=["auto", "local", "ray"])
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. identity_threshold=0.3")


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    overrides = list(args.overrides)
    for name in ("proteins", "out", "seed", "executor"):
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"{name}={value}")
    base: dict[str, Any] = {}
    if args.annotations is not None:
        base["annotations"] = args.annotations
    if args.id_maps is not None:
        base["id_maps"] = args.id_maps
    return load_config(BuildConfig, args.config, overrides=overrides, base=base)


def run(args: argparse.Namespace) -> int:
    import sys

    try:
        config = config_from_args(args)
        from sepit.console import capture_logs

        from sepit.storage import staging_dir

        with capture_logs(staging_dir(config.out).parent):  # the dataset folder is replaced whole
            card = build_dataset(config)
    except SepitError as exc:
        print(f"sepit build-dataset: {exc}", file=sys.stderr)
        return 2
    from sepit.data.card import summary_lines

    print("\n".join(summary_lines(card)))
    print(f"wrote {config.out}")
    return 0
