"""Baselines a protein LLM must beat, scored like the model (same records, same metrics).

* **Majority class** (closed-set tasks only): yes/no gets the training split's most frequent
  answer to the same question (else to the same category, else overall); multiple choice gets
  the option that was most often correct in training (ties: the first listed).
* **Constant answer**: the training split's most frequent answer per task, for every row (the
  floor for open questions: a model must say more than the commonest sentence).
* **Nearest neighbour by sequence identity**: the answer that the most similar *training*
  protein has for the same question (for open questions, else for the same category); the
  honest bar, since annotation transfer by homology is what biologists do without a model.
  Identity comes from ``sepit.data.identity`` when that module exists, else from a Biopython
  global alignment (see :class:`NeighbourRanker`).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from sepit.evaluation.answer_parsing import format_choice, gold_letter, option_letters
from sepit.evaluation.predictions import PredictionRecord

CLOSED = ("yes_no", "multiple_choice")


def question_key(question: str) -> str:
    """The question without its option list, lower case, single spaces (same wording = same key)."""
    stem = question.split("\nOptions:")[0]
    return re.sub(r"\s+", " ", stem.replace("<protein>", "")).strip().lower()


def _record(row: dict, prediction: str, **extra) -> PredictionRecord:
    return PredictionRecord(
        id=row["id"], task=row["task"], category=row.get("category") or "other", question=row["question"],
        reference=row["answer"], prediction=prediction, protein_id=row.get("protein_id"), structure_used=False,
        accession=row.get("accession"), length=len(row["sequence"]),
        choices=list(row["choices"]) if row.get("choices") is not None else None,
        answer_letter=row.get("answer_letter"), extra=extra,
    )


def _option_text(row: dict) -> str | None:
    """The correct option's text of a multiple-choice row."""
    letter = gold_letter(row["answer"], row.get("choices"), row.get("answer_letter"))
    if letter is None:
        return None
    return row["choices"][option_letters(row["choices"]).index(letter)]


def _map_answer(train_row: dict, eval_row: dict) -> str | None:
    """A training answer re-expressed for ``eval_row`` (multiple choice: its letter there)."""
    if eval_row["task"] != "multiple_choice":
        return train_row["answer"]
    text = _option_text(train_row)
    choices = eval_row.get("choices") or []
    if text not in choices:
        return None
    return format_choice(option_letters(choices)[choices.index(text)], text)


# --------------------------------------------------------------------------- majority class
def majority_baseline(train_rows: Sequence[dict], eval_rows: Sequence[dict]) -> list[PredictionRecord]:
    """Majority-class predictions for the closed-set rows of ``eval_rows``."""
    yn: dict[tuple, Counter] = defaultdict(Counter)
    mc_correct: Counter = Counter()
    for r in train_rows:
        if r["task"] == "yes_no":
            ans = r["answer"].strip().rstrip(".").capitalize()
            for key in (("q", question_key(r["question"])), ("c", r.get("category")), ("all",)):
                yn[key][ans] += 1
        elif r["task"] == "multiple_choice":
            text = _option_text(r)
            if text:
                mc_correct[text] += 1
    out = []
    for r in eval_rows:
        if r["task"] == "yes_no":
            for key, level in ((("q", question_key(r["question"])), "question"), (("c", r.get("category")), "category"), (("all",), "task")):
                if yn.get(key):
                    out.append(_record(r, yn[key].most_common(1)[0][0], baseline="majority", level=level))
                    break
            else:
                out.append(_record(r, "", baseline="majority", level="no_training_answer"))
        elif r["task"] == "multiple_choice":
            choices = r["choices"]
            best = max(range(len(choices)), key=lambda i: (mc_correct.get(choices[i], 0), -i))
            out.append(_record(r, format_choice(option_letters(choices)[best], choices[best]), baseline="majority",
                               train_count=mc_correct.get(choices[best], 0)))
    return out


# --------------------------------------------------------------------------- constant answer
def constant_baseline(train_rows: Sequence[dict], eval_rows: Sequence[dict]) -> list[PredictionRecord]:
    """One fixed answer per task, whatever the protein and the question: the training split's most
    frequent answer of that task (multiple choice: its most frequent correct letter, with this row's
    option at that letter).  What a model that learned only the answer format would score."""
    by_task: dict[str, Counter] = defaultdict(Counter)
    for r in train_rows:
        if r["task"] == "multiple_choice":
            letter = gold_letter(r["answer"], r.get("choices"), r.get("answer_letter"))
            if letter:
                by_task["multiple_choice"][letter] += 1
        else:
            by_task[r["task"]][r["answer"].strip()] += 1
    out = []
    for r in eval_rows:
        counts = by_task.get(r["task"])
        if not counts:
            out.append(_record(r, "", baseline="constant", level="no_training_answer"))
            continue
        answer = counts.most_common(1)[0][0]
        if r["task"] == "multiple_choice":
            letters = option_letters(r["choices"])
            answer = format_choice(answer, r["choices"][letters.index(answer)]) if answer in letters else answer
        out.append(_record(r, answer, baseline="constant"))
    return out


