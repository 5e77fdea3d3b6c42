"""The part of stages 1 and 2 they share: instruction rows -> SEPIT LM batches, the LM loss,
and (stage 2) the per-expert token counts.

A batch holds the chat-template prompt + answer token ids (right-padded with the dedicated
``<pad>``; labels only on answer tokens and the closing eos) and the proteins as an ESM batch,
both made by the task's :class:`~sepit.processing.SepitProcessor`; the model splices each
protein's projected tokens at its ``<protein>``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from sepit.errors import SepitError
from sepit.models.tokenizer import IGNORE_INDEX

from .stage0 import proteins_of
from .task import TrainTask, unwrap


class ExampleError(SepitError, ValueError):
    """A dataset row cannot be turned into a training example; the message names the row."""


@lru_cache(maxsize=4)
def llm_processor(path: str, alphabet: str):
    """The processor of a tokenizer folder, once per process (loading costs more than a batch)."""
    from sepit.models.tokenizer import load_llm_tokenizer
    from sepit.processing import SepitProcessor

    return SepitProcessor(load_llm_tokenizer(path), alphabet=alphabet)


LOSS_PER = ("token", "example")


def example_mean_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each example's labelled tokens, then over examples
    (rows without a labelled token are left out).  logits [B, T, V], labels [B, T] (-100 = ignore)."""
    import torch.nn.functional as F

    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    n = (shift_labels != IGNORE_INDEX).sum(1)
    per_example = tok.sum(1) / n.clamp_min(1)
    return per_example[n > 0].mean()


class InstructionTask(TrainTask):
    """Stage 1/2 base: subclasses build the model, choose parameter groups and export."""

    columns = ["id", "question", "answer", "sequence", "coords", "coord_mask"]

    def __init__(self, *, tokenizer_path: str, alphabet: str, max_residues: int, max_answer_tokens: int,
                 loss_per: str = "token"):
        self.tokenizer_path = tokenizer_path
        self.alphabet = alphabet
        self.max_residues = max_residues
        self.max_answer_tokens = max_answer_tokens
        self.loss_per = loss_per
        self._expert_counts: dict[int, torch.Tensor] = {}

    def record_crop(self, model) -> None:
        """Save the training crop in the model's config: inference cuts proteins the same way."""
        if self.max_residues < model.config.max_residues:
            model.config.crop_residues = self.max_residues

    @property
    def processor(self):
        """Tokenizer, chat template and collation of this task (saved with the exported model)."""
        return llm_processor(self.tokenizer_path, self.alphabet)

    # ------------------------------------------------------------------ data
    def row_length(self, row) -> int:
        # Residues plus a rough text-token count (~4 characters per BPE token).
        return len(row["sequence"]) + (len(row["question"]) + len(row["answer"])) // 4

    def encode(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        from sepit.data.prompts import PromptError

        try:
            ex = self.processor.encode_example(row["question"], row["answer"])
        except PromptError as exc:
            raise ExampleError(f"dataset row {row.get('id')}: {exc}") from None
        ids, labels = ex["input_ids"], ex["labels"]
        prompt = sum(1 for x in labels if x == IGNORE_INDEX)
        # Long answers are cut (such an example has no closing eos to learn); prompts never are:
        # a multiple-choice question without its options would be a different question.
        keep = prompt + self.max_answer_tokens
        return ids[:keep], labels[:keep]

    def collate(self, rows, *, train):
        batch = self.processor.collate_training([self.encode(r) for r in rows], proteins_of(rows), self.max_residues)
        n_tok = int(batch["attention_mask"].sum()) + int(batch["protein"].lengths.sum())
        return {**batch, "num_tokens": n_tok, "num_examples": len(rows)}

    # ------------------------------------------------------------------ loss
    def forward_loss(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    protein=batch["protein"], labels=batch["labels"])
        loss = out.loss
        if self.loss_per == "example":
            # Every example weighs the same, whatever its answer's length: with the token mean a
            # 200-token function description outweighs a hundred "Yes"/"No" answers.
            lm = example_mean_lm_loss(out.logits, out.labels)
            loss = lm if out.aux_loss is None else lm + unwrap(model).config.moe.aux_loss_coef * out.aux_loss
        parts = {"lm_loss": float(out.lm_loss.detach())}
        if out.aux_loss is not None:
            parts["aux_loss"] = float(out.aux_loss.detach())
            module = unwrap(model)
            if module.training:  # routing statistics of training steps only
                for layer, counts in module.moe_stats().items():
                    c = torch.tensor(counts, dtype=torch.float64)
                    self._expert_counts[layer] = self._expert_counts.get(layer, 0) + c
        return loss, parts

    def step_metrics(self, model) -> dict[str, float]:
        """Tokens routed to each expert per MoE layer in this optimizer step, summed over ranks
        (padding excluded, before capacity drops), and C's balance fractions."""
        if not self._expert_counts:
            return {}
        import torch.distributed as dist

        from sepit.models.moe import moe_metrics

        layers = sorted(self._expert_counts)
        flat = torch.cat([self._expert_counts[i] for i in layers])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = next(unwrap(model).parameters()).device
            flat = flat.to(device)
            dist.all_reduce(flat)
            flat = flat.cpu()
        self._expert_counts = {}
        n = flat.numel() // len(layers)
        counts = {layer: flat[j * n : (j + 1) * n].tolist() for j, layer in enumerate(layers)}
        metrics = {f"moe/layer{layer}/expert{e}_tokens": float(c) for layer, cs in counts.items() for e, c in enumerate(cs)}
        metrics.update(moe_metrics(counts))
        return metrics
