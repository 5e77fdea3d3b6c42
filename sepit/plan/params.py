"""Closed-form parameter counts of each stage's model, from the preset configs (no model built).

Layouts counted (checked against meta-device builds in ``tests/test_plan.py``):

* fair-esm ESM-2: token embedding ``33·D``; per layer ``12·D² + 13·D`` (q, k, v, out with biases,
  two LayerNorms, fc1 ``D→4D``, fc2 ``4D→D``); final LayerNorm ``2D``; LM head ``D² + 3D + 33``
  (dense, LayerNorm, bias; its weight is tied to the embedding); contact head ``layers·heads + 1``.
  ESM-2 650M = 651,043,254.
* structure bias: Gaussian basis ``2K``, pair MLP ``K² + K + K·H + H``, edge projection ``K·D + D``.
* Llama: embedding and untied head ``2·V·h``; per layer ``2h² + 2·h·kv + 3·h·i + 2h``; final
  RMSNorm ``h`` (``kv = h · kv_heads / heads``).  TinyLlama-1.1B at V = 32000: 1,100,048,384.
* MoE (stage 2): each upcycled layer's MLP becomes ``E`` copies (``3·h·i`` each) + a router ``h·E``.
* Frozen parts: stages 1-2 never train the encoder's last layer, final norm, LM and contact heads
  (the LLM reads ``hidden_states[-2]``); stage 2 freezes the whole encoder; stage 0 the text encoder
  and the contact head (fair-esm builds it frozen).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .activations import ActivationShapes

#: fair-esm ESM-1b alphabet size (ESM-2 vocabulary).
ESM_VOCAB = 33
#: <pad>, <bop>, <protein>, <eop> added to a loaded LLM tokenizer (TinyLlama has none of them).
SEPIT_ADDED_TOKENS = 4


@dataclass
class ParamCounts:
    trainable_dense: int
    """Trained parameters that are not MoE experts (replicated on every rank before ZeRO)."""
    expert_total: int
    """Expert parameters over all experts of all MoE layers (0 before stage 2)."""
    frozen: int
    """Parameters held but never trained (weights only)."""
    moe_layers: int = 0
    """Decoder blocks upcycled to MoE."""
    has_structure_bias: bool = True

    @property
    def total(self) -> int:
        return self.trainable_dense + self.expert_total + self.frozen


def esm2_parameters(num_layers: int, embed_dim: int, attention_heads: int) -> dict[str, int]:
    """ESM-2 parts: ``layers`` (all blocks), ``last_layer``, ``embed``, ``heads`` (final norm + LM
    head + contact head)."""
    D = embed_dim
    per_layer = 12 * D * D + 13 * D
    heads = 2 * D + (D * D + 3 * D + ESM_VOCAB) + (num_layers * attention_heads + 1)
    return {"embed": ESM_VOCAB * D, "layers": num_layers * per_layer, "last_layer": per_layer, "heads": heads}


def structure_bias_parameters(num_rbf: int, heads: int, embed_dim: int) -> int:
    K = num_rbf
    return 2 * K + (K * K + K) + (K * heads + heads) + (K * embed_dim + embed_dim)


def llama_parameters(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                     tied: bool = False) -> dict[str, int]:
    """Llama parts: ``embed_head`` (embedding + untied head), ``mlp`` (one block's SwiGLU),
    ``per_layer`` (one whole block), ``total``."""
    kv = hidden * kv_heads // heads
    mlp = 3 * hidden * intermediate
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + mlp + 2 * hidden
    embed_head = vocab * hidden * (1 if tied else 2)
    return {"embed_head": embed_head, "mlp": mlp, "per_layer": per_layer,
            "total": embed_head + layers * per_layer + hidden}


def bert_parameters(config_json: Path) -> int:
    """A transformers BERT (the stage-0 text encoder) with its pooler, from its config.json."""
    c = json.loads(Path(config_json).read_text())
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    emb = (c["vocab_size"] + c["max_position_embeddings"] + c.get("type_vocab_size", 2)) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return emb + n * layer + (h * h + h)


def count_stage_parameters(preset: str, stage: int, *, num_experts: int, vocab_size: int | None,
                           residues: int, answer_tokens: int, prompt_tokens: int, micro_batch: int
                           ) -> tuple[ParamCounts, ActivationShapes]:
    """Parameter counts and activation shapes of ``stage`` built from the recipe ``preset``."""
    from sepit.pipeline import recipe

    steps = recipe(preset)
    enc = steps.stage1.model.encoder
    esm = esm2_parameters(enc.num_layers, enc.embed_dim, enc.attention_heads)
    bias = structure_bias_parameters(enc.num_rbf, enc.attention_heads, enc.embed_dim) if enc.use_structure else 0
    esm_total = sum(v for k, v in esm.items() if k != "last_layer")
    shapes = ActivationShapes(
        micro_batch=micro_batch, encoder_tokens=residues + 2, encoder_dim=enc.embed_dim,
        encoder_heads=enc.attention_heads, encoder_layers=enc.num_layers, structure=enc.use_structure,
        num_rbf=enc.num_rbf, chunk_size=enc.chunk_size, stage=stage, encoder_trained=stage < 2)
    if stage == 0:
        from sepit.models.text_encoder import resolve_text_encoder_path

        cfg = steps.stage0.model
        text_json = resolve_text_encoder_path(cfg.text_encoder_path or None) / "config.json"
        text_dim = json.loads(text_json.read_text())["hidden_size"]
        D, P = enc.embed_dim, cfg.projection_dim
        heads_new = (D * D + D + D * P + P) + (text_dim * text_dim + text_dim + text_dim * P + P) + 1 \
            + 3 * (D * D + D) + D  # protein / text projections, logit scale, denoise head
        shapes.text_tokens = cfg.text_max_length
        contact = esm["heads"] - (2 * D + D * D + 3 * D + ESM_VOCAB)  # fair-esm's contact head: frozen
        return ParamCounts(esm_total - contact + bias + heads_new, 0, bert_parameters(text_json) + contact,
                           has_structure_bias=bool(bias)), shapes

    llm_cfg = steps.stage1.model.llm
    vocab = vocab_size or llm_cfg.vocab_size + SEPIT_ADDED_TOKENS
    llm = llama_parameters(vocab, llm_cfg.hidden_size, llm_cfg.intermediate_size, llm_cfg.num_layers,
                           llm_cfg.num_attention_heads, llm_cfg.num_key_value_heads, llm_cfg.tie_word_embeddings)
    h = llm_cfg.hidden_size
    projector = enc.embed_dim * h + h + h * h + h  # Linear(Dp→h)·GELU·Linear(h→h)
    unused_encoder = esm["last_layer"] + esm["heads"]  # the tied LM-head weight is counted in embed
    shapes.llm_tokens = min(prompt_tokens + residues + 2 + answer_tokens, llm_cfg.max_position_embeddings)
    shapes.vocab, shapes.llm_hidden, shapes.llm_intermediate = vocab, h, llm_cfg.intermediate_size
    shapes.llm_layers, shapes.llm_heads = llm_cfg.num_layers, llm_cfg.num_attention_heads
    shapes.llm_kv_heads = llm_cfg.num_key_value_heads
    encoder_all = esm_total + bias
    if stage == 1:
        return ParamCounts(encoder_all - unused_encoder + projector + llm["total"], 0, unused_encoder,
                           has_structure_bias=bool(bias)), shapes
    from sepit.models.moe import MoEConfig

    moe = MoEConfig(num_experts=num_experts)
    layers = llm_cfg.num_layers if moe.layers == "all" else len(moe.layers)
    shapes.moe_layers, shapes.num_experts, shapes.top_k = layers, num_experts, moe.top_k
    shapes.capacity_factor = moe.capacity_factor
    dense_llm = llm["total"] - layers * llm["mlp"] + layers * h * num_experts  # routers stay dense
    return ParamCounts(projector + dense_llm, layers * num_experts * llm["mlp"], encoder_all, moe_layers=layers,
                       has_structure_bias=bool(bias)), shapes
