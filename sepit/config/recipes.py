"""Presets: one recipe per name for the whole pipeline, and the one config loader.

A recipe is data: :func:`sections` gives, for preset ``name``, every step's section
(``preprocess``, ``dataset``, ``stage0``, ``stage1``, ``stage2``, ``evaluate``) as a nested dict,
built in two layers, both here:

* the training stages' defaults per preset (:func:`_stage_defaults`: model sizes from
  :data:`MODEL_SIZES`, steps, learning rates, ZeRO, answer lengths);
* ``sepit/config/presets/<name>.yaml`` on top: what the pipeline decided and measured for that
  preset (shorter proteins, stage-2 per-example loss, steps, evaluation sample ...).

Every command types its own section with its own config class through :func:`load` (preset <-
YAML file <- named flags <- dotted overrides, validated; :class:`ConfigError` names the dotted
path), so a preset name means the same hyperparameters everywhere: ``sepit stage1 --preset
small`` trains exactly the stage 1 that ``sepit pipeline --preset small`` trains (apart from the
paths the pipeline wires).  The typed whole-pipeline view is :func:`sepit.pipeline.recipe`; the
model configs' ``preset()`` constructors read :data:`MODEL_SIZES`.  This package imports no
other sepit package, so every package may use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from sepit.config.base import ConfigError, check_choice, load_config, load_yaml, merge

#: Preset name -> what it is for.
PRESETS: dict[str, str] = {
    "tiny": "the test suite's pipeline (minutes on 2 CPU cores)",
    "small": "the README's CPU demo on the bundled real data",
    "paper": "ESM-2 650M + TinyLlama-1.1B on a GPU cluster",
}
#: The preset every command starts from unless ``--preset`` says otherwise.
DEFAULT_PRESET = "small"
PRESET_DIR = Path(__file__).resolve().parent / "presets"

#: Model sizes per preset (fields of ``EncoderConfig``, ``LLMConfig`` and ``CLIPConfig``; the
#: rest are those classes' defaults).
MODEL_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    # ESM-2 layouts: tiny for tests, small = ESM-2 8M sizes, paper = ESM-2 650M sizes.
    "encoder": {
        "tiny": dict(num_layers=2, embed_dim=64, attention_heads=4, num_rbf=16, chunk_size=32),
        "small": dict(num_layers=6, embed_dim=320, attention_heads=20, num_rbf=128),
        "paper": dict(num_layers=33, embed_dim=1280, attention_heads=20, num_rbf=128),
    },
    # Llama layouts: tiny = seconds on a CPU core, small = CPU demo in minutes (vocabularies sized
    # for a BPE trained on the bundled text), paper = TinyLlama-1.1B (the class defaults; point
    # ``llm.path`` at a local TinyLlama folder for its weights).
    "llm": {
        "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
        "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
        "paper": {},
    },
    # Stage 0's contrastive heads and text length.
    "clip": {
        "tiny": dict(projection_dim=64, text_max_length=64),
        "small": dict(projection_dim=256, text_max_length=128),
        "paper": dict(projection_dim=512, text_max_length=256),
    },
}


def model_sizes(part: str, name: str) -> dict[str, Any]:
    """``MODEL_SIZES[part][name]`` (a copy), with the usual error for an unknown preset."""
    check_choice(name, f"{part} preset", list(MODEL_SIZES[part]))
    return dict(MODEL_SIZES[part][name])


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
    if stage == 2:
        # Export the validation point whose closed-set answers are best, not the last step: on
        # held-out proteins this accuracy peaks and then falls as a model starts to memorise
        # training proteins (README, results; evals/recipe_probe.py).
        base["select_best"] = "val_closed_acc"
    base["run_name"] = f"stage{stage}"
    return base


def _stage_defaults(name: str) -> dict[str, Any]:
    """The training stages' layer of a recipe: model sizes, training defaults and answer lengths;
    the preset's YAML goes on top."""
    encoder = model_sizes("encoder", name)
    answer = {"tiny": 96, "small": 256, "paper": 1024}[name]
    return {
        "stage0": {"model": {"encoder": encoder, **model_sizes("clip", name)}, "train": _train_defaults(name, 0)},
        "stage1": {"model": {"encoder": encoder, "llm": model_sizes("llm", name)}, "train": _train_defaults(name, 1),
                   "max_answer_tokens": answer},
        "stage2": {"train": _train_defaults(name, 2), "max_answer_tokens": answer},
    }


def sections(name: str) -> dict[str, Any]:
    """Preset ``name`` as data: ``{"preset": name, "num_cpus": ..., "stage1": {...}, ...}``, every
    step's section with paths left unset."""
    check_choice(name, "--preset", list(PRESETS))
    data = merge(_stage_defaults(name), load_yaml(PRESET_DIR / f"{name}.yaml"))
    data["preset"] = name
    return data


# --------------------------------------------------------------------------- the loader
def load(cls: type, section: str | None, preset: str | None = None, path: str | Path | None = None,
         flags: Mapping[str, Any] | None = None, overrides: Iterable[str] = (), *,
         base: Mapping[str, Any] | None = None,
         prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Any:
    """The typed config ``cls`` of a command: preset (default :data:`DEFAULT_PRESET`; its
    ``section``, or the whole recipe for ``section=None``, or ``base`` when given) <- YAML file <-
    named flags <- dotted overrides, through :func:`sepit.config.base.load_config`."""
    preset = preset or DEFAULT_PRESET
    check_choice(preset, "--preset", list(PRESETS))
    if base is None:
        recipe_data = sections(preset)
        if section is not None and section not in recipe_data:
            raise ConfigError(f"{section!r} is not a section of the recipes; choose one of "
                              f"{sorted(k for k, v in recipe_data.items() if isinstance(v, dict))}")
        base = recipe_data[section] if section is not None else recipe_data
    return load_config(cls, path, overrides, base=base, flags=flags, prepare=prepare)
