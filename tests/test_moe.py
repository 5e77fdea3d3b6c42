"""MoE upcycling (DeepSpeed MoE), aux loss and routing stats, plain export, stage-2 save/load."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

from lm_support import load_lm, save_lm

from sepit.data.prompts import IGNORE_INDEX
from sepit.models.moe import (
    MoEFeedForward, SepitMoEBlock, export_for_inference, moe_blocks, split_moe_param_groups,
    upcycle_to_moe,
)
from sepit.models.protein_batch import collate_proteins
from sepit.models.sepit_lm import SepitForConditionalGeneration

SEQS = ["MSLEQKKGADIISKILQIQNSIGK", "MVLSPADKTNVKAAW", "MDDREDLVYQAKLAEQAERYDEMVESMKKVAGMDV"]
QA = [("What does <protein> do?", "It hydrolyses NAD(+)."),
      ("Where is this protein found?", "Cytoplasm."),
      ("Is <protein> an enzyme?", "Yes")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _upcycled(model, perturb=False, **kw):
    """Upcycled copy of the dense model; with ``perturb`` also an exported (plain) copy of it."""
    m = copy.deepcopy(model)
    upcycle_to_moe(m, **kw)
    if perturb:
        _perturb_experts(m)
    # Copy before the expert groups are attached: a process-group handle cannot be deep-copied.
    plain = export_for_inference(copy.deepcopy(m))
    for _, block in moe_blocks(m):
        block.moe.set_deepspeed_parallelism()  # what deepspeed.initialize does for each MoE
    return m, plain


def _perturb_experts(model, scale=0.05, seed=1):
    """Make experts differ (as after training) so routing matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, block in moe_blocks(model):
            for expert in block.experts:
                for p in expert.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * scale)
            block.router.weight.mul_(20)  # confident routing, like a trained router


