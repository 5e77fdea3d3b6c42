"""ProteinEncoder: fair-esm parity, checkpoint loading, invariance, save/load, presets, collation."""

from __future__ import annotations

import argparse
import gzip
import json

import esm
import gemmi
import numpy as np
import pytest
import torch

from sepit.models.encoder import EncoderConfig, EncoderInputError, EsmCheckpointError, ProteinEncoder
from sepit.models.io import ModelFolderError
from sepit.models.protein_batch import ProteinBatchError, collate_proteins
from sepit.resources import data_path

ALPHABET = esm.data.Alphabet.from_architecture("ESM-1b")
AFDB = ["AF-O84102-F1-model_v4.cif.gz", "AF-O84171-F1-model_v4.cif.gz", "AF-O84043-F1-model_v4.cif.gz"]


class NotAllowListed:
    """An arbitrary class: unpickling it would run code of the file's choosing."""


def read_chain(name: str) -> tuple[str, np.ndarray]:
    """(sequence, Cα [n, 3] Å) of the first chain of a bundled AlphaFold DB model."""
    st = gemmi.read_structure(str(data_path("chlamatlas_afdb", "afdb_models", name)))
    chain = st[0][0]
    seq = "".join(gemmi.find_tabulated_residue(r.name).one_letter_code.upper() for r in chain)
    return seq, np.array([r.find_atom("CA", "*").pos.tolist() for r in chain], np.float32)


@pytest.fixture(scope="module")
def real_sequences() -> list[str]:
    """Real UniProt sequences of different lengths from the bundled annotation index."""
    with gzip.open(data_path("derived", "proteins.jsonl.gz"), "rt") as fh:
        seqs = [json.loads(line)["sequence"] for line in fh]
    seqs = [s for s in seqs if s and 20 <= len(s) <= 300 and set(s) <= set("ACDEFGHIKLMNPQRSTVWYX")]
    return [seqs[0], seqs[7], seqs[23], seqs[41]]


@pytest.fixture(scope="module")
def structures() -> list[tuple[str, np.ndarray]]:
    return [read_chain(n) for n in AFDB]


@pytest.fixture(scope="module")
def fair_esm_model() -> esm.model.esm2.ESM2:
    torch.manual_seed(0)
    return esm.model.esm2.ESM2(num_layers=2, embed_dim=64, attention_heads=4, alphabet=ALPHABET).eval()


def tiny(**kw) -> ProteinEncoder:
    torch.manual_seed(1)
    return ProteinEncoder(EncoderConfig.preset("tiny", **kw)).eval()


@pytest.mark.parametrize("attention", ["exact", "sdpa"])
def test_parity_with_fair_esm_without_coordinates(fair_esm_model, real_sequences, attention):
    enc = tiny(attention=attention)
    missing, unexpected = enc.load_state_dict(fair_esm_model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("structure_bias.") for k in missing)
    batch = collate_proteins(enc.alphabet, [(s, None, None) for s in real_sequences])
    tokens = batch.tokens.clone()
    tokens[0, 5] = ALPHABET.mask_idx  # exercises ESM-2's token-dropout rescaling
    with torch.no_grad():
        ref = fair_esm_model(tokens, repr_layers=[0, 1, 2])
        out = enc(tokens, batch.coords, torch.zeros_like(batch.coord_mask), return_hidden_states=True)
    assert len(out.hidden_states) == 3
    # SDPA picks a CPU kernel (and summation order) by machine: CI saw 1.14e-5 on one logit.
    tol = 1e-5 if attention == "exact" else 5e-5
    for layer in range(3):
        torch.testing.assert_close(out.hidden_states[layer], ref["representations"][layer], atol=tol, rtol=tol)
    torch.testing.assert_close(out.logits, ref["logits"], atol=tol, rtol=tol)
    torch.testing.assert_close(out.last_hidden_state, ref["representations"][2], atol=tol, rtol=tol)
    if attention == "exact":
        assert (out.logits - ref["logits"]).abs().max() <= 1e-5


