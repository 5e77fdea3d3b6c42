"""Tokenisation as a Ray Data step: exact answer labels and one protein placeholder per prompt."""

from __future__ import annotations

import pandas as pd
import pytest
from dataset_support import all_rows, small_build

from sepit.data.prompts import IGNORE_INDEX, SYSTEM_PROMPT, encode_prompt
from sepit.data.tokenize import TokenizeError, encode_frame, tokenize_dataset
from sepit.models.tokenizer import special_token_ids, train_llm_tokenizer

TEXT_COLUMNS = ["id", "question", "answer", "task", "stage"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    rows = all_rows(small_build(tmp_path_factory.getbasetemp()))
    # every stage and task, a few hundred records (the Ray step is what is under test, not volume)
    picked = []
    for task in ("caption", "open", "yes_no", "multiple_choice"):
        of_task = [r for r in rows if r["task"] == task]
        picked += of_task[:: max(1, len(of_task) // 70)]
    return [{k: r[k] for k in TEXT_COLUMNS} for r in picked]


@pytest.fixture(scope="module")
def tok(rows):
    # trained on every other record: the rest holds words the BPE never saw whole
    texts = [f"{r['question']} {r['answer']}" for r in rows[::2]] + [SYSTEM_PROMPT]
    return train_llm_tokenizer(texts, vocab_size=1200)


def test_ray_step_labels_exactly_the_answer_and_one_placeholder(rows, tok, ray_local):
    ids = special_token_ids(tok)
    ds = tokenize_dataset(ray_local.data.from_items(rows, override_num_blocks=2), tok, batch_size=128)
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert len(out) == len(rows) > 200
    assert {r["task"] for r in out} == {"caption", "open", "yes_no", "multiple_choice"}
    by_id = {r["id"]: r for r in rows}
    for r in out:
        input_ids, labels = list(r["input_ids"]), list(r["labels"])
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert all(lab == IGNORE_INDEX for lab in labels[:first]) and labels[first:] == input_ids[first:]
        assert tok.decode(labels[first:]) == by_id[r["id"]]["answer"] + tok.eos_token
        assert input_ids[:first] == encode_prompt(tok, by_id[r["id"]]["question"])
        assert input_ids.count(ids.protein) == 1
        p = input_ids.index(ids.protein)
        assert input_ids[p - 1] == ids.bop and input_ids[p + 1] == ids.eop
        assert ids.pad not in input_ids


def test_tokenizer_folder_gives_the_same_ids(rows, tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "tok"))
    frame = pd.DataFrame(rows[:20])
    by_object = encode_frame(frame, tok)
    import ray

    from sepit.ray_runtime import init_ray

    init_ray(num_cpus=4)
    by_folder = pd.DataFrame(tokenize_dataset(ray.data.from_items(rows[:20], override_num_blocks=1), tmp_path / "tok").take_all())
    by_folder = by_folder.set_index("id").loc[list(frame["id"])]
    assert [list(x) for x in by_folder["input_ids"]] == list(by_object["input_ids"])


def test_bad_record_names_its_id(tok):
    frame = pd.DataFrame([{"id": "s2-broken", "question": "What is <protein>?", "answer": "It ends</s> early"}])
    with pytest.raises(TokenizeError, match="record s2-broken: answer contains the reserved token"):
        encode_frame(frame, tok)
