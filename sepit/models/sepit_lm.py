"""SEPIT's protein-conditioned language model (stages 1 and 2; docs/method.md §3–4).

    protein tokens/coords ─► ProteinEncoder (structure-aware ESM-2) ─► hidden_states[-2] [P, Lp, Dp]
        ─► projector Linear(Dp→Dh)·GELU·Linear(Dh→Dl) ─► spliced at <protein> ─► Llama-family LLM

Structure dropout (p = 0.15 per protein, training only) drops a protein's coordinates so the
model also answers from sequence alone.  The training loss is the answer-token cross-entropy
plus ``aux_loss_coef · Σ_layers l_aux`` once the LLM is upcycled to MoE (:mod:`sepit.models.moe`).
The model takes ids and tensors only: the tokenizer, chat template, protein tokenisation and
collation are :class:`sepit.processing.SepitProcessor`'s, which is saved into the same folder.
Saving writes safetensors and config.json (the processor adds ``tokenizer/``); MoE blocks are
always saved in the plain :class:`~sepit.models.moe.MoEFeedForward` layout.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sepit.config.base import check_choice, check_range, from_dict, to_dict
from sepit.models.encoder import EncoderConfig, ProteinEncoder, build_encoder
from sepit.models.generation import DecodeBatch, SamplingConfig, decode_batch, length_buckets
from sepit.models.io import ModelFolderError, load_state, read_config, save_folder
from sepit.models.llm import LLMConfig, build_llm, build_llm_from_hf_config
from sepit.models.moe import (
    MoEConfig, clear_moe_stats, deepspeed_moe_state_dict, moe_aux_loss, moe_stats,
    plain_moe_state_dict, set_moe_token_mask, upcycle_to_moe,
)
from sepit.models.protein_batch import ProteinBatch
from sepit.models.splice import SplicedInputs, splice_protein_embeddings
from sepit.models.tokenizer import (
    IGNORE_INDEX, TOKENIZER_DIR, SpecialTokenIds, load_llm_tokenizer, special_token_ids,
)

MODEL_TYPE = "sepit"


@dataclass
class ProjectorConfig:
    hidden_size: int | None = None
    """Inner width of Linear→GELU→Linear; None = the LLM's hidden size."""


@dataclass
class SepitConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Protein encoder sizes (ignored when encoder_path / esm_checkpoint give the weights)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """LLM sizes or a local folder (llm.path)."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Protein→LLM projector."""
    structure_dropout: float = 0.15
    """Probability that a training protein loses its coordinates (sequence-only)."""
    residue_dropout: float = 0.0
    """Training only: the share of each protein's projected residue vectors removed before they
    are spliced into the prompt (``<cls>``/``<eos>`` always kept; order kept).  Against
    memorising proteins by their exact residue string: the LLM must answer from what survives any
    subset (composition, motifs), which transfers across the homology split.  0 = off."""
    max_residues: int = 1022
    """Longest protein the processor accepts for inference; longer ones are an error unless truncate=True."""
    crop_residues: int | None = None
    """Inference cuts proteins to their first ``crop_residues`` residues (and coordinates): the crop
    the model was trained with (set by the training stage), so it never reads protein spans longer
    than it learnt from.  None = no crop."""
    encoder_path: str | None = None
    """Protein-encoder folder (ProteinEncoder.save_pretrained / stage-0 export) to start from."""
    esm_checkpoint: str | None = None
    """Local fair-esm ESM-2 .pt to start the encoder from (when encoder_path is not set)."""
    tokenizer_path: str | None = None
    """Local tokenizer folder for stage 1; None = llm.path's tokenizer, else a BPE trained on
    bundled text (``sepit.train.stage1.build_tokenizer``)."""
    moe: MoEConfig | None = None
    """Set by upcycle_to_moe (stage 2); saved models rebuild their MoE blocks from it."""

    def __post_init__(self) -> None:
        check_range(self.structure_dropout, "structure_dropout", lo=0.0, hi=1.0)
        check_range(self.residue_dropout, "residue_dropout", lo=0.0, hi=0.95)
        check_range(self.max_residues, "max_residues", lo=1)

    @classmethod
    def preset(cls, name: str) -> "SepitConfig":
        """``tiny`` (tests, seconds), ``small`` (CPU demo), ``paper`` (ESM-2 650M + TinyLlama-1.1B sizes;
        point ``esm_checkpoint`` and ``llm.path`` at local weights)."""
        check_choice(name, "preset", ["tiny", "small", "paper"])
        return cls(encoder=EncoderConfig.preset(name), llm=LLMConfig.preset(name))


