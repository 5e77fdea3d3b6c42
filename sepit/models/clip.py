"""Stage 0 (docs/method.md §2): ProteinTextCLIP, the structure warm-up of the protein encoder.

One forward pass on a corrupted protein batch gives three losses, summed and reported apart:

* CLIP: masked mean pooling of residues (protein) and of text tokens (frozen text encoder),
  Linear→GELU→Linear projections to ``projection_dim``, cosine logits × exp(logit_scale)
  (init ln(1/0.07), clamped at 100), symmetric cross-entropy over the *global* batch
  (all-gather with gradients when a process group is up).
* Masked LM on ``mlm_probability`` of the residues with ESM-2's own vocabulary-sized head;
  selected residues become <mask> (80%), a random amino acid (10%) or stay (10%).
* 3D denoising: valid residues that were not selected for MLM get coords + 0.2·ε; the encoder
  runs on that input and :class:`EquivariantDenoiseHead` predicts ε; MSE over noised residues.

Everything is batch-first with padding masks.  ``export_encoder`` writes the protein encoder
folder that stage 1 loads with ``ProteinEncoder.from_pretrained``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sepit.config.base import check_range, from_dict, to_dict
from sepit.config.recipes import model_sizes
from sepit.models.encoder import EncoderConfig, ProteinEncoder
from sepit.models.io import ModelFolderError, load_state, read_config, save_folder
from sepit.models.protein_batch import ProteinBatch
from sepit.models.text_encoder import load_text_encoder

MODEL_TYPE = "sepit_stage0_clip"
CANONICAL_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


@dataclass
class CLIPConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Protein encoder (structure bias included)."""
    text_encoder_path: str = ""
    """Local transformers folder of the frozen text encoder; "" = bundled all-MiniLM-L6-v2."""
    projection_dim: int = 512
    """Shared embedding size of the CLIP projections."""
    logit_scale_init: float = math.log(1 / 0.07)
    """Initial log temperature-inverse (CLIP)."""
    logit_scale_max: float = 100.0
    """Clamp for exp(logit_scale)."""
    mlm_probability: float = 0.15
    """Fraction of residues selected for masked LM."""
    mlm_mask_fraction: float = 0.8
    """Of the selected residues: fraction replaced by <mask>."""
    mlm_random_fraction: float = 0.1
    """Of the selected residues: fraction replaced by a random amino acid (the rest stay)."""
    noise_scale: float = 0.2
    """Å multiplier of ε ~ N(0, I) added to valid, unmasked residue coordinates."""
    text_max_length: int = 128
    """Text tokens kept per caption."""

    def __post_init__(self) -> None:
        check_range(self.projection_dim, "projection_dim", lo=1)
        check_range(self.mlm_probability, "mlm_probability", lo=0.0, hi=1.0)
        check_range(self.mlm_mask_fraction + self.mlm_random_fraction, "mlm_mask_fraction + mlm_random_fraction", lo=0.0, hi=1.0)
        check_range(self.noise_scale, "noise_scale", lo=0.0)
        check_range(self.logit_scale_max, "logit_scale_max", lo=0.0, lo_inclusive=False)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CLIPConfig":
        return from_dict(cls, {"encoder": model_sizes("encoder", name), **model_sizes("clip", name), **overrides})


@dataclass
class Stage0Output:
    loss: torch.Tensor
    clip_loss: torch.Tensor
    mlm_loss: torch.Tensor
    denoise_loss: torch.Tensor
    protein_embeds: torch.Tensor
    """[B, P] L2-normalised local protein embeddings."""
    text_embeds: torch.Tensor
    """[B, P] L2-normalised local text embeddings."""
    logit_scale: torch.Tensor
    n_mlm: int = 0
    n_noised: int = 0


