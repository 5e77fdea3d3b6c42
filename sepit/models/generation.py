"""Batched decoding from spliced, left-padded embeddings with a preallocated KV cache.

A small explicit loop rather than ``transformers.generate`` because the prompt is embeddings
(protein vectors spliced in), position ids must skip left padding, and MoE blocks need to know
which tokens are padding during the prefill.  Greedy decoding here equals a cache-free greedy
loop (tested); sampling uses temperature and nucleus (top-p) filtering.

:class:`DecodeBatch` holds the rows being decoded together: their KV cache (keys/values written
in place into buffers allocated once, :class:`PreallocatedKVLayer`), attention mask and next
positions.  Rows can leave (:meth:`DecodeBatch.keep`, finished sequences stop costing compute)
and newly prefilled rows can join (:meth:`DecodeBatch.concat`, left-aligned caches), which is
what the serving replica's iteration-level batching is built on.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from sepit.config.base import ConfigError
from sepit.models.moe import set_moe_token_mask

# Extra cache columns allocated beyond what is needed right now, so that decode steps write in
# place; a batch outgrowing its buffers doubles them (amortised O(1) copies per token).
MIN_HEADROOM = 64


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def _cache_kwarg(llm: nn.Module) -> str:
    # transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated).
    params = inspect.signature(llm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] (any dtype) -> [B] token ids; softmax and filtering in fp32."""
    logits = logits.float()
    if not cfg.do_sample:
        return logits.argmax(-1)
    return sample_tokens(logits, torch.full((logits.shape[0],), cfg.temperature, device=logits.device),
                         torch.full((logits.shape[0],), cfg.top_p, device=logits.device), generator)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] fp32, per-row temperature [B] (> 0) and top_p [B] in (0, 1] -> [B] ids."""
    probs = (logits / temperature[:, None]).softmax(-1)
    if bool((top_p < 1.0).any()):
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- the KV cache
class PreallocatedKVLayer(DynamicLayer):
    """One attention layer's keys/values in buffers [B, H, capacity, d] written in place.

    ``keys`` / ``values`` are views of the first ``length`` columns, so attention reads exactly
    what a growing cache would hold, without a ``torch.cat`` (a full copy) per decode step.
    """

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k: Optional[torch.Tensor] = None
        self._v: Optional[torch.Tensor] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, T, d = key_states.shape
        self.device = key_states.device
        cap = max(self.capacity, T + MIN_HEADROOM)
        self._k = key_states.new_zeros(B, H, cap, d)
        self._v = value_states.new_zeros(B, H, cap, value_states.shape[-1])
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self._k[:, :, :self.length]
        self.values = self._v[:, :, :self.length]

    def reserve(self, total: int) -> None:
        """Make room for ``total`` columns (doubling), keeping the cached ones."""
        if self._k is None or total <= self._k.shape[2]:
            return
        cap = max(total, 2 * self._k.shape[2])
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)
        self._views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.reserve(end)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def drop_left(self, n: int) -> None:
        """Forget the first ``n`` columns (padding of every row) by shifting the rest left."""
        if n <= 0 or not self.is_initialized:
            return
        keep = self.length - n
        self._k[:, :, :keep] = self._k[:, :, n:self.length].clone()
        self._v[:, :, :keep] = self._v[:, :, n:self.length].clone()
        self.length = keep
        self._views()


class PreallocatedKVCache(DynamicCache):
    """A transformers cache whose layers are :class:`PreallocatedKVLayer` (one per LLM layer)."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        Cache.__init__(self, layers=[PreallocatedKVLayer(capacity) for _ in range(num_layers)])


def _num_layers(llm: nn.Module) -> int:
    cfg = llm.config.get_text_config(decoder=True) if hasattr(llm.config, "get_text_config") else llm.config
    return int(cfg.num_hidden_layers)


def _concat_layers(a: PreallocatedKVLayer, b: PreallocatedKVLayer, width: int, capacity: int) -> PreallocatedKVLayer:
    """Rows of ``a`` then ``b`` in a new layer of ``width`` columns, each right-aligned (left padding)."""
    out = PreallocatedKVLayer(capacity)
    k0 = a._k
    B = a._k.shape[0] + b._k.shape[0]
    out._k = k0.new_zeros(B, k0.shape[1], capacity, k0.shape[3])
    out._v = a._v.new_zeros(B, a._v.shape[1], capacity, a._v.shape[3])
    for src, rows in ((a, slice(0, a._k.shape[0])), (b, slice(a._k.shape[0], B))):
        out._k[rows, :, width - src.length:width] = src._k[:, :, :src.length]
        out._v[rows, :, width - src.length:width] = src._v[:, :, :src.length]
    out.device, out.length, out.is_initialized = a.device, width, True
    out._views()
    return out


