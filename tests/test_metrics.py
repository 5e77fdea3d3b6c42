"""Metric parity on real answer texts: our numbers equal the reference libraries' on the same inputs."""

from __future__ import annotations

import gzip
import json
import warnings

import numpy as np
import pytest

from sepit.evaluation.bootstrap import BootstrapConfig, mean_ci, statistic_ci
from sepit.evaluation.metrics import (
    BLEU_WEIGHTS,
    MetricsConfig,
    TextMetrics,
    bleu_from_stats,
    corpus_bleu,
    corpus_bleu_stats,
)
from sepit.resources import data_path


@pytest.fixture(scope="module")
def pairs():
    """(predictions, references): real answers from the bundled QA file, each scored against a
    neighbouring answer (same source, often the same template) so overlap ranges from none to high."""
    rows = [json.loads(line) for line in gzip.open(data_path("derived", "qa.jsonl.gz"), "rt")]
    texts = [r["answer"] for r in rows if r["task_type"] not in ("yes_no", "subcellular_location_mc")]
    texts = [t for t in texts if len(t) < 600][:81]
    refs = texts[:80]
    preds = texts[1:81]
    preds[0] = refs[0]  # one exact match
    preds[1] = ""  # one empty generation
    return preds, refs


@pytest.fixture(scope="module")
def text_metrics():
    return TextMetrics.cached(MetricsConfig())


@pytest.fixture(scope="module")
def ours(pairs, text_metrics):
    """Our per-sample scores of all pairs, computed once."""
    return text_metrics.score(*pairs)


