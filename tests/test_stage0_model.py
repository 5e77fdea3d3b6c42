"""Stage-0 model: losses, corruption, equivariant denoising, global-batch CLIP, groups, export."""

from __future__ import annotations

import gzip
import json
import math

import gemmi
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sepit.models.encoder import ProteinEncoder
from sepit.models.protein_batch import collate_proteins
from sepit.models.clip import (
    ProteinTextCLIP, CLIPConfig, clip_loss, gather_with_grad, mask_residues, retrieval_accuracy,
)
from sepit.models.text_encoder import TextEncoderError, build_tiny_bert, default_text_encoder_path, load_text_encoder
from sepit.resources import data_path

ACCESSIONS = ["O84102", "O84171", "O84043", "O84033"]


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, np.ndarray, str]]:
    """(sequence, Cα [n, 3], STRING function text) of real C. trachomatis AlphaFold models."""
    with gzip.open(data_path("derived", "proteins.jsonl.gz"), "rt") as fh:
        text = {r["accession"]: r["function"] for r in map(json.loads, fh) if r["accession"] in ACCESSIONS}
    out = []
    for acc in ACCESSIONS:
        st = gemmi.read_structure(str(data_path("chlamatlas_afdb", "afdb_models", f"AF-{acc}-F1-model_v4.cif.gz")))
        chain = st[0][0]
        seq = "".join(gemmi.find_tabulated_residue(r.name).one_letter_code.upper() for r in chain)
        ca = np.array([r.find_atom("CA", "*").pos.tolist() for r in chain], np.float32)
        out.append((seq, ca, text[acc]))
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def build(tiny_bert, seed: int = 0, **kw) -> ProteinTextCLIP:
    torch.manual_seed(seed)
    return ProteinTextCLIP(CLIPConfig.preset("tiny", text_encoder_path=str(tiny_bert), projection_dim=32, **kw))


def batch_of(model, pairs, drop_structure_of: int | None = None, max_residues: int = 72):
    # first 72 residues (and their coordinates) keep the pairwise work small on a 2-core CI box
    items = [(s, None if i == drop_structure_of else c, None) for i, (s, c, _) in enumerate(pairs)]
    protein = collate_proteins(model.encoder.alphabet, items, max_residues=max_residues, truncate=True)
    text = model.tokenize_texts([t for _, _, t in pairs])
    return protein, text["input_ids"], text["attention_mask"]


def test_forward_backward_reports_three_losses(tiny_bert, pairs):
    model = build(tiny_bert).train()
    protein, ids, am = batch_of(model, pairs, drop_structure_of=3)  # one sequence-only protein
    out = model(protein, ids, am, generator=torch.Generator().manual_seed(0))
    for part in (out.clip_loss, out.mlm_loss, out.denoise_loss):
        assert part.ndim == 0 and torch.isfinite(part) and part > 0
    torch.testing.assert_close(out.loss, out.clip_loss + out.mlm_loss + out.denoise_loss)
    assert out.protein_embeds.shape == (4, 32) and out.n_mlm > 0 and out.n_noised > 0
    torch.testing.assert_close(out.protein_embeds.norm(dim=-1), torch.ones(4))
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("text_encoder."):
            assert not p.requires_grad and p.grad is None, name
        elif p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # an untrained CLIP loss sits near ln(batch): 4 pairs
    assert abs(out.clip_loss.item() - math.log(4)) < 1.0


def test_corruption_masks_residues_and_noises_only_valid_unmasked_ones(tiny_bert, pairs):
    model = build(tiny_bert)
    protein, _, _ = batch_of(model, pairs, drop_structure_of=1)
    tokens, labels, coords, eps, noised = model.corrupt(protein, torch.Generator().manual_seed(1))
    picked = labels != -100
    assert not (picked & ~protein.residue_mask).any()  # never <cls>/<eos>/padding
    assert torch.equal(labels[picked], protein.tokens[picked])
    assert torch.equal(tokens[~picked], protein.tokens[~picked])
    assert torch.equal(noised, protein.coord_mask & protein.residue_mask & ~picked)
    assert not noised[1].any()  # the protein without structure is never noised
    torch.testing.assert_close(coords[noised], protein.coords[noised] + 0.2 * eps[noised])
    assert torch.equal(coords[~noised], protein.coords[~noised])


def test_mlm_replacement_is_80_10_10():
    tokens = torch.full((200, 502), 5)  # 'A' everywhere; residues at 1..500
    residue = torch.zeros_like(tokens, dtype=torch.bool)
    residue[:, 1:501] = True
    random_ids = torch.arange(4, 24)
    inputs, labels = mask_residues(tokens, residue, 32, random_ids, 0.15, 0.8, 0.1, torch.Generator().manual_seed(0))
    picked = labels != -100
    n = picked.sum().item()
    assert abs(n / residue.sum().item() - 0.15) < 0.005
    masked = (inputs == 32).sum().item() / n
    unchanged = (picked & (inputs == 5)).sum().item() / n
    assert abs(masked - 0.8) < 0.01
    # 10% random amino acids (1 in 20 of them is 'A' again) + 10% left unchanged
    assert abs(unchanged - (0.1 + 0.1 / 20)) < 0.01
    assert ((inputs != 5) & ~picked).sum() == 0


