"""Batched decoding from spliced, left-padded embeddings with a KV cache.

A small explicit loop rather than ``transformers.generate`` because the prompt is embeddings
(protein vectors spliced in), position ids must skip left padding, and MoE blocks need to know
which tokens are padding during the prefill.  Greedy decoding here equals a cache-free greedy
loop (tested); sampling uses temperature and nucleus (top-p) filtering.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from sepit.models.moe import set_moe_token_mask


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _cache_kwarg(llm: nn.Module) -> str:
    # transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated).
    params = inspect.signature(llm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] (any dtype) -> [B] token ids; softmax and filtering in fp32."""
    logits = logits.float()
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = (logits / cfg.temperature).softmax(-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_from_embeddings(
    model: nn.Module,
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    eos_token_id: int,
    pad_token_id: int,
    cfg: SamplingConfig,
    stop_check=None,
) -> list[list[int]]:
    """Generate up to ``cfg.max_new_tokens`` per row; returns each row's new ids without eos.

    inputs_embeds [B, T, D] left-padded; attention_mask / position_ids [B, T].  ``stop_check(row,
    ids) -> bool`` may end a row early (stop strings).  ``model`` owns the MoE blocks, if any.
    """
    B = inputs_embeds.shape[0]
    device = inputs_embeds.device
    embed = llm.get_input_embeddings()
    cache_name = _cache_kwarg(llm)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    set_moe_token_mask(model, attention_mask)
    try:
        out = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=True)
    finally:
        set_moe_token_mask(model, None)
    cache = _returned_cache(out)
    logits = out.logits[:, -1]
    mask = attention_mask
    next_pos = position_ids[:, -1:] + 1  # [B, 1]; left padding keeps every row's last token last
    generated: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, generator)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        for b in (~done).nonzero().flatten().tolist():
            t = int(tok[b])
            if t == eos_token_id:
                done[b] = True
            else:
                generated[b].append(t)
                if stop_check is not None and stop_check(b, generated[b]):
                    done[b] = True
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = llm(inputs_embeds=embed(tok[:, None]), attention_mask=mask, position_ids=next_pos,
                  use_cache=True, **{cache_name: cache})
        cache = _returned_cache(out)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return generated
