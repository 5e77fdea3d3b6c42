"""``sepit plan``: parameter counts against meta-device models, ZeRO model-state bytes, activation
bytes against the tensors autograd really saves (CPU, bf16), and the divisibility rules."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from sepit.cli import main as sepit_main
from sepit.plan import GIB, PlanError, PlanRequest, make_plan
from sepit.plan.activations import ActivationShapes, activation_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Agreement of the CPU activation estimate with the measured saved tensors (see test below).
ACTIVATION_MARGIN = 0.10


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained in a second on real UniProt-style sentences (no bundled corpus)."""
    from sepit.models.tokenizer import train_llm_tokenizer

    text = ["Acts as a co-chaperone for the SNARE protein SNAP-25.", "Cytoplasm. Nucleus.",
            "Catalyzes the hydrolysis of ATP coupled with the transport of calcium.",
            "Belongs to the GatB/GatE family.", "What is the function of this protein?"] * 20
    return train_llm_tokenizer(text, vocab_size=400)


def _split_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(trainable non-expert, expert, frozen) parameter counts of a built model."""
    dense = expert = frozen = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            frozen += p.numel()
        elif ".experts." in name:
            expert += p.numel()
        else:
            dense += p.numel()
    return dense, expert, frozen


@pytest.fixture(scope="module")
def paper_counts(tokenizer):
    """(vocab, stage-1 split, stage-2 split) of the paper model built on the meta device."""
    from sepit.models.moe import upcycle_to_moe
    from sepit.models.sepit_lm import SepitConfig, SepitForConditionalGeneration
    from sepit.models.tokenizer import special_token_ids

    with torch.device("meta"):
        model = SepitForConditionalGeneration(SepitConfig.preset("paper"), special_token_ids(tokenizer), len(tokenizer))
    stage1 = _split_counts(model)
    # Stage 2: encoder frozen, every LLM FFN -> 4 experts + a bias-free router (DeepSpeed's `wg`).
    model.freeze(encoder=True)
    with torch.device("meta"):
        upcycle_to_moe(model, num_experts=4, use_deepspeed=False)
    return model.llm.get_input_embeddings().num_embeddings, stage1, _split_counts(model)


def test_paper_stage1_and_stage2_counts_match_meta_models(paper_counts):
    vocab, stage1, stage2 = paper_counts
    plan1 = make_plan(PlanRequest(preset="paper", stage=1, gpus=8, vocab_size=vocab))
    assert (plan1.params.trainable_dense, plan1.params.expert_total, plan1.params.frozen) == stage1
    assert stage1[2] > 20_000_000  # the encoder's last layer and heads: never reach the loss
    plan2 = make_plan(PlanRequest(preset="paper", stage=2, gpus=8, vocab_size=vocab))
    assert (plan2.params.trainable_dense, plan2.params.expert_total, plan2.params.frozen) == stage2
    assert plan2.params.expert_total == 22 * 4 * 3 * 2048 * 5632


def test_paper_vocab_default_is_tinyllama_plus_sepit_tokens():
    plan = make_plan(PlanRequest(preset="paper", stage=1, gpus=8))
    # ESM-2 650M without its unused top (trainable) + TinyLlama-1.1B at 32004 tokens + projector
    assert plan.params.total == 651_043_254 + (2 * 128 + 128 * 128 + 128 + 128 * 20 + 20 + 128 * 1280 + 1280) \
        + 1_100_048_384 + 4 * 2048 * 2 + (1280 * 2048 + 2048 + 2048 * 2048 + 2048)


def test_paper_stage0_counts_match_meta_model():
    from sepit.pipeline import recipe
    from sepit.models.encoder import ProteinEncoder
    from sepit.models.clip import ProteinTextCLIP

    cfg = recipe("paper").stage0.model
    with torch.device("meta"):  # the 650M encoder; the text encoder loads its real weights
        encoder = ProteinEncoder(cfg.encoder)
    model = ProteinTextCLIP(cfg, encoder=encoder)
    plan = make_plan(PlanRequest(preset="paper", stage=0, gpus=8))
    dense, _, frozen = _split_counts(model)
    assert (plan.params.trainable_dense, plan.params.frozen) == (dense, frozen)


def test_model_state_bytes_follow_the_zero_partitioning(paper_counts):
    """bf16 weights of everything, bf16 grads and 12 B of fp32 master + Adam per trainable
    parameter; ZeRO-1 splits the 12 over ranks, ZeRO-2 also the grads, ZeRO-3 also the weights;
    experts are held num_experts/ep_size per rank and split over gpus/ep_size ranks."""
    vocab, _, (dense, expert, frozen) = paper_counts
    n, ep = 8, 2
    plan = make_plan(PlanRequest(preset="paper", stage=2, gpus=n, ep_size=ep, vocab_size=vocab))
    held = expert // ep
    assert plan.states_by_zero[0] == {"weights": 2 * (dense + frozen + held), "gradients": 2 * (dense + held),
                                      "optimizer": 12 * (dense + held)}
    assert plan.states_by_zero[1]["optimizer"] == int(12 * dense / n + 12 * held / (n // ep))
    assert plan.states_by_zero[2]["gradients"] == int(2 * dense / n + 2 * held / (n // ep))
    assert plan.states_by_zero[2]["weights"] == 2 * (dense + frozen + held)
    assert plan.states_by_zero[3]["weights"] == int(2 * (dense + frozen) / n + 2 * held)
    assert "refused" not in " ".join(plan.errors)
    assert any("ZeRO-3" in e for e in make_plan(PlanRequest(preset="paper", stage=2, gpus=8, zero_stage=3)).errors)


# ---------------------------------------------------------------------------------- activations
def measure_saved_bytes(fn) -> tuple[object, int]:
    """Run ``fn`` and return (its result, bytes of the distinct non-parameter storages autograd
    still holds for backward when it returns): the activation memory at the start of backward."""
    held = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        held.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), weakref.ref(t)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    gc.collect()
    return result, held


def _training_batch(model, tokenizer, residues=(100, 80, 60), answer_chars=(400, 300, 200)):
    from sepit.data.prompts import IGNORE_INDEX, encode_example
    from sepit.models.protein_batch import collate_proteins

    g = torch.Generator().manual_seed(0)
    amino = "ACDEFGHIKLMNPQRSTVWY"
    seqs = ["".join(amino[i] for i in torch.randint(0, 20, (r,), generator=g)) for r in residues]
    answer = "Catalyzes the hydrolysis of ATP coupled with the transport of calcium. " * 8
    exs = [encode_example(tokenizer, "What is the function of <protein>?", answer[:k]) for k in answer_chars]
    T = max(len(x["input_ids"]) for x in exs)
    ids = torch.full((len(exs), T), model.token_ids.pad)
    labels = torch.full((len(exs), T), IGNORE_INDEX)
    mask = torch.zeros(len(exs), T, dtype=torch.long)
    for b, x in enumerate(exs):
        n = len(x["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
    items = [(s, torch.cumsum(torch.randn(len(s), 3, generator=g) * 2.2, 0), None) for s in seqs]
    return ids, mask, labels, collate_proteins(model.encoder.alphabet, items)


def _measured_vs_estimate(model, tokenizer, stage: int) -> tuple[int, int]:
    ids, mask, labels, protein = _training_batch(model, tokenizer)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out, held = measure_saved_bytes(lambda: model(ids, mask, protein, labels))
    live = {ptr: nbytes for ptr, nbytes, ref in held if ref() is not None and ptr not in params}
    measured = sum(live.values())
    enc, llm = model.encoder.config, model.config.llm
    moe = model.config.moe
    shapes = ActivationShapes(
        micro_batch=ids.shape[0], encoder_tokens=protein.tokens.shape[1], encoder_dim=enc.embed_dim,
        encoder_heads=enc.attention_heads, encoder_layers=enc.num_layers, structure=enc.use_structure,
        num_rbf=enc.num_rbf, chunk_size=enc.chunk_size, stage=stage, encoder_trained=stage < 2,
        llm_tokens=out.logits.shape[1], vocab=out.logits.shape[-1], llm_hidden=llm.hidden_size,
        llm_intermediate=llm.intermediate_size, llm_layers=llm.num_layers, llm_heads=llm.num_attention_heads,
        llm_kv_heads=llm.num_key_value_heads, moe_layers=llm.num_layers if moe else 0,
        num_experts=moe.num_experts if moe else 0, top_k=moe.top_k if moe else 1,
        capacity_factor=moe.capacity_factor if moe else 1.25)
    estimate = sum(activation_bytes(shapes, 2, checkpointing=False, device="cpu").values())
    return measured, estimate


@pytest.fixture(scope="module")
def small_bf16_model(tokenizer):
    from sepit.models.sepit_lm import SepitConfig, SepitForConditionalGeneration
    from sepit.models.tokenizer import special_token_ids

    torch.manual_seed(0)
    cfg = SepitConfig.preset("small")
    cfg.structure_dropout = 0.0  # every protein keeps its structure: the [B, H, L, L] mask exists
    # DeepSpeed's bf16 engine casts the whole module; so does this test.
    return SepitForConditionalGeneration(cfg, special_token_ids(tokenizer), len(tokenizer)).to(torch.bfloat16).train()


def test_stage1_activation_estimate_matches_saved_tensors(small_bf16_model, tokenizer):
    measured, estimate = _measured_vs_estimate(small_bf16_model, tokenizer, stage=1)
    assert measured > 20e6
    print(f"activations: estimate {estimate} B, measured {measured} B, ratio {estimate / measured:.3f}")
    assert abs(estimate / measured - 1) < ACTIVATION_MARGIN, (estimate, measured)


def test_stage2_moe_activation_estimate_matches_saved_tensors(small_bf16_model, tokenizer, process_group):
    import copy

    from sepit.models.moe import upcycle_to_moe

    model = copy.deepcopy(small_bf16_model)
    model.freeze(encoder=True)
    upcycle_to_moe(model, num_experts=4, use_deepspeed=True)
    model.to(torch.bfloat16).train()
    measured, estimate = _measured_vs_estimate(model, tokenizer, stage=2)
    print(f"activations: estimate {estimate} B, measured {measured} B, ratio {estimate / measured:.3f}")
    assert abs(estimate / measured - 1) < ACTIVATION_MARGIN, (estimate, measured)


# ---------------------------------------------------------------------------------- rules and CLI
def test_divisibility_rules_are_reported():
    plan = make_plan(PlanRequest(preset="paper", stage=2, gpus=6, ep_size=4))
    assert any("ep_size=4 must divide the world size gpus=6" in e for e in plan.errors)
    with pytest.raises(PlanError, match="num_experts=4 is not divisible by ep_size=3"):
        make_plan(PlanRequest(preset="paper", stage=2, gpus=6, ep_size=3))
    assert any("structure bias" in e for e in make_plan(PlanRequest(preset="paper", stage=1, zero_stage=3)).errors)
    assert not make_plan(PlanRequest(preset="paper", stage=2, gpus=8, ep_size=2)).errors


def test_checkpointing_and_more_gpus_lower_the_peak():
    base = make_plan(PlanRequest(preset="paper", stage=2, gpus=8))
    assert base.peak_bytes(checkpointing=True) < base.peak_bytes(checkpointing=False)
    wider = make_plan(PlanRequest(preset="paper", stage=2, gpus=16))
    assert wider.peak_bytes() < base.peak_bytes()
    small_gpu = make_plan(PlanRequest(preset="paper", stage=2, gpus=8, gpu_mem_gib=24))
    assert not small_gpu.fits() and base.fits()
    assert base.peak_bytes() / GIB > 10


def test_cli_prints_the_plan_and_fails_on_broken_rules(capsys):
    assert sepit_main(["plan", "--preset", "paper", "--stage", "2", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "<- ZeRO-2" in out and "experts per rank: 4 of 4" in out and "fits in 80 GiB" in out
    assert sepit_main(["plan", "--preset", "paper", "--stage", "2", "--gpus", "6", "--ep-size", "4"]) == 1
    captured = capsys.readouterr()
    assert "ERROR: ep_size=4 must divide" in captured.out and "refused at launch" in captured.err
    assert sepit_main(["plan", "--preset", "huge"]) == 2
    assert "--preset 'huge'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- evals/gpu_smoke.py
def _gpu_smoke():
    import importlib.util

    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "evals" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_gpu_smoke_skips_cleanly_without_cuda():
    import subprocess
    import sys

    path, _ = _gpu_smoke()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(path), "--steps", "1"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip().splitlines()[-1] == "gpu_smoke: skipped: no CUDA device"


def test_gpu_smoke_batches_have_the_planned_shapes(tokenizer):
    """The smoke's synthetic stage-1/2 batch splices to exactly the plan's LLM length and trains."""
    from sepit.models.sepit_lm import SepitConfig, SepitForConditionalGeneration
    from sepit.models.tokenizer import special_token_ids
    from sepit.processing import SepitProcessor

    _, smoke = _gpu_smoke()
    torch.manual_seed(0)
    model = SepitForConditionalGeneration(SepitConfig.preset("tiny"), special_token_ids(tokenizer), len(tokenizer))
    plan = make_plan(PlanRequest(preset="tiny", stage=1, gpus=1, micro_batch_size=2, residues=40,
                                 answer_tokens=200, vocab_size=len(tokenizer)))
    batch = smoke.instruction_batch(model, SepitProcessor(tokenizer), 2, 40, plan.shapes.llm_tokens)
    out = model(**batch)
    assert out.logits.shape[:2] == (2, plan.shapes.llm_tokens)
    assert torch.isfinite(out.loss) and int((out.labels != -100).sum()) > 2 * 20
    assert smoke.bf16_peak_flops("NVIDIA H200") == 989e12 and smoke.bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    paper1 = make_plan(PlanRequest(preset="paper", stage=1, gpus=1))
    tokens = paper1.shapes.micro_batch * paper1.shapes.llm_tokens
    # Stage 1 trains every parameter: at least 6 FLOPs per parameter per LLM token.
    assert smoke.flops_per_step(paper1, 1) > 6 * paper1.params.trainable_dense * tokens * 0.9
