"""Stage 2: MoE instruction tuning on the full instruction set (docs/method.md §4).

    sepit stage2 --preset small --data outputs/dataset --init runs/stage1 --out runs/stage2
    ray job submit --working-dir . -- python jobs/stage2.py --config stage2.yaml --init <run id>

Loads the stage-1 model (``--init``: folder or MLflow run id), sparse-upcycles the chosen LLM
feed-forwards into DeepSpeed MoE layers (experts = copies of the stage-1 FFN, new router),
freezes the protein encoder, and trains projector + LLM with ``lm_loss + aux_loss_coef · Σ l_aux``.
DeepSpeed MoE does not support ZeRO-3: the config is refused at load time.  Expert parameters go
to their own optimizer groups (``split_params_into_different_moe_groups_for_optimizer``).  Per
step it logs the aux loss and the tokens routed to each expert of each layer.  The export
converts the experts to plain PyTorch blocks (``export_for_inference``), so inference and
serving need no DeepSpeed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sepit.config.base import ConfigError, check_choice, check_range
from sepit.models.moe import MoEConfig

from .config import TrainConfig
from .deepspeed_config import check_zero_for_moe
from .launch import run_training
from .lineage import resolve_parent
from .lm_task import LOSS_PER, InstructionTask
from .stage_common import StageDataConfig, StageInitError, add_stage_arguments, check_model_folder, run_cli

SEPIT_MODEL_TYPE = "sepit"


@dataclass
class Stage2JobConfig:
    init: str = ""
    """Stage-1 output folder (or its ``model/``) or MLflow run id (required)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Experts per layer (4), top-k (1), capacity factor (1.25 train / 2.0 eval), layers ("all"),
    aux loss coefficient (0.01), expert-parallel size."""
    data: StageDataConfig = field(default_factory=StageDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_name="stage2", lr=2e-5, zero_stage=2))
    llm_lr_ratio: float = 0.1
    """LLM (and expert) lr = train.lr × this; the projector trains at train.lr."""
    freeze_encoder: bool = True
    """docs/method.md: the protein encoder is frozen in stage 2."""
    structure_dropout: Optional[float] = None
    """Override the stage-1 model's structure dropout (None keeps it, 0.15 by default)."""
    residue_dropout: Optional[float] = None
    """Override the stage-1 model's residue dropout (``SepitConfig.residue_dropout``: the share of
    each training protein's residue vectors removed before splicing; None keeps it, 0 by default)."""
    max_answer_tokens: int = 384
    """Answer LLM tokens kept per example (longer answers are cut; prompts are kept whole)."""
    loss_per: str = "token"
    """"token": the LM loss is the mean over every answer token of the batch (the usual SFT loss);
    "example": each example's answer tokens are averaged first, so a one-token "Yes" weighs as much
    as a long description (closed-set questions otherwise barely move the model)."""

    def __post_init__(self) -> None:
        check_zero_for_moe(self.train.zero_stage)  # fail now, not inside deepspeed.initialize on every worker
        if self.train.num_workers % self.moe.ep_size:
            raise ConfigError(f"moe.ep_size={self.moe.ep_size} must divide train.num_workers={self.train.num_workers}")
        if self.moe.exported:
            raise ConfigError("moe.exported=true describes an inference export; stage 2 trains DeepSpeed MoE blocks")
        check_range(self.llm_lr_ratio, "llm_lr_ratio", lo=0)
        check_range(self.max_answer_tokens, "max_answer_tokens", lo=1)
        check_choice(self.loss_per, "loss_per", LOSS_PER)
        if self.structure_dropout is not None:
            check_range(self.structure_dropout, "structure_dropout", lo=0, hi=1)
        if self.residue_dropout is not None:
            check_range(self.residue_dropout, "residue_dropout", lo=0, hi=0.95)


class Stage2Task(InstructionTask):
    stage = "stage2"
    uses_moe = True
    # closed-set rows carry their options and gold letter: validation reports their accuracy
    columns = [*InstructionTask.columns, "task", "choices", "answer_letter"]

    def __init__(self, cfg: Stage2JobConfig, init_dir: str, alphabet: str):
        super().__init__(tokenizer_path=str(Path(init_dir) / "tokenizer"), alphabet=alphabet,
                         max_residues=cfg.train.max_residues, max_answer_tokens=cfg.max_answer_tokens,
                         loss_per=cfg.loss_per)
        self.init_dir = init_dir
        self.moe = cfg.moe
        self.llm_lr_ratio = cfg.llm_lr_ratio
        self.freeze_encoder = cfg.freeze_encoder
        self.structure_dropout = cfg.structure_dropout
        self.residue_dropout = cfg.residue_dropout

    def build_model(self):
        from sepit.models.moe import upcycle_to_moe
        from sepit.models.sepit_lm import SepitForConditionalGeneration

        model = SepitForConditionalGeneration.from_pretrained(self.init_dir)
        if self.structure_dropout is not None:
            model.config.structure_dropout = self.structure_dropout
        if self.residue_dropout is not None:
            model.config.residue_dropout = self.residue_dropout
        if self.freeze_encoder:
            model.freeze(encoder=True)
        upcycle_to_moe(model, self.moe, use_deepspeed=True)
        return model

    def param_groups(self, model, lr):
        # A frozen encoder has no trainable parameters and so no group.
        return model.param_groups(base_lr=lr, encoder_lr_ratio=self.llm_lr_ratio, llm_lr_ratio=self.llm_lr_ratio)

    def export(self, model, out_dir: Path) -> None:
        from sepit.models.moe import export_for_inference

        export_for_inference(model)  # DeepSpeed experts -> plain PyTorch blocks, same weights
        self.record_crop(model)
        model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)

    def describe(self) -> dict[str, Any]:
        return {"stage": self.stage, "init": self.init_dir, "freeze_encoder": self.freeze_encoder}


def run_stage2(config: Stage2JobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train stage 2; returns ``{output_dir, model_dir, mlflow_run_id, tracking_uri, metrics, checkpoint}``."""
    import json

    from sepit.tracking import resolve_tracking_uri

    if parent_run_id:
        config.train.parent_run_id = parent_run_id
    if not config.init:
        raise StageInitError("stage 2 starts from a stage-1 model: pass --init <stage-1 folder or MLflow run id>")
    parent = resolve_parent(config.init, resolve_tracking_uri(config.train.tracking_uri, config.train.out_path),
                            download_to=config.train.out_path / "parent")
    check_model_folder(parent.path, SEPIT_MODEL_TYPE, "a stage-1 SEPIT model export")
    saved = json.loads((Path(parent.path) / "config.json").read_text())
    if (saved.get("sepit") or {}).get("moe"):
        raise StageInitError(f"{parent.path} is already an MoE (stage-2) model; stage 2 starts from a dense stage-1 model")
    task = Stage2Task(config, parent.path, alphabet=saved.get("encoder_alphabet") or "ESM-1b")
    outcome = run_training(task, config.train, dataset_dir=config.data.dataset_dir, data_stage="stage2",
                           stage_config=config, parent=parent)
    return outcome.as_dict()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, stage=2)


def run(args: argparse.Namespace) -> int:
    return run_cli(args, "stage2", run_stage2)
