"""Tokenisation of instruction records as a Ray Data step.

``tokenize_dataset(ds, tokenizer)`` adds ``input_ids`` and ``labels`` (lists of int) to every row
with :func:`sepit.data.prompts.encode_example`: the chat template with the system prompt, the
question's ``<protein>`` wrapped as ``<bop><protein><eop>``, labels = -100 everywhere except the
answer tokens and the final end token.  The tokenizer object travels to the Ray tasks by
pickling (a local ``PreTrainedTokenizerFast``); a folder path is opened in each task instead.
A record that cannot be encoded stops the step with :class:`TokenizeError` naming the record:
the builder already rejected such texts, so this means the input was not built by it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd

from sepit.data.prompts import PromptError, encode_example
from sepit.errors import SepitError


class TokenizeError(SepitError, ValueError):
    """A record cannot be turned into token ids; the message names the record id."""


def encode_frame(frame: pd.DataFrame, tokenizer, max_length: Optional[int] = None) -> pd.DataFrame:
    """``frame`` (columns id, question, answer, ...) with ``input_ids``/``labels`` added."""
    input_ids, labels = [], []
    for rid, question, answer in zip(frame["id"], frame["question"], frame["answer"]):
        try:
            ex = encode_example(tokenizer, question, answer, max_length=max_length)
        except PromptError as exc:
            raise TokenizeError(f"record {rid}: {exc}") from None
        input_ids.append(ex["input_ids"])
        labels.append(ex["labels"])
    out = frame.copy()
    out["input_ids"] = input_ids
    out["labels"] = labels
    return out


@lru_cache(maxsize=4)
def _tokenizer_from_folder(folder: str):
    """One tokenizer per folder per worker process (loading costs more than encoding a batch)."""
    from sepit.models.tokenizer import load_llm_tokenizer

    return load_llm_tokenizer(folder)


def tokenize_dataset(ds, tokenizer: Union[Any, str, Path], max_length: Optional[int] = None, batch_size: int = 256):
    """Ray Data ``ds`` of instruction rows -> the same rows plus ``input_ids`` and ``labels``."""
    if isinstance(tokenizer, (str, Path)):
        folder = str(tokenizer)

        def encode(frame: pd.DataFrame) -> pd.DataFrame:
            return encode_frame(frame, _tokenizer_from_folder(folder), max_length)
    else:
        def encode(frame: pd.DataFrame) -> pd.DataFrame:
            return encode_frame(frame, tokenizer, max_length)

    return ds.map_batches(encode, batch_format="pandas", batch_size=batch_size)


def read_instruction_split(root: Union[str, Path], stage: int, split: str, columns: Optional[list[str]] = None):
    """A built stage/split as a Ray Data dataset (``ray.data.read_parquet``)."""
    import ray

    from sepit.data.instruction_schema import stage_split_path

    path = stage_split_path(root, stage, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; build the dataset with `sepit build-dataset`")
    return ray.data.read_parquet(str(path), columns=columns)
