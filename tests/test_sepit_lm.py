"""SepitForConditionalGeneration: splicing, labels, loss, overfitting, generation, groups, presets."""

from __future__ import annotations

import copy

import pytest
import torch

from lm_support import build_lm, load_lm, save_lm

from sepit.data.prompts import IGNORE_INDEX
from sepit.models.encoder import EncoderConfig
from sepit.models.llm import LLMConfig, build_llm, count_parameters
from sepit.models.protein_batch import collate_proteins
from sepit.models.sepit_lm import SepitConfig, SepitForConditionalGeneration
from sepit.models.splice import SpliceError
from sepit.processing import generate_answers

# Real sequences from the bundled data (UniProt A0A009IHW8 fragment, P68308 / P62258 starts).
SEQS = ["MSLEQKKGADIISKILQIQNSIGK", "MVLSPADKTNVKAAW", "MDDREDLVYQAKLAEQAERYDEMVESMKKVAGMDVELTVEERNLLSVAYKNV"]
QA = [
    ("What does <protein> do?", "It hydrolyses NAD(+)."),
    ("Where is this protein found in the cell?", "Cytoplasm."),
    ("Is <protein> an enzyme? Answer yes or no.", "Yes"),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _coords(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(n, 3, generator=g) * 2.2, 0)  # a random Cα walk, Å


def _batch(model, processor, qa=QA, seqs=SEQS, structure=(True, False, True)):
    exs = [processor.encode_example(q, a) for q, a in qa]
    T = max(len(e["input_ids"]) for e in exs)
    ids = torch.full((len(exs), T), model.token_ids.pad)
    labels = torch.full((len(exs), T), IGNORE_INDEX)
    mask = torch.zeros(len(exs), T, dtype=torch.long)
    for b, e in enumerate(exs):
        n = len(e["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    items = [(s, _coords(len(s), i) if st else None, None) for i, (s, st) in enumerate(zip(seqs, structure))]
    return ids, mask, labels, collate_proteins(model.encoder.alphabet, items), exs


def test_spliced_positions_labels_mask_and_positions_line_up(model, processor):
    ids, mask, labels, prot, exs = _batch(model, processor)
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        projected, n_real = model.encode_proteins(prot, structure_dropout=False)
        # The projector reads the encoder's second-to-last hidden layer.
        enc = model.encoder(prot.tokens, prot.coords, prot.coord_mask, return_hidden_states=True)
        torch.testing.assert_close(projected, model.projector(enc.hidden_states[-2]))
        assert not torch.allclose(projected, model.projector(enc.hidden_states[-1]))
        for side in ("right", "left"):
            s = model.splice(ids, mask, prot, labels, padding_side=side, structure_dropout=False)
            width = s.inputs_embeds.shape[1]
            for b, e in enumerate(exs):
                n = len(SEQS[b]) + 2  # <cls> residues <eos>, never the protein batch's padding
                assert int(n_real[b]) == n
                p = e["input_ids"].index(model.token_ids.protein)
                total = len(e["input_ids"]) - 1 + n
                start = 0 if side == "right" else width - total
                assert s.protein_spans[b] == (start + p, n)
                row = s.inputs_embeds[b]
                torch.testing.assert_close(row[start + p: start + p + n], projected[b, :n], rtol=0, atol=0)
                before = embed(torch.tensor(e["input_ids"][:p]))
                after = embed(torch.tensor(e["input_ids"][p + 1:]))
                torch.testing.assert_close(row[start: start + p], before, rtol=0, atol=0)
                torch.testing.assert_close(row[start + p + n: start + total], after, rtol=0, atol=0)
                expect_mask = torch.zeros(width, dtype=torch.long)
                expect_mask[start: start + total] = 1
                assert torch.equal(s.attention_mask[b], expect_mask)
                assert s.position_ids[b, start: start + total].tolist() == list(range(total))
                expect_labels = e["labels"][:p] + [IGNORE_INDEX] * n + e["labels"][p + 1:]
                assert s.labels[b, start: start + total].tolist() == expect_labels
                assert (s.labels[b, :start] == IGNORE_INDEX).all() and (s.labels[b, start + total:] == IGNORE_INDEX).all()


def test_shared_protein_index_and_bad_placeholder_counts(model, processor):
    ids, mask, labels, prot, exs = _batch(model, processor)
    index = torch.tensor([2, 2, 0])
    with torch.no_grad():
        projected, _ = model.encode_proteins(prot, structure_dropout=False)
        s = model.splice(ids, mask, prot, labels, protein_index=index, structure_dropout=False)
    for b, pi in enumerate(index.tolist()):
        start, n = s.protein_spans[b]
        assert n == len(SEQS[pi]) + 2
        torch.testing.assert_close(s.inputs_embeds[b, start: start + n], projected[pi, :n], rtol=0, atol=0)
    no_placeholder = ids.clone()
    no_placeholder[1][no_placeholder[1] == model.token_ids.protein] = model.token_ids.eop
    with pytest.raises(SpliceError, match="row 1 holds the <protein> token 0 times"):
        model.splice(no_placeholder, mask, prot, labels, structure_dropout=False)


def test_loss_is_on_answer_tokens_only(model, processor):
    ids, mask, labels, prot, exs = _batch(model, processor)
    with torch.no_grad():
        out = model(ids, mask, prot, labels)
    for b, (_, answer) in enumerate(QA):
        labelled = [t for t in out.labels[b].tolist() if t != IGNORE_INDEX]
        assert processor.tokenizer.decode(labelled) == answer + processor.tokenizer.eos_token
    # The loss is the mean next-token CE over exactly those positions.
    logits, lab = out.logits[:, :-1], out.labels[:, 1:]
    keep = lab != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep].float(), lab[keep])
    torch.testing.assert_close(out.lm_loss, manual)
    assert out.aux_loss is None and torch.equal(out.loss, out.lm_loss)


def test_structure_dropout_only_in_training(model, processor):
    ids, mask, labels, prot, _ = _batch(model, processor)
    m = copy.deepcopy(model)
    m.config.structure_dropout = 1.0
    seq_only = prot.without_structure(torch.ones(len(prot), dtype=torch.bool))
    with torch.no_grad():
        m.train()
        dropped = m.encode_proteins(prot)[0]
        m.eval()
        kept = m.encode_proteins(prot)[0]
        reference = m.encode_proteins(seq_only)[0]
    torch.testing.assert_close(dropped, reference)
    assert not torch.allclose(kept[0], reference[0])  # row 0 has coordinates: structure matters
    torch.testing.assert_close(kept[1], reference[1])  # row 1 is sequence-only anyway


def test_residue_dropout_removes_residues_in_training_only(model, processor):
    from sepit.models.sepit_lm import drop_residues

    # the packing itself: <cls>/<eos> kept, survivors in order at the front, lengths shrink
    x = torch.arange(3 * 40, dtype=torch.float32).view(3, 40, 1)
    lengths = torch.tensor([40, 12, 3])
    torch.manual_seed(0)
    packed, new = drop_residues(x, lengths, 0.5)
    for p in range(3):
        n, m = int(lengths[p]), int(new[p])
        kept = packed[p, :m, 0]
        assert kept[0] == x[p, 0, 0] and kept[-1] == x[p, n - 1, 0]  # <cls> ... <eos>
        assert bool((kept[1:] > kept[:-1]).all())  # order kept, nothing duplicated
        assert 3 <= m <= n  # at least one residue survives
    assert 10 <= int(new[0]) - 2 <= 28  # ~half of 38 residues
    assert int(new[2]) == 3  # a one-residue protein keeps its residue
    # in the model: training drops, eval and generation do not
    ids, mask, labels, prot, _ = _batch(model, processor)
    m = copy.deepcopy(model)
    m.config.residue_dropout = 0.9
    with torch.no_grad():
        m.eval()
        full, n_full = m.encode_proteins(prot)
        m.train()
        dropped, n_dropped = m.encode_proteins(prot)
        also_full, n_also = m.encode_proteins(prot, structure_dropout=False)
    assert bool((n_dropped < n_full).any()) and bool((n_dropped >= 3).all())
    assert torch.equal(n_also, n_full)
    with pytest.raises(Exception, match="residue_dropout"):
        SepitConfig(residue_dropout=1.0)


def test_tiny_model_overfits_one_batch(model, processor):
    torch.manual_seed(0)
    m = copy.deepcopy(model).train()
    m.config.structure_dropout = 0.0
    ids, mask, labels, prot, _ = _batch(model, processor)
    opt = torch.optim.AdamW(m.param_groups(base_lr=3e-3, encoder_lr_ratio=1.0, llm_lr_ratio=1.0))
    losses = []
    for _ in range(30):
        loss = m(ids, mask, prot, labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    m.eval()
    answers = generate_answers(m, processor, [q for q, _ in QA], [(s, None, None) for s in SEQS], max_new_tokens=16)
    assert answers == [a for _, a in QA]


def _manual_greedy(model, processor, question, protein, steps):
    """Cache-free greedy decoding of one prompt: full forward over the whole sequence each step."""
    s = model.build_generation_inputs(**processor.generation_inputs([question], [protein]))
    embeds, out_ids = s.inputs_embeds, []
    embed = model.llm.get_input_embeddings()
    for _ in range(steps):
        n = embeds.shape[1]
        logits = model.llm(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long),
                           position_ids=torch.arange(n)[None]).logits[0, -1]
        t = int(logits.float().argmax())
        if t == model.token_ids.eos:
            break
        out_ids.append(t)
        embeds = torch.cat([embeds, embed(torch.tensor([[t]]))], 1)
    return out_ids


def test_batched_left_padded_greedy_equals_manual_loop(model, processor):
    questions = [q for q, _ in QA]
    proteins = [(s, _coords(len(s), i).numpy(), None) for i, s in enumerate(SEQS)]
    with torch.no_grad():
        batched = model.generate(**processor.generation_inputs(questions, proteins), max_new_tokens=8)
        for b in range(len(questions)):
            assert batched[b] == _manual_greedy(model, processor, questions[b], proteins[b], 8)
    texts = generate_answers(model, processor, questions, proteins, max_new_tokens=8)
    assert texts == [processor.tokenizer.decode(r, skip_special_tokens=True) for r in batched]
    # Sampling is reproducible with a seed and stop strings cut the text.
    a = generate_answers(model, processor, questions, proteins, max_new_tokens=8, do_sample=True, temperature=0.8,
                         top_p=0.9, seed=3)
    b = generate_answers(model, processor, questions, proteins, max_new_tokens=8, do_sample=True, temperature=0.8,
                         top_p=0.9, seed=3)
    assert a == b
    first = texts[0]
    if len(first) > 2:
        stop = first[1:3]
        cut = generate_answers(model, processor, questions[:1], proteins[:1], max_new_tokens=8, stop=[stop])[0]
        assert cut == first.split(stop, 1)[0]


def test_generate_rejects_bad_input_clearly(model, processor):
    with pytest.raises(ValueError, match="2 questions but 1 proteins"):
        generate_answers(model, processor, ["a", "b"], [(SEQS[0], None, None)])
    with pytest.raises(ValueError, match="above max_residues"):
        generate_answers(model, processor, ["a"], [("M" * (model.config.max_residues + 1), None, None)])
    assert len(generate_answers(model, processor, ["a"], [("M" * (model.config.max_residues + 1), None, None)],
                                max_new_tokens=1, truncate=True)) == 1
    inputs = processor.generation_inputs(["a", "b"], [(SEQS[0], None, None), (SEQS[1], None, None)])
    with pytest.raises(ValueError, match="2 prompts .* but 1 proteins"):
        model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["protein"].select([0]))


