"""Tiny SEPIT language models for tests: a model and its processor, built as stage 1 builds them
(the tokenizer from ``sepit.train.stage1.build_tokenizer``, the model from its ids and size)."""

from __future__ import annotations

from pathlib import Path

from sepit.models.sepit_lm import SepitConfig, SepitForConditionalGeneration
from sepit.processing import SepitProcessor


def build_lm(cfg: SepitConfig | None = None, tokenizer=None) -> tuple[SepitForConditionalGeneration, SepitProcessor]:
    """(model, processor) for ``cfg`` (default: the tiny preset); ``tokenizer`` defaults to stage 1's."""
    from sepit.train.stage1 import build_tokenizer

    cfg = cfg or SepitConfig.preset("tiny")
    processor = SepitProcessor.for_model(tokenizer if tokenizer is not None else build_tokenizer(cfg), cfg)
    return SepitForConditionalGeneration(cfg, processor.token_ids, processor.vocab_size), processor


def save_lm(model: SepitForConditionalGeneration, processor: SepitProcessor, folder: str | Path) -> Path:
    """A model folder as the stages export it: the model's weights and config, the processor's tokenizer."""
    out = model.save_pretrained(folder)
    processor.save_pretrained(out)
    return out


def load_lm(folder: str | Path) -> tuple[SepitForConditionalGeneration, SepitProcessor]:
    """(model in eval mode, processor) of a model folder."""
    return SepitForConditionalGeneration.from_pretrained(folder).eval(), SepitProcessor.from_pretrained(folder)