def test_bleu_per_sample_matches_nltk_and_sacrebleu(pairs, text_metrics, ours):
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu
    from sacrebleu.metrics import BLEU

    preds, refs = pairs
    sacre = BLEU(tokenize="none", smooth_method="none", effective_order=False)
    for i, (p, r) in enumerate(zip(preds, refs)):
        rt, ht = text_metrics.tokens(r), text_metrics.tokens(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, w in BLEU_WEIGHTS.items():
                # The reference's exact call: corpus_bleu on one tokenised sample, no smoothing.
                expected = 100 * nltk_corpus_bleu([[rt]], [ht], weights=w)
                assert ours[name][i] == pytest.approx(expected, abs=1e-9), (name, i)
        # An independent implementation agrees on unsmoothed BLEU-4 over the same tokens.
        if ht:
            s4 = sacre.sentence_score(" ".join(ht), [" ".join(rt)]).score
            assert ours["bleu4"][i] == pytest.approx(s4, abs=1e-6), i
    assert ours["bleu1"][0] == pytest.approx(100.0)
    assert ours["bleu4"][1] == 0.0
    assert 0 < ours["bleu1"].mean() < 100


def test_corpus_bleu_matches_sacrebleu_and_stats_reproduce_it(pairs):
    import sacrebleu

    preds, refs = pairs
    cfg = MetricsConfig()
    expected = sacrebleu.corpus_bleu(preds, [refs]).score  # defaults: 13a, exp smoothing
    assert corpus_bleu(preds, refs, cfg) == pytest.approx(expected, abs=1e-9)
    stats = corpus_bleu_stats(preds, refs, cfg)
    assert bleu_from_stats(stats.sum(axis=0), cfg) == pytest.approx(expected, abs=1e-9)
    half = stats[::2].sum(axis=0)
    assert bleu_from_stats(half, cfg) == pytest.approx(sacrebleu.corpus_bleu(preds[::2], [refs[::2]]).score, abs=1e-9)


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    if not overlap:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 100 * 2 * p * r / (p + r)


def test_rouge_matches_rouge_score_and_a_rederivation(pairs, ours):
    from collections import Counter

    from nltk.stem import porter
    from rouge_score import rouge_scorer, tokenize

    preds, refs = pairs
    lib = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    stemmer = porter.PorterStemmer()
    for i, (p, r) in enumerate(zip(preds, refs)):
        s = lib.score(r, p)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert ours[k][i] == pytest.approx(100 * s[k].fmeasure, abs=1e-9)
        pt, rt = tokenize.tokenize(p, stemmer), tokenize.tokenize(r, stemmer)
        uni = sum((Counter(pt) & Counter(rt)).values())
        assert ours["rouge1"][i] == pytest.approx(_f(uni, len(pt), len(rt)), abs=1e-9)
        assert ours["rougeL"][i] == pytest.approx(_f(_lcs(pt, rt), len(pt), len(rt)), abs=1e-9)


def test_meteor_matches_nltk_and_states_synonyms(pairs, text_metrics, ours):
    from nltk.translate.meteor_score import meteor_score

    preds, refs = pairs
    for i, (p, r) in enumerate(zip(preds[:30], refs[:30])):
        expected = 100 * meteor_score([text_metrics.tokens(r)], text_metrics.tokens(p), wordnet=text_metrics.wordnet)
        assert ours["meteor"][i] == pytest.approx(expected, abs=1e-9)
    assert ours["meteor"][0] > 99  # identical text: only the fragmentation penalty of one chunk
    assert ours["meteor"][1] == 0.0
    desc = text_metrics.describe()["meteor"]
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("protein")
        has_wordnet = True
    except LookupError:
        has_wordnet = False
    assert desc["synonyms"] is has_wordnet
    assert desc["note"] == ("METEOR with WordNet synonyms" if has_wordnet else "METEOR without synonyms (WordNet not found by NLTK)")


def test_bertscore_matches_the_bert_score_package(pairs, text_metrics):
    bert_score = pytest.importorskip("bert_score")
    from sepit.evaluation.bertscore import BertScoreConfig, BertScorer

    preds, refs = pairs
    preds, refs = preds[2:14], refs[2:14]  # bert-score 0.3.13 cannot encode "" under transformers 5
    path = text_metrics.bertscorer.path
    for idf in (False, True):
        scorer = text_metrics.bertscorer if not idf else BertScorer(BertScoreConfig(idf=True))
        p, r, f = scorer.score(preds, refs)
        P, R, F = bert_score.score(preds, refs, model_type=str(path), num_layers=scorer.layer, idf=idf)
        np.testing.assert_allclose(p, P.numpy(), atol=1e-5)
        np.testing.assert_allclose(r, R.numpy(), atol=1e-5)
        np.testing.assert_allclose(f, F.numpy(), atol=1e-5)
    p, r, f = text_metrics.bertscorer.score(["", refs[0]], [refs[0], refs[0]])
    assert (p[0], r[0], f[0]) == (0.0, 0.0, 0.0)
    assert f[1] == pytest.approx(1.0, abs=1e-5)
    desc = text_metrics.describe()["bertscore"]
    assert desc["layer"] == 6 and "all-MiniLM-L6-v2" in desc["encoder_name"]


def test_scores_are_x100_per_sample(pairs, ours):
    for k, v in ours.items():
        # float32 cosine of identical embeddings can read 1 + 5e-8 (CI saw 100.000005), as in bert_score
        assert v.shape == (len(pairs[0]),) and ((v >= 0) & (v <= 100 + 1e-4)).all(), k
    assert ours["rougeL"][0] == pytest.approx(100.0) and ours["bertscore_f1"][0] == pytest.approx(100.0, abs=1e-3)


def test_bootstrap_interval_is_seeded_and_sane():
    rng = np.random.default_rng(1)
    values = rng.normal(50, 10, size=400)
    cfg = BootstrapConfig(n_resamples=2000, seed=7)
    a, b = mean_ci(values, cfg), mean_ci(values, cfg)
    assert a == b
    assert a["ci_low"] < a["mean"] < a["ci_high"]
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)  # normal-theory half width
    assert (a["ci_high"] - a["ci_low"]) / 2 == pytest.approx(half, rel=0.1)
    assert mean_ci(values, BootstrapConfig(seed=8)) != a
    assert np.isnan(mean_ci([3.0], cfg)["ci_low"])
    # A corpus statistic: the CI of a sum-of-rows ratio brackets the full-sample value.
    rows = np.stack([rng.integers(0, 5, 300), rng.integers(5, 10, 300)], axis=1)
    ci = statistic_ci(rows, lambda s: 100 * s[0] / s[1], cfg)
    assert ci["ci_low"] < ci["value"] < ci["ci_high"]
