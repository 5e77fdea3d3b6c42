"""Stage 2's validation reads closed-set answers from its teacher-forced forward: the option whose
first answer token the model rates highest (the proxy of the evaluation's likelihood scoring that
``train.select_best: val_closed_acc`` selects checkpoints by)."""

from __future__ import annotations

import pytest
import torch

from lm_support import save_lm

from sepit.models.tokenizer import IGNORE_INDEX
from sepit.train.lm_task import closed_set_choice
from sepit.train.stage2 import Stage2JobConfig, Stage2Task

SEQ = "MSLEQKKGADIISKILQIQNSIGK"  # UniProt A0A009IHW8 fragment (bundled data)
MC_Q = ("Which of the following is a subcellular location of <protein>?\nOptions:\nA) Nucleus\nB) Cytoplasm\n"
        "C) Mitochondrion\nD) Secreted\nAnswer with the letter and the option.")
ROWS = [
    {"id": "yn", "task": "yes_no", "question": 'Is "Nucleus" a subcellular location of <protein>?', "answer": "No",
     "choices": None, "answer_letter": None},
    {"id": "mc", "task": "multiple_choice", "question": MC_Q, "answer": "C) Mitochondrion",
     "choices": ["Nucleus", "Cytoplasm", "Mitochondrion", "Secreted"], "answer_letter": "C"},
    {"id": "open", "task": "open", "question": "Where in the cell is <protein> located?", "answer": "Nucleus.",
     "choices": None, "answer_letter": None},
]


@pytest.fixture(scope="module")
def task(lm, tmp_path_factory):
    model, processor = lm
    folder = save_lm(model, processor, tmp_path_factory.mktemp("s1") / "model")
    return Stage2Task(Stage2JobConfig(), str(folder), alphabet=processor.alphabet_name)


def _rows():
    return [dict(r, sequence=SEQ, coords=None, coord_mask=None) for r in ROWS]


def test_closed_options_are_the_first_tokens_of_the_evaluated_options(task, processor):
    yn, mc, open_ = (task.closed_options(r) for r in _rows())
    assert open_ is None
    firsts = lambda q, opts: [next(x for x in processor.encode_example(q, o)["labels"] if x != IGNORE_INDEX) for o in opts]
    assert yn == ("yes_no", firsts(ROWS[0]["question"], ["Yes", "No"]), 1)
    assert mc[0] == "multiple_choice" and mc[2] == 2
    assert mc[1] == firsts(MC_Q, ["A) Nucleus", "B) Cytoplasm", "C) Mitochondrion", "D) Secreted"])
    assert len(set(mc[1])) == 4
    # a row whose gold answer is none of its options is left out, not guessed
    assert task.closed_options(dict(_rows()[0], answer="Maybe")) is None
    # the validation batch carries them; training batches do not
    assert [c[0] for c in task.collate(_rows(), train=False)["closed"]] == [0, 1]
    assert "closed" not in task.collate(_rows(), train=True)


def test_choice_is_the_highest_first_token_logit_at_the_answer_position():
    V, T = 12, 6
    labels = torch.full((2, T), IGNORE_INDEX)
    labels[0, 3:5] = torch.tensor([7, 2])  # answer starts at 3: read logits at position 2
    labels[1, 4:6] = torch.tensor([9, 2])
    logits = torch.zeros(2, T, V)
    logits[0, 2, 5] = 3.0  # row 0 prefers token 5 ("No") over 4 ("Yes")
    logits[0, 3, 4] = 9.0  # a later position must not count
    logits[1, 3, 8] = 1.0  # row 1: options 6, 7, 8, 9 -> 8 (index 2)
    logits[1, 3, 9] = 0.5
    closed = [(0, "yes_no", [4, 5], 1), (1, "multiple_choice", [6, 7, 8, 9], 3)]
    assert closed_set_choice(logits, labels, closed) == {"yes_no": [1.0], "multiple_choice": [0.0]}
    logits[1, 3, 9] = 2.0
    assert closed_set_choice(logits, labels, closed)["multiple_choice"] == [1.0]


def test_validation_reports_closed_set_accuracy(task, model):
    batch = task.collate(_rows(), train=False)
    metrics = task.evaluate(model, [batch])
    assert {"val_loss", "val_lm_loss", "val_closed_acc", "val_yes_no_acc", "val_multiple_choice_acc"} <= set(metrics)
    assert metrics["val_yes_no_n"] == 1 and metrics["val_multiple_choice_n"] == 1
    assert metrics["val_closed_acc"] in (0.0, 50.0, 100.0)
    # the same numbers as reading the choice by hand from one forward
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["protein"], labels=batch["labels"])
    hand = closed_set_choice(out.logits, out.labels, batch["closed"])
    assert metrics["val_yes_no_acc"] == 100.0 * hand["yes_no"][0]
    assert metrics["val_multiple_choice_acc"] == 100.0 * hand["multiple_choice"][0]


def test_select_best_must_name_a_validation_metric():
    from sepit.config.base import ConfigError
    from sepit.train.config import TrainConfig

    with pytest.raises(ConfigError, match="select_best"):
        TrainConfig(select_best="closed_acc")
    # stage 2 names the MoE refusal of ZeRO-3 first, whatever select_best says
    with pytest.raises(ConfigError, match="ZeRO-3"):
        Stage2JobConfig(train=TrainConfig(select_best="val_closed_acc", zero_stage=3))
    # elsewhere a run refuses it before Ray starts
    from sepit.train.launch import run_training

    with pytest.raises(ConfigError, match="select_best.*zero_stage <= 2"):
        run_training(None, TrainConfig(select_best="val_loss", zero_stage=3), dataset_dir="unused",
                     data_stage="stage1", stage_config=None)
    assert TrainConfig(select_best="val_closed_acc").select_best == "val_closed_acc"
