"""The LLM tokenizer: locally trained byte-level BPE and local HF folders get SEPIT's tokens."""

from __future__ import annotations

import gzip
import json

import pytest

from sepit.models.tokenizer import (
    PROTEIN_SPECIAL_TOKENS,
    TokenizerError,
    load_llm_tokenizer,
    special_token_ids,
    train_llm_tokenizer,
)
from sepit.resources import data_path


@pytest.fixture(scope="module")
def qa_texts():
    with gzip.open(data_path("derived", "qa.jsonl.gz"), "rt") as fh:
        rows = [json.loads(line) for line in fh]
    return [f"{r['question']} {r['answer']}" for r in rows]


def test_trained_bpe_has_dedicated_specials_and_is_lossless(qa_texts, tmp_path):
    tok = train_llm_tokenizer(qa_texts, vocab_size=1200, out_dir=tmp_path / "tok")
    assert len(tok) == 1200
    ids = special_token_ids(tok)
    assert ids.pad not in (ids.eos, ids.bos)  # never pad with </s>
    assert len({ids.bos, ids.eos, ids.pad, ids.bop, ids.protein, ids.eop}) == 6
    # Special tokens are single ids and never split, even glued to text.
    assert tok.encode("x<bop><protein><eop>y", add_special_tokens=False)[1:4] == [ids.bop, ids.protein, ids.eop]
    # Byte-level BPE round-trips arbitrary text exactly (the label tests rely on it).
    for text in qa_texts[:200] + ["Ünïcödé ÅÅ  double  spaces\tand\nnewlines", "EC 3.2.2.6; Kd=1.5 µM"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    reloaded = load_llm_tokenizer(tmp_path / "tok")
    assert len(reloaded) == len(tok)
    assert reloaded.encode(qa_texts[0], add_special_tokens=False) == tok.encode(qa_texts[0], add_special_tokens=False)
    assert special_token_ids(reloaded) == ids


def test_vocab_too_small_and_empty_corpus_are_rejected(qa_texts):
    with pytest.raises(TokenizerError, match="too small"):
        train_llm_tokenizer(qa_texts, vocab_size=100)
    with pytest.raises(TokenizerError, match="no training texts"):
        train_llm_tokenizer([], vocab_size=1000)


def _llama_style_folder(texts, folder):
    """A TinyLlama-like tokenizer folder: SentencePiece-style BPE (Metaspace), pads with </s>,
    and no SEPIT tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="</s>")
    hf.save_pretrained(str(folder))
    return len(hf)


def test_local_llama_style_folder_gets_pad_and_protein_tokens(qa_texts, tmp_path):
    base_len = _llama_style_folder(qa_texts, tmp_path / "llama")
    tok = load_llm_tokenizer(tmp_path / "llama")
    assert len(tok) == base_len + 4  # <pad>, <bop>, <protein>, <eop>
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    vocab = tok.get_vocab()
    assert all(t in vocab for t in PROTEIN_SPECIAL_TOKENS)
    # The prompt code works on it too: the labelled span decodes to the answer exactly.
    from sepit.data.prompts import IGNORE_INDEX, encode_example

    for text in qa_texts[:50]:
        q, a = "What is this protein?", text
        ex = encode_example(tok, q, a)
        answer_ids = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
        assert tok.decode(answer_ids) == a + "</s>"
    # Saved and reopened, nothing is added twice.
    tok.save_pretrained(str(tmp_path / "again"))
    assert len(load_llm_tokenizer(tmp_path / "again")) == len(tok)


def test_missing_or_empty_folder_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_llm_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_llm_tokenizer(tmp_path / "empty")
