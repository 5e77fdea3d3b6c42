"""Presets: one typed recipe per name, for the whole pipeline, and the one config loader.

``recipe("small")`` is a :class:`PipelineConfig` whose sections are the typed configs of every
step (``PreprocessConfig``, ``BuildConfig``, ``Stage0JobConfig``, ``Stage1JobConfig``,
``Stage2JobConfig``, ``EvaluateConfig``).  Every command takes its section from it, so a preset
name means the same hyperparameters everywhere: ``sepit stage1 --preset small`` trains exactly the
stage 1 that ``sepit pipeline --preset small`` trains (apart from the paths the pipeline wires).

A recipe is built in two layers, both here:

* the training stages' defaults per preset (:func:`_stage_defaults`: model sizes from the
  ``EncoderConfig``/``LLMConfig``/``SepitConfig``/``CLIPConfig`` size tables, steps, learning
  rates, ZeRO, answer lengths);
* ``sepit/config/presets/<name>.yaml`` on top: what the pipeline decided and measured for that
  preset (shorter proteins, stage-2 per-example loss, steps, evaluation sample ...).

:func:`load` is the one loader of every command: preset <- YAML file <- named flags <- dotted
overrides, typed and validated (:class:`ConfigError` names the dotted path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from sepit.config.base import (
    ConfigError,
    check_choice,
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
    to_dict,
)
from sepit.config.steps import PIPELINE_STEPS, STEPS
from sepit.data.build import BuildConfig
from sepit.data.preprocess import PreprocessConfig
from sepit.evaluation.run import EvaluateConfig
from sepit.train.stage0 import Stage0JobConfig
from sepit.train.stage1 import Stage1JobConfig
from sepit.train.stage2 import Stage2JobConfig

#: Preset name -> what it is for.
PRESETS: dict[str, str] = {
    "tiny": "the test suite's pipeline (minutes on 2 CPU cores)",
    "small": "the README's CPU demo on the bundled real data",
    "paper": "ESM-2 650M + TinyLlama-1.1B on a GPU cluster",
}
#: The preset every command starts from unless ``--preset`` says otherwise.
DEFAULT_PRESET = "small"
PRESET_DIR = Path(__file__).resolve().parent / "presets"


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


# --------------------------------------------------------------------------- the registry
def _train_defaults(name: str, stage: int) -> dict[str, Any]:
    """Training-section defaults per preset: tiny = tests (seconds), small = CPU demo (minutes),
    paper = GPU cluster (ZeRO, bf16, the paper's learning rates)."""
    base = {
        "tiny": dict(micro_batch_size=8, max_steps=40, warmup_steps=4, eval_every=20, checkpoint_every=20,
                     max_residues=128, num_workers=1, cpus_per_worker=0.5, bucket_window=4),
        # 1 worker with 2 threads on the 2-core CPU box; the steps are the pipeline YAML's.
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


def _stage_defaults(name: str) -> dict[str, Any]:
    """The training stages' layer of a recipe: model sizes (the size tables of the model configs),
    training defaults and answer lengths; the preset's YAML goes on top."""
    from sepit.models.moe import MoEConfig
    from sepit.models.sepit_lm import SepitConfig
    from sepit.models.clip import CLIPConfig

    sizes0 = {"tiny": dict(projection_dim=64, text_max_length=64),
              "small": dict(projection_dim=256, text_max_length=128),
              "paper": dict(projection_dim=512, text_max_length=256)}[name]
    answer = {"tiny": 96, "small": 256, "paper": 1024}[name]
    return {
        "stage0": {"model": to_dict(CLIPConfig.preset(name, **sizes0)), "train": _train_defaults(name, 0)},
        "stage1": {"model": to_dict(SepitConfig.preset(name)), "train": _train_defaults(name, 1),
                   "max_answer_tokens": answer},
        "stage2": {"moe": to_dict(MoEConfig()), "train": _train_defaults(name, 2), "max_answer_tokens": answer},
    }


def recipe(name: str) -> PipelineConfig:
    """The typed recipe of preset ``name``: every step's config, paths left at their defaults."""
    check_choice(name, "--preset", list(PRESETS))
    data = merge(_stage_defaults(name), load_yaml(PRESET_DIR / f"{name}.yaml"))
    data["preset"] = name
    return from_dict(PipelineConfig, data)


# --------------------------------------------------------------------------- the loader
def _command_base(command: str, preset: str) -> tuple[type, dict[str, Any]]:
    """(config class, preset layer as a dict) of ``command``: "pipeline" or a step of
    :data:`sepit.config.steps.STEPS`."""
    if command == "pipeline":
        return PipelineConfig, to_dict(recipe(preset))
    if command == "sweep":
        from sepit.tune.config import SweepConfig

        return SweepConfig, {"preset": preset}  # its stage2 section goes on the recipe's (stage2_config)
    if command not in STEPS:
        raise ConfigError(f"{command!r} has no config; choose one of {['pipeline', *STEPS]}")
    cls, _ = STEPS[command].load()
    return cls, to_dict(getattr(recipe(preset), command))


def nested(flags: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.output_dir": "x", "init": None}`` -> ``{"train": {"output_dir": "x"}}`` (None = unset)."""
    out: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def load(command: str, preset: str | None = None, path: str | Path | None = None,
         flags: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> Any:
    """The typed config of ``command`` ("pipeline", "stage1", "evaluate", "sweep", ...):
    preset (default :data:`DEFAULT_PRESET`) <- YAML file <- named flags (dotted key -> value,
    None = not given) <- dotted ``key=value`` overrides."""
    preset = preset or DEFAULT_PRESET
    check_choice(preset, "--preset", list(PRESETS))
    cls, data = _command_base(command, preset)
    if path:
        data = merge(data, load_yaml(path))
    data = merge(data, nested(flags or {}))
    data = merge(data, parse_overrides(overrides))
    if command == "sweep":
        from sepit.tune.config import prepare_sweep_data

        data = prepare_sweep_data(data)
    return from_dict(cls, data)