@dataclass
class SepitOutput:
    loss: torch.Tensor | None
    """lm_loss + aux_loss_coef · aux_loss (None without labels)."""
    logits: torch.Tensor
    """[B, T', V] over the spliced sequence."""
    lm_loss: torch.Tensor | None
    """Mean next-token cross-entropy over labelled (answer) tokens."""
    aux_loss: torch.Tensor | None
    """Σ over MoE layers of the load-balancing loss (None for a dense LLM)."""
    labels: torch.Tensor | None = None
    """[B, T'] labels aligned with ``logits`` (IGNORE_INDEX on prompt, protein span, padding)."""
    attention_mask: torch.Tensor | None = None
    """[B, T'] spliced attention mask."""


class ProteinProjector(nn.Module):
    """Linear(D_plm → D_h) → GELU → Linear(D_h → D_llm), applied per protein token."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))




class SepitForConditionalGeneration(nn.Module):
    """Protein encoder + projector + causal LM; see the module docstring.

    ``token_ids`` and ``vocab_size`` come from the LLM tokenizer (``SepitProcessor.token_ids`` /
    ``.vocab_size``); the model never tokenises.  Components may be passed in (``from_pretrained``
    does); otherwise they are built from ``config`` offline.  ``config`` is updated to describe
    what was built (encoder sizes, LLM vocabulary), so saving it is enough to rebuild the model.
    """

    def __init__(self, config: SepitConfig, token_ids: SpecialTokenIds, vocab_size: int,
                 encoder: ProteinEncoder | None = None, llm: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.token_ids = token_ids
        self.encoder = encoder if encoder is not None else build_encoder(config.encoder, config.encoder_path, config.esm_checkpoint)
        config.encoder = self.encoder.config
        n_vocab = vocab_size
        self.llm = llm if llm is not None else build_llm(config.llm, vocab_size=n_vocab)
        if self.llm.get_input_embeddings().num_embeddings < n_vocab:
            # A loaded LLM lacks <pad>/<bop>/<protein>/<eop>: new rows start at the mean embedding.
            self.llm.resize_token_embeddings(n_vocab, mean_resizing=True)
        hf = self.llm.config
        hf.pad_token_id, hf.eos_token_id = self.token_ids.pad, self.token_ids.eos
        hf.bos_token_id = self.token_ids.bos
        config.llm = dataclasses.replace(config.llm, vocab_size=self.llm.get_input_embeddings().num_embeddings)
        self.projector = ProteinProjector(self.encoder.hidden_size, hf.hidden_size, config.projector.hidden_size)
        self.projector.to(next(self.llm.parameters()).dtype)
        # The LLM reads hidden_states[-2]; the encoder's last layer, final norm and heads never
        # reach the loss.  Freezing them keeps optimizers and DDP/ZeRO from waiting on grads.
        for p in self._unused_encoder_parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ parts
    def _unused_encoder_parameters(self) -> list[nn.Parameter]:
        enc = self.encoder
        unused = [*enc.lm_head.parameters(), *enc.contact_head.parameters(),
                  *enc.emb_layer_norm_after.parameters()]
        if len(enc.layers) > 0:
            unused += list(enc.layers[-1].parameters())
        tied = {id(enc.embed_tokens.weight)}  # the MLM head shares the token embedding: keep it
        return [p for p in unused if id(p) not in tied]

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def encode_proteins(self, protein: ProteinBatch, structure_dropout: bool | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (projected [P, Lp, D_llm], real token counts [P]) for a protein batch.

        ``structure_dropout`` (default: ``self.training``) switches the training-time drops on:
        coordinates (``config.structure_dropout``) and residue vectors (``config.residue_dropout``)."""
        drop = self.training if structure_dropout is None else structure_dropout
        if drop and self.config.structure_dropout > 0:
            lost = torch.rand(len(protein), device=protein.tokens.device) < self.config.structure_dropout
            protein = protein.without_structure(lost)
        coords = protein.coords if bool(protein.coord_mask.any()) else None
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            enc = self.encoder(protein.tokens, coords, protein.coord_mask if coords is not None else None,
                               return_hidden_states=True)
        hidden = enc.hidden_states[-2]  # [P, Lp, Dp], second-to-last layer (docs/method.md §3)
        projected = self.projector(hidden.to(self.projector.fc1.weight.dtype))
        lengths = protein.attention_mask.sum(1)
        if drop and self.config.residue_dropout > 0:
            projected, lengths = drop_residues(projected, lengths, self.config.residue_dropout)
        return projected, lengths

    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, protein: ProteinBatch,
               labels: torch.Tensor | None = None, protein_index: torch.Tensor | None = None,
               padding_side: str = "right", structure_dropout: bool | None = None) -> SplicedInputs:
        """Embed prompts and put each protein's projected real tokens at its ``<protein>``."""
        projected, lengths = self.encode_proteins(protein, structure_dropout)
        embed = self.llm.get_input_embeddings()
        return splice_protein_embeddings(
            embed(input_ids), input_ids, attention_mask, projected, lengths, self.token_ids.protein,
            labels=labels, protein_index=protein_index, padding_side=padding_side,
            pad_embedding=embed.weight[self.token_ids.pad].detach(),
        )

    # ------------------------------------------------------------------ training forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, protein: ProteinBatch,
                labels: torch.Tensor | None = None, protein_index: torch.Tensor | None = None) -> SepitOutput:
        """input_ids / attention_mask / labels [B, T] (prompt + answer, any padding side);
        ``protein`` the ESM batch; ``protein_index`` [B] maps rows to proteins (default identity)."""
        s = self.splice(input_ids, attention_mask, protein, labels, protein_index, padding_side="right")
        clear_moe_stats(self)
        # The mask stays set after the forward: activation checkpointing re-runs the MoE blocks
        # during backward and must route exactly as the forward did.
        set_moe_token_mask(self, s.attention_mask)
        out = self.llm(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                       position_ids=s.position_ids, use_cache=False)
        lm_loss = None if s.labels is None else causal_lm_loss(out.logits, s.labels)
        aux = moe_aux_loss(self)
        loss = lm_loss
        if loss is not None and aux is not None:
            loss = loss + self.config.moe.aux_loss_coef * aux
        return SepitOutput(loss, out.logits, lm_loss, aux, s.labels, s.attention_mask)

    def moe_stats(self) -> dict[int, list[int]]:
        """Tokens per expert per MoE layer in the last forward (padding excluded)."""
        return moe_stats(self)

    # ------------------------------------------------------------------ generation
    def build_generation_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                protein: ProteinBatch) -> SplicedInputs:
        """Left-padded spliced prompts: ``input_ids`` / ``attention_mask`` [B, T] (any padding side)
        and one protein per row (``SepitProcessor.generation_inputs`` builds all three)."""
        return self.splice(input_ids.to(self.device), attention_mask.to(self.device), protein.to(self.device),
                           padding_side="left", structure_dropout=False)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, protein: ProteinBatch,
                 max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, stop_check: Callable[[int, list[int]], bool] | None = None
                 ) -> list[list[int]]:
        """New token ids per prompt row (eos excluded).

        ``input_ids`` / ``attention_mask`` [B, T] hold the chat prompts, ``protein`` row b's
        protein.  Greedy, or temperature / top-p sampling with ``seed``; a row ends at eos, after
        ``max_new_tokens``, or when ``stop_check(row, ids)`` says so (the processor's stop strings).
        Prompts are prefilled in length buckets (sorted, so little left padding) whose rows then
        decode as one batch; rows leave the batch as they end."""
        cfg = SamplingConfig(max_new_tokens, do_sample, temperature, top_p, seed)
        n = input_ids.shape[0]
        if n == 0:
            raise ValueError("generate() needs at least one prompt")
        if len(protein) != n or attention_mask.shape != input_ids.shape:
            raise ValueError(f"{n} prompts ({tuple(attention_mask.shape)} attention mask) but {len(protein)} "
                             "proteins; pass one protein and one mask row per prompt")
        # LLM prompt length: the <protein> placeholder becomes <cls> residues <eos> (residues cropped).
        lengths = (attention_mask.sum(1).cpu() + 1 + protein.lengths.cpu()).tolist()
        order: list[int] = []
        batch = None
        for bucket in length_buckets(lengths):
            rows = torch.tensor(bucket, dtype=torch.long, device=input_ids.device)
            s = self.build_generation_inputs(input_ids[rows], attention_mask[rows], protein.select(bucket))
            part = DecodeBatch.prefill(self, self.llm, s.inputs_embeds, s.attention_mask, s.position_ids, max_new_tokens)
            if batch is None:
                batch = part
            else:
                batch.concat(part, headroom=max_new_tokens)
            order += bucket
        ids = decode_batch(batch, self.token_ids.eos, self.token_ids.pad, cfg, stop_check)
        out: list[list[int]] = [[] for _ in range(n)]
        for row, i in enumerate(order):
            out[i] = ids[row]
        return out

    # ------------------------------------------------------------------ LoRA, freezing, optimizer groups
    def apply_lora(self, r: int = 8, alpha: int = 16, target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                   dropout: float = 0.05) -> None:
        """Wrap the LLM with peft LoRA adapters (the LLM's base weights become frozen)."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # the optional extra: no training stage uses LoRA
            raise ImportError("apply_lora needs the optional extra: pip install 'sepit[lora]' (peft)") from exc

        self.llm = get_peft_model(self.llm, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                       target_modules=list(target_modules)))

    def gradient_checkpointing_enable(self) -> None:
        """Recompute LLM blocks in backward (non-reentrant, so RNG state and MoE stats are safe)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5 name
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def has_lora(self) -> bool:
        return hasattr(self.llm, "merge_and_unload")

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the LLM weights and drop the peft wrapper."""
        if self.has_lora:
            self.llm = self.llm.merge_and_unload()

    def freeze(self, encoder: bool | None = None, llm: bool | None = None, projector: bool | None = None) -> None:
        """True freezes a part, False unfreezes it, None leaves it as is."""
        unused = {id(p) for p in self._unused_encoder_parameters()}
        for flag, module in ((encoder, self.encoder), (llm, self.llm), (projector, self.projector)):
            if flag is None:
                continue
            for p in module.parameters():
                if id(p) not in unused:
                    p.requires_grad_(not flag)

    def param_groups(self, base_lr: float = 1e-4, encoder_lr_ratio: float = 0.1, llm_lr_ratio: float = 0.1,
                     weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups by module membership: projector at ``base_lr``, encoder and LLM at
        ``base_lr × ratio`` (docs/method.md §3); frozen parameters and empty groups are left out.
        Each group has a ``name`` (DeepSpeed's MoE group split needs it)."""
        groups = []
        for name, module, lr in (("projector", self.projector, base_lr),
                                 ("encoder", self.encoder, base_lr * encoder_lr_ratio),
                                 ("llm", self.llm, base_lr * llm_lr_ratio)):
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params, "lr": lr, "weight_decay": weight_decay})
        return groups

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, extra_files: dict | None = None) -> Path:
        """Model folder: model.safetensors and config.json (no hub, no pickle); the processor's
        ``save_pretrained`` adds ``tokenizer/`` to the same folder."""
        if self.has_lora:
            raise ModelFolderError("the LLM carries LoRA adapters; call merge_lora() before save_pretrained()")
        cfg = copy.deepcopy(self.config)
        sources = {"encoder_path": cfg.encoder_path, "esm_checkpoint": cfg.esm_checkpoint,
                   "llm_path": cfg.llm.path, "tokenizer_path": cfg.tokenizer_path}
        cfg.encoder_path = cfg.esm_checkpoint = cfg.tokenizer_path = None
        cfg.llm = dataclasses.replace(cfg.llm, path=None)
        if cfg.moe is not None:
            cfg.moe.exported = True  # weights below are in the plain MoEFeedForward layout
        config_dict = {
            "model_type": MODEL_TYPE, "format_version": 1, "sepit": to_dict(cfg),
            "llm_hf_config": self.llm.config.to_dict(), "encoder_alphabet": self.encoder.config.alphabet,
            "tokenizer": TOKENIZER_DIR, "token_ids": dataclasses.asdict(self.token_ids), "sources": sources,
        }
        return save_folder(directory, plain_moe_state_dict(self.state_dict()), config_dict, extra_files)

    @classmethod
    def from_pretrained(cls, directory: str | Path, moe_backend: str = "plain",
                        map_location: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "SepitForConditionalGeneration":
        """Rebuild a saved model offline.  MoE layers come back as plain ``MoEFeedForward`` blocks
        (``moe_backend="plain"``, for inference) or as DeepSpeed blocks (``"deepspeed"``, to train on).
        Weights load into fp32 parameters (bf16/fp16 files are upcast exactly); ``dtype`` (e.g.
        ``torch.bfloat16`` for GPU serving) casts the LLM and projector afterwards, the protein
        encoder stays fp32."""
        check_choice(moe_backend, "moe_backend", ["plain", "deepspeed"])
        data = read_config(directory)
        if data.get("model_type") != MODEL_TYPE:
            raise ModelFolderError(f"{directory}: config.json is not a sepit model (model_type={data.get('model_type')!r})")
        config = from_dict(SepitConfig, data["sepit"])
        moe_cfg, config.moe = config.moe, None
        if "token_ids" in data:
            token_ids = SpecialTokenIds(**data["token_ids"])
        else:  # folders written before the processor split record the ids only in their tokenizer
            token_ids = special_token_ids(load_llm_tokenizer(Path(directory) / TOKENIZER_DIR))
        model = cls(config, token_ids, config.llm.vocab_size, encoder=ProteinEncoder(config.encoder),
                    llm=build_llm_from_hf_config(data["llm_hf_config"]))
        state = load_state(directory)
        if moe_cfg is not None:
            upcycle_to_moe(model, moe_cfg, use_deepspeed=moe_backend == "deepspeed")
            if moe_backend == "deepspeed":
                state = deepspeed_moe_state_dict(state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelFolderError(
                f"{directory}: weights do not match the saved config (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]})"
            )
        if dtype is not None:
            model.llm.to(dtype)
            model.projector.to(dtype)
        return model.to(map_location)


def drop_residues(projected: torch.Tensor, lengths: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove a random share ``p`` of each protein's residue vectors (positions 1 … n-2; the
    ``<cls>`` at 0 and ``<eos>`` at n-1 stay) and pack the survivors, in order, at the front.
    projected [P, Lp, D], lengths [P] -> (same shape, new lengths); at least one residue survives."""
    P, Lp, _ = projected.shape
    pos = torch.arange(Lp, device=projected.device).expand(P, Lp)
    n = lengths.to(projected.device).unsqueeze(1)
    residue = (pos >= 1) & (pos < n - 1)
    keep = (torch.rand(P, Lp, device=projected.device) >= p) | ~residue
    keep &= pos < n
    # a protein whose residues were all dropped keeps its first one
    none_left = ~(keep & residue).any(1) & residue.any(1)
    keep[none_left, 1] = True
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept first, in order
    packed = torch.gather(projected, 1, order.unsqueeze(-1).expand_as(projected))
    return packed, keep.sum(1).to(lengths.dtype)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over positions whose label is not IGNORE_INDEX (-100)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    n = (shift_labels != IGNORE_INDEX).sum().clamp_min(1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum") / n