class DecodeBatch:
    """Rows decoded together: KV cache, attention mask [B, T], next positions [B, 1], last logits [B, V].

    Rows are left-aligned: every row's newest token sits in the last cache column, so one decode
    step appends one column for all rows.  A row's padding columns are masked out.
    """

    def __init__(self, model: nn.Module, llm: nn.Module, cache: PreallocatedKVCache, mask: torch.Tensor,
                 next_pos: torch.Tensor, logits: torch.Tensor) -> None:
        self.model, self.llm = model, llm
        self.cache, self.mask, self.next_pos, self.logits = cache, mask, next_pos, logits
        self._embed = llm.get_input_embeddings()
        self._cache_name = _cache_kwarg(llm)

    @classmethod
    @torch.no_grad()
    def prefill(cls, model: nn.Module, llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, max_new_tokens: int) -> "DecodeBatch":
        """Run the prompt (inputs_embeds [B, T, D] left-padded) and keep room for ``max_new_tokens``."""
        T = inputs_embeds.shape[1]
        cache = PreallocatedKVCache(_num_layers(llm), T + max_new_tokens)
        set_moe_token_mask(model, attention_mask)
        try:
            # logits_to_keep=1: only the last position's logits are needed ([B, 1, V], not [B, T, V]).
            out = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, logits_to_keep=1, **{_cache_kwarg(llm): cache})
        finally:
            set_moe_token_mask(model, None)
        # Left padding keeps every row's last token last, so its next position is last + 1.
        return cls(model, llm, cache, attention_mask, position_ids[:, -1:] + 1, out.logits[:, -1])

    def __len__(self) -> int:
        return self.mask.shape[0]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> None:
        """Feed one token per row (tokens [B]) and compute the next logits."""
        B = tokens.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        out = self.llm(inputs_embeds=self._embed(tokens[:, None]), attention_mask=self.mask,
                       position_ids=self.next_pos, use_cache=True, logits_to_keep=1,
                       **{self._cache_name: self.cache})
        self.logits = out.logits[:, -1]
        self.next_pos = self.next_pos + 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (finished sequences leave: later steps cost nothing for them)."""
        if len(rows) == len(self):
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos, self.logits = self.mask[idx], self.next_pos[idx], self.logits[idx]
        # Columns that are padding for every remaining row carry nothing: drop them.
        pad = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if pad:
            for layer in self.cache.layers:
                layer.drop_left(pad)
            self.mask = self.mask[:, pad:]

    def concat(self, other: "DecodeBatch", headroom: int) -> None:
        """Append ``other``'s rows (freshly prefilled) to this batch; ``headroom`` columns are reserved."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        capacity = width + max(headroom, MIN_HEADROOM)
        self.cache.layers = [_concat_layers(a, b, width, capacity)
                             for a, b in zip(self.cache.layers, other.cache.layers)]
        masks = [m.new_zeros(m.shape[0], width) for m in (self.mask, other.mask)]
        for full, m in zip(masks, (self.mask, other.mask)):
            full[:, width - m.shape[1]:] = m
        self.mask = torch.cat(masks)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.logits = torch.cat([self.logits, other.logits.to(self.logits.dtype)])


# --------------------------------------------------------------------------- the offline loop
def length_buckets(lengths: list[int], ratio: float = 1.3) -> list[list[int]]:
    """Indices sorted by length, split where the longest would exceed ``ratio`` x the shortest.

    Prefilling each bucket separately bounds left padding (padding costs full encoder and
    attention compute) at the price of one more forward call per bucket."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if buckets and lengths[i] <= ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


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
    stop_check: Optional[Callable[[int, list[int]], bool]] = None,
) -> list[list[int]]:
    """Generate up to ``cfg.max_new_tokens`` per row; returns each row's new ids without eos.

    inputs_embeds [B, T, D] left-padded; attention_mask / position_ids [B, T].  ``stop_check(row,
    ids) -> bool`` may end a row early (stop strings).  ``model`` owns the MoE blocks, if any.
    """
    batch = DecodeBatch.prefill(model, llm, inputs_embeds, attention_mask, position_ids, cfg.max_new_tokens)
    return decode_batch(batch, eos_token_id, pad_token_id, cfg, stop_check)


@torch.no_grad()
def decode_batch(batch: DecodeBatch, eos_token_id: int, pad_token_id: int, cfg: SamplingConfig,
                 stop_check: Optional[Callable[[int, list[int]], bool]] = None) -> list[list[int]]:
    """Decode a prefilled batch to the end; each row's new ids without eos, in batch order.

    Without ``stop_check`` no Python runs per row beyond reading the step's tokens; rows that
    end (eos, stop) leave the batch at once.  Run it in the autograd mode the batch was prefilled
    in (``no_grad`` or ``inference_mode``): the cache is written in place.
    """
    B = len(batch)
    device = batch.mask.device
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    # out[b, j] is row b's j-th new token; lengths[b] counts them (eos excluded).
    out = torch.full((B, cfg.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = [0] * B
    rows = list(range(B))  # original index of each row still in the batch
    for step in range(cfg.max_new_tokens):
        tok = next_token(batch.logits, cfg, generator)
        out[rows, step] = tok
        tok_list = tok.tolist()
        keep = []
        for i, b in enumerate(rows):
            if tok_list[i] == eos_token_id:
                continue
            lengths[b] = step + 1
            if stop_check is not None and stop_check(b, out[b, :step + 1].tolist()):
                continue
            keep.append(i)
        if not keep or step == cfg.max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            batch.keep(keep)
            rows = [rows[i] for i in keep]
            tok_list = [tok_list[i] for i in keep]
        batch.step(torch.tensor(tok_list, dtype=torch.long, device=device))
    return [out[b, :lengths[b]].tolist() for b in range(B)]
