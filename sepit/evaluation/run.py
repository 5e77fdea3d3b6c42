"""``sepit evaluate``: generate answers with a trained model, score them, compare, report, log.

    sepit evaluate --model RUN/model --data DATA --split stage2/test --out EVAL

The config is the ``evaluate`` section of a preset recipe (``--preset``, default small:
sample size, generation and bootstrap settings; :mod:`sepit.config.recipes`) under the flags.
Writes ``EVAL/config.yaml`` (the resolved config), ``EVAL/predictions.jsonl`` (resumable), the
sequence-only ablation and comparison-model predictions under ``EVAL/ablations/``, baseline
predictions under ``EVAL/baselines/``, ``EVAL/metrics.json``, ``EVAL/report.md``, ``EVAL/plots/*.png``, and one MLflow run tagged with
the model's own run id (from its ``lineage.json``).  :func:`evaluate` is the Python entry point
the pipeline calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sepit.config.base import ConfigError, check_choice, from_dict, to_dict, write_run_config
from sepit.errors import SepitError
from sepit.evaluation.bootstrap import BootstrapConfig
from sepit.evaluation.generate import GenerationConfig, GenerationTask, generate_predictions, unusable_rows
from sepit.evaluation.metrics import MetricsConfig
from sepit.evaluation.predictions import PredictionsStore

BASELINES = ("majority", "nearest_neighbour", "constant")


@dataclass
class EvaluateConfig:
    model: str = ""
    """Model folder written by SepitForConditionalGeneration.save_pretrained (or a stage output folder holding model/),
    or a registered MLflow model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model."""
    data: str = ""
    """Dataset folder, stage folder, Parquet split, or QA / reference JSONL."""
    out: str = ""
    """Output folder."""
    split: str = "stage2/test"
    """Split inside a dataset folder (stageN/name)."""
    train_data: str | None = None
    """Training split for the baselines; default: <data>/<stage>/train.parquet or the model lineage's dataset."""
    compare_model: str | None = None
    """A second model folder scored on the same rows (e.g. stage 1 dense vs stage 2 MoE)."""
    pdb_h5: str | None = None
    """The reference's pdb.h5, for sequences/coordinates of reference conversation JSONL rows."""
    limit: int | None = None
    """Evaluate a seeded random sample of N valid rows (input order kept); the overall tables use it."""
    sample_seed: int = 0
    """Seed of that sample."""
    structured_slice: bool = True
    """Also evaluate every row whose protein has coordinates (beyond the sample): the structured
    slice, where the model is compared with itself given no coordinates (the sequence-only ablation)."""
    sequence_only_ablation: bool = True
    """Also generate with structures dropped for rows that have one."""
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    tracking_uri: str | None = None
    """MLflow URI; default: MLFLOW_TRACKING_URI, the model run's store, else sqlite in out."""
    experiment: str = "sepit"
    mlflow: bool = True

    def __post_init__(self) -> None:
        for b in self.baselines:
            check_choice(b, "evaluate.baselines[]", BASELINES)
        if self.split.count("/") > 1:
            raise ConfigError(f"evaluate.split={self.split!r}: use 'stageN/name' or 'name'")

    def check_inputs(self) -> None:
        """model, data and out are required to run (a preset's section leaves them to the command)."""
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"evaluate.{name} is required")


# --------------------------------------------------------------------------- helpers
def resolve_model_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if (p / "model" / "config.json").is_file() and not (p / "config.json").is_file():
        p = p / "model"  # a stage's output folder
    if not (p / "config.json").is_file():
        raise ConfigError(f"model folder {p} has no config.json (expected a save_pretrained folder)")
    return p.resolve()