def test_fair_esm_checkpoint_file_loads_with_weights_only(tmp_path, fair_esm_model, real_sequences):
    # fair-esm's on-disk layout: prefixed state dict + cfg with an argparse.Namespace.
    cfg = argparse.Namespace(encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=4, token_dropout=True)
    state = {f"encoder.sentence_encoder.{k}": v for k, v in fair_esm_model.state_dict().items()
             if not k.startswith("contact_head")}
    path = tmp_path / "esm2_t2_tiny.pt"
    torch.save({"model": state, "cfg": {"model": cfg}}, path)
    with pytest.warns(UserWarning, match="argparse.Namespace"):
        # exact attention: this checks the loaded weights, not SDPA's machine-dependent kernel noise
        enc = ProteinEncoder.from_esm_checkpoint(path, attention="exact").eval()
    assert enc.config.num_layers == 2 and enc.structure_bias is not None
    batch = collate_proteins(enc.alphabet, [(s, None, None) for s in real_sequences[:2]])
    with torch.no_grad():
        ref = fair_esm_model(batch.tokens, repr_layers=[2])
        out = enc(batch.tokens)
    torch.testing.assert_close(out.logits, ref["logits"], atol=1e-5, rtol=1e-5)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(EsmCheckpointError, match="does not exist"):
        ProteinEncoder.from_esm_checkpoint(tmp_path / "absent.pt")
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": NotAllowListed()}}, evil)
    with pytest.raises(EsmCheckpointError, match="refusing to unpickle"):
        ProteinEncoder.from_esm_checkpoint(evil)
    v1 = tmp_path / "v1.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "args": {"arch": "roberta_large"}}, v1)
    with pytest.raises(EsmCheckpointError, match="only ESM-2"):
        ProteinEncoder.from_esm_checkpoint(v1)


def test_rotation_and_translation_leave_outputs_unchanged(structures):
    enc = tiny()
    batch = collate_proteins(enc.alphabet, [(s, c, None) for s, c in structures])
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(5)))
    moved = batch.coords @ q.T + torch.tensor([30.0, -12.0, 55.0])
    with torch.no_grad():
        a = enc(batch.tokens, batch.coords, batch.coord_mask, return_hidden_states=True)
        b = enc(batch.tokens, moved, batch.coord_mask, return_hidden_states=True)
        plain = enc(batch.tokens)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert (a.logits - plain.logits).abs().max() > 1e-3  # the structure does change the output


def test_sequence_only_protein_is_unaffected_by_structured_neighbours(structures):
    enc = tiny()
    (s0, c0), (s1, _) = structures[0], structures[1]
    mixed = collate_proteins(enc.alphabet, [(s0, c0, None), (s1, None, None)])
    alone = collate_proteins(enc.alphabet, [(s1, None, None)])
    with torch.no_grad():
        m = enc(mixed.tokens, mixed.coords, mixed.coord_mask)
        a = enc(alone.tokens)
    n = alone.tokens.shape[1]
    torch.testing.assert_close(m.last_hidden_state[1, :n], a.last_hidden_state[0], atol=1e-5, rtol=1e-5)


def test_sdpa_and_exact_attention_agree_with_structure(structures):
    a, b = tiny(attention="exact"), tiny(attention="sdpa")
    batch = collate_proteins(a.alphabet, [(s, c, None) for s, c in structures])
    with torch.no_grad():
        x = a(batch.tokens, batch.coords, batch.coord_mask)
        y = b(batch.tokens, batch.coords, batch.coord_mask)
    real = batch.attention_mask  # padded rows hold unused values that may differ in the last bits
    torch.testing.assert_close(x.logits[real], y.logits[real], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_structure_bias(structures):
    enc = tiny().train()
    batch = collate_proteins(enc.alphabet, [(s, c, None) for s, c in structures[:2]])
    enc(batch.tokens, batch.coords, batch.coord_mask).last_hidden_state.square().mean().backward()
    for name, p in enc.structure_bias.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_save_and_load_round_trip(tmp_path, structures):
    enc = tiny(structure_graph="radius", graph_radius=12.0)
    enc.save_pretrained(tmp_path / "enc")
    assert {p.name for p in (tmp_path / "enc").iterdir()} == {"model.safetensors", "config.json"}
    back = ProteinEncoder.from_pretrained(tmp_path / "enc").eval()
    assert back.config == enc.config
    batch = collate_proteins(enc.alphabet, [(s, c, None) for s, c in structures])
    with torch.no_grad():
        torch.testing.assert_close(back(batch.tokens, batch.coords, batch.coord_mask).logits,
                                   enc(batch.tokens, batch.coords, batch.coord_mask).logits, atol=0, rtol=0)
    with pytest.raises(ModelFolderError, match="shape"):
        ProteinEncoder.from_pretrained(tmp_path / "enc", num_rbf=8)
    with pytest.raises(ModelFolderError, match="does not exist"):
        ProteinEncoder.from_pretrained(tmp_path / "nothing")


def test_paper_preset_on_meta_device_has_esm2_650m_layout():
    with torch.device("meta"):
        ours = ProteinEncoder(EncoderConfig.preset("paper"))
        ref = esm.model.esm2.ESM2(num_layers=33, embed_dim=1280, attention_heads=20)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.startswith("structure_bias.")}
    assert our_shapes == ref_shapes
    n_ref = sum(p.numel() for p in ref.parameters())
    n_bias = sum(p.numel() for p in ours.structure_bias.parameters())
    assert n_ref == 651_043_254  # ESM-2 650M (esm2_t33_650M_UR50D)
    K, H, D = 128, 20, 1280
    assert n_bias == 2 * K + (K * K + K) + (K * H + H) + (K * D + D)
    assert sum(p.numel() for p in ours.parameters()) == n_ref + n_bias