def test_denoising_head_is_rotation_equivariant(tiny_bert, pairs):
    model = build(tiny_bert).eval()
    protein, _, _ = batch_of(model, pairs[:3])
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2)))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]  # a proper rotation
    moved = protein.coords @ q.T + torch.tensor([7.0, -3.0, 20.0])

    def predict(coords):
        with torch.no_grad():
            out = model.encoder(protein.tokens, coords, protein.coord_mask, return_structure_bias=True)
            return model.denoise_head(out.last_hidden_state, coords, protein.coord_mask, out.structure_bias)

    a, b = predict(protein.coords), predict(moved)
    m = protein.coord_mask
    assert a[m].abs().mean() > 1e-3
    torch.testing.assert_close(b[m], a[m] @ q.T, atol=1e-4, rtol=1e-3)


def test_clip_loss_and_clamped_scale(tiny_bert):
    model = build(tiny_bert)
    torch.testing.assert_close(model.scale(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == 100.0
    g = torch.Generator().manual_seed(0)
    p = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 3.0 * p @ t.T
    manual = -0.5 * (logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean())
    torch.testing.assert_close(clip_loss(p, t, torch.tensor(3.0)), manual)
    assert retrieval_accuracy(p, p) == {"p2t_top1": 1.0, "t2p_top1": 1.0}
    acc = retrieval_accuracy(p, p.roll(1, 0), k=2)
    assert set(acc) == {"p2t_top2", "t2p_top2"}


def _gather_worker(rank: int, world: int, init: str, p_full, t_full, split, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    p = p_full[lo:hi].clone().requires_grad_(True)
    t = t_full[lo:hi].clone()
    rows, offset = gather_with_grad(p)
    loss = clip_loss(p, t, torch.tensor(4.0))
    loss.backward()
    queue.put((rank, loss.item(), p.grad.tolist(), offset, rows.shape[0]))  # no shared-memory tensors
    dist.barrier()
    dist.destroy_process_group()


def test_clip_loss_over_two_gloo_ranks_equals_the_global_batch(tmp_path):
    mp = torch.multiprocessing.get_context("spawn")
    g = torch.Generator().manual_seed(0)
    p_full = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    t_full = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    split = [4, 2]  # uneven local batches (e.g. the last batch of an epoch)
    queue = mp.Queue()
    procs = [mp.Process(target=_gather_worker, args=(r, 2, f"file://{tmp_path}/pg", p_full, t_full, split, queue))
             for r in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    p_ref = p_full.clone().requires_grad_(True)
    ref = clip_loss(p_ref, t_full, torch.tensor(4.0))
    ref.backward()
    for rank, loss, grad, offset, n_rows in results:
        assert n_rows == 6 and offset == [0, 4][rank]
        assert abs(loss - ref.item()) < 1e-6
        # every rank back-propagates the same global loss; data parallel averages over 2 ranks
        lo, hi = offset, offset + split[rank]
        torch.testing.assert_close(torch.tensor(grad) / 2, p_ref.grad[lo:hi], atol=1e-6, rtol=1e-5)


def test_param_groups_by_module_membership(tiny_bert):
    model = build(tiny_bert)
    groups = {g["name"]: g for g in model.param_groups(base_lr=1e-6, new_module_mult=10)}
    assert groups["backbone"]["lr"] == 1e-6 and groups["new_modules"]["lr"] == pytest.approx(1e-5)
    ids = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    new = {id(p) for p in groups["new_modules"]["params"]}
    assert all(id(p) in new for p in model.encoder.structure_bias.parameters())
    assert id(model.logit_scale) in new and id(model.encoder.embed_tokens.weight) not in new
    assert not any(id(p) in set(ids) for p in model.text_encoder.parameters())


def test_export_encoder_loads_as_a_protein_encoder(tiny_bert, pairs, tmp_path):
    model = build(tiny_bert).eval()
    model.export_encoder(tmp_path / "encoder")
    enc = ProteinEncoder.from_pretrained(tmp_path / "encoder").eval()
    protein, _, _ = batch_of(model, pairs)
    with torch.no_grad():
        a = model.encoder(protein.tokens, protein.coords, protein.coord_mask).last_hidden_state
        b = enc(protein.tokens, protein.coords, protein.coord_mask).last_hidden_state
    assert torch.equal(a, b)


def test_save_load_round_trip_and_training_lowers_the_loss(tiny_bert, pairs, tmp_path):
    model = build(tiny_bert, seed=3).train()
    protein, ids, am = batch_of(model, pairs)
    opt = torch.optim.AdamW(model.param_groups(base_lr=2e-3, new_module_mult=1))
    losses = []
    for _ in range(12):
        out = model(protein, ids, am, generator=torch.Generator().manual_seed(7))  # same corruption
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval().save_pretrained(tmp_path / "stage0")
    back = ProteinTextCLIP.from_pretrained(tmp_path / "stage0").eval()
    with torch.no_grad():
        a = model(protein, ids, am, generator=torch.Generator().manual_seed(7))
        b = back(protein, ids, am, generator=torch.Generator().manual_seed(7))
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-6)


def test_default_text_encoder_is_the_real_minilm():
    path = default_text_encoder_path()
    assert (path / "model.safetensors").is_file()
    model, tokenizer = load_text_encoder(path)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert not any(p.requires_grad for p in model.parameters())
    texts = ["GMP kinase, essential for recycling GMP", "guanylate kinase activity",
             "outer membrane porin transporting sugars"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # the sentence-transformers mean pooling
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1
    with pytest.raises(TextEncoderError, match="does not exist"):
        load_text_encoder("/nonexistent/bert")
