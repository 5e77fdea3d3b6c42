"""Tiny SEPIT language models for tests: a model and its processor, built as stage 1 builds them
(``sepit.train.stage1.initial_model``), saved and loaded as the stages export them."""

from __future__ import annotations

from pathlib import Path

from sepit.models.sepit_lm import SepitConfig, SepitForConditionalGeneration
from sepit.processing import SepitProcessor


def build_lm(cfg: SepitConfig | None = None, tokenizer=None) -> tuple[SepitForConditionalGeneration, SepitProcessor]:
    """(model, processor) for ``cfg`` (default: the tiny preset); ``tokenizer`` defaults to stage 1's."""
    from sepit.train.stage1 import initial_model

    return initial_model(cfg or SepitConfig.preset("tiny"), tokenizer)


def save_lm(model: SepitForConditionalGeneration, processor: SepitProcessor, folder: str | Path) -> Path:
    """A model folder as the stages export it: the model's weights and config, the processor's tokenizer."""
    out = model.save_pretrained(folder)
    processor.save_pretrained(out)
    return out


def load_lm(folder: str | Path) -> tuple[SepitForConditionalGeneration, SepitProcessor]:
    """(model in eval mode, processor) of a model folder."""
    return SepitForConditionalGeneration.from_pretrained(folder).eval(), SepitProcessor.from_pretrained(folder)
