"""Chat prompts: exact label masks on real QA records, one placeholder per prompt."""

from __future__ import annotations

import gzip
import json

import pytest

from sepit.data.prompts import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    PromptError,
    encode_example,
    encode_prompt,
    normalize_question,
    render_prompt,
)
from sepit.models.tokenizer import special_token_ids, train_llm_tokenizer
from sepit.resources import data_path


@pytest.fixture(scope="module")
def qa_rows():
    with gzip.open(data_path("derived", "qa.jsonl.gz"), "rt") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def tok(qa_rows):
    # Trained on half the records so the other half has words the BPE never saw as a whole.
    texts = [f"{r['question']} {r['answer']}" for r in qa_rows[::2]] + [SYSTEM_PROMPT]
    return train_llm_tokenizer(texts, vocab_size=1500)


def test_labels_are_exactly_the_answer_and_end_token_on_real_records(tok, qa_rows):
    ids = special_token_ids(tok)
    assert len(qa_rows) > 1000
    for row in qa_rows:
        ex = encode_example(tok, row["question"], row["answer"])
        input_ids, labels = ex["input_ids"], ex["labels"]
        assert len(input_ids) == len(labels)
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        # One contiguous labelled span at the end, equal to the inputs there.
        assert all(lab == IGNORE_INDEX for lab in labels[:first])
        assert labels[first:] == input_ids[first:]
        assert tok.decode(labels[first:]) == row["answer"] + tok.eos_token
        assert input_ids[-1] == ids.eos
        # The prompt is the generation prefix, with the placeholder exactly once, wrapped.
        assert input_ids[:first] == encode_prompt(tok, row["question"])
        assert input_ids.count(ids.protein) == 1
        p = input_ids.index(ids.protein)
        assert input_ids[p - 1] == ids.bop and input_ids[p + 1] == ids.eop
        assert ids.pad not in input_ids


def test_prompt_decodes_to_the_chat_template(tok, qa_rows):
    row = qa_rows[0]
    text = tok.decode(encode_prompt(tok, row["question"]))
    assert text == render_prompt(row["question"])
    assert text.startswith("<s><|system|>\n" + SYSTEM_PROMPT + "</s>\n<|user|>\n<bop><protein><eop>\n")
    assert text.endswith(row["question"] + "</s>\n<|assistant|>\n")


def test_placeholder_rules(tok):
    ids = special_token_ids(tok)
    assert normalize_question("What does it do?") == "<protein>\nWhat does it do?"
    inline = encode_prompt(tok, "Is <protein> an enzyme?")
    assert inline.count(ids.protein) == 1
    assert tok.decode(inline).count("Is <bop><protein><eop> an enzyme?") == 1
    with pytest.raises(PromptError, match="2 times"):
        encode_prompt(tok, "Compare <protein> with <protein>.")
    with pytest.raises(PromptError, match="<bop>"):
        encode_prompt(tok, "<bop>What is it?")


def test_bad_answers_are_rejected_with_reasons(tok):
    with pytest.raises(PromptError, match="non-empty"):
        encode_example(tok, "What is it?", "   ")
    with pytest.raises(PromptError, match="reserved token '</s>'"):
        encode_example(tok, "What is it?", "A kinase.</s>")
    with pytest.raises(PromptError, match="reserved token '<protein>'"):
        encode_example(tok, "What is it?", "Like <protein>.")
    with pytest.raises(PromptError, match="over max_length=10"):
        encode_example(tok, "What is it?", "A kinase.", max_length=10)
