"""ProteinEncoder: fair-esm's ESM-2 with a shared 3D structure bias in every attention layer.

Parameter names and layout are exactly those of ``esm.model.esm2.ESM2`` (``embed_tokens``,
``layers.N.self_attn.{q,k,v,out}_proj``, ``layers.N.fc1`` …, ``lm_head``, ``contact_head``), plus
``structure_bias.*``, so real ESM-2 checkpoints (8M … 650M … 15B) load unchanged.  With no
coordinates the encoder computes what fair-esm's ``ESM2`` computes (tested to ≤ 1e-5, fp32).

Attention: ``attention="sdpa"`` uses ``F.scaled_dot_product_attention`` with the additive
[B, H, L, L] bias (structure bias + -inf on padded keys); ``"exact"`` replays fair-esm's
explicit matmul-softmax-matmul (fp32 softmax) for bit-level parity checks.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import esm
import torch
import torch.nn.functional as F
from esm.modules import ContactPredictionHead, ESM1bLayerNorm, RobertaLMHead, TransformerLayer, gelu
from torch import nn

from sepit.config.base import ConfigError, check_choice, check_range, from_dict, to_dict
from sepit.config.recipes import model_sizes
from sepit.errors import SepitError
from sepit.models.io import ModelFolderError, load_state, read_config, save_folder
from sepit.models.structure_bias import GRAPH_MODES, StructureBias, StructureBiasConfig

MODEL_TYPE = "sepit_protein_encoder"


class EncoderInputError(SepitError, ValueError):
    """Tokens / coordinates handed to the encoder are inconsistent; the message says how."""


class EsmCheckpointError(SepitError, ValueError):
    """A fair-esm checkpoint file is missing, unreadable or not an ESM-2 checkpoint."""


@dataclass
class EncoderConfig:
    num_layers: int = 6
    """Transformer layers (ESM-2: 6 / 12 / 30 / 33 / 36 / 48)."""
    embed_dim: int = 320
    """Hidden size D; the FFN is 4·D wide as in ESM-2."""
    attention_heads: int = 20
    """Heads H; embed_dim must divide evenly."""
    alphabet: str = "ESM-1b"
    """fair-esm alphabet name (ESM-2 uses the ESM-1b alphabet)."""
    token_dropout: bool = True
    """ESM-2's <mask>-embedding zeroing and rescaling (True in every released ESM-2)."""
    use_structure: bool = True
    """Build the structure bias; False gives plain ESM-2 (coordinates are then ignored)."""
    num_rbf: int = 128
    """K Gaussian basis functions of the structure bias."""
    chunk_size: int = 64
    """Row chunk of the dense structure bias (memory O(chunk·L·K))."""
    edge_scale: float = 0.01
    """Scale of the structure edge feature added to the token embeddings."""
    structure_graph: str = "dense"
    """dense | radius | knn: where the structure bias is evaluated (see structure_bias.py)."""
    graph_radius: float = 16.0
    """Å, cut-off for structure_graph='radius'."""
    graph_k: int = 32
    """Neighbours for structure_graph='knn'."""
    checkpoint_chunks: bool = True
    """Recompute structure-bias chunks in backward (bounded training memory)."""
    attention: str = "sdpa"
    """sdpa (fused scaled_dot_product_attention) | exact (fair-esm's maths, for parity)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "embed_dim", "attention_heads", "num_rbf", "chunk_size", "graph_k"):
            check_range(getattr(self, name), name, lo=1)
        if self.embed_dim % self.attention_heads:
            raise ConfigError(f"embed_dim={self.embed_dim} is not divisible by attention_heads={self.attention_heads}")
        if (self.embed_dim // self.attention_heads) % 2:
            raise ConfigError("embed_dim / attention_heads must be even (rotary embeddings rotate pairs)")
        check_choice(self.attention, "attention", ("sdpa", "exact"))
        check_choice(self.structure_graph, "structure_graph", GRAPH_MODES)
        check_choice(self.alphabet, "alphabet", ("ESM-1b",))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "EncoderConfig":
        """``tiny`` (tests), ``small`` (ESM-2 8M sizes), ``paper`` (ESM-2 650M sizes)."""
        return from_dict(cls, {**model_sizes("encoder", name), **overrides})

    def structure_bias_config(self) -> StructureBiasConfig:
        return StructureBiasConfig(
            num_heads=self.attention_heads, embed_dim=self.embed_dim, num_rbf=self.num_rbf,
            chunk_size=self.chunk_size, edge_scale=self.edge_scale, graph=self.structure_graph,
            radius=self.graph_radius, knn=self.graph_k, checkpoint_chunks=self.checkpoint_chunks,
        )


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    """[B, L, D] final layer after ``emb_layer_norm_after`` (= fair-esm's last representation)."""
    logits: Optional[torch.Tensor]
    """[B, L, V] masked-LM logits over the alphabet (None when compute_logits=False)."""
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    """num_layers + 1 tensors [B, L, D]: embeddings, then each layer (the last one normed)."""
    structure_bias: Optional[torch.Tensor] = None
    """[B, H, L, L] shared structure bias when coordinates were used and it was requested."""


class StructureAwareLayer(TransformerLayer):
    """fair-esm's pre-LN TransformerLayer (same parameters), batch-first, with an additive bias."""

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor], exact: bool) -> torch.Tensor:
        # x [B, L, D]; attn_bias [B or 1, H or 1, L or 1, L] added to the scaled scores, or None.
        attn = self.self_attn
        B, L, D = x.shape
        H, hd = attn.num_heads, attn.head_dim
        h = self.self_attn_layer_norm(x)
        q = (attn.q_proj(h) * attn.scaling).view(B, L, H, hd).transpose(1, 2)  # [B, H, L, hd]
        k = attn.k_proj(h).view(B, L, H, hd).transpose(1, 2)
        v = attn.v_proj(h).view(B, L, H, hd).transpose(1, 2)
        q, k = attn.rot_emb(q, k)  # rotary on the last two dims; fair-esm applies it after scaling
        if exact:
            scores = q @ k.transpose(-1, -2)  # [B, H, L, L]
            if attn_bias is not None:
                scores = scores + attn_bias
            probs = F.softmax(scores.float(), dim=-1).type_as(scores)  # fp32 softmax as fair-esm
            o = probs @ v
        else:
            # q already carries 1/sqrt(hd), hence scale=1; the mask must match q's dtype (autocast).
            mask = None if attn_bias is None else attn_bias.to(q.dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        x = x + attn.out_proj(o.transpose(1, 2).reshape(B, L, D))
        h = self.final_layer_norm(x)
        return x + self.fc2(gelu(self.fc1(h)))


class ProteinEncoder(nn.Module):
    """Structure-aware ESM-2 (see module docstring); ``encoder.alphabet`` is fair-esm's."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.alphabet = esm.data.Alphabet.from_architecture(config.alphabet)
        a = self.alphabet
        self.padding_idx, self.mask_idx = a.padding_idx, a.mask_idx
        self.cls_idx, self.eos_idx = a.cls_idx, a.eos_idx
        self.embed_scale = 1
        self.embed_tokens = nn.Embedding(len(a), config.embed_dim, padding_idx=a.padding_idx)
        self.layers = nn.ModuleList(
            StructureAwareLayer(
                config.embed_dim, 4 * config.embed_dim, config.attention_heads,
                add_bias_kv=False, use_esm1b_layer_norm=True, use_rotary_embeddings=True,
            )
            for _ in range(config.num_layers)
        )
        # Kept so fair-esm checkpoints load unchanged; SEPIT never uses it, so it is not trained
        # (an unused trainable parameter breaks data-parallel gradient reduction).
        self.contact_head = ContactPredictionHead(
            config.num_layers * config.attention_heads, a.prepend_bos, a.append_eos, eos_idx=a.eos_idx
        ).requires_grad_(False)
        self.emb_layer_norm_after = ESM1bLayerNorm(config.embed_dim)
        self.lm_head = RobertaLMHead(config.embed_dim, len(a), weight=self.embed_tokens.weight)
        self.structure_bias = StructureBias(config.structure_bias_config()) if config.use_structure else None

    @property
    def hidden_size(self) -> int:
        return self.config.embed_dim

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, tokens, coords, coord_mask):
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise EncoderInputError(f"tokens must be a [B, L] long tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if coords is None:
            return None, None
        if coords.shape != (*tokens.shape, 3):
            raise EncoderInputError(f"coords shape {tuple(coords.shape)} does not match tokens {tuple(tokens.shape)} + (3,)")
        if coord_mask is None:
            raise EncoderInputError("coords given without coord_mask; pass the [B, L] bool validity mask")
        if coord_mask.shape != tokens.shape or coord_mask.dtype != torch.bool:
            raise EncoderInputError(f"coord_mask must be [B, L] bool like tokens, got {tuple(coord_mask.shape)} {coord_mask.dtype}")
        special = (tokens == self.padding_idx) | (tokens == self.cls_idx) | (tokens == self.eos_idx)
        return coords, coord_mask & ~special  # special tokens never carry a coordinate

    def forward(
        self,
        tokens: torch.Tensor,
        coords: Optional[torch.Tensor] = None,
        coord_mask: Optional[torch.Tensor] = None,
        return_hidden_states: bool = False,
        return_structure_bias: bool = False,
        compute_logits: bool = True,
    ) -> EncoderOutput:
        """tokens [B, L] long, coords [B, L, 3] Å | None, coord_mask [B, L] bool | None.

        ``compute_logits=False`` skips the LM head (stages 1-2 only need hidden states); logits
        are then None.
        """
        coords, coord_mask = self._check_inputs(tokens, coords, coord_mask)
        padding_mask = tokens.eq(self.padding_idx)  # [B, L]
        x = self.embed_scale * self.embed_tokens(tokens)  # [B, L, D]
        if self.config.token_dropout:
            # ESM-2: zero <mask> embeddings and rescale to the training mask ratio (0.15 · 0.8).
            is_mask = (tokens == self.mask_idx).unsqueeze(-1)
            x = x.masked_fill(is_mask, 0.0)
            src_lengths = (~padding_mask).sum(-1)
            observed = (tokens == self.mask_idx).sum(-1).to(x.dtype) / src_lengths
            x = x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]

        attn_bias = None
        use_structure = self.structure_bias is not None and coords is not None and bool(coord_mask.any())
        if use_structure:
            sb = self.structure_bias(coords, coord_mask)
            x = x + sb.edge_embedding.to(x.dtype)
            attn_bias = sb.attn_bias.to(x.dtype)  # [B, H, L, L]
        elif self.structure_bias is not None and self._bias_call_required():
            # A batch without coordinates still calls the bias module (on a 2-residue input with
            # nothing valid: exactly zero here) when data-parallel ranks must agree (see
            # _bias_call_required); plain inference skips it.
            dummy = self.structure_bias(x.new_zeros(1, 2, 3, dtype=torch.float32),
                                        torch.zeros(1, 2, dtype=torch.bool, device=x.device))
            x = x + 0.0 * (dummy.attn_bias.sum() + dummy.edge_embedding.sum()).to(x.dtype)
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))

        if padding_mask.any():
            pad = torch.zeros(padding_mask.shape, dtype=x.dtype, device=x.device)
            pad = pad.masked_fill(padding_mask, float("-inf"))[:, None, None, :]  # [B, 1, 1, L]
            attn_mask = pad if attn_bias is None else attn_bias + pad
        else:
            attn_mask = attn_bias

        hidden = [x] if return_hidden_states else None
        exact = self.config.attention == "exact"
        for layer in self.layers:
            x = layer(x, attn_mask, exact)
            if hidden is not None:
                hidden.append(x)
        x = self.emb_layer_norm_after(x)
        if hidden is not None:
            hidden[-1] = x  # as fair-esm: the last representation carries the final layer norm
        return EncoderOutput(
            last_hidden_state=x,
            logits=self.lm_head(x) if compute_logits else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
            structure_bias=attn_bias if (return_structure_bias and use_structure) else None,
        )

    def _bias_call_required(self) -> bool:
        """Whether a forward without coordinates must still call the structure bias.

        ZeRO-3 (its parameters carry DeepSpeed's ``ds_id``) gathers parameters per module call,
        so every rank must call the same modules in the same order, in training and in no-grad
        validation alike; a rank skipping the call leaves the others waiting in the gather.
        ZeRO-1/2 reduce gradients in buckets filled as they arrive, so in training every rank
        needs a gradient for every trainable bias parameter (a rank without them aborted the
        gloo all-reduce: stage 1, 2 ranks, ZeRO-2).
        """
        params = list(self.structure_bias.parameters())
        if any(hasattr(p, "ds_id") for p in params):
            return True
        return torch.is_grad_enabled() and any(p.requires_grad for p in params)

    # ------------------------------------------------------------------ groups, save, load
    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that are not part of a pretrained ESM-2 (the structure bias)."""
        return [] if self.structure_bias is None else list(self.structure_bias.parameters())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Self-contained folder: model.safetensors + config.json (model_type, encoder, alphabet)."""
        cfg = {"model_type": MODEL_TYPE, "alphabet": self.config.alphabet, "encoder": to_dict(self.config)}
        return save_folder(directory, self.state_dict(), cfg)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        **overrides: Any) -> "ProteinEncoder":
        """Load a folder written by :meth:`save_pretrained` (or by ``ProteinTextCLIP.export_encoder``).

        ``overrides`` change runtime-only fields (``attention``, ``chunk_size``, ``structure_graph``…).
        """
        data = read_config(directory)
        if data.get("model_type") != MODEL_TYPE or "encoder" not in data:
            raise ModelFolderError(f"{directory}: config.json is not a sepit protein encoder (model_type={data.get('model_type')!r})")
        config = from_dict(EncoderConfig, {**data["encoder"], **overrides})
        model = cls(config)
        _load_strict(model, load_state(directory, map_location), str(directory))
        return model.to(map_location)

    @classmethod
    def from_esm_checkpoint(cls, path: str | Path, **config_overrides: Any) -> "ProteinEncoder":
        """Build from a local fair-esm ESM-2 checkpoint (``esm2_t33_650M_UR50D.pt`` …).

        Reads ``{"model": state_dict, "cfg": {"model": ...}}`` with ``torch.load(weights_only=True)``
        (``argparse.Namespace`` allow-listed only if the file needs it).  A co-located
        ``<name>-contact-regression.pt`` is merged when present, as fair-esm does.  The structure
        bias (new) is freshly initialised; ``config_overrides`` set e.g. ``use_structure``,
        ``num_rbf``.
        """
        path = Path(path)
        data = _torch_load_checkpoint(path)
        if not isinstance(data, dict) or "model" not in data:
            raise EsmCheckpointError(f"{path}: not a fair-esm checkpoint (no 'model' state dict)")
        if "cfg" not in data:
            raise EsmCheckpointError(f"{path}: no 'cfg' entry; only ESM-2 checkpoints are supported (ESM-1/1b use 'args')")
        cfg = data["cfg"]["model"] if isinstance(data["cfg"], dict) and "model" in data["cfg"] else data["cfg"]

        def get(name: str) -> Any:
            value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
            if value is None:
                raise EsmCheckpointError(f"{path}: checkpoint cfg lacks {name!r}")
            return value

        config = from_dict(EncoderConfig, {
            "num_layers": int(get("encoder_layers")), "embed_dim": int(get("encoder_embed_dim")),
            "attention_heads": int(get("encoder_attention_heads")), "token_dropout": bool(get("token_dropout")),
            **config_overrides,
        })
        prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
        state = {prefix.sub("", k): v for k, v in data["model"].items()}
        regression = path.with_name(path.stem + "-contact-regression.pt")
        if regression.is_file():
            state.update({prefix.sub("", k): v for k, v in _torch_load_checkpoint(regression)["model"].items()})
        model = cls(config)
        optional = {n for n in model.state_dict() if n.startswith(("structure_bias.", "contact_head."))}
        _load_strict(model, state, str(path), allowed_missing=optional)
        return model


#: Fields a fair-esm checkpoint fixes itself: a config's values for them are not applied to it.
ESM_ARCHITECTURE_FIELDS = ("num_layers", "embed_dim", "attention_heads", "token_dropout")


def build_encoder(config: EncoderConfig, folder: str | Path | None = None,
                  esm_checkpoint: str | Path | None = None) -> ProteinEncoder:
    """The protein encoder to start from: a saved folder (``save_pretrained`` / stage-0 export), a
    fair-esm checkpoint with ``config``'s other fields (structure bias, dropout, ...), or a random
    init from ``config``."""
    if folder:
        return ProteinEncoder.from_pretrained(folder)
    if esm_checkpoint:
        overrides = {k: v for k, v in to_dict(config).items() if k not in ESM_ARCHITECTURE_FIELDS}
        return ProteinEncoder.from_esm_checkpoint(esm_checkpoint, **overrides)
    return ProteinEncoder(config)


def _torch_load_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise EsmCheckpointError(f"fair-esm checkpoint {path} does not exist")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "argparse.Namespace" not in str(exc):
            raise EsmCheckpointError(
                f"{path}: refusing to unpickle it: it holds objects beyond tensors and plain "
                f"containers ({str(exc).splitlines()[-1] if str(exc) else exc})"
            ) from None
    # fair-esm stores its hyper-parameters as argparse.Namespace: plain attributes, safe to allow.
    warnings.warn(f"{path}: allow-listing argparse.Namespace to read the fair-esm cfg (weights_only=True)")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as exc:
            raise EsmCheckpointError(f"{path}: cannot be read with weights_only=True ({exc})") from None


def _load_strict(model: nn.Module, state: dict, where: str, allowed_missing: set[str] = frozenset()) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - set(allowed_missing))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFolderError(f"{where}: weights do not fit the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    bad = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ModelFolderError(f"{where}: {k} has shape {tuple(state[k].shape)}, the config expects {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