def _batch(model, processor):
    exs = [processor.encode_example(q, a) for q, a in QA]
    T = max(len(e["input_ids"]) for e in exs)
    ids = torch.full((len(exs), T), model.token_ids.pad)
    labels = torch.full((len(exs), T), IGNORE_INDEX)
    mask = torch.zeros(len(exs), T, dtype=torch.long)
    for b, e in enumerate(exs):
        n = len(e["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    prot = collate_proteins(model.encoder.alphabet, [(s, None, None) for s in SEQS])
    return ids, mask, labels, prot


def test_experts_start_as_dense_copies_and_combine_like_deepspeed(model, process_group):
    m, _ = _upcycled(model, num_experts=4, top_k=1, capacity_factor=8.0, eval_capacity_factor=8.0)
    dense_layers = model.llm.model.layers
    blocks = dict(moe_blocks(m))
    assert sorted(blocks) == list(range(len(dense_layers)))
    assert m.config.moe.num_experts == 4 and not m.config.moe.exported
    for i, block in blocks.items():
        assert isinstance(block, SepitMoEBlock) and len(block.experts) == 4
        dense_sd = dense_layers[i].mlp.state_dict()
        for expert in block.experts:
            for name, tensor in expert.state_dict().items():
                assert torch.equal(tensor, dense_sd[name])
        assert tuple(block.router.weight.shape) == (4, dense_layers[i].mlp.down_proj.out_features)
        # All experts equal, top-1, nothing dropped: DeepSpeed outputs p_top1(x) · dense(x)
        # (the top-1 gate is not renormalised).
        x = torch.randn(2, 7, block.router.in_features)
        with torch.no_grad():
            out = block(x)
            p_top = torch.softmax(x.reshape(-1, x.shape[-1]) @ block.router.weight.T, -1).max(-1).values
            expected = dense_layers[i].mlp(x) * p_top.reshape(2, 7, 1)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert block.expert_counts.sum().item() == 14


@pytest.mark.parametrize("top_k", [1, 2])
def test_exported_block_matches_deepspeed_block(model, process_group, top_k):
    m, plain = _upcycled(model, perturb=True, num_experts=4, top_k=top_k, capacity_factor=16.0,
                         eval_capacity_factor=16.0)
    assert plain.config.moe.exported
    for (i, ds), (j, pl) in zip(moe_blocks(m), moe_blocks(plain)):
        assert i == j and isinstance(pl, MoEFeedForward)
        x = torch.randn(3, 9, pl.router.in_features)
        token_mask = torch.ones(27, dtype=torch.bool)
        token_mask[-5:] = False  # padding: routed nowhere, not counted
        ds.token_mask = pl.token_mask = token_mask if top_k == 1 else None
        with torch.no_grad():
            a, b = ds(x), pl(x)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ds.aux_loss, pl.aux_loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(ds.expert_counts, pl.expert_counts)
        expected_tokens = (22 if top_k == 1 else 27) * top_k
        assert int(pl.expert_counts.sum()) == expected_tokens


def test_whole_model_aux_loss_stats_and_export_parity(model, process_group, processor):
    m, plain = _upcycled(model, perturb=True, num_experts=4, top_k=1, capacity_factor=16.0,
                         eval_capacity_factor=16.0, aux_loss_coef=0.01)
    ids, mask, labels, prot = _batch(m, processor)
    out = m(ids, mask, prot, labels)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss)
    # The aux loss reaches the routers' gradients.
    out.aux_loss.backward()
    assert all(b.router.weight.grad is not None and b.router.weight.grad.abs().sum() > 0 for _, b in moe_blocks(m))
    real_tokens = int(out.attention_mask.sum())
    stats = m.moe_stats()
    assert sorted(stats) == [0, 1] and all(sum(c) == real_tokens for c in stats.values())
    # Exported (plain PyTorch) model: same logits on real tokens, same stats.
    with torch.no_grad():
        a = m(ids, mask, prot, labels)
        b = plain(ids, mask, prot, labels)
    real = a.attention_mask.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    assert plain.moe_stats() == m.moe_stats()


def test_expert_params_get_their_own_optimizer_groups(model, process_group):
    m, _ = _upcycled(model, num_experts=2, layers=[1])
    assert [i for i, _ in moe_blocks(m)] == [1]
    m.freeze(encoder=True)
    groups = split_moe_param_groups(m.param_groups(base_lr=1e-4))
    moe_groups = [g for g in groups if g.get("moe")]
    assert len(moe_groups) == 1 and moe_groups[0]["lr"] == pytest.approx(1e-5)
    expert_ids = {id(p) for _, b in moe_blocks(m) for e in b.experts for p in e.parameters()}
    assert {id(p) for p in moe_groups[0]["params"]} == expert_ids
    dense_ids = {id(p) for g in groups if not g.get("moe") for p in g["params"]}
    assert dense_ids.isdisjoint(expert_ids) and id(m.llm.model.layers[1].mlp.router.weight) in dense_ids
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle_to_moe(m)


def test_stage2_model_roundtrips_and_generates_the_same(model, process_group, processor, tmp_path):
    _, m = _upcycled(model, perturb=True, num_experts=3, top_k=1, capacity_factor=16.0,
                     eval_capacity_factor=16.0)
    questions = [q for q, _ in QA]
    proteins = [(s, None, None) for s in SEQS]
    before = m.generate(**processor.generation_inputs(questions, proteins), max_new_tokens=8)
    loaded, loaded_processor = load_lm(save_lm(m, processor, tmp_path / "stage2"))
    assert all(isinstance(b, MoEFeedForward) for _, b in moe_blocks(loaded))
    assert loaded.config.moe.num_experts == 3
    assert loaded.generate(**loaded_processor.generation_inputs(questions, proteins), max_new_tokens=8) == before
    # The same folder reopens as DeepSpeed blocks to continue training, with equal outputs.
    ds = SepitForConditionalGeneration.from_pretrained(tmp_path / "stage2", moe_backend="deepspeed").eval()
    assert all(isinstance(b, SepitMoEBlock) for _, b in moe_blocks(ds))
    ids, mask, labels, prot = _batch(m, processor)
    with torch.no_grad():
        a, b = loaded(ids, mask, prot, labels), ds(ids, mask, prot, labels)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


def test_deepspeed_engine_trains_the_upcycled_model_at_zero2(model, process_group, processor):
    """deepspeed.initialize finds the MoE blocks (sets their expert groups) and a ZeRO-2 step
    with the split optimizer groups updates routers and experts."""
    import deepspeed

    m = copy.deepcopy(model)
    upcycle_to_moe(m, num_experts=2, top_k=1)
    m.freeze(encoder=True)
    m.config.structure_dropout = 0.0
    opt = torch.optim.AdamW(split_moe_param_groups(m.param_groups(base_lr=1e-2, llm_lr_ratio=1.0)))
    engine, _, _, _ = deepspeed.initialize(model=m, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
    })
    blocks = dict(moe_blocks(m))
    router0 = blocks[0].router.weight.detach().clone()
    expert0 = blocks[0].experts[0].down_proj.weight.detach().clone()
    ids, mask, labels, prot = _batch(m, processor)
    m.train()
    losses = []
    for _ in range(4):
        out = engine(ids, mask, prot, labels)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(blocks[0].router.weight, router0)
    assert not torch.equal(blocks[0].experts[0].down_proj.weight, expert0)
    assert sum(m.moe_stats()[0]) == int(out.attention_mask.sum())


