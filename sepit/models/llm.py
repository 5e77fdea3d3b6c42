"""The Llama-family language model SEPIT conditions on proteins: config, presets, offline build.

Two sources, both offline:

* ``LLMConfig(path="/models/TinyLlama-1.1B-Chat")``: a local Hugging Face folder, loaded with
  ``local_files_only=True`` (any causal LM whose blocks live at ``model.layers[i]`` with an
  ``mlp`` feed-forward, i.e. Llama, Mistral, Qwen2 and friends);
* ``LLMConfig.preset("tiny" | "small" | "paper")``: a ``LlamaForCausalLM`` built from sizes with
  random weights.  ``paper`` has TinyLlama-1.1B's shapes (1,100,048,384 parameters at vocab 32000).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sepit.config.base import ConfigError, check_choice, check_range, from_dict
from sepit.config.recipes import model_sizes
from sepit.errors import SepitError


@dataclass
class LLMConfig:
    path: str | None = None
    """Local Hugging Face model folder; when set, the size fields below are ignored."""
    vocab_size: int = 32000
    """Vocabulary size for a model built from config (grown to the tokenizer's size if smaller)."""
    hidden_size: int = 2048
    """Model width (d_model)."""
    intermediate_size: int = 5632
    """Feed-forward (SwiGLU) inner width."""
    num_layers: int = 22
    """Number of decoder blocks."""
    num_attention_heads: int = 32
    """Query heads."""
    num_key_value_heads: int = 4
    """Key/value heads (grouped-query attention); must divide num_attention_heads."""
    max_position_embeddings: int = 2048
    """Longest sequence (prompt + protein span + answer) in tokens, for the rotary tables."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the token embedding with the output head (TinyLlama does not)."""
    attn_implementation: str = "sdpa"
    """'sdpa' (PyTorch fused attention) or 'eager'."""
    dtype: str = "float32"
    """Parameter dtype when built or loaded: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        check_choice(self.attn_implementation, "attn_implementation", ["sdpa", "eager"])
        check_choice(self.dtype, "dtype", ["float32", "bfloat16", "float16"])
        if self.path is None:
            for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                         "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
                check_range(getattr(self, name), name, lo=1)
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
                )
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError(
                    f"num_key_value_heads={self.num_key_value_heads} must divide "
                    f"num_attention_heads={self.num_attention_heads}"
                )

    @classmethod
    def preset(cls, name: str) -> "LLMConfig":
        return from_dict(cls, model_sizes("llm", name))

    def with_path(self, path: str | Path) -> "LLMConfig":
        return replace(self, path=str(path))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class LLMLoadError(SepitError, ValueError):
    """A local LLM folder is missing or holds something SEPIT cannot use; names the folder."""


def llama_config(cfg: LLMConfig, vocab_size: int | None = None):
    """The transformers ``LlamaConfig`` for a config-built model (``vocab_size`` overrides)."""
    from transformers import LlamaConfig

    hf = LlamaConfig(
        vocab_size=vocab_size or cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
    )
    hf._attn_implementation = cfg.attn_implementation
    return hf


def build_llm(cfg: LLMConfig, vocab_size: int | None = None) -> nn.Module:
    """Build (from sizes) or load (from ``cfg.path``) the causal LM; never touches a hub.

    Built models get ``vocab_size`` rows (default ``cfg.vocab_size``); the caller resizes a
    loaded model to its tokenizer.  Honours an enclosing ``torch.device("meta")`` context for
    shape-only builds.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.path is None:
        model = LlamaForCausalLM(llama_config(cfg, vocab_size))
        return model.to(cfg.torch_dtype)
    folder = Path(cfg.path)
    if not (folder / "config.json").is_file():
        raise LLMLoadError(f"LLM folder {folder} does not exist or has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=cfg.torch_dtype,
            attn_implementation=cfg.attn_implementation,
        )
    except (OSError, ValueError) as exc:
        raise LLMLoadError(f"cannot load the causal LM in {folder}: {exc}") from exc
    decoder_layers(model)  # fail now, with the folder named, if the layout is not Llama-like
    return model


def build_llm_from_hf_config(hf_config: dict) -> nn.Module:
    """Rebuild a causal LM (random weights) from a saved ``config.to_dict()``, offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(hf_config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise LLMLoadError("saved LLM config has no model_type")
    attn = data.pop("_attn_implementation", None) or data.pop("attn_implementation", None) or "sdpa"
    hf = AutoConfig.for_model(model_type, **data)
    hf._attn_implementation = attn
    dtype = data.get("dtype") or data.get("torch_dtype") or "float32"
    model = AutoModelForCausalLM.from_config(hf)
    return model.to(getattr(torch, str(dtype).replace("torch.", "")))


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (plain or wrapped by peft), each with an ``mlp``."""
    base = llm
    if hasattr(base, "get_base_model"):  # peft PeftModel
        base = base.get_base_model()
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "mlp") for layer in layers):
        raise LLMLoadError(
            f"{type(base).__name__} is not a Llama-family causal LM (expected model.layers[i].mlp)"
        )
    return layers


def input_embeddings(llm: nn.Module) -> nn.Embedding:
    return llm.get_input_embeddings()


def count_parameters(module: nn.Module) -> int:
    """Parameters of ``module``, counting tied (shared) tensors once; works on the meta device."""
    return sum(p.numel() for p in module.parameters())