def test_param_groups_freeze_and_lora(model, processor):
    m = copy.deepcopy(model)
    groups = {g["name"]: g for g in m.param_groups(base_lr=1e-4)}
    assert groups["projector"]["lr"] == pytest.approx(1e-4)
    assert groups["encoder"]["lr"] == pytest.approx(1e-5) and groups["llm"]["lr"] == pytest.approx(1e-5)
    ids = {n: {id(p) for p in g["params"]} for n, g in groups.items()}
    assert ids["projector"] == {id(p) for p in m.projector.parameters()}
    assert ids["llm"] == {id(p) for p in m.llm.parameters()}
    # The encoder's last layer and heads never reach the LLM (it reads hidden_states[-2]).
    assert {id(p) for p in m.encoder.layers[-1].parameters()}.isdisjoint(ids["encoder"])
    assert id(m.encoder.embed_tokens.weight) in ids["encoder"]
    m.freeze(encoder=True)
    assert [g["name"] for g in m.param_groups()] == ["projector", "llm"]
    m.apply_lora(r=4, alpha=8)
    lora = {g["name"]: g for g in m.param_groups()}["llm"]["params"]
    assert lora and all(p.shape[0] == 4 or p.shape[1] == 4 for p in lora)
    ids_, mask, labels, prot, _ = _batch(model, processor)
    m(ids_, mask, prot, labels).loss.backward()
    assert all(p.grad is not None for p in lora)
    with pytest.raises(ValueError, match="merge_lora"):
        m.save_pretrained("/nonexistent")
    m.merge_lora()
    assert not m.has_lora


