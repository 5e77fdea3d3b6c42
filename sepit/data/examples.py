"""From input records to instruction examples: protein resolution, question generation, checks.

One :class:`ProteinEntry` per distinct (protein key, sequence); its key is the UniProt accession
when known, else the store record id, else ``seq-<sha1 of the sequence>``.  When one accession
comes with different sequences from different sources, each variant gets ``ACC~<sha1[:8]>`` so
that a protein id always means one sequence (identity clustering still puts them together).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from sepit.data.annotations import ProteinAnnotation, QAItem
from sepit.data.prompts import PromptError, normalize_question
from sepit.data.protein_join import StoreIndex, join_protein
from sepit.data.questions import (
    MC_OPTIONS_HEADER, ExampleText, caption_examples, choice_letter, format_multiple_choice, multiple_choice_examples, open_examples,
    yes_no_examples,
)
from sepit.models.tokenizer import BOP_TOKEN, BOS_TOKEN, EOP_TOKEN, EOS_TOKEN, PAD_TOKEN, PROTEIN_TOKEN, UNK_TOKEN
from sepit.structure.record import SEQUENCE_ALPHABET

RESERVED_IN_ANSWER = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, BOP_TOKEN, PROTEIN_TOKEN, EOP_TOKEN)


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class ProteinEntry:
    key: str
    accession: Optional[str]
    sequence: str
    coords: Optional[np.ndarray]
    coord_mask: Optional[np.ndarray]
    store_id: Optional[str]
    truncated_from: Optional[int] = None
    """Original length when the sequence was cut to ``max_residues``."""

    @property
    def has_structure(self) -> bool:
        return self.coord_mask is not None and bool(self.coord_mask.any())


@dataclass
class Example:
    stage: int
    text: ExampleText
    protein: ProteinEntry
    source: str
    source_file: str
    source_record: str


def resolve_protein(
    rec: Union[ProteinAnnotation, QAItem], index: StoreIndex, max_residues: int, long_policy: str,
    min_structure_identity: float,
) -> Union[ProteinEntry, str]:
    """The protein of one input record, or the reason there is none."""
    seq = rec.sequence.strip().upper() if rec.sequence else None
    if seq is not None:
        bad = sorted(set(seq) - SEQUENCE_ALPHABET)
        if bad:
            return f"sequence has characters outside the protein alphabet: {''.join(bad)!r}"
    joined = join_protein(index, rec.accession, seq, getattr(rec, "structure_file", None),
                          getattr(rec, "structure_chain", None), min_structure_identity)
    if joined is None:
        what = f"accession {rec.accession}" if rec.accession else "this record"
        return f"no sequence: the annotation has none and no protein-store record matches {what}"
    seq, coords, mask = joined.sequence, joined.coords, joined.coord_mask
    truncated_from = None
    if len(seq) > max_residues:
        if long_policy == "skip":
            return f"{len(seq)} residues exceeds max_residues={max_residues} (long_sequences=skip)"
        truncated_from = len(seq)
        seq = seq[:max_residues]  # sequence, coordinates and mask are cut together
        if coords is not None:
            coords, mask = coords[:max_residues], mask[:max_residues]
            if not mask.any():
                coords, mask = None, None
    key = rec.accession or joined.store_id or f"seq-{sha1(seq)[:12]}"
    return ProteinEntry(key, rec.accession, seq, coords, mask, joined.store_id, truncated_from)


def label_pools(annotations: Sequence[ProteinAnnotation], categories: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per category, every label any annotation carries and how many carry it (sorted by label,
    so the pool is order-independent): negatives and distractors are drawn by these counts."""
    pools: dict[str, dict[str, int]] = {}
    for c in categories:
        counts = Counter(label for a in annotations for label in set(a.labels(c)))
        pools[c] = dict(sorted(counts.items()))
    return pools


def annotation_examples(
    ann: ProteinAnnotation, protein_key: str, pools: dict[str, dict[str, int]], seed: int,
    open_categories: Sequence[str], closed_categories: Sequence[str],
    yes_no_pairs: int, mc_questions: int, mc_choices: int, open_in_stage1: bool = False,
) -> list[tuple[int, ExampleText]]:
    """Stage 0/1 captions and stage 2 open and closed-set questions of one annotation (with
    ``open_in_stage1``, the open questions also in stage 1)."""
    key = f"{protein_key}|{ann.source}"
    out = [(stage, ex) for stage, ex in caption_examples(ann, seed, key).items()]
    open_ = open_examples(ann, seed, key, open_categories)
    out += [(2, ex) for ex in open_]
    if open_in_stage1:
        out += [(1, ex) for ex in open_]
    for category in closed_categories:
        own = ann.labels(category)
        pool = pools.get(category, [])
        out += [(2, ex) for ex in yes_no_examples(own, pool, category, yes_no_pairs, seed, key)]
        out += [(2, ex) for ex in multiple_choice_examples(own, pool, category, mc_questions, mc_choices, seed, key)]
    return out


def qa_example(item: QAItem) -> ExampleText:
    """A ready-made QA pair as an example (multiple choice laid out with lettered options)."""
    if item.task == "multiple_choice":
        correct = item.choices.index(item.answer)
        if MC_OPTIONS_HEADER in item.question:  # already laid out (our own export read back)
            letter = choice_letter(correct)
            return ExampleText(item.question, f"{letter}) {item.answer}", item.task, item.category,
                               tuple(item.choices), letter)
        return format_multiple_choice(item.question, item.choices, correct, item.category)
    return ExampleText(item.question, item.answer, item.task, item.category)


def check_text(ex: ExampleText) -> tuple[Optional[ExampleText], Optional[str]]:
    """(example with exactly one ``<protein>`` in the question, None) or (None, reason)."""
    try:
        question = normalize_question(ex.question)
    except PromptError as exc:
        return None, str(exc)
    if not ex.answer or not ex.answer.strip():
        return None, "empty answer"
    for token in RESERVED_IN_ANSWER:
        if token in ex.answer:
            return None, f"answer contains the reserved token {token!r}"
    for token in RESERVED_IN_ANSWER:
        if token != PROTEIN_TOKEN and token in question:
            return None, f"question contains the reserved token {token!r}"
    if question == ex.question:
        return ex, None
    return ExampleText(question, ex.answer, ex.task, ex.category, ex.choices, ex.answer_letter), None


def finalize_protein_ids(entries: Sequence[ProteinEntry]) -> dict[int, str]:
    """id(entry) -> final protein id; keys with several sequences get ``KEY~sha1[:8]``."""
    variants: dict[str, set[str]] = {}
    for e in entries:
        variants.setdefault(e.key, set()).add(e.sequence)
    return {id(e): e.key if len(variants[e.key]) == 1 else f"{e.key}~{sha1(e.sequence)[:8]}" for e in entries}