def read_lineage(model_dir: Path) -> dict:
    path = model_dir / "lineage.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def find_train_split(cfg: EvaluateConfig, lineage: dict) -> Path | None:
    if cfg.train_data:
        p = Path(cfg.train_data)
        if not p.exists():
            raise ConfigError(f"evaluate.train_data {p} does not exist")
        return p
    stage = cfg.split.rpartition("/")[0] or "stage2"
    for root in (Path(cfg.data), Path((lineage.get("data") or {}).get("dataset_dir") or "/nonexistent")):
        for cand in (root / stage / "train.parquet", root / "train.parquet"):  # dataset or stage folder
            if root.is_dir() and cand.is_file():
                return cand
    return None


def localize_inputs(cfg: EvaluateConfig) -> EvaluateConfig:
    """Object-store (``s3://``, ``gs://``) inputs as local cached copies (:mod:`sepit.storage`):
    model folders whole; of a dataset folder only the evaluated split (and, for the baselines,
    the training split of the same stage)."""
    from dataclasses import replace

    from sepit.storage import first_file, is_remote, localize_dir, localize_file, resolve

    def model(ref: str) -> str:
        loc = resolve(ref)
        if loc.join("model", "config.json").is_file() and not loc.join("config.json").is_file():
            loc = loc.join("model")  # a stage's output folder
        return str(localize_dir(loc))

    changes = {k: model(getattr(cfg, k)) for k in ("model", "compare_model") if is_remote(getattr(cfg, k))}
    from sepit.tracking.models import is_model_uri, localize_model  # models:/NAME@ALIAS, runs:/ID/model

    changes.update({k: str(localize_model(getattr(cfg, k), tracking_uri=cfg.tracking_uri))
                    for k in ("model", "compare_model") if is_model_uri(getattr(cfg, k))})
    if is_remote(cfg.train_data):
        changes["train_data"] = str(localize_file(cfg.train_data))
    if is_remote(cfg.data):
        root, (stage, _, name) = resolve(cfg.data), cfg.split.rpartition("/")
        split = root if root.is_file() else first_file(
            root, [cfg.split, f"{cfg.split}.parquet", f"{name}.parquet", f"{stage}/{name}.parquet"])
        if split is None:
            raise ConfigError(f"evaluate.data {cfg.data}: no split {cfg.split!r} (looked for {cfg.split}.parquet "
                              f"and {name}.parquet)")
        changes["data"] = str(localize_file(split))
        if cfg.baselines and not cfg.train_data and split is not root:
            train = first_file(root, [f"{stage or 'stage2'}/train.parquet", "train.parquet"])
            if train is not None:
                changes["train_data"] = str(localize_file(train))
    return replace(cfg, **changes) if changes else cfg


def _tracking_uri(cfg: EvaluateConfig, lineage: dict) -> str:
    import os

    from sepit.tracking import resolve_tracking_uri

    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or lineage.get("tracking_uri") or \
        resolve_tracking_uri(None, cfg.out)


def _progress(done: int, total: int) -> None:
    from sepit.console import report

    report("evaluate", done, total, unit="answers")