def test_dense_save_load_roundtrip_generates_the_same(model, processor, tmp_path):
    questions = [q for q, _ in QA]
    proteins = [(s, None, None) for s in SEQS]
    before = model.generate(**processor.generation_inputs(questions, proteins), max_new_tokens=6)
    loaded, loaded_processor = load_lm(save_lm(model, processor, tmp_path / "m"))
    assert loaded.generate(**loaded_processor.generation_inputs(questions, proteins), max_new_tokens=6) == before
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)


def test_paper_preset_shapes_on_meta_device(processor):
    with torch.device("meta"):
        llm = build_llm(LLMConfig.preset("paper"))
    assert count_parameters(llm) == 1_100_048_384  # TinyLlama-1.1B
    import esm

    cfg = SepitConfig.preset("paper")
    tok = processor.tokenizer
    with torch.device("meta"):
        m = SepitForConditionalGeneration(cfg, processor.token_ids, processor.vocab_size)
        esm2 = esm.model.esm2.ESM2(num_layers=33, embed_dim=1280, attention_heads=20,
                                   alphabet=esm.data.Alphabet.from_architecture("ESM-1b"))
    assert next(m.parameters()).device.type == "meta"
    enc = m.encoder
    assert count_parameters(enc) - count_parameters(enc.structure_bias) == count_parameters(esm2)
    assert count_parameters(esm2) == 651_043_254  # fair-esm ESM2 at 650M sizes, incl. contact head
    # The LLM's vocabulary follows the tokenizer (untied: embedding + head rows).
    assert count_parameters(m.llm) == 1_100_048_384 + (len(tok) - 32000) * 2048 * 2
    assert m.llm.config.num_hidden_layers == 22 and m.llm.config.num_key_value_heads == 4
    assert tuple(m.projector.fc1.weight.shape) == (2048, 1280)
    assert tuple(m.projector.fc2.weight.shape) == (2048, 2048)
    assert EncoderConfig.preset("paper").num_layers == 33