def test_activation_checkpointing_reroutes_identically(model, process_group, processor):
    """Recomputing MoE blocks in backward sees the same padding mask: same loss, same grads."""
    m, _ = _upcycled(model, perturb=True, num_experts=2, layers=[1])
    m.train()
    m.config.structure_dropout = 0.0
    ids, mask, labels, prot = _batch(m, processor)
    router = m.llm.model.layers[1].mlp.router.weight
    torch.manual_seed(5)  # DeepSpeed's random token selection draws from the global RNG
    plain = m(ids, mask, prot, labels)
    plain.loss.backward()
    grad = router.grad.clone()
    m.zero_grad()
    m.gradient_checkpointing_enable()
    torch.manual_seed(5)
    ckpt = m(ids, mask, prot, labels)
    ckpt.loss.backward()
    torch.testing.assert_close(ckpt.loss, plain.loss)
    torch.testing.assert_close(router.grad, grad)
    assert grad.abs().sum() > 0


def _expert_parallel_worker(rank: int, port: int, results) -> None:
    """One of two ranks: 4 experts split 2 + 2, different token counts per rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_SIZE="2", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from sepit.models.moe import MoEConfig

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    hf = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)  # same dense MLP and router on both ranks
    block = SepitMoEBlock(LlamaMLP(hf), 16, MoEConfig(num_experts=4, ep_size=2, capacity_factor=16.0,
                                                      eval_capacity_factor=16.0)).eval()
    block.moe.set_deepspeed_parallelism()
    with torch.no_grad():
        for j, expert in enumerate(block.experts):  # global expert id 2·rank + j
            g = torch.Generator().manual_seed(100 + 2 * rank + j)
            for p in expert.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        block.router.weight.mul_(20)
    torch.manual_seed(1 + rank)
    x = torch.randn(1, 5 + 4 * rank, 16)
    with torch.no_grad():
        y = block(x)
    gathered = [None, None]
    dist.all_gather_object(gathered, [e.state_dict() for e in block.experts])
    experts = []
    for state in gathered[0] + gathered[1]:
        expert = LlamaMLP(hf)
        expert.load_state_dict(state)
        experts.append(expert)
    plain = MoEFeedForward(experts, 16, top_k=1)
    plain.router.weight.data.copy_(block.router.weight)
    with torch.no_grad():
        results[rank] = float((y - plain(x)).abs().max())
    dist.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_across_two_ranks_with_unequal_token_counts():
    """ep_size=2 over gloo: each rank holds 2 of 4 experts and a different number of tokens (the
    block pads to the group maximum so DeepSpeed's all-to-all buffers agree); outputs equal a
    plain block holding all 4 experts."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_expert_parallel_worker, args=(port, results), nprocs=2)
        assert sorted(results.keys()) == [0, 1]
        assert max(results.values()) < 1e-5