# --------------------------------------------------------------------------- nearest neighbour
def fallback_identity(a: str, b: str) -> float:
    """Identical residues of an optimal global alignment / length of the shorter sequence.

    Biopython ``PairwiseAligner`` with match 1, mismatch 0, gaps 0 scores the largest number of
    identical aligned residues (score only: fast).  Used only when ``sepit.data.identity`` (the
    dataset builder's BLOSUM62 alignment identity, same shorter-length convention) is absent.
    """
    from Bio.Align import PairwiseAligner

    aligner = PairwiseAligner(mode="global", match_score=1.0, mismatch_score=0.0, gap_score=0.0)
    return float(aligner.score(a, b)) / min(len(a), len(b))


class NeighbourRanker:
    """Training proteins ranked by sequence identity to a query.

    With ``sepit.data.identity`` present, :meth:`rank` aligns the ``max_candidates`` training
    proteins with the most similar 3-mer sets (its k-mer prefilter: a weak homolog outside them
    is missed); otherwise every training protein is scored with :func:`fallback_identity`.
    :meth:`rank_among` scores a given subset exactly (the proteins asked one question).
    """

    def __init__(self, sequences: dict[str, str], max_candidates: int = 50) -> None:
        self.ids = list(sequences)
        self.seqs = dict(sequences)
        self.max_candidates = max_candidates
        try:
            from sepit.data import identity as ident
        except ImportError:
            ident = None
        self._ident = ident
        self.description = (
            f"sepit.data.identity (BLOSUM62 alignment identity / shorter length) over the {max_candidates} "
            "training proteins with the most similar 3-mer sets, else over the proteins asked the same question"
            if ident else "Biopython global alignment: identical residues / shorter length, all training proteins"
        )
        if ident is not None and self.ids:
            self._train_kmers = ident.kmer_matrix([self.seqs[i] for i in self.ids], 3)
        self._ranked: dict[str, list[tuple[float, str]]] = {}
        self._pair: dict[tuple[str, str], float] = {}

    def identity(self, query: str, pid: str) -> float:
        key = (query, pid)
        if key not in self._pair:
            fn = self._ident.sequence_identity if self._ident is not None else fallback_identity
            self._pair[key] = float(fn(query, self.seqs[pid]))
        return self._pair[key]

    def rank(self, query: str) -> list[tuple[float, str]]:
        """``[(identity, protein id), ...]`` best first (ties by id)."""
        if query not in self._ranked:
            if self._ident is None:
                pids = self.ids
            else:
                sim = (self._ident.kmer_matrix([query], 3) @ self._train_kmers.T).toarray().ravel()
                pids = [self.ids[i] for i in np.argsort(-sim, kind="stable")[: self.max_candidates]]
            self._ranked[query] = self.rank_among(query, pids)
        return self._ranked[query]

    def rank_among(self, query: str, pids: Sequence[str]) -> list[tuple[float, str]]:
        return sorted(((self.identity(query, p), p) for p in pids), key=lambda x: (-x[0], x[1]))


def nearest_neighbour_baseline(
    train_rows: Sequence[dict], eval_rows: Sequence[dict], max_candidates: int = 50, max_askers: int = 200,
) -> tuple[list[PredictionRecord], str]:
    """Answer each eval row with the answer of its most similar training protein.

    The nearest training proteins are tried in order of identity until one has an answer for the
    same question; failing that, the most identical of the training proteins that *were* asked
    that question (at most ``max_askers`` of them) answers; open questions then fall back to the
    nearest protein's answer in the same category.  A multiple-choice answer counts only if the
    neighbour's correct option is among this row's options.  A row nothing can answer gets an
    empty prediction (scored, never dropped).  Returns (records, how identity was computed).
    """
    proteins: dict[str, str] = {}
    answers: dict[tuple, dict] = {}
    askers: dict[tuple, list[str]] = {}
    for r in train_rows:
        pid = r.get("protein_id") or r["id"]
        proteins.setdefault(pid, r["sequence"])
        keys = [question_key(r["question"])]
        if r["task"] not in CLOSED:
            keys.append("category:" + (r.get("category") or "other"))
        for key in keys:
            if (pid, r["task"], key) not in answers:
                answers[(pid, r["task"], key)] = r
                askers.setdefault((r["task"], key), []).append(pid)
    ranker = NeighbourRanker(proteins, max_candidates)
    out = []
    for r in eval_rows:
        qkey = question_key(r["question"])
        attempts = [("question", qkey, ranker.rank(r["sequence"])),
                    ("question", qkey, lambda: ranker.rank_among(r["sequence"], askers.get((r["task"], qkey), [])[:max_askers]))]
        if r["task"] not in CLOSED:
            cat = "category:" + (r.get("category") or "other")
            attempts.append(("category", cat, ranker.rank(r["sequence"])))
        pred, info = "", {"neighbour": None, "identity": None, "match": None}
        for match, key, ranked in attempts:
            for ident, pid in (ranked() if callable(ranked) else ranked):
                hit = answers.get((pid, r["task"], key))
                mapped = _map_answer(hit, r) if hit is not None else None
                if mapped is not None:
                    pred, info = mapped, {"neighbour": pid, "identity": round(ident, 4), "match": match}
                    break
            if info["neighbour"] is not None:
                break
        out.append(_record(r, pred, baseline="nearest_neighbour", **info))
    return out, ranker.description
