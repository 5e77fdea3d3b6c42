"""``sepit pipeline``: the whole platform in one job, on the embedded default or a cluster.

    preprocess -> build dataset -> stage 0 -> stage 1 -> stage 2 -> evaluate

Each step is the same Python function its own ``sepit``/``jobs/`` entry point calls (one step
registry, :mod:`sepit.config.steps`); the pipeline only decides paths (everything under
``--out``), wires each step's output into the next, validates every step's config *before*
anything runs, and nests every step's MLflow run under one pipeline run.  Its config is a preset
recipe (:func:`recipe`: one typed section per step, typed from :mod:`sepit.config.recipes`, the
same sections the stage, evaluate and sweep commands start from); a YAML file and dotted overrides
(``stage2.moe.num_experts=8``) go on top.  The resolved config is written to ``<out>/config.yaml``.
Re-running with the same ``--out`` resumes: finished steps are skipped (their outputs carry a
``.done`` marker), training stages resume from their last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from sepit.config.base import RUN_CONFIG, ConfigError, check_choice, from_dict, merge, to_dict, write_run_config
from sepit.config.recipes import DEFAULT_PRESET, PRESETS, load, sections
from sepit.config.steps import PIPELINE_STEPS, STEPS
from sepit.data.build import BuildConfig
from sepit.data.preprocess import PreprocessConfig
from sepit.errors import SepitError
from sepit.evaluation.run import EvaluateConfig
from sepit.train.stage0 import Stage0JobConfig
from sepit.train.stage1 import Stage1JobConfig
from sepit.train.stage2 import Stage2JobConfig


# --------------------------------------------------------------------------- the typed recipe
@dataclass
class PipelineConfig:
    preset: str = DEFAULT_PRESET
    """Which preset this config started from (recorded in MLflow)."""
    out: str = "runs/pipeline"
    """Output folder: store/, dataset/, stage0/, stage1/, stage2/, eval/, mlflow.db."""
    steps: list[str] = field(default_factory=lambda: list(PIPELINE_STEPS))
    """Steps to run, in pipeline order; a skipped step's output must already exist under out."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite at <out>/mlflow.db."""
    ray_address: Optional[str] = None
    """Ray cluster to join; default RAY_ADDRESS or a local Ray on loopback."""
    num_cpus: Optional[int] = None
    """Logical CPUs of a local Ray (more than the cores keeps data + training from starving)."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Preprocessing (out is set by the pipeline)."""
    dataset: BuildConfig = field(default_factory=BuildConfig)
    """Dataset build (proteins and out are set by the pipeline)."""
    stage0: Stage0JobConfig = field(default_factory=Stage0JobConfig)
    """Stage 0 (data and output folder are set by the pipeline)."""
    stage1: Stage1JobConfig = field(default_factory=Stage1JobConfig)
    """Stage 1 (data, init from stage 0 and output folder are set by the pipeline)."""
    stage2: Stage2JobConfig = field(default_factory=Stage2JobConfig)
    """Stage 2 (data, init from stage 1 and output folder are set by the pipeline)."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluation (model, data, compare_model and out are set by the pipeline)."""

    def __post_init__(self) -> None:
        check_choice(self.preset, "preset", list(PRESETS))
        for s in self.steps:
            check_choice(s, "steps[]", PIPELINE_STEPS)
        if not self.out:
            raise ConfigError("out: an output folder is required")



def recipe(name: str) -> PipelineConfig:
    """The typed recipe of preset ``name``: every step's config, paths left at their defaults."""
    return from_dict(PipelineConfig, sections(name))


