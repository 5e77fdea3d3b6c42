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
CLOSED_TASKS = ("yes_no", "multiple_choice")


def closed_set_choice(logits: torch.Tensor, labels: torch.Tensor, closed: list[tuple]) -> dict[str, list[float]]:
    """Closed-set answers read from a teacher-forced forward: for each ``(row, task, first_ids,
    gold)`` the option whose *first* answer token the model rates highest at the answer's first
    position ("Yes" vs "No"; the letters "A", "B", ... of multiple choice).  logits [B, T, V],
    labels [B, T] as the forward returns them.  -> {task: [correct (0/1) per row]}.

    This is the cheap proxy of ``sepit.evaluation.likelihood`` (which scores every option's whole
    text, one forward each) that a validation pass gets for free; the evaluation reports the
    real thing."""
    out: dict[str, list[float]] = {t: [] for t in CLOSED_TASKS}
    for b, task, first_ids, gold in closed:
        answer_pos = (labels[b] != IGNORE_INDEX).nonzero().flatten()
        if answer_pos.numel() == 0 or int(answer_pos[0]) == 0:
            continue
        scores = logits[b, int(answer_pos[0]) - 1, list(first_ids)].float()
        out[task].append(float(int(scores.argmax()) == gold))
    return out


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
        out = {**batch, "num_tokens": n_tok, "num_examples": len(rows)}
        if not train:
            out["closed"] = [(b, *c) for b, r in enumerate(rows) if (c := self.closed_options(r)) is not None]
        return out

    def closed_options(self, row: dict[str, Any]) -> tuple[str, list[int], int] | None:
        """``(task, first answer token of each option, gold option index)`` of a closed-set row
        (options exactly as the evaluation scores them), None for open rows, rows without a gold
        option and options that share their first token."""
        if row.get("task") not in CLOSED_TASKS:
            return None
        from sepit.evaluation.answer_parsing import gold_letter, normalize_yes_no
        from sepit.evaluation.likelihood import closed_set_options, option_index

        task = row["task"]
        options = closed_set_options(task, row.get("choices"))
        if not options:
            return None
        gold = (normalize_yes_no(row["answer"]) if task == "yes_no"
                else gold_letter(row["answer"], row.get("choices"), row.get("answer_letter")))
        g = option_index(task, options, gold)
        if g is None:
            return None
        firsts = []
        for option in options:
            labels = self.processor.encode_example(row["question"], option)["labels"]
            firsts.append(next(x for x in labels if x != IGNORE_INDEX))
        return (task, firsts, g) if len(set(firsts)) == len(firsts) else None

    # ------------------------------------------------------------------ loss
    def forward_loss(self, model, batch):
        return self._loss(model, batch)[:2]

    def validation_step(self, model, batch):
        """Loss and parts, plus ``<task>_correct`` / ``<task>_rows`` of the closed-set rows, the
        option chosen by its first answer token (:func:`closed_set_choice`)."""
        loss, parts, out = self._loss(model, batch)
        counters = {}
        for task, hits in closed_set_choice(out.logits, out.labels, batch.get("closed") or []).items():
            counters[f"{task}_correct"], counters[f"{task}_rows"] = float(sum(hits)), float(len(hits))
        return loss, parts, counters

    def validation_metrics(self, counts):
        """``val_closed_acc`` over yes/no and multiple choice, ``val_<task>_acc`` and
        ``val_<task>_n`` per task (counts summed over ranks)."""
        metrics: dict[str, float] = {}
        hits = rows = 0.0
        for task in CLOSED_TASKS:
            c, r = counts.get(f"{task}_correct", 0.0), counts.get(f"{task}_rows", 0.0)
            if r:
                metrics[f"val_{task}_acc"] = 100.0 * c / r
                metrics[f"val_{task}_n"] = r
            hits, rows = hits + c, rows + r
        if rows:
            metrics["val_closed_acc"] = 100.0 * hits / rows
        return metrics

    def _loss(self, model, batch):
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
        return loss, parts, out

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
