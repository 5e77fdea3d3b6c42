"""Stage 1: caption instruction tuning of protein encoder + projector + LLM (docs/method.md §3).

    sepit stage1 --preset small --data outputs/dataset --init runs/stage0 --out runs/stage1
    python jobs/stage1.py --config stage1.yaml --init <stage-0 MLflow run id>

Builds :class:`~sepit.models.sepit_lm.SepitForConditionalGeneration` from the stage-0 encoder
(``--init``: stage-0 output folder or MLflow run id; none = the encoder in ``model``) and the LLM
config (sizes, or a local Hugging Face folder in ``model.llm.path``), and trains all three parts:
projector at ``train.lr``, encoder and LLM at ``train.lr × 0.1`` (docs/method.md), structure dropout
``model.structure_dropout`` (0.15).  Exports a self-contained model folder for stage 2.

Stage 1 is also where the LLM tokenizer is chosen: ``model.tokenizer_path``, the LLM folder's
tokenizer, or a byte-level BPE trained on the bundled text (:func:`build_tokenizer`); the export
saves it with the model (``SepitProcessor.save_pretrained``) and later stages reuse it.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sepit.config.base import check_choice, check_range
from sepit.models.sepit_lm import SepitConfig

from .config import TrainConfig
from .launch import run_training
from .lineage import ParentRef, resolve_parent
from .lm_task import LOSS_PER, InstructionTask
from .stage_common import StageDataConfig, add_stage_arguments, check_model_folder, run_cli

ENCODER_MODEL_TYPE = "sepit_protein_encoder"


@dataclass
class Stage1JobConfig:
    model: SepitConfig = field(default_factory=SepitConfig)
    """Encoder / LLM / projector config; ``--init`` overrides ``model.encoder_path``."""
    data: StageDataConfig = field(default_factory=StageDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_name="stage1", lr=1e-4))
    init: Optional[str] = None
    """Stage-0 output folder (or its ``model/``) or MLflow run id; None = encoder from ``model``."""
    encoder_lr_ratio: float = 0.1
    """Encoder lr = train.lr × this (docs/method.md: 0.1)."""
    llm_lr_ratio: float = 0.1
    """LLM lr = train.lr × this (docs/method.md: 0.1); the projector trains at train.lr."""
    freeze_encoder: bool = False
    """Freeze the protein encoder (docs/method.md trains it in stage 1)."""
    max_answer_tokens: int = 384
    """Answer LLM tokens kept per example (longer answers are cut; prompts are kept whole)."""
    loss_per: str = "token"
    """"token" (mean over every answer token of the batch) or "example" (each example's answer
    tokens averaged first): as stage 2's, for a stage 1 that mixes one-line answers with captions."""

    def __post_init__(self) -> None:
        check_range(self.encoder_lr_ratio, "encoder_lr_ratio", lo=0)
        check_range(self.llm_lr_ratio, "llm_lr_ratio", lo=0)
        check_range(self.max_answer_tokens, "max_answer_tokens", lo=1)
        check_choice(self.loss_per, "loss_per", LOSS_PER)


def bundled_tokenizer_corpus() -> list[str]:
    """Real text shipped with sepit for training a tokenizer offline: the chat template's fixed
    text, the bundled QA pairs and the UniProt annotation fields of the bundled proteins."""
    import gzip
    import json

    from sepit.data.prompts import ASSISTANT_HEADER, SYSTEM_HEADER, SYSTEM_PROMPT, USER_HEADER
    from sepit.resources import data_path

    texts = [SYSTEM_HEADER + SYSTEM_PROMPT, USER_HEADER, ASSISTANT_HEADER]
    with gzip.open(data_path("derived", "qa.jsonl.gz"), "rt") as fh:
        for line in fh:
            row = json.loads(line)
            texts.append(f"{row['question']} {row['answer']}")
    fields = ("protein_name", "function", "subcellular_location", "catalytic_activity",
              "domain_comment", "similarity")
    with gzip.open(data_path("derived", "proteins.jsonl.gz"), "rt") as fh:
        for line in fh:
            row = json.loads(line)
            texts.extend(str(row[f]) for f in fields if row.get(f))
            texts.extend(row.get("keywords") or [])
            texts.extend(go["term"] for go in row.get("go") or [] if go.get("term"))
    return texts