def load_pipeline(preset: str | None = None, path: str | Path | None = None,
                  flags: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> PipelineConfig:
    """The pipeline's config: preset recipe <- YAML file <- named flags <- dotted overrides."""
    return load(PipelineConfig, None, preset, path, flags, overrides)


def command_config(command: str, preset: str | None = None, path: str | Path | None = None,
                   flags: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> Any:
    """The typed config of ``command`` ("pipeline", "sweep" or a step of
    :data:`sepit.config.steps.STEPS`) exactly as that command resolves it: preset <- YAML file <-
    named flags <- dotted overrides."""
    if command == "pipeline":
        return load_pipeline(preset, path, flags, overrides)
    if command == "sweep":
        from sepit.tune.config import load_sweep

        return load_sweep(preset, path, flags, overrides)
    if command not in STEPS:
        raise ConfigError(f"{command!r} has no config; choose one of {['pipeline', 'sweep', *STEPS]}")
    cls, _ = STEPS[command].load()
    return load(cls, command, preset, path, flags, overrides)


# --------------------------------------------------------------------------- wiring
def _paths(out: Path) -> dict[str, Path]:
    return {
        "store": out / "store",
        "dataset": out / "dataset",
        "stage0": out / "stage0",
        "stage1": out / "stage1",
        "stage2": out / "stage2",
        "eval": out / "eval",
    }


def wire(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every step's paths under ``out`` and each step's input the previous step's
    output (the pipeline's wiring replaces what the sections say about paths)."""
    out = Path(cfg.out).resolve()
    p = _paths(out)

    def train(step: str) -> dict[str, Any]:
        t = {"output_dir": str(p[step]), "run_name": step, "ray_address": cfg.ray_address}
        if cfg.tracking_uri:
            t["tracking_uri"] = cfg.tracking_uri
        return t

    wiring = {
        "preprocess": {"out": str(p["store"]), "ray_address": cfg.ray_address},
        "dataset": {"proteins": str(p["store"]), "out": str(p["dataset"])},
        "stage0": {"data": {"dataset_dir": str(p["dataset"])}, "train": train("stage0")},
        "stage1": {"data": {"dataset_dir": str(p["dataset"])}, "train": train("stage1")},
        "stage2": {"data": {"dataset_dir": str(p["dataset"])}, "train": train("stage2"),
                   "init": str(p["stage1"] / "model")},
        "evaluate": {"model": str(p["stage2"] / "model"), "data": str(p["dataset"]),
                     "compare_model": str(p["stage1"] / "model"), "out": str(p["eval"])},
    }
    # Stage 1 starts from stage 0's encoder when the pipeline runs (or ran) stage 0.
    if "stage0" in cfg.steps or (p["stage0"] / "model").exists():
        wiring["stage1"]["init"] = str(p["stage0"] / "model")
    if cfg.tracking_uri:
        wiring["evaluate"]["tracking_uri"] = cfg.tracking_uri
    data = merge(to_dict(cfg), wiring)
    data["dataset"]["annotations"] = [_bundled(a) for a in data["dataset"]["annotations"]]
    return from_dict(PipelineConfig, data)


def _bundled(path: str) -> str:
    """``bundled:derived/qa.jsonl.gz`` -> the file in the data bundled with sepit (presets use it)."""
    if isinstance(path, str) and path.startswith("bundled:"):
        from sepit.resources import data_path

        return str(data_path(*path[len("bundled:"):].split("/")))
    return path


def validate(cfg: PipelineConfig) -> dict[str, Any]:
    """Every selected step's typed config, wired (a typo or a broken rule fails now, before hours
    of training; the error names the step's section)."""
    return selected_steps(wire(cfg))


def selected_steps(cfg: PipelineConfig) -> dict[str, Any]:
    """``{step: its config}`` of the steps ``cfg`` runs, in pipeline order."""
    return {step: getattr(cfg, step) for step in cfg.steps}


def _call(step: str, fn: Callable[..., Any], step_cfg: Any, parent_run_id: str | None) -> Any:
    if step in ("stage0", "stage1", "stage2", "evaluate"):
        return fn(step_cfg, parent_run_id=parent_run_id)
    return fn(step_cfg)


def _summary_line(step: str, result: Any) -> str:
    """One line per finished step: what it produced, in numbers a user checks first."""
    if not isinstance(result, dict):
        return ""
    if step == "preprocess":
        return f"{result.get('n_records')} protein records from {result.get('n_input_files')} files, {result.get('n_rejected')} rejected (see store/rejects.parquet)"
    if step == "dataset":
        ex = result.get("examples") or {}
        per_stage = ", ".join(f"{k} {v.get('total')}" for k, v in ex.items() if isinstance(v, dict))
        prot = (result.get("proteins") or {}).get("by_split") or {}
        return f"examples: {per_stage}; proteins by split {prot}"
    if step in ("stage0", "stage1", "stage2"):
        m = result.get("metrics", {})
        parts = []
        if "loss" in m:
            parts.append(f"loss {m['first_loss']:.4g} -> {m['loss']:.4g}" if "first_loss" in m else f"loss {m['loss']:.4g}")
        if "val_loss" in m:
            parts.append(f"val_loss {m['val_loss']:.4g}")
        if "val_closed_acc" in m:
            parts.append(f"val closed-set acc (first token) {m['val_closed_acc']:.1f}%")
        selected = [k for k in m if k.startswith("selected_val_")]
        if "selected_step" in m and selected:
            parts.append(f"exported step {int(m['selected_step'])} (best {selected[0][len('selected_'):]} "
                         f"{m[selected[0]]:.4g})")
        parts.append(f"model -> {result.get('model_dir')}")
        return ", ".join(parts)
    return ""


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the selected steps; each shows a header, one progress display and a summary line.

    Ray, DeepSpeed and MLflow output goes to ``<out>/logs/`` (``--verbose`` shows it too); ``log``
    receives the project's own lines (default: the console).
    """
    from sepit.console import capture_logs, say
    from sepit.tracking import import_mlflow

    import_mlflow()  # its logger is configured at import: before the capture reroutes it

    out = Path(cfg.out).resolve()
    wired = wire(cfg)  # typed and checked here (as validate does): a typo fails before hours of training
    write_run_config(wired, out)
    typed = selected_steps(wired)
    with capture_logs(out) as logs:
        (log or say)(f"sepit pipeline ({cfg.preset}): {len(cfg.steps)} steps -> {out}  (Ray/DeepSpeed/MLflow logs: {logs})")
        return _run_steps(cfg, typed, out, log or say)


def _run_steps(cfg: PipelineConfig, typed: dict[str, Any], out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    import ray

    from sepit.console import rerouted
    from sepit.ray_runtime import init_ray
    from sepit.tracking import log_artifact, log_metrics, log_params, resolve_tracking_uri, start_run

    started_ray = not ray.is_initialized()
    init_ray(address=cfg.ray_address, num_cpus=cfg.num_cpus)
    uri = resolve_tracking_uri(cfg.tracking_uri, out)
    for step_cfg in typed.values():  # every step logs to the pipeline's store
        tr = getattr(step_cfg, "train", None)
        if tr is not None and tr.tracking_uri is None:
            tr.tracking_uri = uri
    if "evaluate" in typed and typed["evaluate"].tracking_uri is None:
        typed["evaluate"].tracking_uri = uri
    results: dict[str, Any] = {}
    t_all = time.time()
    try:
        with start_run(f"pipeline-{cfg.preset}", tracking_uri=uri, tags={"sepit.kind": "pipeline"}) as run:
            log_params({"preset": cfg.preset, "steps": cfg.steps, "out": str(out)})
            log_artifact(out / RUN_CONFIG)
            for i, step in enumerate(cfg.steps, 1):
                _, fn = STEPS[step].load()
                done = out / f".{step}.done"
                head = f"[{i}/{len(cfg.steps)}] {step}"
                if done.exists() and step in ("preprocess", "dataset", "evaluate"):
                    log(f"{head}: already done ({done}), skipping")
                    results[step] = json.loads(done.read_text())
                    continue
                log(f"{head} ...")
                rerouted()  # loggers a library configured since (e.g. DeepSpeed's at import)
                t0 = time.time()
                result = _call(step, fn, typed[step], run.info.run_id)
                dt = time.time() - t0
                results[step] = result
                log_metrics({f"pipeline.{step}_seconds": dt})
                done.write_text(json.dumps(result, default=str))
                summary = _summary_line(step, result)
                log(f"{head}: done in {_duration(dt)}" + (f"  {summary}" if summary else ""))
            log_metrics({"pipeline.total_seconds": time.time() - t_all})
            results["mlflow_run_id"] = run.info.run_id
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()  # inside the capture: Ray's goodbye lines go to the logs too
    results["tracking_uri"] = uri
    results["out"] = str(out)
    results["total_seconds"] = time.time() - t_all
    return results


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _final_report(cfg: PipelineConfig, results: dict[str, Any]) -> str:
    out = Path(results["out"])
    p = _paths(out)
    took = f" in {_duration(results['total_seconds'])}" if "total_seconds" in results else ""
    lines = ["", f"sepit pipeline finished{took}", f"  outputs          {out}"]
    if "stage2" in results:
        lines.append(f"  model (stage 2)  {p['stage2'] / 'model'}")
    if "evaluate" in results:
        lines.append(f"  results          {p['eval'] / 'report.md'}  and  {p['eval'] / 'metrics.json'}")
        closed = _closed_set_lines(results["evaluate"])
        lines.extend(closed)
    lines.append(f"  logs             {out / 'logs'}  (Ray, DeepSpeed, MLflow; --verbose shows them live)")
    lines.append(f"  MLflow store     {results['tracking_uri']}  (run {results['mlflow_run_id']})")
    lines.append(f"  browse with      mlflow ui --backend-store-uri {results['tracking_uri']}")
    lines.append(f"  serve with       sepit serve --model {p['stage2'] / 'model'}")
    return "\n".join(lines)


def _closed_set_lines(ev: Any) -> list[str]:
    """Closed-set accuracy of the model vs the majority-class baseline, if the evaluation has them."""
    if not isinstance(ev, dict):
        return []
    summary = ev.get("summary") or {}
    out = []
    for k, v in summary.items():
        out.append(f"  {k:<16} {v}")
    return out


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                        help="; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + f" (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", help="YAML file with PipelineConfig fields, merged over the preset")
    parser.add_argument("--out", help="output folder (default runs/pipeline-<preset>)")
    parser.add_argument("--steps", help="comma-separated subset of " + ",".join(PIPELINE_STEPS))
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stage2.train.max_steps=50")


def run(args: argparse.Namespace) -> int:
    flags = {"out": args.out or f"runs/pipeline-{args.preset}",
             "steps": [s.strip() for s in args.steps.split(",")] if args.steps else None}
    try:
        cfg = load_pipeline(args.preset, args.config, flags, args.overrides)
        results = run_pipeline(cfg)
    except SepitError as exc:
        print(f"sepit pipeline: {'invalid configuration: ' if isinstance(exc, ConfigError) else ''}{exc}")
        return 2
    print(_final_report(cfg, results))
    return 0
