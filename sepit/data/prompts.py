"""SEPIT chat prompts, tokenised segment by segment so the label mask is exact.

The template is TinyLlama-Chat's (Zephyr style), built in Python rather than from a Jinja chat
template so that every segment's token span is known::

    <s><|system|>\\n{SYSTEM_PROMPT}</s>\\n<|user|>\\n{question before}<bop><protein><eop>{question after}</s>\\n<|assistant|>\\n{answer}</s>
    |------------------------------------------------ prompt (labels = -100) ------------------------------------------------||--- labelled ---|

Each text segment is encoded on its own (``add_special_tokens=False``) and special tokens are
inserted by id, so the ids of an example are the concatenation of its segments' ids and the
labelled tokens are exactly the answer's tokens plus the end token.  The user turn holds the
protein placeholder exactly once; the model replaces the ``<protein>`` id by the protein's
projected vectors (docs/method.md §3).
"""

from __future__ import annotations

from sepit.errors import SepitError
from sepit.models.tokenizer import (
    BOP_TOKEN,
    EOP_TOKEN,
    IGNORE_INDEX,
    PROTEIN_TOKEN,
    special_token_ids,
)

SYSTEM_PROMPT = (
    "You are a helpful biological assistant. You are given a protein, as its amino-acid "
    "sequence and, when known, its 3D structure, and you answer questions about it accurately "
    "and concisely."
)
PLACEHOLDER = PROTEIN_TOKEN
SYSTEM_HEADER = "<|system|>\n"
USER_HEADER = "\n<|user|>\n"
ASSISTANT_HEADER = "\n<|assistant|>\n"


class PromptError(SepitError, ValueError):
    """A question or answer cannot be turned into a SEPIT prompt; the message says why."""


def normalize_question(question: str) -> str:
    """Return ``question`` with exactly one ``<protein>`` placeholder.

    A question without the placeholder gets ``"<protein>\\n"`` prepended (the protein comes
    first, as in the SEPIT data); one with more than one is rejected.
    """
    if not isinstance(question, str) or not question.strip():
        raise PromptError(f"question must be a non-empty string, got {question!r}")
    count = question.count(PLACEHOLDER)
    if count > 1:
        raise PromptError(
            f"question holds the placeholder {PLACEHOLDER} {count} times; one protein per prompt: "
            f"{question[:120]!r}"
        )
    if count == 0:
        question = f"{PLACEHOLDER}\n{question}"
    for token in (BOP_TOKEN, EOP_TOKEN):
        if token in question:
            raise PromptError(f"question must not contain {token} (the template adds it): {question[:120]!r}")
    return question


def render_prompt(question: str, answer: str | None = None) -> str:
    """The full chat text (for display and debugging; training uses the token segments)."""
    before, after = normalize_question(question).split(PLACEHOLDER)
    text = (
        f"<s>{SYSTEM_HEADER}{SYSTEM_PROMPT}</s>{USER_HEADER}{before}{BOP_TOKEN}{PLACEHOLDER}"
        f"{EOP_TOKEN}{after}</s>{ASSISTANT_HEADER}"
    )
    return text if answer is None else f"{text}{answer}</s>"


def _reject_reserved(tokenizer, text: str, what: str) -> None:
    # A literal "</s>" or "<pad>" inside user text would be read as the special token itself and
    # corrupt the mask or end the turn early; such records are rejected, not silently altered.
    for token in (*tokenizer.all_special_tokens, BOP_TOKEN, PROTEIN_TOKEN, EOP_TOKEN):
        if token and token in text:
            raise PromptError(f"{what} contains the reserved token {token!r}: {text[:120]!r}")


def _encode_text(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of the prompt for ``question``, ending where the assistant's answer starts.

    Holds the ``<protein>`` id exactly once, wrapped in ``<bop>``/``<eop>``.
    """
    ids = special_token_ids(tokenizer)
    question = normalize_question(question)
    before, after = question.split(PLACEHOLDER)
    _reject_reserved(tokenizer, before + after, "question")
    out: list[int] = [] if ids.bos is None else [ids.bos]
    out += _encode_text(tokenizer, SYSTEM_HEADER + SYSTEM_PROMPT)
    out.append(ids.eos)
    out += _encode_text(tokenizer, USER_HEADER + before)
    out += [ids.bop, ids.protein, ids.eop]
    out += _encode_text(tokenizer, after)
    out.append(ids.eos)
    out += _encode_text(tokenizer, ASSISTANT_HEADER)
    return out


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer followed by the end-of-turn (eos) token."""
    if not isinstance(answer, str) or not answer.strip():
        raise PromptError(f"answer must be a non-empty string, got {answer!r}")
    _reject_reserved(tokenizer, answer, "answer")
    return _encode_text(tokenizer, answer) + [special_token_ids(tokenizer).eos]


def encode_example(
    tokenizer, question: str, answer: str, max_length: int | None = None
) -> dict[str, list[int]]:
    """Encode one (question, answer) pair for training.

    Returns ``{"input_ids": [...], "labels": [...]}`` of equal length; ``labels`` is
    ``IGNORE_INDEX`` on every prompt token and equals ``input_ids`` on the answer tokens and the
    final eos.  ``max_length`` (in LLM tokens, not counting the protein span that replaces
    ``<protein>``) raises :class:`PromptError` when exceeded instead of truncating silently.
    """
    prompt = encode_prompt(tokenizer, question)
    target = encode_answer(tokenizer, answer)
    input_ids = prompt + target
    if max_length is not None and len(input_ids) > max_length:
        raise PromptError(
            f"example is {len(input_ids)} tokens ({len(prompt)} prompt + {len(target)} answer), "
            f"over max_length={max_length}"
        )
    labels = [IGNORE_INDEX] * len(prompt) + target
    return {"input_ids": input_ids, "labels": labels}
