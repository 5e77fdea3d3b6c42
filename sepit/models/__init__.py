"""The SEPIT models (pure PyTorch; no Ray, and DeepSpeed only inside the MoE training block).

Public API (imported lazily so ``import sepit.models`` stays cheap):

- structure: :class:`StructureBias`, :class:`StructureBiasConfig`
- protein encoder: :class:`ProteinEncoder`, :class:`EncoderConfig`, :func:`collate_proteins`, :class:`ProteinBatch`
- stage 0: :class:`ProteinTextCLIP`, :class:`CLIPConfig`, :func:`load_text_encoder`
- stages 1-2: :class:`SepitForConditionalGeneration`, :class:`SepitConfig`, :class:`LLMConfig`
- MoE: :func:`upcycle_to_moe`, :func:`export_for_inference`, :class:`MoEConfig`, :class:`MoEFeedForward`
- tokenizer: :func:`train_llm_tokenizer`, :func:`load_llm_tokenizer`

Text and protein preprocessing for stages 1-2 is :class:`sepit.processing.SepitProcessor`'s
(outside this package: ``sepit.models`` imports nothing from ``sepit.data``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StructureBias": "structure_bias",
    "StructureBiasConfig": "structure_bias",
    "ProteinEncoder": "encoder",
    "EncoderConfig": "encoder",
    "EncoderOutput": "encoder",
    "collate_proteins": "protein_batch",
    "ProteinBatch": "protein_batch",
    "ProteinTextCLIP": "clip",
    "CLIPConfig": "clip",
    "load_text_encoder": "text_encoder",
    "default_text_encoder_path": "text_encoder",
    "SepitForConditionalGeneration": "sepit_lm",
    "SepitConfig": "sepit_lm",
    "LLMConfig": "llm",
    "upcycle_to_moe": "moe",
    "export_for_inference": "moe",
    "MoEConfig": "moe",
    "MoEFeedForward": "moe",
    "SepitMoEBlock": "moe",
    "train_llm_tokenizer": "tokenizer",
    "load_llm_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sepit.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sepit.models.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
