"""Sparse upcycling of the LLM feed-forwards into mixtures of experts, and their plain export.

Stage 2 (docs/method.md §4) replaces the chosen decoder blocks' ``mlp`` by a mixture of experts whose
experts all start as copies of that block's stage-1 feed-forward; only the router is new.

* :class:`SepitMoEBlock` (training) wraps ``deepspeed.moe.layer.MoE`` (expert parallelism,
  capacity, token dropping).  ``deepspeed.initialize`` finds it and sets its expert-parallel
  group; with ``ep_size=1`` it also runs without any process group.
* :class:`MoEFeedForward` (inference) is plain PyTorch with the same maths and no capacity (no
  token is ever dropped): router ``Linear`` on fp32 inputs, softmax in fp32, top-k, combine
  weights as DeepSpeed's gates (top-1: the raw top probability, *not* renormalised; top-k ≥ 2:
  renormalised over the chosen k), weighted sum accumulated in fp32.

Both expose the same statistics after each forward: ``aux_loss`` (DeepSpeed's load-balancing
loss l_aux) and ``expert_counts`` ([E] tokens routed to each expert, padding excluded, before
any capacity drop).  Padding is excluded through a token mask set by the owning model
(:func:`set_moe_token_mask`); DeepSpeed's top-1 gate also takes it as ``used_token``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sepit.config.base import ConfigError, check_range
from sepit.models.llm import decoder_layers


@dataclass
class MoEConfig:
    num_experts: int = 4
    """Experts per upcycled layer."""
    top_k: int = 1
    """Experts per token (top-1 keeps the dense model's activated parameter count)."""
    capacity_factor: float = 1.25
    """Training capacity: ceil(tokens / experts * factor * k) slots per expert; overflow is dropped."""
    eval_capacity_factor: float = 2.0
    """Capacity factor of the DeepSpeed block in eval mode (the exported block has no capacity)."""
    min_capacity: int = 0
    """Lower bound on slots per expert.  DeepSpeed also asserts tokens >= min_capacity, which a
    one-token decoding step would break, hence 0 by default."""
    layers: list[int] | str = "all"
    """Decoder blocks to upcycle: "all" or a list of block indices."""
    aux_loss_coef: float = 0.01
    """Weight of the summed load-balancing losses in the training loss."""
    ep_size: int = 1
    """Expert-parallel group size (num_experts must be divisible by it); ranks may hold different
    token counts (the block pads to the group maximum before DeepSpeed's all-to-all)."""
    exported: bool = False
    """True once the blocks are plain-PyTorch MoEFeedForward (set by export_for_inference)."""

    def __post_init__(self) -> None:
        check_range(self.num_experts, "num_experts", lo=1)
        check_range(self.top_k, "top_k", lo=1, hi=self.num_experts)
        check_range(self.capacity_factor, "capacity_factor", lo=0.0, lo_inclusive=False)
        check_range(self.eval_capacity_factor, "eval_capacity_factor", lo=0.0, lo_inclusive=False)
        check_range(self.min_capacity, "min_capacity", lo=0)
        check_range(self.aux_loss_coef, "aux_loss_coef", lo=0.0)
        check_range(self.ep_size, "ep_size", lo=1)
        if self.num_experts % self.ep_size:
            raise ConfigError(f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ConfigError(f"layers={self.layers!r}: use 'all' or a list of layer indices")


class _MoEStats(nn.Module):
    """Shared bookkeeping: the padding mask for the next forward and the last forward's stats."""

    num_experts: int
    top_k: int

    def _init_stats(self) -> None:
        self.token_mask: torch.Tensor | None = None  # [B*T] bool (True = real token) or None
        self.aux_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None

    def _flat_mask(self, num_tokens: int) -> torch.Tensor | None:
        if self.token_mask is None:
            return None
        mask = self.token_mask.reshape(-1)
        if mask.numel() != num_tokens:
            raise ValueError(
                f"MoE token mask covers {mask.numel()} tokens but the block got {num_tokens}; "
                "set_moe_token_mask() must match the LLM input batch"
            )
        return mask

    def _record_counts(self, logits_fp32: torch.Tensor, mask: torch.Tensor | None) -> None:
        # Router assignments before any capacity drop; padding tokens are not counted.
        top = logits_fp32.topk(self.top_k, dim=-1).indices  # [S, k]
        chosen = F.one_hot(top, self.num_experts).sum(1)  # [S, E]
        if mask is not None:
            chosen = chosen * mask[:, None].to(chosen.dtype)
        self.expert_counts = chosen.sum(0).detach()


class SepitMoEBlock(_MoEStats):
    """Training-time MoE feed-forward: DeepSpeed MoE whose experts start as ``dense_mlp`` copies.

    ``forward(hidden [B, T, D]) -> [B, T, D]`` like the dense MLP it replaces.
    """

    def __init__(self, dense_mlp: nn.Module, hidden_size: int, cfg: MoEConfig) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        # DeepSpeed deep-copies `dense_mlp` once per local expert (upcycling); the gate `wg` is new.
        # The second-expert Gumbel sampling of DeepSpeed's top-2 gate also fires in eval mode, so
        # it is off: routing is deterministic and matches the exported block.
        self.moe = MoE(
            hidden_size=hidden_size,
            expert=dense_mlp,
            num_experts=cfg.num_experts,
            ep_size=cfg.ep_size,
            k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.eval_capacity_factor,
            min_capacity=cfg.min_capacity,
            drop_tokens=True,
            use_rts=True,
            top2_2nd_expert_sampling=False,
        )
        self._init_stats()

    @property
    def router(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    @property
    def experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])  # [S, D]
        n_tokens = flat.shape[0]
        mask = self._flat_mask(n_tokens)
        # DeepSpeed's top-1 gate multiplies its routing mask by `used_token` (padding gets no
        # expert, no capacity slot and a zero output); other k ignore it.
        used = None if mask is None else mask.to(torch.float32)
        flat_in, used = self._pad_to_group_max(flat, used)
        out, l_aux, _ = self.moe(flat_in.unsqueeze(0), used_token=used)
        self.aux_loss = l_aux
        with torch.no_grad():
            self._record_counts(F.linear(flat.float(), self.router.weight.float()), mask)
        return out[0, :n_tokens].reshape(shape)

    def _pad_to_group_max(self, flat: torch.Tensor, used: torch.Tensor | None):
        """With expert parallelism every rank must send equal [E, capacity, D] buffers through the
        all-to-all, and DeepSpeed derives capacity from the local token count: pad the tokens to
        the expert group's largest count (zero rows, ``used_token`` 0, so top-1 routes them
        nowhere; top-k ≥ 2 gates ignore ``used_token`` and route them like any token)."""
        group = self.moe.deepspeed_moe.ep_group
        if self.moe.ep_size == 1 or group is None:
            return flat, used
        import torch.distributed as dist

        n = torch.tensor([flat.shape[0]], device=flat.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
        extra = int(n) - flat.shape[0]
        if extra == 0:
            return flat, used
        if used is None:
            used = flat.new_ones(flat.shape[0], dtype=torch.float32)
        flat = torch.cat([flat, flat.new_zeros(extra, flat.shape[1])])
        return flat, torch.cat([used, used.new_zeros(extra)])


class MoEFeedForward(_MoEStats):
    """Inference MoE feed-forward in plain PyTorch: DeepSpeed's maths without capacity."""

    def __init__(self, experts: Sequence[nn.Module], hidden_size: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = len(experts), top_k
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(experts)
        self._init_stats()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])  # [S, D]
        mask = self._flat_mask(flat.shape[0])
        logits = F.linear(flat.float(), self.router.weight.float())  # [S, E], fp32 like DeepSpeed
        gates = logits.softmax(dim=-1)
        top_gate, top_idx = gates.topk(self.top_k, dim=-1)  # [S, k]
        if self.top_k > 1:  # DeepSpeed renormalises top-2 / top-k gates, not top-1
            top_gate = top_gate / top_gate.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
        if mask is not None:
            top_gate = top_gate * mask[:, None].to(top_gate.dtype)
        self.aux_loss = _load_balancing_loss(gates, top_idx, self.top_k, mask)
        self._record_counts(logits.detach(), mask)

        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (top_idx == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y = expert(flat[token_idx]).float() * top_gate[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out.to(hidden.dtype).reshape(shape)


def _load_balancing_loss(gates: torch.Tensor, top_idx: torch.Tensor, k: int,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """DeepSpeed's l_aux: E·Σ_e mean(gate_e)·frac(top-1 = e) for k = 1, its top-2/top-k forms else."""
    num_experts = gates.shape[-1]
    me = gates.mean(0)
    if k <= 2:
        first = F.one_hot(top_idx[:, 0], num_experts).float()
        if k == 1 and mask is not None:
            first = first * mask[:, None].float()
        ce = first.mean(0)
        return (me * ce).sum() * num_experts if k == 1 else (me * ce).mean() * num_experts**2
    chosen = F.one_hot(top_idx, num_experts).sum(1).clamp_max(1).float()
    return (me * chosen.mean(0)).mean() * num_experts**2 / k


# --------------------------------------------------------------------------- whole-model operations
def _resolve_llm(model: nn.Module) -> nn.Module:
    return getattr(model, "llm", model)


def _layer_indices(layers: list[int] | str, n: int) -> list[int]:
    if layers == "all":
        return list(range(n))
    bad = [i for i in layers if not 0 <= i < n]
    if bad or len(set(layers)) != len(layers):
        raise ConfigError(f"MoE layers {list(layers)} must be distinct indices in [0, {n})")
    return sorted(layers)


def upcycle_to_moe(model: nn.Module, config: MoEConfig | None = None, *, use_deepspeed: bool = True,
                   **fields: Any) -> nn.Module:
    """Replace the chosen decoder blocks' dense ``mlp`` by MoE blocks (sparse upcycling), in place.

    ``config`` is the :class:`MoEConfig` to apply, or its fields are given as keywords
    (``upcycle_to_moe(model, num_experts=4, top_k=1)``; the rest keep their defaults).
    ``model`` is a SEPIT model (its ``.llm`` is used and ``model.config.moe`` is recorded) or a
    bare causal LM.  ``use_deepspeed=False`` builds :class:`MoEFeedForward` blocks directly (same
    initialisation: experts are copies of the dense MLP, the router is a fresh ``Linear``).
    """
    if config is not None and fields:
        raise TypeError(f"upcycle_to_moe: give a MoEConfig or its fields {sorted(fields)}, not both")
    cfg = dataclasses.replace(config or MoEConfig(**fields), exported=not use_deepspeed)
    blocks = decoder_layers(_resolve_llm(model))
    if any(isinstance(b.mlp, _MoEStats) for b in blocks):
        raise ValueError("model is already upcycled to MoE")
    for i in _layer_indices(cfg.layers, len(blocks)):
        dense = blocks[i].mlp
        hidden = _hidden_size(dense)
        if use_deepspeed:
            block = SepitMoEBlock(dense, hidden, cfg)
        else:
            block = MoEFeedForward([copy.deepcopy(dense) for _ in range(cfg.num_experts)], hidden, cfg.top_k)
        blocks[i].mlp = block.to(next(dense.parameters()).device)
    sepit_config = getattr(model, "config", None)
    if hasattr(sepit_config, "moe"):
        sepit_config.moe = cfg
    return model


def _hidden_size(mlp: nn.Module) -> int:
    for name in ("down_proj", "fc2", "c_proj"):
        layer = getattr(mlp, name, None)
        if isinstance(layer, nn.Linear):
            return layer.out_features
    raise ValueError(f"cannot tell the hidden size of feed-forward {type(mlp).__name__}")


def moe_blocks(model: nn.Module) -> Iterator[tuple[int, _MoEStats]]:
    """(layer index, MoE block) for every upcycled decoder block."""
    try:
        blocks = decoder_layers(_resolve_llm(model))
    except ValueError:
        return
    for i, layer in enumerate(blocks):
        if isinstance(layer.mlp, _MoEStats):
            yield i, layer.mlp


def set_moe_token_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> None:
    """Tell every MoE block which of the next forward's tokens are real ([B, T], 1 = real)."""
    flat = None if attention_mask is None else attention_mask.reshape(-1).bool()
    for _, block in moe_blocks(model):
        block.token_mask = flat


def clear_moe_stats(model: nn.Module) -> None:
    for _, block in moe_blocks(model):
        block.aux_loss = None
        block.expert_counts = None


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Σ over layers of the last forward's l_aux (None when the model has no MoE block)."""
    losses = [b.aux_loss for _, b in moe_blocks(model) if b.aux_loss is not None]
    return torch.stack([loss.float() for loss in losses]).sum() if losses else None


def moe_stats(model: nn.Module) -> dict[int, list[int]]:
    """Tokens routed to each expert in the last forward, per upcycled layer (padding excluded)."""
    return {i: b.expert_counts.tolist() for i, b in moe_blocks(model) if b.expert_counts is not None}


def export_for_inference(model: nn.Module) -> nn.Module:
    """Convert every :class:`SepitMoEBlock` to a :class:`MoEFeedForward`, in place (same weights)."""
    for i, block in list(moe_blocks(model)):
        if not isinstance(block, SepitMoEBlock):
            continue
        experts = [copy.deepcopy(e) for e in block.experts]
        for expert in experts:  # drop DeepSpeed's expert-parallel tags: plain parameters now
            for p in expert.parameters():
                for attr in ("allreduce", "group_name"):
                    if hasattr(p, attr):
                        delattr(p, attr)
        plain = MoEFeedForward(experts, block.router.in_features, block.top_k)
        plain.router.weight.data.copy_(block.router.weight.data)
        plain.train(block.training)
        decoder_layers(_resolve_llm(model))[i].mlp = plain.to(block.router.weight.device)
    cfg = getattr(getattr(model, "config", None), "moe", None)
    if isinstance(cfg, MoEConfig):
        cfg.exported = True
    return model


# DeepSpeed block parameter names <-> plain block names, e.g.
#   layers.3.mlp.moe.deepspeed_moe.gate.wg.weight                          <-> layers.3.mlp.router.weight
#   layers.3.mlp.moe.deepspeed_moe.experts.deepspeed_experts.2.up_proj.weight <-> layers.3.mlp.experts.2.up_proj.weight
_DS_TO_PLAIN = [
    (re.compile(r"\.mlp\.moe\.deepspeed_moe\.gate\.wg\."), ".mlp.router."),
    (re.compile(r"\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\."), ".mlp.experts."),
]


def plain_moe_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename DeepSpeed MoE entries of a state dict to the plain :class:`MoEFeedForward` layout."""
    out = {}
    for name, tensor in state.items():
        for pattern, repl in _DS_TO_PLAIN:
            name = pattern.sub(repl, name)
        out[name] = tensor
    return out


def deepspeed_moe_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`plain_moe_state_dict` (to resume DeepSpeed training from a saved folder)."""
    out = {}
    for name, tensor in state.items():
        name = re.sub(r"\.mlp\.router\.", ".mlp.moe.deepspeed_moe.gate.wg.", name)
        name = re.sub(r"\.mlp\.experts\.", ".mlp.moe.deepspeed_moe.experts.deepspeed_experts.", name)
        out[name] = tensor
    return out


def split_moe_param_groups(groups: list[dict]) -> list[dict]:
    """Split optimizer groups so expert parameters get their own groups, as DeepSpeed requires.

    Each group needs a ``name``.  Wraps
    ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    missing = [i for i, g in enumerate(groups) if "name" not in g]
    if missing:
        raise ValueError(f"parameter groups {missing} have no 'name' (DeepSpeed keys MoE groups by it)")
    return split_params_into_different_moe_groups_for_optimizer([dict(g) for g in groups])


def moe_metrics(counts: dict[int, list[int]], prefix: str = "moe") -> dict[str, float]:
    """Flatten :func:`moe_stats` output into loggable metrics: per-expert token fractions and the
    busiest expert's fraction per layer (1/E is perfectly balanced, 1.0 is collapsed)."""
    metrics: dict[str, float] = {}
    for layer, layer_counts in counts.items():
        total = sum(layer_counts) or 1
        for e, c in enumerate(layer_counts):
            metrics[f"{prefix}/layer{layer}/expert{e}_frac"] = c / total
        metrics[f"{prefix}/layer{layer}/max_frac"] = max(layer_counts) / total
    return metrics
