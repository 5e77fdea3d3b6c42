"""Closed-set answers are read from the generated text only, robustly and without regex traps."""

from __future__ import annotations

import pytest

from sepit.evaluation.answer_parsing import gold_letter, parse_choice, parse_yes_no
from sepit.evaluation.predictions import PredictionRecord
from sepit.evaluation.task_metrics import closed_set_outcome

# The DeepLoc options of the bundled multiple-choice records.
LOCATIONS = [
    "Cell membrane", "Cytoplasm", "Endoplasmic reticulum", "Extracellular", "Golgi apparatus",
    "Lysosome/Vacuole", "Mitochondrion", "Nucleus", "Peroxisome", "Plastid",
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "yes"), ("yes", "yes"), ("YES, it is an enzyme.", "yes"), ("no,", "no"),
        ("No. It lacks a catalytic site.", "no"), ("Answer: yes", "yes"), ("The answer is no.", "no"),
        ("It is, yes.", "yes"), ("not yes but no", None), ("It is not an enzyme.", None),
        ("Nobody knows", None), ("yesterday", None), ("", None), (None, None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"), ("(B)", "B"), ("B)", "B"), ("B) Cytoplasm", "B"), ("b.", "B"), ("Answer: C", "C"),
        ("answer: c.", "C"), ("The answer is (G).", "G"), ("Option H", "H"), ("I think (D) fits.", "D"),
        ("Cytoplasm", "B"), ("It is located in the mitochondrion.", "G"), ("Lysosome/Vacuole", "F"),
        ("Cell membrane", "A"),  # not also "membrane"-something: the longest mention wins
        ("The answer is a kinase of the nucleus", "H"),  # "a" is an article, not option A
        ("Answer: Z", None), ("(K)", None), ("It binds DNA.", None), ("", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text, LOCATIONS) == expected


def test_regex_metacharacters_in_options_are_literal():
    choices = ["Na(+)/H(+) antiporter", "[Fe-S] cluster.*", "Kinase"]
    assert parse_choice("a Na(+)/H(+) antiporter", choices) == "A"
    assert parse_choice("Na+/H+ antiporter", choices) is None  # "(+)" is not a regex group
    assert parse_choice("an S cluster protein", choices) is None  # "[Fe-S]" is not a class
    assert parse_choice("binds a [Fe-S] cluster.* here", choices) == "B"


def test_gold_letter_forms():
    assert gold_letter("B) Cytoplasm", LOCATIONS) == "B"
    assert gold_letter("Mitochondrion", LOCATIONS) == "G"
    assert gold_letter("whatever", LOCATIONS, answer_letter="d") == "D"
    assert gold_letter("Unknown place", LOCATIONS) is None


def _rec(question, prediction, reference, task="yes_no", choices=None):
    return PredictionRecord(
        id="x", task=task, category="location", question=question, reference=reference,
        prediction=prediction, choices=choices,
    )


@pytest.mark.parametrize("reference", ["Yes", "No"])
def test_the_questions_own_yes_or_no_never_counts(reference):
    q = "<protein>\nIs this protein located in the nucleus? Answer yes or no."
    parsed, gold, correct = closed_set_outcome(_rec(q, "It binds DNA.", reference))
    assert parsed is None and not correct and gold == reference.lower()
    # The reference's approach (last yes/no anywhere in prompt + answer) would have scored this:
    assert q.lower().split()[-1].strip(".") == "no"


def test_multiple_choice_outcome_uses_generated_text_only():
    q = "<protein>\nWhere is it? Options: A) Cell membrane B) Cytoplasm C) Endoplasmic reticulum. Answer: B"
    rec = _rec(q, "Probably somewhere.", "B) Cytoplasm", task="multiple_choice", choices=LOCATIONS)
    assert closed_set_outcome(rec) == (None, "B", False)
    rec.prediction = "B) Cytoplasm"
    assert closed_set_outcome(rec) == ("B", "B", True)