# ---------------------------------------------------------------------------------- pieces
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, D] over positions where mask [B, L] is True (0 for an empty row)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather equal-sized [m, P] blocks; backward sums every rank's gradient of my block.

    (all_reduce + slice rather than reduce_scatter, which gloo lacks.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather [n, P] rows from every rank (gradients flow back); returns (rows, my offset).

    Ranks may hold different n (e.g. the last batch): sizes are exchanged first and rows padded.
    Every rank gets the gradient of *all* ranks' losses w.r.t. its rows, so when each rank
    back-propagates the same global loss, data-parallel averaging yields exactly its gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    m = max(sizes)
    gathered = _AllGatherWithGrad.apply(F.pad(x, (0, 0, 0, m - x.shape[0])))  # [world·m, P]
    rows = torch.cat([gathered[r * m : r * m + s] for r, s in enumerate(sizes)])
    return rows, sum(sizes[:rank])


def clip_loss(protein: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; protein/text [n, P] are L2-normalised, local."""
    p_all, _ = gather_with_grad(protein)
    t_all, _ = gather_with_grad(text)
    logits = scale * p_all @ t_all.t()  # [N, N]; row i's positive is column i
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def retrieval_accuracy(protein: torch.Tensor, text: torch.Tensor, k: int = 1) -> dict[str, float]:
    """Top-k retrieval accuracy protein→text and text→protein (pair i ↔ i is correct)."""
    sim = protein.float() @ text.float().t()
    k = min(k, sim.shape[0])
    target = torch.arange(sim.shape[0], device=sim.device)[:, None]
    p2t = (sim.topk(k, dim=1).indices == target).any(1).float().mean().item()
    t2p = (sim.t().topk(k, dim=1).indices == target).any(1).float().mean().item()
    return {f"p2t_top{k}": p2t, f"t2p_top{k}": t2p}


def mask_residues(
    tokens: torch.Tensor, residue_mask: torch.Tensor, mask_idx: int, random_ids: torch.Tensor,
    probability: float, mask_fraction: float, random_fraction: float,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption of residue tokens → (inputs [B, L], labels [B, L] with -100 off-target)."""
    draw = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    selected = (draw < probability) & residue_mask
    how = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    to_mask = selected & (how < mask_fraction)
    to_random = selected & (how >= mask_fraction) & (how < mask_fraction + random_fraction)
    pick = torch.randint(len(random_ids), tokens.shape, generator=generator, device=tokens.device)
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_idx), tokens)
    inputs = torch.where(to_random, random_ids.to(tokens.device)[pick], inputs)
    labels = torch.where(selected, tokens, torch.full_like(tokens, -100))
    return inputs, labels


