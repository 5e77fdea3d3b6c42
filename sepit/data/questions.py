"""Question templates and the open / yes-no / multiple-choice examples made from annotations.

Every question holds the placeholder ``<protein>`` exactly once.  All random choices (template,
negative label, option order) come from :func:`rng_for`, seeded by the build seed *and* the
protein and category, so one protein's questions do not change when other proteins are added.

Multiple-choice format (documented contract):
    question  = "<stem>\\nOptions:\\nA) <choice 1>\\nB) <choice 2>\\n...\\nAnswer with the letter and the option."
    choices   = ["<choice 1>", "<choice 2>", ...]   (bare option texts, in display order)
    answer    = "B) <choice 2>"                     (letter, ")", space, option text)
    answer_letter = "B"
Yes/no answers are exactly ``"Yes"`` or ``"No"``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from sepit.data.annotations import ProteinAnnotation

PLACEHOLDER = "<protein>"
CAPTION_QUESTION = "Describe the function of <protein>."
CAPTION_PARAPHRASES = (
    CAPTION_QUESTION,
    "What is the function of <protein>?",
    "What does <protein> do?",
    "Summarize the biological role of <protein>.",
    "Give a short functional description of <protein>.",
    "Explain what <protein> does in the cell.",
    "<protein>\nDescribe the function of this protein.",
)
OPEN_TEMPLATES: Mapping[str, Sequence[str]] = {
    "function": ("What is the function of <protein>?", "What biological role does <protein> play?",
                 "<protein>\nWhat is known about the function of this protein?"),
    "location": ("Where in the cell is <protein> located?", "What is the subcellular location of <protein>?",
                 "<protein>\nIn which cellular compartment is this protein found?"),
    "family": ("Which protein family does <protein> belong to?", "What family is <protein> a member of?"),
    "domains_motifs": ("Which domains or motifs does <protein> contain?",
                       "List the domains and motifs of <protein>."),
    "keywords": ("Which UniProt keywords describe <protein>?", "List the UniProt keywords of <protein>."),
    "go": ("Which Gene Ontology terms are annotated to <protein>?", "List the GO terms of <protein>."),
    "ec": ("What is the EC number of <protein>?", "Which enzyme class (EC number) does <protein> have?"),
    "catalytic_activity": ("What reaction does <protein> catalyze?", "Which chemical reaction is catalyzed by <protein>?"),
}
YES_NO_TEMPLATES: Mapping[str, str] = {
    "location": "Is \"{label}\" a subcellular location of <protein>?",
    "family": "Does <protein> belong to the {label}?",
    "domains_motifs": "Does <protein> contain the domain or motif \"{label}\"?",
    "keywords": "Does the UniProt keyword \"{label}\" apply to <protein>?",
    "go": "Is <protein> annotated with the GO term \"{label}\"?",
    "ec": "Does <protein> have the EC number {label}?",
}
MC_TEMPLATES: Mapping[str, str] = {
    "location": "Which of the following is a subcellular location of <protein>?",
    "family": "Which family does <protein> belong to?",
    "domains_motifs": "Which of the following domains or motifs does <protein> contain?",
    "keywords": "Which of the following UniProt keywords applies to <protein>?",
    "go": "Which of the following GO terms is annotated to <protein>?",
    "ec": "Which EC number does <protein> have?",
}
CLOSED_SET_CATEGORIES = tuple(YES_NO_TEMPLATES)
MC_INSTRUCTION = "Answer with the letter and the option."
MC_OPTIONS_HEADER = "\nOptions:\n"
GO_ASPECTS = (("F", "Molecular function"), ("P", "Biological process"), ("C", "Cellular component"))


@dataclass(frozen=True)
class ExampleText:
    """The text side of one instruction record."""

    question: str
    answer: str
    task: str
    category: str
    choices: Optional[tuple[str, ...]] = None
    answer_letter: Optional[str] = None


def rng_for(seed: int, *keys: object) -> random.Random:
    """A Random seeded by ``seed`` and ``keys`` through sha256 (stable across runs and Pythons)."""
    digest = hashlib.sha256("|".join(map(str, (seed, *keys))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def choice_letter(index: int) -> str:
    if not 0 <= index < 26:
        raise ValueError(f"option index {index} has no letter (at most 26 options)")
    return chr(ord("A") + index)


def format_multiple_choice(stem: str, choices: Sequence[str], correct: int, category: str) -> ExampleText:
    """Lay out a multiple-choice question; ``correct`` indexes ``choices``."""
    lines = [stem + MC_OPTIONS_HEADER.rstrip("\n")] + [f"{choice_letter(i)}) {c}" for i, c in enumerate(choices)]
    lines.append(MC_INSTRUCTION)
    letter = choice_letter(correct)
    return ExampleText("\n".join(lines), f"{letter}) {choices[correct]}", "multiple_choice", category,
                       tuple(choices), letter)


# --------------------------------------------------------------------------- open answers
def open_answer(ann: ProteinAnnotation, category: str) -> Optional[str]:
    """The answer text of the open question of ``category``, or None when the field is empty."""
    if category == "function":
        return ann.function
    if category == "location":
        if ann.location_text:
            return ann.location_text
        return ". ".join(ann.locations) + "." if ann.locations else None
    if category == "family":
        return ann.family
    if category == "domains_motifs":
        return "; ".join(ann.domains_motifs) or None
    if category == "keywords":
        return "; ".join(ann.keywords) or None
    if category == "go":
        parts = []
        for aspect, title in GO_ASPECTS:
            terms = [t.term for t in ann.go if t.aspect == aspect]
            if terms:
                parts.append(f"{title}: {'; '.join(terms)}.")
        return " ".join(parts) or None
    if category == "ec":
        return "; ".join(f"EC {e}" for e in ann.ec) or None
    if category == "catalytic_activity":
        return "; ".join(ann.catalytic_activity) or None
    raise ValueError(f"no open question for category {category!r}")


def caption_examples(ann: ProteinAnnotation, seed: int, key: str) -> dict[int, ExampleText]:
    """Stage 0 (fixed prompt) and stage 1 (a paraphrase) caption examples, keyed by stage."""
    if not ann.function:
        return {}
    paraphrase = rng_for(seed, key, "caption").choice(CAPTION_PARAPHRASES)
    return {
        0: ExampleText(CAPTION_QUESTION, ann.function, "caption", "caption"),
        1: ExampleText(paraphrase, ann.function, "caption", "caption"),
    }


def open_examples(ann: ProteinAnnotation, seed: int, key: str, categories: Sequence[str]) -> list[ExampleText]:
    out = []
    for category in categories:
        answer = open_answer(ann, category)
        if answer:
            template = rng_for(seed, key, "open", category).choice(OPEN_TEMPLATES[category])
            out.append(ExampleText(template, answer, "open", category))
    return out


# --------------------------------------------------------------------------- closed set
LabelPool = Union[Sequence[str], Mapping[str, int]]
"""A category's labels: ``{label: proteins carrying it}`` (negatives drawn by frequency) or a
plain sequence of labels (each equally likely)."""


def negative_candidates(own: Sequence[str], pool: LabelPool) -> list[str]:
    """Labels other proteins carry in this category, minus this protein's and related ones.

    Labels that contain each other ("Membrane" / "Cell membrane") are not safe negatives: the
    protein may well carry the broader one without the source saying so.
    """
    if not own:
        return []
    own_l = [o.lower() for o in own]
    return [label for label in pool
            if not any(label.lower() in o or o in label.lower() for o in own_l)]


def sample_negatives(rng: random.Random, negatives: Sequence[str], pool: LabelPool, k: int) -> list[str]:
    """``k`` distinct labels of ``negatives`` drawn without replacement, each with probability in
    proportion to its weight in ``pool`` (1 for a plain sequence): weighted reservoir keys
    ``u ** (1 / w)`` (Efraimidis & Spirakis), the ``k`` largest in draw order."""
    weights = pool if isinstance(pool, Mapping) else {}
    keyed = [(rng.random() ** (1.0 / max(int(weights.get(label, 1)), 1)), label) for label in negatives]
    keyed.sort(key=lambda kv: -kv[0])
    return [label for _, label in keyed[:k]]


def yes_no_examples(
    own: Sequence[str], pool: LabelPool, category: str, n_pairs: int, seed: int, key: str
) -> list[ExampleText]:
    """``n_pairs`` (Yes, No) pairs: own labels vs labels drawn from other proteins' labels.

    Exactly balanced: a pair is emitted only when both a positive and a negative exist.  With
    label counts as the pool, a negative is drawn as often as its label is carried, just as a
    positive is; so every label is asked about about as often with "No" as with "Yes", and the
    wording of a question does not give its answer away (drawn uniformly over distinct labels,
    rare labels such as "Cytoplasm, P-body" were almost only ever negatives: the majority class
    of the question alone answered 78% of the yes/no questions).
    """
    if not own or n_pairs <= 0:
        return []
    negatives = negative_candidates(own, pool)
    if not negatives:
        return []
    rng = rng_for(seed, key, "yes_no", category)
    positives = rng.sample(list(own), min(n_pairs, len(own)))
    chosen_neg = sample_negatives(rng, negatives, pool, min(len(positives), len(negatives)))
    template = YES_NO_TEMPLATES[category]
    out = []
    for pos, neg in zip(positives, chosen_neg):
        out.append(ExampleText(template.format(label=pos), "Yes", "yes_no", category))
        out.append(ExampleText(template.format(label=neg), "No", "yes_no", category))
    return out


def multiple_choice_examples(
    own: Sequence[str], pool: LabelPool, category: str, n_questions: int, n_choices: int,
    seed: int, key: str,
) -> list[ExampleText]:
    """``n_questions`` questions, each with one own label and ``n_choices - 1`` distractors
    (drawn by label frequency with label counts as the pool, as for yes/no: otherwise the
    commonest label among the options is nearly always the answer)."""
    if not own or n_questions <= 0:
        return []
    negatives = negative_candidates(own, pool)
    if len(negatives) < n_choices - 1:
        return []
    rng = rng_for(seed, key, "mc", category)
    out = []
    for correct_label in rng.sample(list(own), min(n_questions, len(own))):
        options = sample_negatives(rng, negatives, pool, n_choices - 1) + [correct_label]
        rng.shuffle(options)
        out.append(format_multiple_choice(MC_TEMPLATES[category], options, options.index(correct_label), category))
    return out
