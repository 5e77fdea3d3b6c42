"""Likelihood scoring of closed-set questions (yes/no, multiple choice).

Generation can fail a closed-set question for reasons that say little about what the model
knows (an unparsable answer, a format it half-learned).  Likelihood scoring asks the model
instead how probable each *option* is as the answer, the way lm-evaluation-harness scores
multiple choice: every option is appended to the same prompt as the assistant's answer, and
its log-probability under teacher forcing is summed over its tokens and the end-of-turn token
(the answer exactly as the model was trained to write it, ``"Yes</s>"``, ``"B) Cytoplasm</s>"``).
Two choices are reported:

* **sum**: the option with the highest total log-probability (lm-eval's ``acc``);
* **length-normalised**: the highest mean log-probability per scored token, which does not
  favour options with fewer tokens.  (lm-eval's ``acc_norm`` divides by the option's length in
  bytes instead; with a model's own tokens as the unit, "Yes" and "No" -- one token each -- are
  compared on equal terms, where bytes would tilt every yes/no question towards "Yes".)

Only the question and the option texts enter the model: the gold answer (``answer``,
``answer_letter``) is read after scoring, to mark the choice right or wrong.  Each protein is
encoded once per row and shared by its options (``protein_index``), options are scored in
batches, and padding never contributes (labels are -100 there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from sepit.evaluation.answer_parsing import format_choice, option_letters

YES_NO_OPTIONS = ("Yes", "No")
"""The builder's yes/no answers, exactly (``sepit.data.questions``)."""


@dataclass
class OptionScores:
    """Scores of one question's options, in option order."""

    options: list[str]
    logprob: list[float]
    """Sum of log-probabilities of the option's tokens and the end token."""
    n_tokens: list[int]
    """Scored tokens per option (end token included)."""

    def best(self, normalised: bool = False) -> int:
        """Index of the chosen option (ties: the first listed)."""
        values = [lp / max(1, n) for lp, n in zip(self.logprob, self.n_tokens)] if normalised else self.logprob
        return max(range(len(values)), key=lambda i: (values[i], -i))


def closed_set_options(task: str, choices: Sequence[str] | None) -> list[str] | None:
    """The answer texts a closed-set question can have, as the builder writes them; None for open tasks."""
    if task == "yes_no":
        return list(YES_NO_OPTIONS)
    if task == "multiple_choice":
        if not choices:
            return None
        return [format_choice(letter, text) for letter, text in zip(option_letters(choices), choices)]
    return None


def option_index(task: str, options: Sequence[str], gold: str | None) -> int | None:
    """Index of the gold answer among ``options`` (gold: "yes"/"no" or a letter), None when absent."""
    if gold is None:
        return None
    if task == "yes_no":
        return {"yes": 0, "no": 1}.get(gold)
    letters = option_letters(options)
    return letters.index(gold) if gold in letters else None


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of log p(label_t | < t), number of scored positions).

    ``logits`` [N, T, V] from a causal LM, ``labels`` [N, T] with ``ignore_index`` wherever a
    position is not scored (prompt, protein span, padding).  Position t's logits predict token
    t + 1, as in the training loss; log-softmax in fp32.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    scored = shift_labels != ignore_index
    logp = F.log_softmax(shift_logits, dim=-1)
    picked = logp.gather(-1, shift_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1), scored.sum(-1)


@torch.no_grad()
def score_options(model, processor, questions: Sequence[str], proteins: Sequence[tuple],
                  options: Sequence[Sequence[str]], max_rows: int = 32, truncate: bool = False) -> list[OptionScores]:
    """Score every option of every question with ``model`` (a SepitForConditionalGeneration) and
    its ``processor`` (:class:`~sepit.processing.SepitProcessor`, which encodes and collates).

    ``proteins[i]`` is ``(sequence, coords | None, coord_mask | None)`` for question i (pass
    ``coords=None`` for the sequence-only ablation).  At most ``max_rows`` prompt+option rows go
    through the LLM at once; each chunk encodes only the proteins its rows need.
    """
    from sepit.data.prompts import IGNORE_INDEX

    if not (len(questions) == len(proteins) == len(options)):
        raise ValueError(f"{len(questions)} questions, {len(proteins)} proteins, {len(options)} option lists")
    flat = [(q, k, opt) for q, opts in enumerate(options) for k, opt in enumerate(opts)]
    if any(len(opts) < 2 for opts in options):
        raise ValueError("every closed-set question needs at least two options to score")
    logprob = [[0.0] * len(o) for o in options]
    n_tok = [[0] * len(o) for o in options]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(flat), max_rows):
            chunk = flat[start:start + max_rows]
            qs = sorted({q for q, _, _ in chunk})
            local = {q: i for i, q in enumerate(qs)}
            encoded = [processor.encode_example(questions[q], opt) for q, _, opt in chunk]
            rows = processor.pad([e["input_ids"] for e in encoded], padding_side="right",  # as in training
                                 labels=[e["labels"] for e in encoded])
            batch = processor.protein_batch([proteins[q] for q in qs], truncate).to(model.device)
            index = torch.tensor([local[q] for q, _, _ in chunk], device=model.device)
            # The model's own training forward (structure dropout is off in eval mode; MoE
            # blocks route with the padding mask exactly as in training).
            out = model(rows["input_ids"].to(model.device), rows["attention_mask"].to(model.device), batch,
                        labels=rows["labels"].to(model.device), protein_index=index)
            sums, counts = sequence_logprobs(out.logits, out.labels, IGNORE_INDEX)
            for (q, k, _), lp, n in zip(chunk, sums.tolist(), counts.tolist()):
                logprob[q][k], n_tok[q][k] = float(lp), int(n)
    finally:
        model.train(was_training)
    return [OptionScores(list(o), lp, n) for o, lp, n in zip(options, logprob, n_tok)]