class EquivariantDenoiseHead(nn.Module):
    """Predicts per-residue noise ε [B, L, 3] that rotates with the input coordinates.

    Attention over valid residues j ≠ i with the encoder's structure bias, its weights applied
    to unit directions u_ij = (x_i - x_j)/|x_i - x_j| and to per-head values, one output per axis:
    f_i,a = w · Σ_j α_ij u_ij,a v_j.  ``w`` is shared by the three axes and has no bias: per-axis
    weights (as in Transformer-M-style heads) would break rotation equivariance.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.vector_proj = nn.Linear(embed_dim, 1, bias=False)

    def forward(self, hidden: torch.Tensor, coords: torch.Tensor, coord_mask: torch.Tensor,
                attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, D = hidden.shape
        H, hd = self.num_heads, D // self.num_heads
        h = hidden.float()
        q = F.linear(h, self.q_proj.weight.float(), self.q_proj.bias.float()).view(B, L, H, hd).transpose(1, 2)
        k = F.linear(h, self.k_proj.weight.float(), self.k_proj.bias.float()).view(B, L, H, hd).transpose(1, 2)
        v = F.linear(h, self.v_proj.weight.float(), self.v_proj.bias.float()).view(B, L, H, hd).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # [B, H, L, L]
        if attn_bias is not None:
            scores = scores + attn_bias.float()
        eye = torch.eye(L, dtype=torch.bool, device=hidden.device)
        pair = coord_mask[:, :, None] & coord_mask[:, None, :] & ~eye  # [B, L, L]
        scores = scores.masked_fill(~pair[:, None], torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1) * pair[:, None]  # rows without partners become all-zero
        x = torch.where(coord_mask.unsqueeze(-1), coords.float(), torch.zeros((), device=coords.device))
        diff = x[:, :, None, :] - x[:, None, :, :]  # [B, L, L, 3] Å
        unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        axes = [(probs * unit[..., a].unsqueeze(1)) @ v for a in range(3)]  # 3 × [B, H, L, hd]
        vec = torch.stack(axes, 2).permute(0, 3, 2, 1, 4).reshape(B, L, 3, D)  # [B, L, 3, D]
        return F.linear(vec, self.vector_proj.weight.float()).squeeze(-1)  # [B, L, 3]


def _projection(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


# ---------------------------------------------------------------------------------- the model
class ProteinTextCLIP(nn.Module):
    """Protein encoder + frozen text encoder + projections + MLM and denoising heads."""

    def __init__(self, config: CLIPConfig, encoder: Optional[ProteinEncoder] = None,
                 text_model: Any = None, tokenizer: Any = None):
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else ProteinEncoder(config.encoder)
        if text_model is None or tokenizer is None:
            text_model, tokenizer = load_text_encoder(config.text_encoder_path or None)
        self.text_encoder = text_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        D, T = self.encoder.hidden_size, self.text_encoder.config.hidden_size
        self.protein_proj = _projection(D, config.projection_dim)
        self.text_proj = _projection(T, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.denoise_head = EquivariantDenoiseHead(D, self.encoder.config.attention_heads)
        alphabet = self.encoder.alphabet
        self.register_buffer(
            "random_residue_ids", torch.tensor([alphabet.get_idx(a) for a in CANONICAL_AMINO_ACIDS]), persistent=False
        )

    def train(self, mode: bool = True) -> "ProteinTextCLIP":
        super().train(mode)
        self.text_encoder.eval()  # frozen: never dropout
        return self

    # ------------------------------------------------------------------ embeddings
    def tokenize_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.config.text_max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = masked_mean(hidden.float(), attention_mask.bool())
        return F.normalize(self.text_proj(pooled.to(self.text_proj[0].weight.dtype)).float(), dim=-1)

    def embed_protein_hidden(self, hidden: torch.Tensor, residue_mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(hidden, residue_mask)  # residues only: no <cls>/<eos>/padding
        return F.normalize(self.protein_proj(pooled).float(), dim=-1)

    def embed_protein(self, protein: ProteinBatch) -> torch.Tensor:
        out = self.encoder(protein.tokens, protein.coords, protein.coord_mask)
        return self.embed_protein_hidden(out.last_hidden_state, protein.residue_mask)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    # ------------------------------------------------------------------ training forward
    def corrupt(self, protein: ProteinBatch, generator: Optional[torch.Generator] = None):
        """MLM-masked tokens, labels, noised coords, ε and the noised-residue mask [B, L]."""
        cfg, enc = self.config, self.encoder
        tokens, labels = mask_residues(
            protein.tokens, protein.residue_mask, enc.mask_idx, self.random_residue_ids, cfg.mlm_probability,
            cfg.mlm_mask_fraction, cfg.mlm_random_fraction, generator,
        )
        noised = protein.coord_mask & protein.residue_mask & (labels == -100)  # valid and not MLM-selected
        eps = torch.randn(protein.coords.shape, generator=generator, device=protein.coords.device)
        coords = protein.coords + cfg.noise_scale * eps * noised.unsqueeze(-1)
        return tokens, labels, coords, eps, noised

    def forward(self, protein: ProteinBatch, text_input_ids: torch.Tensor, text_attention_mask: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> Stage0Output:
        """Corrupt once, encode once, return the three losses (see module docstring)."""
        enc = self.encoder
        residue_mask = protein.residue_mask
        tokens, labels, coords, eps, noised = self.corrupt(protein, generator)

        out = enc(tokens, coords, protein.coord_mask, return_structure_bias=True)
        p = self.embed_protein_hidden(out.last_hidden_state, residue_mask)
        t = self.embed_text(text_input_ids, text_attention_mask)
        scale = self.scale()
        loss_clip = clip_loss(p, t, scale)

        picked = labels != -100
        if picked.any():
            loss_mlm = F.cross_entropy(out.logits[picked].float(), labels[picked])
        else:  # keep the head in the graph so data-parallel gradient sync sees every parameter
            loss_mlm = out.logits.sum() * 0.0
        pred = self.denoise_head(out.last_hidden_state, coords, protein.coord_mask, out.structure_bias)
        if noised.any():
            loss_dn = F.mse_loss(pred[noised], eps[noised])
        else:
            loss_dn = pred.sum() * 0.0
        return Stage0Output(
            loss=loss_clip + loss_mlm + loss_dn, clip_loss=loss_clip, mlm_loss=loss_mlm, denoise_loss=loss_dn,
            protein_embeds=p, text_embeds=t, logit_scale=scale.detach(),
            n_mlm=int(picked.sum()), n_noised=int(noised.sum()),
        )

    # ------------------------------------------------------------------ optimisation, export
    def param_groups(self, base_lr: float = 1e-6, new_module_mult: float = 10.0) -> list[dict]:
        """Backbone (pretrained ESM-2) at base_lr; new modules at base_lr × new_module_mult.

        Groups are built by module membership; the frozen text encoder is left out.
        """
        new_ids = {id(p) for p in self.encoder.new_parameters()}
        for module in (self.protein_proj, self.text_proj, self.denoise_head):
            new_ids |= {id(p) for p in module.parameters()}
        new_ids.add(id(self.logit_scale))
        backbone = [p for p in self.encoder.parameters() if p.requires_grad and id(p) not in new_ids]
        new = [p for p in self.parameters() if p.requires_grad and id(p) in new_ids]
        return [
            {"name": "backbone", "params": backbone, "lr": base_lr},
            {"name": "new_modules", "params": new, "lr": base_lr * new_module_mult},
        ]

    def export_encoder(self, directory: str | Path) -> Path:
        """Write the protein encoder as a folder ``ProteinEncoder.from_pretrained`` (stage 1) loads."""
        return self.encoder.save_pretrained(directory)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Trainable weights + config, and the text encoder + tokenizer under ``text_encoder/``."""
        out = Path(directory)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}
        save_folder(out, state, {"model_type": MODEL_TYPE, "stage0": to_dict(self.config)})
        self.text_encoder.save_pretrained(str(out / "text_encoder"))
        self.tokenizer.save_pretrained(str(out / "text_encoder"))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ProteinTextCLIP":
        data = read_config(directory)
        if data.get("model_type") != MODEL_TYPE:
            raise ModelFolderError(f"{directory}: config.json is not a stage-0 model (model_type={data.get('model_type')!r})")
        config = from_dict(CLIPConfig, {**data["stage0"], "text_encoder_path": str(Path(directory) / "text_encoder")})
        model = cls(config)
        missing, unexpected = model.load_state_dict(load_state(directory), strict=False)
        missing = [k for k in missing if not k.startswith("text_encoder.")]
        if missing or unexpected:
            raise ModelFolderError(f"{directory}: weights do not fit the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return model
