"""Likelihood scoring of closed-set questions: hand-set logits pick the expected option, the
batched scorer equals one-option-at-a-time teacher forcing, and the gold answer never reaches
the model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lm_support import save_lm

from sepit.evaluation.generate import GenerationTask, ModelReplica, replica_item
from sepit.evaluation.likelihood import OptionScores, closed_set_options, score_options, sequence_logprobs
from sepit.evaluation.predictions import PredictionRecord
from sepit.evaluation.task_metrics import RecordScorer, likelihood_outcome
from sepit.models.sepit_lm import SepitForConditionalGeneration

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Real sequences from the bundled data (UniProt fragments used elsewhere in the tests).
SEQS = ["MSLEQKKGADIISKILQIQNSIGK", "MVLSPADKTNVKAAW"]
MC_CHOICES = ["Cytoplasm", "Nucleus", "Cell membrane", "Mitochondrion matrix"]
MC_QUESTION = ("Where is <protein> located?\nOptions:\n"
               + "\n".join(f"{letter}) {c}" for letter, c in zip("ABCD", MC_CHOICES)))


def _hand_set(model, bias: torch.Tensor) -> SepitForConditionalGeneration:
    """The same model whose LM head ignores the hidden state: logits = ``bias`` at every position."""
    hand = copy.deepcopy(model)
    head = nn.Linear(model.llm.config.hidden_size, bias.numel(), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    hand.llm.lm_head = head
    return hand


def test_sequence_logprobs_by_hand():
    # vocab 3; row 0 scores tokens at positions 2, 3; row 1 only position 1 (rest ignored).
    logits = torch.log(torch.tensor([
        [[.2, .3, .5], [.1, .1, .8], [.6, .2, .2], [1 / 3, 1 / 3, 1 / 3]],
        [[.5, .25, .25], [.9, .05, .05], [.2, .2, .6], [.2, .2, .6]],
    ]))
    labels = torch.tensor([[-100, -100, 2, 0], [-100, 1, -100, -100]])
    sums, n = sequence_logprobs(logits, labels)
    torch.testing.assert_close(sums, torch.tensor([math.log(.8) + math.log(.6), math.log(.25)]))
    assert n.tolist() == [2, 1]


def test_best_sum_vs_length_normalised():
    sc = OptionScores(["A) Cytoplasm and nucleus", "B) Golgi"], [-6.0, -4.0], [6, 3])
    assert sc.best() == 1  # -4 > -6
    sc = OptionScores(["A) Cytoplasm and nucleus", "B) Golgi"], [-6.0, -5.0], [6, 3])
    assert sc.best() == 1 and sc.best(normalised=True) == 0  # per token: -6/6 > -5/3
    assert OptionScores(["Yes", "No"], [-1.0, -1.0], [2, 2]).best() == 0  # ties: first listed


def test_hand_set_logits_choose_the_most_likely_option(model, processor):
    options = closed_set_options("multiple_choice", MC_CHOICES)
    assert options == ["A) Cytoplasm", "B) Nucleus", "C) Cell membrane", "D) Mitochondrion matrix"]
    vocab = model.llm.get_input_embeddings().num_embeddings
    # Favour the tokens of option C's text: it must win, and the scorer must equal the hand sum.
    bias = torch.zeros(vocab)
    favoured = processor.encode_answer(options[2])[:-1]
    bias[torch.tensor(favoured)] = 4.0
    hand = _hand_set(model, bias)
    logp = torch.log_softmax(bias, 0)
    expected = [float(sum(logp[t] for t in processor.encode_answer(o))) for o in options]
    assert int(np.argmax(expected)) == 2
    for coords in (None, torch.cumsum(torch.randn(len(SEQS[0]), 3), 0).numpy()):
        protein = (SEQS[0], coords, None if coords is None else np.ones(len(SEQS[0]), bool))
        [sc] = score_options(hand, processor, [MC_QUESTION], [protein], [options])
        assert sc.logprob == pytest.approx(expected, abs=1e-3)
        assert sc.n_tokens == [len(processor.encode_answer(o)) for o in options]
        assert sc.best() == 2
    # Favour "No": yes/no follows.
    bias = torch.zeros(vocab)
    bias[torch.tensor(processor.encode_answer("No")[:-1])] = 3.0
    [sc] = score_options(_hand_set(model, bias), processor, ["Is <protein> an enzyme?"], [(SEQS[1], None, None)],
                         [closed_set_options("yes_no", None)])
    assert sc.options == ["Yes", "No"] and sc.best() == 1 and sc.best(normalised=True) == 1


def test_batched_scores_equal_one_option_at_a_time(model, processor):
    questions = [MC_QUESTION, "Is <protein> an enzyme?", "Is <protein> found in the nucleus?"]
    proteins = [(SEQS[0], None, None), (SEQS[1], None, None), (SEQS[0], None, None)]
    options = [closed_set_options("multiple_choice", MC_CHOICES), ["Yes", "No"], ["Yes", "No"]]
    batched = score_options(model, processor, questions, proteins, options, max_rows=5)  # chunks cut across questions
    for q, p, opts, sc in zip(questions, proteins, options, batched):
        for k, opt in enumerate(opts):
            one = score_options(model, processor, [q], [p], [[opt, opt]], max_rows=1)[0]  # alone, unpadded
            assert one.logprob == pytest.approx([sc.logprob[k]] * 2, abs=1e-4)
    with pytest.raises(ValueError, match="two options"):
        score_options(model, processor, ["Is <protein> an enzyme?"], [(SEQS[1], None, None)], [["Yes"]])


def test_gold_answer_never_reaches_the_replica(model, processor, tmp_path):
    save_lm(model, processor, tmp_path / "m")
    replica = ModelReplica(str(tmp_path / "m"), {"max_new_tokens": 3, "batch_size": 4})
    base = {"id": "q1", "task": "multiple_choice", "question": MC_QUESTION, "sequence": SEQS[0],
            "choices": MC_CHOICES, "coords": None, "coord_mask": None}
    task = GenerationTask("model", [], store=None)
    outs = []
    for answer, letter in (("A) Cytoplasm", "A"), ("C) Cell membrane", "C")):
        item = replica_item(task, {**base, "answer": answer, "answer_letter": letter})
        assert not ({"answer", "answer_letter", "reference"} & set(item))
        assert answer not in item["question"].split("Options:")[0]
        batch = {k: np.asarray([v] + [v], dtype=object) for k, v in item.items()}
        batch["options"] = np.asarray([item["options"], item["options"]], dtype=object)
        outs.append(replica(batch))
    assert outs[0]["option_logprob"][0] == outs[1]["option_logprob"][0]
    # The gold answer is read only when scoring the record, after the model has chosen.
    rec = dict(id="q1", task="multiple_choice", category="location", question=MC_QUESTION, reference="",
               prediction=outs[0]["prediction"][0], choices=MC_CHOICES, options=item["options"],
               option_logprob=list(outs[0]["option_logprob"][0]), option_tokens=list(outs[0]["option_tokens"][0]))
    picked = OptionScores(item["options"], rec["option_logprob"], rec["option_tokens"]).best()
    for letter in "ABCD":
        r = PredictionRecord(**{**rec, "reference": f"{letter}) x", "answer_letter": letter})
        out = likelihood_outcome(r, letter)
        assert out["ll_choice"] == item["options"][picked]
        assert out["ll_correct"] == (100.0 if "ABCD"[picked] == letter else 0.0)


def test_closed_block_reports_generative_and_likelihood_accuracy():
    from sepit.evaluation.bootstrap import BootstrapConfig

    recs = [
        # generated "Yes" (right), likelihood prefers "No" (wrong)
        PredictionRecord("a", "yes_no", "x", "Q?", "Yes", "Yes", options=["Yes", "No"], option_logprob=[-2.0, -1.0],
                         option_tokens=[2, 2]),
        # unparsable generation (wrong), likelihood right
        PredictionRecord("b", "yes_no", "x", "Q?", "No", "maybe", options=["Yes", "No"], option_logprob=[-3.0, -1.0],
                         option_tokens=[2, 2]),
        # a baseline-like record without scores: generative only
        PredictionRecord("c", "yes_no", "x", "Q?", "No", "No"),
    ]
    scorer = RecordScorer(None, BootstrapConfig(n_resamples=0))  # closed-set rows need no text metrics
    block = scorer._closed_block(scorer.per_sample(recs))
    assert block["n"] == 3 and block["unparsed"] == 1
    assert block["accuracy"]["mean"] == pytest.approx(200 / 3)
    assert block["n_likelihood"] == 2 and block["likelihood_accuracy"]["mean"] == 50.0
    assert block["likelihood_accuracy_norm"]["mean"] == 50.0


def test_inference_crops_proteins_as_in_training(model, processor):
    """A model trained on proteins cut to N residues reads the same first N at inference
    (generation and likelihood alike); proteins above max_residues still need truncate=True."""
    from sepit.models.protein_batch import ProteinBatchError

    cropped = copy.copy(processor)  # the processor crops as the model's config says: crop_residues
    cropped.crop_residues = 10
    long_seq = SEQS[0]  # 24 residues
    coords = torch.cumsum(torch.randn(len(long_seq), 3), 0).numpy()
    full = (long_seq, coords, np.ones(len(long_seq), bool))
    cut = (long_seq[:10], coords[:10], np.ones(10, bool))
    q, opts = ["Is <protein> an enzyme?"], [["Yes", "No"]]
    assert score_options(model, cropped, q, [full], opts)[0].logprob == pytest.approx(
        score_options(model, cropped, q, [cut], opts)[0].logprob, abs=1e-5)
    assert score_options(model, processor, q, [full], opts)[0].logprob != pytest.approx(
        score_options(model, processor, q, [cut], opts)[0].logprob, abs=1e-5)
    assert (model.generate(**cropped.generation_inputs(q, [full]), max_new_tokens=4)
            == model.generate(**cropped.generation_inputs(q, [cut]), max_new_tokens=4))
    cropped.max_residues = 20
    with pytest.raises(ProteinBatchError, match="above max_residues=20"):
        cropped.generation_inputs(q, [full])
    assert model.generate(**cropped.generation_inputs(q, [full], truncate=True), max_new_tokens=2)