def test_collate_aligns_coordinates_to_tokens(structures):
    (s0, c0), (s1, c1) = structures[0], structures[2]
    m1 = np.ones(len(s1), bool)
    m1[[0, 10]] = False
    b = collate_proteins(ALPHABET, [(s0, c0, None), (s1, c1, m1)])
    n0, n1 = len(s0), len(s1)
    assert b.tokens[0, 0] == ALPHABET.cls_idx and b.tokens[0, n0 + 1] == ALPHABET.eos_idx
    assert b.tokens[1, n1 + 1] == ALPHABET.eos_idx and (b.tokens[1, n1 + 2 :] == ALPHABET.padding_idx).all()
    assert "".join(ALPHABET.get_tok(int(t)) for t in b.tokens[1, 1 : n1 + 1]) == s1
    torch.testing.assert_close(b.coords[0, 1 : n0 + 1], torch.from_numpy(c0))
    assert not b.coord_mask[:, 0].any() and not b.coord_mask[0, n0 + 1 :].any()
    assert b.coord_mask[1, 1 : n1 + 1].tolist() == m1.tolist()
    assert b.lengths.tolist() == [n0, n1] and b.residue_mask.sum(1).tolist() == [n0, n1]
    flat = collate_proteins(ALPHABET, [(s0, c0.reshape(-1).tolist(), None)])  # Parquet row layout
    torch.testing.assert_close(flat.coords[0], b.coords[0, : n0 + 2])


def test_collate_truncates_together_or_refuses(structures):
    seq, ca = structures[0]
    with pytest.raises(ProteinBatchError, match="item 0: .* above max_residues=50"):
        collate_proteins(ALPHABET, [(seq, ca, None)], max_residues=50)
    b = collate_proteins(ALPHABET, [(seq, ca, None)], max_residues=50, truncate=True)
    assert b.tokens.shape == (1, 52) and b.coord_mask[0, 1:51].all()
    torch.testing.assert_close(b.coords[0, 1:51], torch.from_numpy(ca[:50]))
    with pytest.raises(ProteinBatchError, match="item 1: coords shape"):
        collate_proteins(ALPHABET, [(seq, ca, None), (seq, ca[:-1], None)])
    with pytest.raises(ProteinBatchError, match="residue 3 is '-'"):
        collate_proteins(ALPHABET, [("MK-LV", None, None)])


def test_encoder_input_errors(structures):
    enc = tiny()
    b = collate_proteins(enc.alphabet, [(structures[0][0], structures[0][1], None)])
    with pytest.raises(EncoderInputError, match="without coord_mask"):
        enc(b.tokens, b.coords)
    with pytest.raises(EncoderInputError, match="coords shape"):
        enc(b.tokens, b.coords[:, :-1], b.coord_mask)


def test_ambiguous_leu_ile_code_is_tokenised_as_unknown():
    """A validated record may carry J (Leu/Ile); ESM's alphabet has no J, so it becomes X."""
    import esm

    from sepit.models.protein_batch import collate_proteins

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    batch = collate_proteins(alphabet, [("MJK", None, None), ("MXK", None, None)])
    assert batch.tokens[0].tolist() == batch.tokens[1].tolist()
