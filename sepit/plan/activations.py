"""Activation memory: bytes of the tensors autograd saves for backward, per part of a stage.

Counted per op from what each op saves (``e`` = bytes per element of the training dtype: 2 in
bf16, 4 in fp32; ``N`` = tokens of the longest micro-batch):

* ESM-2 layer (per protein token): LayerNorm inputs 2·e·D (+ fp32 mean/rstd 16 B), normed inputs of
  the q/k/v and fc1 projections 2·e·D, SDPA's q, k, v and output 4·e·D (+ fp32 logsumexp 4·H),
  fc1 output and GELU output 8·e·D: **16·e·D** per layer.  Stage 1 keeps L - 1 layers (the LLM
  reads the second-to-last layer; the last layer's graph dies with the encoder's output), stage 0
  all L, stage 2 none (frozen encoder, no grad).
* Structure: the additive attention mask [B, H, L, L] in e bytes (one tensor shared by every
  layer); stage 0's denoising head also keeps 4 fp32 [B, H, L, L] tensors (softmax output, three
  direction-weighted products) and the unit vectors [B, L, L, 3] in fp32.
* Llama block (per LLM token): two RMSNorms 2·(4·h + e·h) (fp32 input, e-byte output), SDPA's
  q, k, v (k and v repeated to all heads when a padding mask is given, as in training) and output
  4·e·h (+ 4·heads), SwiGLU 4·e·i (gate, SiLU output, up, product): **20·e·h + 4·e·i** in bf16
  terms (4·h of it is the fp32 norm inputs).  The 4-D mask [B, 1, T, T] in e bytes is shared.
* MoE block (stage 2) instead of the SwiGLU: fp32 router input 4·h and gates 4·E, expert inputs
  and SwiGLU on ``top_k · capacity_factor`` slots per token (e·h + 4·e·i each), the routed outputs
  k·e·h.
* Head: final RMSNorm 4·h + e·h and the fp32 log-softmax of the cross-entropy 4·V per token.
* With activation checkpointing of the LLM blocks each block keeps only its input (e·h per token)
  and one block's activations are rebuilt at a time during backward.

``device="cpu"``: CPU matmul kernels copy a linear layer's 3-D input to 2-D before saving it
where CUDA saves a view; for RMSNorm outputs (also saved by the norm weight's multiply) that is
2·e·h more per Llama block.  Tests measure the CPU variant; GPUs use the default.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ActivationShapes:
    micro_batch: int
    """Examples per GPU per forward."""
    encoder_tokens: int
    """Protein tokens incl. <cls>/<eos> of the longest protein (residues + 2)."""
    encoder_dim: int
    encoder_heads: int
    encoder_layers: int
    structure: bool
    """Encoder has the 3D structure bias (an [B, H, L, L] attention mask)."""
    num_rbf: int
    chunk_size: int
    stage: int
    encoder_trained: bool
    llm_tokens: int = 0
    """Prompt + protein span + answer, capped at the LLM's max positions."""
    vocab: int = 0
    llm_hidden: int = 0
    llm_intermediate: int = 0
    llm_layers: int = 0
    llm_heads: int = 1
    llm_kv_heads: int = 1
    moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 1
    capacity_factor: float = 1.25
    text_tokens: int = 0


def esm_layer_bytes(e: int, D: int, H: int, L: int, device: str = "cuda") -> int:
    """Saved bytes per protein token of one ESM-2 layer (module docstring)."""
    norms = 2 * e * D + 2 * e * D + 4 * 4  # LayerNorm inputs, normed q/k/v and fc1 inputs, mean/rstd
    gelu = 4 * 4 * e * D  # fair-esm's erf GELU keeps x/√2, x/2, 1 + erf and their product (4·D each)
    if device == "cpu":
        # CPU SDPA with a mask that needs a gradient runs the math kernel: fp32 q, kᵀ, v and the
        # fp32 probabilities [H, L] per query; plus the 2-D copies of the out_proj/fc1/qkv inputs.
        attention = 3 * 4 * D + 4 * H * L + e * D + 2 * e * D
    else:
        attention = 4 * e * D + 4 * H  # memory-efficient SDPA: q, k, v, output, fp32 logsumexp
    return norms + gelu + attention


def llama_layer_bytes(s: ActivationShapes, e: int, device: str, moe: bool) -> float:
    """Saved bytes per LLM token of one Llama block (dense or MoE feed-forward)."""
    h, i = s.llm_hidden, s.llm_intermediate
    attention = 2 * (4 * h + e * h) + 4 * e * h + 4 * s.llm_heads
    if moe:
        slots = s.top_k * s.capacity_factor  # expert slots per token (capacity incl. unused ones)
        ffn = 4 * h + 4 * s.num_experts + slots * (e * h + 4 * e * i) + s.top_k * e * h
    else:
        ffn = 4 * e * i
    cpu_copies = 2 * e * h if device == "cpu" else 0
    return attention + ffn + cpu_copies


def activation_bytes(s: ActivationShapes, e: int, *, checkpointing: bool, device: str = "cuda") -> dict[str, int]:
    """Saved-for-backward bytes per GPU of the longest micro-batch, by part."""
    B, L = s.micro_batch, s.encoder_tokens
    out: dict[str, int] = {}
    if s.encoder_trained:
        kept = s.encoder_layers if s.stage == 0 else s.encoder_layers - 1
        per_token = esm_layer_bytes(e, s.encoder_dim, s.encoder_heads, L, device)
        # embeddings, final norm (+ stage 0's LM head: dense, GELU, norm, logits) per token
        extra = (2 * e * s.encoder_dim + 16) + (4 * e * s.encoder_dim + 33 * e if s.stage == 0 else 0)
        out["encoder_layers"] = int(B * L * (kept * per_token + extra))
        if s.structure:
            out["structure_mask"] = int(B * s.encoder_heads * L * L * e)
    if s.stage == 0:
        # denoising head: 4 fp32 [B, H, L, L] + fp32 unit vectors [B, L, L, 3] + its q/k/v inputs
        out["denoise_head"] = int(B * (16 * s.encoder_heads * L * L + 12 * L * L + 4 * 4 * s.encoder_dim * L))
        return out
    T, h = s.llm_tokens, s.llm_hidden
    N = B * T
    out["projector"] = int(B * L * e * (s.encoder_dim + 2 * h))
    dense_layers = s.llm_layers - s.moe_layers
    per_block = [llama_layer_bytes(s, e, device, moe=False)] * dense_layers \
        + [llama_layer_bytes(s, e, device, moe=True)] * s.moe_layers
    if checkpointing:
        out["llm_blocks"] = int(N * (s.llm_layers * e * h + max(per_block)))
    else:
        out["llm_blocks"] = int(N * sum(per_block))
    out["llm_mask"] = int(B * T * T * e)
    out["embeddings_and_head"] = int(N * (e * h + 4 * h + e * h + 4 * s.vocab))
    return out