def build_tokenizer(model_cfg: SepitConfig, out_dir: str | Path | None = None):
    """The LLM tokenizer of a new model: ``model_cfg.tokenizer_path``, else the LLM folder's
    (``llm.path``), else a byte-level BPE of ``llm.vocab_size`` trained on the bundled text
    (written to ``out_dir`` when given)."""
    from sepit.models.tokenizer import load_llm_tokenizer, train_llm_tokenizer

    if model_cfg.tokenizer_path:
        return load_llm_tokenizer(model_cfg.tokenizer_path)
    if model_cfg.llm.path:
        return load_llm_tokenizer(model_cfg.llm.path)
    return train_llm_tokenizer(bundled_tokenizer_corpus(), vocab_size=model_cfg.llm.vocab_size, out_dir=out_dir,
                               model_max_length=model_cfg.llm.max_position_embeddings)


def initial_model(model_cfg: SepitConfig, tokenizer=None):
    """``(model, processor)`` as stage 1 starts from them: the model built from ``model_cfg``
    (random weights unless it names encoder / LLM folders) for ``tokenizer`` (default:
    :func:`build_tokenizer`), and the processor that feeds it.  Benchmarks and tests use it too."""
    from sepit.models.sepit_lm import SepitForConditionalGeneration
    from sepit.processing import SepitProcessor

    processor = SepitProcessor.for_model(tokenizer if tokenizer is not None else build_tokenizer(model_cfg), model_cfg)
    return SepitForConditionalGeneration(model_cfg, processor.token_ids, processor.vocab_size), processor


def prepare_tokenizer(model_cfg: SepitConfig, out_dir: Path) -> str:
    """The LLM tokenizer folder the workers load.

    An explicit ``tokenizer_path`` or the LLM folder's tokenizer is used as is; otherwise a BPE is
    trained once on the bundled text into ``<out>/tokenizer`` (kept on re-runs, so a resumed run
    tokenises exactly as before).
    """
    if model_cfg.tokenizer_path:
        return model_cfg.tokenizer_path
    if model_cfg.llm.path:
        return model_cfg.llm.path
    folder = Path(out_dir) / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        build_tokenizer(model_cfg, out_dir=folder)
    return str(folder)


class Stage1Task(InstructionTask):
    stage = "stage1"

    def __init__(self, cfg: Stage1JobConfig, tokenizer_path: str):
        super().__init__(tokenizer_path=tokenizer_path, alphabet=cfg.model.encoder.alphabet,
                         max_residues=cfg.train.max_residues, max_answer_tokens=cfg.max_answer_tokens,
                         loss_per=cfg.loss_per)
        self.model_cfg = copy.deepcopy(cfg.model)
        self.model_cfg.tokenizer_path = tokenizer_path
        self.encoder_lr_ratio, self.llm_lr_ratio = cfg.encoder_lr_ratio, cfg.llm_lr_ratio
        self.freeze_encoder = cfg.freeze_encoder

    def build_model(self):
        from sepit.models.sepit_lm import SepitForConditionalGeneration

        model = SepitForConditionalGeneration(copy.deepcopy(self.model_cfg), self.processor.token_ids,
                                              self.processor.vocab_size)
        if self.freeze_encoder:
            model.freeze(encoder=True)
        return model

    def param_groups(self, model, lr):
        return model.param_groups(base_lr=lr, encoder_lr_ratio=self.encoder_lr_ratio, llm_lr_ratio=self.llm_lr_ratio)

    def export(self, model, out_dir: Path) -> None:
        self.record_crop(model)
        model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)

    def describe(self) -> dict[str, Any]:
        return {"stage": self.stage, "encoder_path": self.model_cfg.encoder_path or "none",
                "tokenizer_path": self.tokenizer_path, "freeze_encoder": self.freeze_encoder}


def run_stage1(config: Stage1JobConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train stage 1; returns ``{output_dir, model_dir, mlflow_run_id, tracking_uri, metrics, checkpoint}``."""
    from sepit.tracking import resolve_tracking_uri

    if parent_run_id:
        config.train.parent_run_id = parent_run_id
    parent: ParentRef | None = None
    if config.init:
        parent = resolve_parent(config.init, resolve_tracking_uri(config.train.tracking_uri, config.train.out_path),
                            download_to=config.train.out_path / "parent")
        check_model_folder(parent.path, ENCODER_MODEL_TYPE, "a stage-0 protein encoder export")
        config.model.encoder_path = parent.path
    config.train.out_path.mkdir(parents=True, exist_ok=True)
    tokenizer = prepare_tokenizer(config.model, config.train.out_path)
    outcome = run_training(Stage1Task(config, tokenizer), config.train, dataset_dir=config.data.dataset_dir,
                           data_stage="stage1", stage_config=config, parent=parent)
    return outcome.as_dict()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, stage=1)


def run(args: argparse.Namespace) -> int:
    return run_cli(args, "stage1", run_stage1)
