"""The paper's text metrics (docs/method.md §6), computed with the reference libraries.

Per sample, ×100, then averaged over samples (as the reference ``evaluate_task.py`` does):

* BLEU-1..4: ``nltk.translate.bleu_score.sentence_bleu`` with the paper's cumulative weights
  (1,0,0,0), (.5,.5,0,0), (.33,.33,.33,0), (.25,.25,.25,.25), **no smoothing** by default (the
  reference's choice: a sample without any matching n-gram of a weighted order scores 0), on the
  BERTScore encoder's WordPiece tokens (the reference tokenised with its PubMedBERT tokenizer).
* ROUGE-1/2/L F-measure: ``rouge_score`` with Porter stemming, on raw text.
* METEOR: ``nltk.translate.meteor_score`` on the same WordPiece tokens; with WordNet synonyms
  when NLTK finds WordNet, otherwise exact + stem matching only, stated as "METEOR without
  synonyms" (its numbers are then lower than a run with WordNet).
* BERTScore P/R/F1: :mod:`sepit.evaluation.bertscore`.

Corpus level: sacreBLEU ``corpus_bleu`` with tokenisation ``13a`` and ``exp`` smoothing (its
defaults), with its signature string recorded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from sepit.config.base import check_choice
from sepit.evaluation.bertscore import BertScoreConfig, BertScorer

BLEU_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bleu1": (1.0, 0.0, 0.0, 0.0),
    "bleu2": (0.5, 0.5, 0.0, 0.0),
    "bleu3": (0.33, 0.33, 0.33, 0.0),  # the reference's weights (sum 0.99), kept for comparability
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}
OPEN_METRICS = (
    "bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "meteor",
    "bertscore_p", "bertscore_r", "bertscore_f1",
)
SMOOTHINGS = ("none", *(f"method{i}" for i in range(1, 8)))


@dataclass
class MetricsConfig:
    bleu_tokenization: str = "encoder_wordpiece"
    """Tokens for per-sample BLEU and METEOR: "encoder_wordpiece" (the BERTScore encoder's
    WordPiece, as the reference) or "13a" (sacreBLEU's mteval-13a tokenizer)."""
    bleu_smoothing: str = "none"
    """nltk SmoothingFunction for per-sample BLEU: "none" (the reference) or "method1".."method7"."""
    corpus_bleu_tokenize: str = "13a"
    """sacreBLEU tokenizer for corpus BLEU."""
    corpus_bleu_smooth: str = "exp"
    """sacreBLEU smoothing for corpus BLEU: exp | floor | add-k | none."""
    bertscore_enabled: bool = True
    """Compute BERTScore (needs the encoder folder; CPU cost ~1 s per 100 pairs with MiniLM)."""
    bertscore: BertScoreConfig = field(default_factory=BertScoreConfig)
    wordnet_dirs: list[str] = field(default_factory=list)
    """Extra NLTK data roots to search for ``corpora/wordnet`` (appended to ``nltk.data.path``)."""

    def __post_init__(self) -> None:
        check_choice(self.bleu_tokenization, "metrics.bleu_tokenization", ("encoder_wordpiece", "13a"))
        check_choice(self.bleu_smoothing, "metrics.bleu_smoothing", SMOOTHINGS)
        check_choice(self.corpus_bleu_tokenize, "metrics.corpus_bleu_tokenize", ("13a", "none", "intl", "char"))
        check_choice(self.corpus_bleu_smooth, "metrics.corpus_bleu_smooth", ("exp", "floor", "add-k", "none"))


# --------------------------------------------------------------------------- WordNet
class _NoSynonyms:
    """Stands in for the WordNet reader: no synonyms, so METEOR matches exact words and stems only."""

    def synsets(self, word: str) -> list:  # noqa: ARG002 - the reader's interface
        return []


def load_wordnet(extra_dirs: Sequence[str] = ()) -> tuple[object, str]:
    """NLTK's WordNet reader if its data is installed, else a no-synonym stand-in.

    Returns ``(reader, status)`` with status "wordnet" or "no_synonyms".  Never downloads.
    """
    import nltk

    for d in extra_dirs:
        if d not in nltk.data.path:
            nltk.data.path.append(d)  # NLTK 3.10 refuses corpus roots outside its data path
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        wordnet.synsets("protein")
        return wordnet, "wordnet"
    except (LookupError, OSError, AttributeError):
        return _NoSynonyms(), "no_synonyms"


DEBIAN_WORDNET = "/usr/share/wordnet"


def wordnet_detail(status: str) -> str:
    """Why METEOR has or lacks synonyms, in words (Debian's wordnet-base is not NLTK-readable)."""
    import os

    if status == "wordnet":
        return "NLTK WordNet corpus found"
    if os.path.isdir(DEBIAN_WORDNET):
        return (f"{DEBIAN_WORDNET} (Debian wordnet-base) is present but NLTK cannot read it (no 'lexnames' "
                "file, and it is not under an NLTK data root); metrics.wordnet_dirs can name a prepared root")
    return "no WordNet data installed; NLTK cannot download it offline"


# --------------------------------------------------------------------------- per-sample scores
class TextMetrics:
    """Scores (prediction, reference) pairs; loads the encoder and WordNet once."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        from rouge_score import rouge_scorer

        self.config = config or MetricsConfig()
        self._rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        self.wordnet, self.wordnet_status = load_wordnet(self.config.wordnet_dirs)
        needs_encoder = self.config.bertscore_enabled or self.config.bleu_tokenization == "encoder_wordpiece"
        self.bertscorer = BertScorer(self.config.bertscore) if needs_encoder else None
        self._tok13a = None

    _CACHE: dict[str, "TextMetrics"] = {}

    @classmethod
    def cached(cls, config: MetricsConfig | None = None) -> "TextMetrics":
        """One instance per distinct config in this process (loading the encoder costs seconds)."""
        import json

        from sepit.config.base import to_dict

        config = config or MetricsConfig()
        key = json.dumps(to_dict(config), sort_keys=True)
        if key not in cls._CACHE:
            cls._CACHE.clear()  # keep at most one encoder in memory
            cls._CACHE[key] = cls(config)
        return cls._CACHE[key]

    def tokens(self, text: str) -> list[str]:
        if self.config.bleu_tokenization == "encoder_wordpiece":
            return self.bertscorer.wordpieces(text)
        if self._tok13a is None:
            from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

            self._tok13a = Tokenizer13a()
        return self._tok13a(text.strip()).split()

    def bleu(self, ref_tokens: list[str], hyp_tokens: list[str]) -> dict[str, float]:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        smoothing = None if self.config.bleu_smoothing == "none" else getattr(SmoothingFunction(), self.config.bleu_smoothing)
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns on every zero n-gram count; 0 is the answer
            for name, w in BLEU_WEIGHTS.items():
                out[name] = 100.0 * sentence_bleu([ref_tokens], hyp_tokens, weights=w, smoothing_function=smoothing)
        return out

    def meteor(self, ref_tokens: list[str], hyp_tokens: list[str]) -> float:
        from nltk.translate.meteor_score import meteor_score

        return 100.0 * meteor_score([ref_tokens], hyp_tokens, wordnet=self.wordnet)

    def rouge(self, reference: str, prediction: str) -> dict[str, float]:
        s = self._rouge.score(reference, prediction)
        return {k: 100.0 * s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
        """Per-sample metrics ×100: ``{"bleu1": array[n], ..., "bertscore_f1": array[n]}``."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
        n = len(predictions)
        cols: dict[str, list[float]] = {k: [] for k in OPEN_METRICS if not k.startswith("bertscore")}
        for pred, ref in zip(predictions, references):
            pred = pred or ""
            rt, ht = self.tokens(ref), self.tokens(pred)
            for k, v in {**self.bleu(rt, ht), **self.rouge(ref, pred), "meteor": self.meteor(rt, ht)}.items():
                cols[k].append(v)
        out = {k: np.asarray(v, dtype=float).reshape(n) for k, v in cols.items()}
        if self.config.bertscore_enabled:
            p, r, f = self.bertscorer.score(list(predictions), list(references))
            out.update(bertscore_p=100.0 * p, bertscore_r=100.0 * r, bertscore_f1=100.0 * f)
        return out

    def describe(self) -> dict:
        """How every number was computed, for metrics.json and the report."""
        tok = (
            f"WordPiece of the BERTScore encoder ({self.bertscorer.describe()['encoder_name']})"
            if self.config.bleu_tokenization == "encoder_wordpiece"
            else "sacreBLEU 13a"
        )
        return {
            "bleu": {
                "implementation": "nltk sentence_bleu, per sample, averaged",
                "weights": {k: list(v) for k, v in BLEU_WEIGHTS.items()},
                "smoothing": self.config.bleu_smoothing,
                "tokenization": tok,
            },
            "corpus_bleu": {"implementation": "sacreBLEU corpus_bleu", "signature": corpus_bleu_signature(self.config)},
            "rouge": {"implementation": "rouge-score RougeScorer", "measure": "F", "use_stemmer": True},
            "meteor": {
                "implementation": "nltk meteor_score (alpha 0.9, beta 3, gamma 0.5)",
                "tokenization": tok,
                "synonyms": self.wordnet_status == "wordnet",
                "note": "METEOR with WordNet synonyms" if self.wordnet_status == "wordnet" else "METEOR without synonyms (WordNet not found by NLTK)",
                "wordnet_detail": wordnet_detail(self.wordnet_status),
            },
            "bertscore": self.bertscorer.describe() if self.config.bertscore_enabled else {"enabled": False},
            "scale": "x100, averaged per sample",
        }


# --------------------------------------------------------------------------- corpus BLEU
def _sacrebleu(config: MetricsConfig):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=config.corpus_bleu_tokenize, smooth_method=config.corpus_bleu_smooth)


