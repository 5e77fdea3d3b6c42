"""Support for the training tests: a small real model and dataset of our own.

``ResidueLMTask`` trains a two-layer causal transformer to predict the next residue of real
protein sequences from the bundled UniProt/STRING sample (``derived/proteins.jsonl.gz``).  It is
a genuine model and a genuine loss, small enough that the whole Ray Train + DeepSpeed + MLflow
machinery (workers, ZeRO, checkpoints, restarts) runs in seconds on a 2-core CPU.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from sepit.resources import data_path
from sepit.train.task import TrainTask

ALPHABET = "ACDEFGHIKLMNPQRSTVWYXUOBZJ"
PAD, BOS = 0, 1
VOCAB = len(ALPHABET) + 2


def write_sequence_dataset(root: Path, stage: str = "toy", max_len: int = 96, n_val: int = 48) -> Path:
    """``root/<stage>/{train,val}.parquet`` from the bundled real sequences (cut to ``max_len``)."""
    rows = []
    with gzip.open(data_path("derived", "proteins.jsonl.gz"), "rt") as f:
        for line in f:
            rec = json.loads(line)
            seq = (rec.get("sequence") or "")[:max_len]
            if len(seq) >= 16 and set(seq) <= set(ALPHABET):
                rows.append({"id": rec["accession"], "sequence": seq})
    rows.sort(key=lambda r: r["id"])
    (root / stage).mkdir(parents=True, exist_ok=True)
    for split, part in (("val", rows[:n_val]), ("train", rows[n_val:])):
        pq.write_table(pa.Table.from_pylist(part), root / stage / f"{split}.parquet")
    return root


class ResidueLM(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, max_len: int = 128, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.pos = nn.Embedding(max_len + 1, dim)
        block = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=dropout, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, layers)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]  # tokens [B, L]
        x = self.embed(tokens) + self.pos(torch.arange(L, device=tokens.device))[None]
        causal = torch.triu(torch.full((L, L), float("-inf"), device=tokens.device), 1)
        h = self.blocks(x, mask=causal, src_key_padding_mask=tokens == PAD)
        logits = self.head(h)  # [B, L, V]
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


class ResidueLMTask(TrainTask):
    stage = "toy"
    columns = ["id", "sequence"]

    def __init__(self, dim: int = 64, layers: int = 2, export_note: str = ""):
        self.dim, self.layers = dim, layers

    def build_model(self) -> nn.Module:
        return ResidueLM(self.dim, self.layers)

    def param_groups(self, model, lr):
        body = [p for n, p in model.named_parameters() if not n.startswith("head")]
        return [{"name": "body", "params": body, "lr": lr * 0.5},
                {"name": "head", "params": list(model.head.parameters()), "lr": lr}]

    def row_length(self, row) -> int:
        return len(row["sequence"])

    def collate(self, rows, *, train):
        L = max(len(r["sequence"]) for r in rows) + 1
        tokens = torch.full((len(rows), L), PAD, dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids = [ALPHABET.index(c) + 2 for c in r["sequence"]]
            tokens[i, : len(ids)] = torch.tensor([BOS] + ids[:-1])
            labels[i, : len(ids)] = torch.tensor(ids)
        n_tok = int((labels != -100).sum())
        return {"tokens": tokens, "labels": labels, "num_tokens": n_tok, "num_examples": len(rows)}

    def forward_loss(self, model, batch):
        loss = model(batch["tokens"], batch["labels"])
        return loss, {"lm_loss": float(loss.detach())}

    def export(self, model, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out_dir / "weights.pt")
        (out_dir / "config.json").write_text(json.dumps({"dim": self.dim, "layers": self.layers}))