def test_builds_from_local_llm_and_encoder_folders(model, tmp_path):
    """A TinyLlama-like local folder (its tokenizer pads with </s>, lacks SEPIT tokens) and a saved
    protein encoder: the tokenizer gains <pad>/<bop>/<protein>/<eop>, the LLM grows 4 embedding
    rows, and the loaded weights are used as they are."""
    from test_tokenizer import _llama_style_folder
    from transformers import LlamaForCausalLM

    from sepit.models.llm import llama_config
    from sepit.train.stage1 import bundled_tokenizer_corpus

    folder = tmp_path / "llama"
    n_base = _llama_style_folder(bundled_tokenizer_corpus(), folder)
    torch.manual_seed(1)
    LlamaForCausalLM(llama_config(LLMConfig.preset("tiny"), vocab_size=n_base)).save_pretrained(str(folder))
    model.encoder.save_pretrained(tmp_path / "encoder")
    cfg = SepitConfig.preset("tiny")
    cfg.llm = cfg.llm.with_path(folder)
    cfg.encoder_path = str(tmp_path / "encoder")
    m, m_processor = build_lm(cfg)
    m.eval()
    assert m_processor.vocab_size == n_base + 4 and m_processor.tokenizer.pad_token == "<pad>"
    emb = m.llm.get_input_embeddings().weight
    assert emb.shape[0] == n_base + 4 and m.config.llm.vocab_size == n_base + 4
    original = LlamaForCausalLM.from_pretrained(str(folder)).get_input_embeddings().weight
    torch.testing.assert_close(emb[:n_base], original, rtol=0, atol=0)
    for (name, a), b in zip(m.encoder.state_dict().items(), model.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    ids, mask, labels, prot, _ = _batch(m, m_processor)
    assert torch.isfinite(m(ids, mask, prot, labels).loss)
    # Saved, the folder no longer needs the sources.
    again, again_processor = load_lm(save_lm(m, m_processor, tmp_path / "sepit"))
    assert again.config.llm.path is None and again.config.encoder_path is None
    q, p = [QA[0][0]], [(SEQS[0], None, None)]
    assert (again.generate(**again_processor.generation_inputs(q, p), max_new_tokens=5)
            == m.generate(**m_processor.generation_inputs(q, p), max_new_tokens=5))
