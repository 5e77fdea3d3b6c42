"""What the three stage commands share: the data section, presets of the training section,
command-line parsing, and checks on the folder a stage starts from.

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
from typing import Any, Callable, TypeVar

from sepit.config.base import ConfigError, load_config
from sepit.errors import SepitError

T = TypeVar("T")

PRESETS = ("tiny", "small", "paper")


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


def train_preset(name: str, stage: int) -> dict[str, Any]:
    """Training-section defaults per preset: tiny = tests (seconds), small = CPU demo (minutes),
    paper = GPU cluster (ZeRO, bf16, the paper's learning rates)."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is not allowed; choose one of {list(PRESETS)}")
    base = {
        "tiny": dict(micro_batch_size=8, max_steps=40, warmup_steps=4, eval_every=20, checkpoint_every=20,
                     max_residues=128, num_workers=1, cpus_per_worker=0.5, bucket_window=4),
        # Measured on the 2-core CPU box, 1 worker with 2 threads: ~1.8 / 2.1 / 1.3 s per step for
        # stages 0 / 1 / 2 at 128 residues, so stage 0-2 take about 3 + 5 + 3 minutes.
        "small": dict(micro_batch_size=8, max_steps={0: 100, 1: 150, 2: 150}[stage], warmup_steps=10,
                      eval_every=50, checkpoint_every=50, max_residues=128, num_workers=1, cpus_per_worker=2.0),
        "paper": dict(micro_batch_size=4, grad_accum_steps=8, max_steps=20000, warmup_steps=500,
                      eval_every=1000, checkpoint_every=1000, num_workers=8, zero_stage=2,
                      weight_decay=0.0),
    }[name]
    # Learning rates: the paper's for pretrained weights; random tiny/small models need larger ones.
    lrs = {0: {"tiny": 5e-4, "small": 2e-4, "paper": 1e-6},
           1: {"tiny": 1e-2, "small": 2e-3, "paper": 1e-4},
           2: {"tiny": 5e-3, "small": 1e-3, "paper": 2e-5}}
    base["lr"] = lrs[stage][name]
    if stage == 2 and name != "paper":
        base["zero_stage"] = 2  # DeepSpeed MoE's usual setting (ZeRO-3 is refused for MoE)
    base["run_name"] = f"stage{stage}"
    return base


def add_stage_arguments(parser: argparse.ArgumentParser, stage: int) -> None:
    parser.add_argument("--config", help="YAML file with this stage's config fields")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="start from the tiny / small / paper defaults (default: tiny)")
    parser.add_argument("--data", help="built dataset folder (data.dataset_dir)")
    parser.add_argument("--out", help="output folder (train.output_dir); re-using it resumes")
    if stage > 0:
        parser.add_argument("--init", help=f"stage-{stage - 1} output folder, its MLflow run id, or a registered "
                            f"model (models:/sepit-stage{stage - 1}@latest, models:/NAME@ALIAS, "
                            "models:/NAME/VERSION, runs:/RUN_ID/model)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the output folder)")
    parser.add_argument("--parent-run-id", help="MLflow run to nest this stage's run under")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")


def config_from_args(args: argparse.Namespace, preset_fn: Callable[[str], dict[str, Any]], cls: type[T]) -> T:
    """preset <- YAML <- named flags <- dotted overrides, typed and validated."""
    overrides = list(args.overrides)
    flags = {"data": "data.dataset_dir", "out": "train.output_dir", "init": "init",
             "tracking_uri": "train.tracking_uri", "parent_run_id": "train.parent_run_id"}
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    preset = args.preset
    if preset is None and args.config is None:
        preset = "tiny"
    base = preset_fn(preset) if preset else {}
    return load_config(cls, args.config, overrides=overrides, base=base)


def run_cli(args: argparse.Namespace, name: str, preset_fn, cls, run_fn) -> int:
    """Shared ``run(args)`` of the stage commands: clear one-line errors, a summary at the end."""
    from sepit.console import capture_logs
    from sepit.storage import staging_dir

    try:
        config = config_from_args(args, preset_fn, cls)
        with capture_logs(staging_dir(config.train.output_dir)):  # Ray/DeepSpeed/MLflow -> <out>/logs/
            result = run_fn(config)
    except SepitError as exc:
        print(f"sepit {name}: {exc}", file=sys.stderr)
        return 2
    metrics = result["metrics"]
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "first_loss", "val_loss", "first_val_loss")
             or k.startswith("val_p2t") or k.startswith("val_t2p")}
    print(f"sepit {name}: done, metrics {shown}")
    print(f"  model:  {result['model_dir']}")
    print(f"  MLflow: run {result['mlflow_run_id']} at {result['tracking_uri']}")
    if result.get("registered_model"):
        print(f"  registry: {result['registered_model']} (alias @newest; serve it with --model "
              f"{result['registered_model'].rsplit('/', 1)[0]}@latest)")
    return 0

