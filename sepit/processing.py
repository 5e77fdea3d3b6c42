"""The SEPIT processor: everything between texts/proteins and the model's ids and tensors.

As a Hugging Face processor does for a vision-language model, :class:`SepitProcessor` holds in
one object what turns a question, an answer and a protein into model inputs, and generated ids
back into text:

* the LLM tokenizer (with the SEPIT special tokens, :mod:`sepit.models.tokenizer`);
* the chat template (system prompt, user/assistant turns, ``<bop><protein><eop>``,
  :mod:`sepit.data.prompts`) and the label mask of a training example;
* protein tokenisation: fair-esm residue ids, the model's ``max_residues`` limit and the
  inference crop ``crop_residues`` the model was trained with;
* collation: padding (right for training and scoring, left for generation), attention masks,
  labels with ``IGNORE_INDEX`` on everything but the answer.

The model itself only sees ids and tensors (``forward``, ``generate``); the processor is saved
into the same folder (``tokenizer/``) and reads its protein settings from the model's
``config.json``, so every model folder, also those written before the processor existed, loads
both::

    processor = SepitProcessor.from_pretrained(folder)
    model = SepitForConditionalGeneration.from_pretrained(folder)
    answers = generate_answers(model, processor, ["What does <protein> do?"], [(sequence, None, None)])

This module sits above both :mod:`sepit.models` and :mod:`sepit.data`; neither imports it.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sepit.data import prompts
from sepit.errors import SepitError
from sepit.models.protein_batch import DEFAULT_MAX_RESIDUES, ProteinBatch, collate_proteins
from sepit.models.tokenizer import IGNORE_INDEX, TOKENIZER_DIR, load_llm_tokenizer, special_token_ids


class ProcessorError(SepitError, ValueError):
    """A folder holds no usable SEPIT processor; the message names the folder and why."""


class SepitProcessor:
    """Tokenizer + chat template + protein tokenisation + collation (see the module docstring).

    ``alphabet`` is the fair-esm alphabet name of the model's protein encoder; ``max_residues``
    and ``crop_residues`` are the model config's (:class:`~sepit.models.sepit_lm.SepitConfig`).
    """

    def __init__(self, tokenizer, alphabet: str = "ESM-1b", max_residues: int = DEFAULT_MAX_RESIDUES,
                 crop_residues: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.token_ids = special_token_ids(tokenizer)
        self.alphabet_name = alphabet
        self.max_residues = max_residues
        self.crop_residues = crop_residues

    @classmethod
    def for_model(cls, tokenizer, config) -> "SepitProcessor":
        """The processor of a model built from ``config`` (a ``SepitConfig``) with ``tokenizer``."""
        return cls(tokenizer, alphabet=config.encoder.alphabet, max_residues=config.max_residues,
                   crop_residues=config.crop_residues)

    @cached_property
    def alphabet(self):
        """The fair-esm alphabet proteins are tokenised with."""
        import esm

        return esm.data.Alphabet.from_architecture(self.alphabet_name)

    @property
    def vocab_size(self) -> int:
        """LLM vocabulary size (special tokens included): the model's embedding rows."""
        return len(self.tokenizer)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the tokenizer into ``<directory>/tokenizer/`` (the model folder's layout); the
        protein settings are the model's and live in its ``config.json``."""
        out = Path(directory)
        (out / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "SepitProcessor":
        """The processor of a SEPIT model folder: ``tokenizer/`` and the protein settings of
        ``config.json`` (encoder alphabet, ``max_residues``, ``crop_residues``)."""
        folder = Path(directory)
        path = folder / "config.json"
        if not path.is_file():
            raise ProcessorError(f"{folder} has no config.json; is it a SEPIT model folder?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ProcessorError(f"{path}: invalid JSON ({exc})") from None
        sepit = data.get("sepit") if isinstance(data, dict) else None
        if not isinstance(sepit, dict):
            raise ProcessorError(f"{path} is not a SEPIT model config (no 'sepit' section)")
        alphabet = data.get("encoder_alphabet") or (sepit.get("encoder") or {}).get("alphabet", "ESM-1b")
        return cls(load_llm_tokenizer(folder / TOKENIZER_DIR), alphabet=alphabet,
                   max_residues=int(sepit.get("max_residues", DEFAULT_MAX_RESIDUES)),
                   crop_residues=sepit.get("crop_residues"))

    # ------------------------------------------------------------------ chat template
    def encode_prompt(self, question: str) -> list[int]:
        """Token ids of the chat prompt for ``question`` (:func:`sepit.data.prompts.encode_prompt`)."""
        return prompts.encode_prompt(self.tokenizer, question)

    def encode_answer(self, answer: str) -> list[int]:
        """Token ids of ``answer`` and the end-of-turn token (:func:`sepit.data.prompts.encode_answer`)."""
        return prompts.encode_answer(self.tokenizer, answer)

    def encode_example(self, question: str, answer: str, max_length: int | None = None) -> dict[str, list[int]]:
        """``{"input_ids", "labels"}`` of a (question, answer) pair (:func:`sepit.data.prompts.encode_example`)."""
        return prompts.encode_example(self.tokenizer, question, answer, max_length=max_length)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids (special tokens dropped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_answers(self, ids: Sequence[Sequence[int]], stop: Sequence[str] | None = None) -> list[str]:
        """Texts of generated id rows, each cut at the first of the ``stop`` strings."""
        texts = [self.decode(row) for row in ids]
        for x in stop or []:
            texts = [t.split(x, 1)[0] if x else t for t in texts]
        return texts

    def stop_check(self, stop: Sequence[str] | None) -> Callable[[int, list[int]], bool] | None:
        """``model.generate``'s ``stop_check``: True once a row's text holds a stop string
        (None without stop strings, so decoding runs no Python per row)."""
        stops = [x for x in (stop or []) if x]
        if not stops:
            return None

        def check(_row: int, ids: list[int]) -> bool:
            text = self.decode(ids)
            return any(x in text for x in stops)

        return check

    # ------------------------------------------------------------------ proteins
    def protein_batch(self, proteins: Sequence[tuple], truncate: bool = False) -> ProteinBatch:
        """ESM batch of ``(sequence, coords|None, mask|None)`` for inference: a protein over
        ``max_residues`` is an error unless ``truncate``; the rest are cut to ``crop_residues``."""
        if self.crop_residues is not None and not truncate:
            collate_proteins(self.alphabet, [(p[0], None, None) for p in proteins],
                             max_residues=self.max_residues)  # raises ProteinBatchError naming the item
        limit = min(self.max_residues, self.crop_residues or self.max_residues)
        return collate_proteins(self.alphabet, list(proteins), max_residues=limit,
                                truncate=truncate or self.crop_residues is not None)

    # ------------------------------------------------------------------ collation
    def pad(self, sequences: Sequence[Sequence[int]], padding_side: str = "right",
            labels: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"[, "labels"]}`` [B, T] of id lists padded with ``<pad>``
        (labels with ``IGNORE_INDEX``) on ``padding_side``."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.token_ids.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        lab = None if labels is None else torch.full_like(ids, IGNORE_INDEX)
        for b, seq in enumerate(sequences):
            n = len(seq)
            cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
            ids[b, cols] = torch.tensor(list(seq), dtype=torch.long)
            mask[b, cols] = 1
            if lab is not None:
                lab[b, cols] = torch.tensor(list(labels[b]), dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if lab is not None:
            out["labels"] = lab
        return out

    def generation_inputs(self, questions: Sequence[str], proteins: Sequence[tuple], truncate: bool = False,
                          prompt_ids: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        """``model.generate`` / ``model.build_generation_inputs`` keyword arguments: left-padded
        prompts (``input_ids``, ``attention_mask``) and the ``protein`` batch, one per question.

        ``prompt_ids`` (:meth:`encode_prompt` of each question, e.g. from a server that tokenised
        the request once when validating it) skips tokenising again."""
        if len(questions) != len(proteins):
            raise ValueError(f"{len(questions)} questions but {len(proteins)} proteins; pass one protein per question")
        if not questions:
            raise ValueError("generate() needs at least one question")
        if prompt_ids is not None and len(prompt_ids) != len(questions):
            raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(questions)} questions")
        encoded = list(prompt_ids) if prompt_ids is not None else [self.encode_prompt(q) for q in questions]
        return {**self.pad(encoded, padding_side="left"), "protein": self.protein_batch(proteins, truncate)}

    def collate_training(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]], proteins: Sequence[tuple],
                         max_residues: int) -> dict[str, Any]:
        """A training batch: ``(input_ids, labels)`` examples right-padded, and their proteins cut
        to the training crop ``max_residues`` (``truncate=True``)."""
        batch = self.pad([ids for ids, _ in examples], padding_side="right", labels=[lab for _, lab in examples])
        batch["protein"] = collate_proteins(self.alphabet, list(proteins), max_residues=max_residues, truncate=True)
        return batch


@torch.no_grad()
def generate_answers(model, processor: SepitProcessor, questions: Sequence[str], proteins: Sequence[tuple],
                     max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None,
                     truncate: bool = False) -> list[str]:
    """Answer each question about its protein with ``model``; returns only the generated text.

    ``proteins[i]`` is ``(sequence, coords [n, 3] Å | None, coord_mask [n] | None)``; batched
    with left padding.  Generation ends at eos, after ``max_new_tokens``, or at the first of the
    ``stop`` strings (cut from the text).
    """
    inputs = processor.generation_inputs(questions, proteins, truncate)
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                         top_p=top_p, seed=seed, stop_check=processor.stop_check(stop))
    return processor.decode_answers(ids, stop)