def corpus_bleu_signature(config: MetricsConfig) -> str:
    """sacreBLEU's signature, e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``."""
    bleu = _sacrebleu(config)
    bleu.corpus_score(["a"], [["a"]])  # the signature records the reference count of a scored corpus
    return str(bleu.get_signature())


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], config: MetricsConfig) -> float:
    """sacreBLEU corpus BLEU (0-100) with the configured tokenisation and smoothing."""
    return float(_sacrebleu(config).corpus_score([p or "" for p in predictions], [list(references)]).score)


def corpus_bleu_stats(predictions: Sequence[str], references: Sequence[str], config: MetricsConfig) -> np.ndarray:
    """Per-sentence sufficient statistics [n, 2 + 2·4]: hyp_len, ref_len, correct_1..4, total_1..4.

    Summing rows of any resample and calling :func:`bleu_from_stats` gives that resample's corpus
    BLEU without re-tokenising (used by the bootstrap).  Built with sacreBLEU's own tokenizer and
    n-gram extraction; a test checks the sum reproduces ``corpus_score``.
    """
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    bleu = _sacrebleu(config)
    order = bleu.max_ngram_order
    rows = np.zeros((len(predictions), 2 + 2 * order), dtype=np.int64)
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        hyp_ngrams, hyp_len = extract_all_word_ngrams(bleu.tokenizer((pred or "").rstrip()), 1, order)
        ref_ngrams, ref_len = extract_all_word_ngrams(bleu.tokenizer(ref.rstrip()), 1, order)
        rows[i, 0], rows[i, 1] = hyp_len, ref_len
        for ngram, count in hyp_ngrams.items():
            n = len(ngram)
            rows[i, 1 + n] += min(count, ref_ngrams.get(ngram, 0))
            rows[i, 1 + order + n] += count
    return rows


def bleu_from_stats(stats_sum: np.ndarray, config: MetricsConfig) -> float:
    from sacrebleu.metrics import BLEU

    order = (len(stats_sum) - 2) // 2
    return float(
        BLEU.compute_bleu(
            correct=[int(x) for x in stats_sum[2 : 2 + order]],
            total=[int(x) for x in stats_sum[2 + order :]],
            sys_len=int(stats_sum[0]),
            ref_len=int(stats_sum[1]),
            smooth_method=config.corpus_bleu_smooth,
            max_ngram_order=order,
        ).score
    )


def accuracy(correct: Sequence[bool]) -> float:
    """Percentage of correct closed-set answers (an unparsed answer is wrong)."""
    arr = np.asarray(correct, dtype=float)
    return float(100.0 * arr.mean()) if arr.size else float("nan")