# --------------------------------------------------------------------------- main
def evaluate(config: EvaluateConfig | dict, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run the whole evaluation; returns the result dict also written to metrics.json.

    When ``generation.max_batches`` stops generation early the result has ``complete: False``
    and no metrics; rerunning resumes where it stopped.
    """
    from sepit.evaluation.baselines import constant_baseline, majority_baseline, nearest_neighbour_baseline
    from sepit.evaluation.examples import load_eval_data
    from sepit.evaluation.predictions import write_predictions
    from sepit.evaluation.metrics import TextMetrics
    from sepit.evaluation.report import clean_json, write_report
    from sepit.evaluation.task_metrics import RecordScorer, score_systems, summary_lines
    from sepit.evaluation.verdict import compare, short_verdict
    from sepit.ray_runtime import set_local_defaults

    set_local_defaults()
    cfg = config if isinstance(config, EvaluateConfig) else from_dict(EvaluateConfig, config)
    cfg.check_inputs()
    write_run_config(cfg, cfg.out)
    cfg = localize_inputs(cfg)  # s3:// / gs:// model and data -> local cached copies
    out = Path(cfg.out)
    model_dir = resolve_model_dir(cfg.model)
    compare_dir = resolve_model_dir(cfg.compare_model) if cfg.compare_model else None
    lineage = read_lineage(model_dir)
    data = load_eval_data(cfg.data, cfg.split, pdb_h5=cfg.pdb_h5)
    for check_dir in (model_dir, compare_dir):
        if check_dir is not None:
            bad = unusable_rows(data.rows, str(check_dir), cfg.generation.truncate)
            data.rejects += [{"id": i, "reason": f"{why} ({check_dir.name})"} for i, why in bad.items()]
            data.rows = [r for r in data.rows if r["id"] not in bad]
    if data.rejects:
        write_jsonl(out / "rejects.jsonl", data.rejects)
    if not data.rows:
        raise ConfigError(f"{data.source}: no valid rows to evaluate ({len(data.rejects)} rejected; see rejects.jsonl)")
    sample_ids = sample_rows(data.rows, cfg.limit, cfg.sample_seed)
    slice_ids = {r["id"] for r in data.rows if r["has_structure"]
                 and (cfg.structured_slice or r["id"] in sample_ids)}
    rows = [r for r in data.rows if r["id"] in sample_ids or r["id"] in slice_ids]
    sample = [r for r in rows if r["id"] in sample_ids]

    # ---- generation: the model and its sequence-only ablation share one replica pool
    struct_rows = [r for r in rows if r["id"] in slice_ids]
    tasks = [GenerationTask("model", rows, PredictionsStore(out))]
    if cfg.sequence_only_ablation and struct_rows:
        tasks.append(GenerationTask("sequence_only", struct_rows, PredictionsStore(out / "ablations" / "sequence_only"),
                                    drop_structure=True))
    summaries = generate_predictions(tasks, str(model_dir), cfg.generation, on_batch=_progress)
    if compare_dir is not None and all(s.complete for s in summaries.values()):
        summaries.update(generate_predictions(
            [GenerationTask("compare_model", sample, PredictionsStore(out / "ablations" / "compare_model"))],
            str(compare_dir), cfg.generation, on_batch=_progress))
    gen_info = {"settings": to_dict(cfg.generation),
                "summary": {k: {**vars(s), "tokens_per_second": round(s.tokens_per_second, 2)} for k, s in summaries.items()}}
    if not all(s.complete for s in summaries.values()):
        result = {"complete": False, "out_dir": str(out), "generation": gen_info}
        (out / "progress.json").write_text(json.dumps(clean_json(result), indent=1))
        return result

    # ---- systems: records per system
    model_recs = PredictionsStore(out).records()
    systems: dict[str, list] = {"model": model_recs}
    notes = []
    if "sequence_only" in summaries:
        ablated = {r.id: r for r in PredictionsStore(out / "ablations" / "sequence_only").records()}
        # Rows without a structure have the same input either way: their answers are reused.
        systems["model_sequence_only"] = [ablated.get(r.id, r) for r in model_recs]
        notes.append(f"sequence-only ablation regenerated the {len(struct_rows)} rows that have a structure; "
                     "rows without one reuse the model's answers (same input)")
    elif not struct_rows:
        notes.append("no evaluated row has a structure: the sequence-only ablation equals the model and is skipped")
    if compare_dir is not None:
        systems["compare_model"] = PredictionsStore(out / "ablations" / "compare_model").records()
    train_path = find_train_split(cfg, lineage) if cfg.baselines else None
    if cfg.baselines and train_path is None:
        notes.append("baselines skipped: no training split found (pass --train-data)")
    if train_path is not None:
        train = load_eval_data(train_path, split="stage2/train")
        notes.append(f"baselines use the training split {train_path} ({len(train.rows)} rows)")
        if "majority" in cfg.baselines:
            systems["majority"] = majority_baseline(train.rows, rows)
        if "nearest_neighbour" in cfg.baselines:
            systems["nearest_neighbour"], how = nearest_neighbour_baseline(train.rows, rows)
            notes.append(f"nearest-neighbour identity: {how}")
        if "constant" in cfg.baselines:
            systems["constant"] = constant_baseline(train.rows, rows)
        for name in ("majority", "nearest_neighbour", "constant"):
            if systems.get(name):
                write_predictions(out / "baselines" / name / "predictions.jsonl", systems[name])
    systems = {k: v for k, v in systems.items() if v}

    # ---- scores and report: the overall tables on the sample, the structured slice on its rows
    scorer = RecordScorer(TextMetrics.cached(cfg.metrics), cfg.bootstrap)
    in_sample = {k: [r for r in v if r.id in sample_ids] for k, v in systems.items()}
    scored, per_sample = score_systems({k: v for k, v in in_sample.items() if v}, scorer)
    write_jsonl(out / "scores.jsonl", per_sample["model"])
    baselines = [b for b in ("majority", "nearest_neighbour", "constant", "compare_model") if b in per_sample]
    comparisons = compare(per_sample, "model", baselines, cfg.bootstrap)
    structured_slice = None
    struct_ids = {r.id for r in model_recs if r.structure_used}
    if struct_ids:
        names = [k for k in ("model", "model_sequence_only", "majority", "nearest_neighbour", "constant") if k in systems]
        sub_scored, sub_rows = score_systems({k: [r for r in systems[k] if r.id in struct_ids] for k in names}, scorer)
        structured_slice = {
            "n": len(struct_ids), "n_proteins": len({r.protein_id for r in model_recs if r.id in struct_ids}),
            "n_in_sample": len(struct_ids & sample_ids), "systems": sub_scored,
            "comparisons": compare(sub_rows, "model", [k for k in names if k != "model"], cfg.bootstrap),
        }
    if struct_ids - sample_ids:
        notes.append(f"the structured slice adds {len(struct_ids - sample_ids)} rows with coordinates beyond the "
                     f"{len(sample_ids)}-row sample (all {len(struct_ids)} such rows of the split); overall tables use "
                     "the sample only")
    result: dict[str, Any] = {
        "complete": True,
        "out_dir": str(out),
        "model": {"path": str(model_dir), "run_id": lineage.get("mlflow_run_id"), "stage": lineage.get("stage"),
                  "compare_path": str(compare_dir) if compare_dir else None},
        "data": {"source": data.source, "n_input": data.n_input, "n_rejected": len(data.rejects),
                 "n_evaluated": len(rows), "n_sample": len(sample_ids), "n_with_structure": len(struct_rows),
                 "limit": cfg.limit},
        "generation": gen_info,
        "summary": {**summary_lines(scored, structured_slice), "model vs baselines": short_verdict(comparisons)},
        "systems": scored,
        "comparisons": comparisons,
        "structured_slice": structured_slice,
        "metric_definitions": scorer.text.describe(),
        "bootstrap": to_dict(cfg.bootstrap),
        "notes": notes,
    }
    paths = write_report(out, result, {k: v for k, v in per_sample.items() if k in ("model", "nearest_neighbour", "majority")})
    if cfg.mlflow:
        result["mlflow_run_id"] = log_to_mlflow(cfg, result, paths, lineage, parent_run_id)
        (out / "metrics.json").write_text(json.dumps(clean_json(result), indent=1))
    return result


def sample_rows(rows: list[dict], limit: int | None, seed: int = 0) -> set[str]:
    """Ids of a seeded uniform sample of ``limit`` rows (all rows when ``limit`` is None or larger).

    Splits are stored sorted by id, so their first N rows would be a few proteins' questions; a
    uniform sample keeps the task and category mix of the split."""
    ids = [r["id"] for r in rows]
    if limit is None or limit >= len(ids):
        return set(ids)
    import numpy as np

    pick = np.random.default_rng(seed).choice(len(ids), size=limit, replace=False)
    return {ids[i] for i in pick}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))


def log_to_mlflow(cfg: EvaluateConfig, result: dict, paths: dict[str, Path], lineage: dict,
                  parent_run_id: str | None) -> str:
    from sepit.evaluation.task_metrics import headline
    from sepit.tracking import log_artifact, log_metrics, log_params, log_report_files, start_run

    tags = {"sepit.stage": "evaluate", "sepit.model_path": result["model"]["path"]}
    if lineage.get("mlflow_run_id"):
        tags["sepit.model_run_id"] = lineage["mlflow_run_id"]
    with start_run("evaluate", tracking_uri=_tracking_uri(cfg, lineage), out_dir=cfg.out, experiment=cfg.experiment,
                   parent_run_id=parent_run_id, tags=tags) as run:
        log_params(to_dict(cfg))
        flat = {f"{system}.{k}": v for system, block in result["systems"].items() for k, v in headline(block).items()}
        if flat:
            log_metrics(flat)
        log_report_files(paths.values())
        for name in ("predictions.jsonl", "scores.jsonl"):
            if (Path(cfg.out) / name).is_file():
                log_artifact(Path(cfg.out) / name)
        return run.info.run_id


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (save_pretrained) or a stage output folder")
    parser.add_argument("--data", help="dataset folder, Parquet split, or QA/reference JSONL")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--split", help="split in a dataset folder (default stage2/test)")
    from sepit.config.recipes import DEFAULT_PRESET, PRESETS

    parser.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                        help=f"the evaluate section of this pipeline recipe (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", help="YAML file with EvaluateConfig fields, merged over the preset")
    parser.add_argument("--train-data", help="training split for the baselines")
    parser.add_argument("--compare-model", help="second model folder (e.g. stage 1 dense vs stage 2 MoE)")
    parser.add_argument("--pdb-h5", help="reference pdb.h5 for conversation JSONL data")
    parser.add_argument("--limit", type=int, help="evaluate only the first N rows")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--replicas", type=int, help="model replicas (Ray actors)")
    parser.add_argument("--gpus-per-replica", type=float)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--max-batches", type=int, help="stop after N batches (resume later)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the sequence-only ablation")
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples (0 = no CIs)")
    parser.add_argument("--bertscore-model", help="local encoder folder for BERTScore (e.g. PubMedBERT)")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--parent-run-id", help="MLflow run to nest this run under")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generation.top_p=0.9")


def _cli_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The named flags as dotted config keys (None = not given)."""
    return {
        "model": args.model, "data": args.data, "out": args.out, "split": args.split, "train_data": args.train_data,
        "compare_model": args.compare_model, "pdb_h5": args.pdb_h5, "limit": args.limit,
        "tracking_uri": args.tracking_uri,
        "generation.max_new_tokens": args.max_new_tokens, "generation.batch_size": args.batch_size,
        "generation.num_replicas": args.replicas, "generation.gpus_per_replica": args.gpus_per_replica,
        "generation.temperature": args.temperature, "generation.top_p": args.top_p,
        "generation.max_batches": args.max_batches, "bootstrap.n_resamples": args.bootstrap,
        "metrics.bertscore.model_path": args.bertscore_model,
        "generation.do_sample": True if args.do_sample else None, "generation.stop": args.stop,
        "sequence_only_ablation": False if args.no_ablation else None, "mlflow": False if args.no_mlflow else None,
    }


def run(args: argparse.Namespace) -> int:
    try:
        from sepit.config.recipes import load

        cfg = load(EvaluateConfig, "evaluate", args.preset, args.config, _cli_flags(args), args.overrides)
        cfg.check_inputs()
        from sepit.console import capture_logs

        with capture_logs(cfg.out):  # Ray/MLflow output -> <out>/logs/
            result = evaluate(cfg, parent_run_id=args.parent_run_id)
    except SepitError as exc:
        print(f"sepit evaluate: {exc}", file=sys.stderr)
        return 2
    if not result["complete"]:
        print(f"sepit evaluate: stopped early after --max-batches; rerun to resume ({result['out_dir']})")
        return 3
    print(f"sepit evaluate: report in {result['out_dir']}/report.md"
          + (f"; MLflow run {result['mlflow_run_id']}" if result.get("mlflow_run_id") else ""))
    return 0
