"""Splice projected protein vectors into prompt embeddings at the ``<protein>`` placeholder.

Each prompt row holds the ``<protein>`` id exactly once; it is replaced by the projected vectors
of that protein's *real* tokens only (``<cls>``, residues, ``<eos>``; never the protein batch's
padding; docs/method.md §3 fixes the reference, which spliced all 1024 padded positions).  The rows
then have different lengths and are re-padded on the requested side:

* right padding for training (labels stay aligned, -100 on the protein span and padding);
* left padding for generation (every row's last real token is at the last position).

Position ids count real tokens only (0 … n-1), so a row's positions do not depend on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sepit.errors import SepitError
from sepit.models.tokenizer import IGNORE_INDEX


class SpliceError(SepitError, ValueError):
    """A prompt row does not hold exactly one ``<protein>`` placeholder, or indices mismatch."""


@dataclass
class SplicedInputs:
    inputs_embeds: torch.Tensor
    """[B, T', D] prompt embeddings with protein vectors in place of ``<protein>``."""
    attention_mask: torch.Tensor
    """[B, T'] long, 1 on real tokens (prompt, protein span, answer), 0 on padding."""
    position_ids: torch.Tensor
    """[B, T'] long, 0 … n_b - 1 over real tokens, 0 on padding."""
    labels: torch.Tensor | None
    """[B, T'] long, input labels moved with their tokens, IGNORE_INDEX (-100) on protein span and padding."""
    protein_spans: list[tuple[int, int]]
    """Per row (start, length) of the protein span in the padded [T'] coordinates."""


def splice_protein_embeddings(
    token_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    protein_embeds: torch.Tensor,
    protein_lengths: torch.Tensor,
    protein_token_id: int,
    labels: torch.Tensor | None = None,
    protein_index: torch.Tensor | None = None,
    padding_side: str = "right",
    pad_embedding: torch.Tensor | None = None,
) -> SplicedInputs:
    """Build LLM inputs from prompt embeddings and per-protein vectors.

    token_embeds [B, T, D]; input_ids / attention_mask / labels [B, T] (padded on either side,
    real tokens contiguous); protein_embeds [P, Lp, D] with the real tokens of protein p in
    ``protein_embeds[p, :protein_lengths[p]]``; ``protein_index`` [B] picks the protein of each
    row (default: row b uses protein b).  ``pad_embedding`` [D] fills padding (default zeros).
    """
    if padding_side not in ("left", "right"):
        raise SpliceError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    B, _, D = token_embeds.shape
    if protein_index is None:
        if protein_embeds.shape[0] != B:
            raise SpliceError(
                f"{B} prompts but {protein_embeds.shape[0]} proteins; pass protein_index to share proteins"
            )
        protein_index = torch.arange(B, device=input_ids.device)
    if protein_index.shape != (B,) or int(protein_index.max()) >= protein_embeds.shape[0] or int(protein_index.min()) < 0:
        raise SpliceError(f"protein_index must be [B={B}] indices into {protein_embeds.shape[0]} proteins")

    rows, row_labels, spans = [], [], []
    real = attention_mask.bool()
    protein_embeds = protein_embeds.to(token_embeds.dtype)
    for b in range(B):
        ids = input_ids[b][real[b]]
        hits = (ids == protein_token_id).nonzero().flatten()
        if hits.numel() != 1:
            raise SpliceError(f"prompt row {b} holds the <protein> token {hits.numel()} times; it needs exactly one")
        p = int(hits[0])
        pi = int(protein_index[b])
        n = int(protein_lengths[pi])
        emb = token_embeds[b][real[b]]
        rows.append(torch.cat([emb[:p], protein_embeds[pi, :n], emb[p + 1:]]))
        spans.append((p, n))
        if labels is not None:
            lab = labels[b][real[b]]
            fill = lab.new_full((n,), IGNORE_INDEX)
            row_labels.append(torch.cat([lab[:p], fill, lab[p + 1:]]))

    width = max(r.shape[0] for r in rows)
    device = token_embeds.device
    fill_vec = (pad_embedding if pad_embedding is not None else token_embeds.new_zeros(D)).to(token_embeds.dtype)
    out_embeds = fill_vec.expand(B, width, D).clone()
    out_mask = torch.zeros(B, width, dtype=torch.long, device=device)
    out_pos = torch.zeros(B, width, dtype=torch.long, device=device)
    out_labels = None if labels is None else torch.full((B, width), IGNORE_INDEX, dtype=torch.long, device=device)
    padded_spans = []
    for b, row in enumerate(rows):
        n = row.shape[0]
        start = 0 if padding_side == "right" else width - n
        out_embeds[b, start:start + n] = row
        out_mask[b, start:start + n] = 1
        out_pos[b, start:start + n] = torch.arange(n, device=device)
        if out_labels is not None:
            out_labels[b, start:start + n] = row_labels[b]
        padded_spans.append((start + spans[b][0], spans[b][1]))
    return SplicedInputs(out_embeds, out_mask, out_pos, out_labels, padded_spans)
