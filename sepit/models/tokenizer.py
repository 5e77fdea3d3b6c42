"""The LLM-side tokenizer: special tokens, a locally trained byte-level BPE, local HF folders.

SEPIT prompts carry one protein placeholder wrapped as ``<bop><protein><eop>`` (docs/method.md §3);
the model replaces ``<protein>`` by the projected protein vectors.  Padding uses a dedicated
``<pad>`` token, never ``</s>``: the reference padded with ``</s>`` and then had to zero the
embeddings of real end-of-sequence tokens.

Two ways to get a tokenizer, both offline:

* :func:`train_llm_tokenizer` trains a real byte-level BPE on local text with ``tokenizers``
  (tiny/small presets, tests);
* :func:`load_llm_tokenizer` opens a local Hugging Face tokenizer folder (e.g. TinyLlama's) and
  adds the SEPIT special tokens it lacks.  The model must then resize its embeddings to
  ``len(tokenizer)``.

Which tokenizer a model gets is decided by the stage-1 step (``sepit.train.stage1``), not by the
model; the model only receives its special-token ids and vocabulary size, and the tokenizer
travels with it in :class:`sepit.processing.SepitProcessor` (``<model folder>/tokenizer/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken

from sepit.errors import SepitError

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
BOP_TOKEN = "<bop>"
PROTEIN_TOKEN = "<protein>"
EOP_TOKEN = "<eop>"
PROTEIN_SPECIAL_TOKENS = (BOP_TOKEN, PROTEIN_TOKEN, EOP_TOKEN)
TOKENIZER_DIR = "tokenizer"
"""Subfolder of a SEPIT model folder that holds the LLM tokenizer."""
IGNORE_INDEX = -100
"""Label value ignored by the loss (PyTorch ``cross_entropy``'s default ``ignore_index``)."""


class TokenizerError(SepitError, ValueError):
    """A tokenizer folder is missing, unreadable, or lacks what SEPIT needs."""


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the tokens the SEPIT model and prompt code rely on."""

    bos: int | None
    eos: int
    pad: int
    bop: int
    protein: int
    eop: int


def special_token_ids(tokenizer) -> SpecialTokenIds:
    """Resolve the SEPIT special-token ids of ``tokenizer``; raise if any is missing."""
    missing = [t for t in (PAD_TOKEN, *PROTEIN_SPECIAL_TOKENS) if t not in tokenizer.get_vocab()]
    if tokenizer.eos_token_id is None:
        missing.append("eos_token")
    if missing:
        raise TokenizerError(
            f"tokenizer lacks SEPIT special tokens {missing}; build it with train_llm_tokenizer() "
            "or open it with load_llm_tokenizer()"
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise TokenizerError("tokenizer pads with its eos token; SEPIT needs the dedicated <pad> token")
    vocab = tokenizer.get_vocab()
    return SpecialTokenIds(
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        bop=vocab[BOP_TOKEN],
        protein=vocab[PROTEIN_TOKEN],
        eop=vocab[EOP_TOKEN],
    )


def add_sepit_special_tokens(tokenizer) -> int:
    """Add ``<pad>`` (as the pad token) and ``<bop>``/``<protein>``/``<eop>`` where missing.

    Returns how many new vocabulary entries were created (the model must grow its embedding
    matrix by that much).  A tokenizer that pads with ``</s>`` (TinyLlama-Chat does) is switched
    to ``<pad>``.
    """
    before = len(tokenizer)
    if tokenizer.unk_token is None and UNK_TOKEN in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"unk_token": UNK_TOKEN})
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    # special=True: never split, never normalised, dropped by decode(skip_special_tokens=True).
    wanted = [AddedToken(t, special=True, normalized=False) for t in PROTEIN_SPECIAL_TOKENS
              if t not in tokenizer.get_vocab()]
    if wanted:
        tokenizer.add_tokens(wanted, special_tokens=True)
    return len(tokenizer) - before


def train_llm_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    min_frequency: int = 2,
    model_max_length: int = 4096,
):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The vocabulary starts with ``<unk> <s> </s> <pad> <bop> <protein> <eop>`` (ids 0..6), then
    the 256 byte symbols, then merges up to ``vocab_size``.  Byte-level BPE is lossless: decoding
    the ids of any text gives that text back, which the label-mask tests rely on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *PROTEIN_SPECIAL_TOKENS]
    min_vocab = len(specials) + 256
    if vocab_size < min_vocab:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: byte-level BPE needs >= {min_vocab}")
    texts = list(texts)
    if not texts:
        raise TokenizerError("train_llm_tokenizer got no training texts")

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    add_sepit_special_tokens(tokenizer)  # marks <bop>/<protein>/<eop> as special, adds nothing new
    special_token_ids(tokenizer)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_llm_tokenizer(path: str | Path):
    """Open a local Hugging Face tokenizer folder and make sure it has the SEPIT special tokens.

    Never contacts a hub (``local_files_only=True``).  Raises :class:`TokenizerError` naming the
    folder when it is absent or holds no tokenizer.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise TokenizerError(
            f"{folder} holds no tokenizer (expected tokenizer.json, tokenizer.model or vocab.json)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot load the tokenizer in {folder}: {exc}") from exc
    add_sepit_special_tokens(tokenizer)
    special_token_ids(tokenizer)
    return tokenizer
