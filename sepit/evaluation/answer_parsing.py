"""Read a closed-set answer (yes/no, multiple-choice letter) out of a model's generated text.

Only the *generated* tokens are parsed: the caller passes the decoded new tokens, never the
prompt.  (The reference searched the decoded prompt + answer with an unescaped regex and took
the last "yes"/"no" it found, so a question such as "Is it a membrane protein, yes or no?" could
score itself; docs/method.md §6.)  Every pattern built from data goes through ``re.escape``.

Parsing returns ``None`` when the answer is absent or ambiguous; an unparsed answer counts as
wrong and the report counts how many there were.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

LETTERS = string.ascii_uppercase

# "Answer: C", "The answer is (B)", "Option D", "choice b" -- a letter introduced by a cue word.
_CUE = r"(?:answer|option|choice)"
# The letter must end there ("Answer: C.", "answer is (b)"), so "the answer is a kinase" is no "A".
_CUE_LETTER = re.compile(
    rf"\b{_CUE}\s*(?:is|would be)?\s*[:\-]?\s*(?:\(\s*([A-Za-z])\s*\)|([A-Za-z])(?:\)|(?=\s*(?:$|[.,;!\n]))))",
    re.IGNORECASE,
)
# "(B)" anywhere, or "B)" / "B." / "B:" at the very start of the answer.
_PAREN_LETTER = re.compile(r"\(\s*([A-Z])\s*\)")
_LEADING_LETTER = re.compile(r"^\s*([A-Z])\s*[\).:](?:\s|$)")
# The whole answer is a single letter, optionally with punctuation ("B", "b.", "(c)").
_BARE_LETTER = re.compile(r"^\W*([A-Za-z])\W*$")
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?answer\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def normalize_yes_no(text: str | None) -> str | None:
    """A reference label "Yes" / "no." / " YES " -> "yes" / "no"; anything else -> None."""
    if text is None:
        return None
    t = text.strip().strip(string.punctuation + " ").lower()
    return t if t in ("yes", "no") else None


def parse_yes_no(generated: str | None) -> str | None:
    """The yes/no answer of a generated text, or None when absent or contradictory.

    The first word decides when it is yes/no ("Yes.", "no, it is not", "Answer: yes"); otherwise
    the text must mention only one of the two words ("It is, yes."); a text that says both
    ("not yes but no") without leading with one is ambiguous and returns None.
    """
    if not generated:
        return None
    text = _ANSWER_PREFIX.sub("", generated, count=1)
    words = re.findall(r"[A-Za-z]+", text)
    if words and words[0].lower() in ("yes", "no"):
        return words[0].lower()
    found = {m.group(1).lower() for m in _YES_NO.finditer(text)}
    return found.pop() if len(found) == 1 else None


def option_letters(choices: Sequence[str]) -> str:
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices; at most {len(LETTERS)} can be lettered")
    return LETTERS[: len(choices)]


def format_choice(letter: str, text: str) -> str:
    """The canonical multiple-choice answer text, e.g. ``"B) Cytoplasm"``."""
    return f"{letter}) {text}"


def gold_letter(answer: str | None, choices: Sequence[str] | None, answer_letter: str | None = None) -> str | None:
    """The correct option letter of a multiple-choice example.

    Taken from ``answer_letter`` when given; else from an answer written ``"B) Cytoplasm"``;
    else by finding the answer text among ``choices`` (case-insensitive).
    """
    if answer_letter:
        return answer_letter.strip().upper()[:1] or None
    if not choices:
        return None
    letters = option_letters(choices)
    if answer:
        m = _LEADING_LETTER.match(answer)
        if m and m.group(1) in letters:
            return m.group(1)
        norm = answer.strip().lower()
        for letter, choice in zip(letters, choices):
            if choice.strip().lower() == norm:
                return letter
    return None


def _mentioned_choice(text: str, choices: Sequence[str], letters: str) -> str | None:
    """Letter of the option whose text appears first in ``text`` (longest option wins a tie).

    Options that are substrings of a longer mentioned option ("membrane" inside "Cell
    membrane") are not counted on their own.
    """
    hits: list[tuple[int, int, str]] = []  # (start, -length, letter)
    lower = text.lower()
    for letter, choice in zip(letters, choices):
        c = choice.strip().lower()
        if not c:
            continue
        for m in re.finditer(rf"(?<![A-Za-z0-9]){re.escape(c)}(?![A-Za-z0-9])", lower):
            hits.append((m.start(), -(m.end() - m.start()), letter))
    if not hits:
        return None
    hits.sort()
    # Drop hits lying inside an earlier, longer hit.
    kept: list[tuple[int, int, str]] = []
    for start, neg_len, letter in hits:
        if kept and start < kept[-1][0] - kept[-1][1]:
            continue
        kept.append((start, neg_len, letter))
    return kept[0][2]


def parse_choice(generated: str | None, choices: Sequence[str]) -> str | None:
    """The option letter a generated answer picks, or None.

    Recognised, in this order: "Answer: C" / "the answer is (B)" / "option D"; an answer that is
    one letter ("B", "(b)."); "B)" / "B." at the start; "(B)" anywhere; else the option text
    itself ("Cytoplasm", "It is located in the cytoplasm").  Letters outside the options are
    ignored.
    """
    if not generated or not choices:
        return None
    letters = option_letters(choices)
    for m in _CUE_LETTER.finditer(generated):
        letter = (m.group(1) or m.group(2)).upper()
        if letter in letters:
            return letter
    m = _BARE_LETTER.match(generated)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = _LEADING_LETTER.match(generated)
    if m and m.group(1) in letters:
        return m.group(1)
    for m in _PAREN_LETTER.finditer(generated):
        if m.group(1) in letters:
            return m.group(1)
    return _mentioned_choice(generated, choices, letters)
