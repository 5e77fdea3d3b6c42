"""What the three stage commands share: the data section, command-line parsing (each stage's
section of a preset recipe, :mod:`sepit.config.recipes`), and checks on the folder a stage starts from.

    sepit stage1 --preset tiny --data DATA --out runs/stage1 --init runs/stage0 train.max_steps=50
    sepit stage2 --data DATA --out runs/stage2 --init models:/sepit-stage1@latest --tracking-uri URI
    python jobs/stage1.py --config stage1.yaml train.num_workers=2
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepit.errors import SepitError


@dataclass
class StageDataConfig:
    dataset_dir: str = "outputs/dataset"
    """Built dataset folder (``sepit build-dataset``): stage{0,1,2}/{train,val,test}.parquet."""


class StageInitError(SepitError, ValueError):
    """The folder a stage starts from is not the kind of model that stage needs."""


def check_model_folder(path: str | Path, model_type: str, what: str) -> Path:
    """``path/config.json`` must exist and declare ``model_type``; the error names both."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise StageInitError(f"{path} is not a model folder (no config.json); expected {what}")
    found = json.loads(cfg.read_text()).get("model_type")
    if found != model_type:
        raise StageInitError(f"{path} holds a {found!r} model; expected {what} (model_type {model_type!r})")
    return Path(path)


def add_stage_arguments(parser: argparse.ArgumentParser, stage: int) -> None:
    from sepit.config.recipes import DEFAULT_PRESET, PRESETS

    parser.add_argument("--config", help="YAML file with this stage's config fields, merged over the preset")
    parser.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                        help=f"the stage-{stage} section of this pipeline recipe (default: {DEFAULT_PRESET})")
    parser.add_argument("--data", help="built dataset folder (data.dataset_dir)")
    parser.add_argument("--out", help="output folder (train.output_dir); re-using it resumes")
    if stage > 0:
        parser.add_argument("--init", help=f"stage-{stage - 1} output folder, its MLflow run id, or a registered "
                            f"model (models:/sepit-stage{stage - 1}@latest, models:/NAME@ALIAS, "
                            "models:/NAME/VERSION, runs:/RUN_ID/model)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the output folder)")
    parser.add_argument("--parent-run-id", help="MLflow run to nest this stage's run under")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")


def config_from_args(args: argparse.Namespace, step: str) -> Any:
    """preset <- YAML <- named flags <- dotted overrides, typed and validated."""
    from sepit.config.recipes import load
    from sepit.config.steps import STEPS

    cls, _ = STEPS[step].load()
    flags = {"data.dataset_dir": args.data, "train.output_dir": args.out, "init": getattr(args, "init", None),
             "train.tracking_uri": args.tracking_uri, "train.parent_run_id": args.parent_run_id}
    return load(cls, step, args.preset, args.config, flags, args.overrides)


def run_cli(args: argparse.Namespace, name: str, run_fn) -> int:
    """Shared ``run(args)`` of the stage commands: clear one-line errors, a summary at the end."""
    from sepit.console import capture_logs
    from sepit.storage import staging_dir

    try:
        config = config_from_args(args, name)
        with capture_logs(staging_dir(config.train.output_dir)):  # Ray/DeepSpeed/MLflow -> <out>/logs/
            result = run_fn(config)
    except SepitError as exc:
        print(f"sepit {name}: {exc}", file=sys.stderr)
        return 2
    metrics = result["metrics"]
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "first_loss", "val_loss", "first_val_loss",
                                                                 "val_closed_acc", "selected_step")
             or k.startswith(("val_p2t", "val_t2p", "selected_val_"))}
    print(f"sepit {name}: done, metrics {shown}")
    print(f"  model:  {result['model_dir']}")
    print(f"  MLflow: run {result['mlflow_run_id']} at {result['tracking_uri']}")
    if result.get("registered_model"):
        print(f"  registry: {result['registered_model']} (alias @newest; serve it with --model "
              f"{result['registered_model'].rsplit('/', 1)[0]}@latest)")
    return 0

