"""GPU smoke check: a few bf16 DeepSpeed training steps of stages 0, 1, 2 and a generation on one
CUDA GPU at the ``paper`` shapes (or the largest micro-batch that fits), next to ``sepit plan``.

    python evals/gpu_smoke.py [--preset paper] [--steps 3] [--stages 0 1 2] [--out evals/results]

For each stage: the model built from the preset (random weights: the shapes, not the numbers,
matter here), DeepSpeed ZeRO-2 in bf16 with the stage's optimizer groups (stage 2 upcycled to
DeepSpeed MoE, encoder frozen), a synthetic batch at the plan's worst case (micro-batch x
longest protein x longest LLM sequence), one warm-up step, then ``--steps`` timed steps.  Prints
tokens/s, ``torch.cuda.max_memory_allocated`` against the plan's peak (ratio; the plan claims
±25 %), and MFU = model FLOPs/s over the GPU's dense bf16 peak.  Then a greedy generation of 64
tokens from the exported stage-2 model.  Without CUDA it prints ``skipped: no CUDA device`` and
exits 0.  Raw JSON: ``<out>/gpu_smoke.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

#: Dense bf16 tensor-core peak FLOP/s by device-name fragment (vendor datasheets, no sparsity).
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 70e12, "A10": 125e12, "V100": 125e12}
PLAN_MARGIN = 0.25
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def bf16_peak_flops(name: str) -> float | None:
    for key in sorted(BF16_PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return BF16_PEAK_FLOPS[key]
    return None


def init_single_process_group(backend: str) -> None:
    """World of one, as a Ray Train worker would have; DeepSpeed needs LOCAL_RANK too."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_SIZE="1")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def synthetic_proteins(batch: int, residues: int, seed: int = 0) -> list[tuple]:
    """``batch`` random sequences of ``residues`` amino acids with a Cα random walk (3.8 Å steps)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        seq = "".join(AMINO[i] for i in torch.randint(0, 20, (residues,), generator=g).tolist())
        step = torch.randn(residues, 3, generator=g)
        coords = torch.cumsum(3.8 * step / step.norm(dim=1, keepdim=True), 0).numpy()
        out.append((seq, coords, None))
    return out


def instruction_batch(model, processor, batch: int, residues: int, llm_tokens: int, seed: int = 0) -> dict:
    """A stage-1/2 batch whose spliced sequence is exactly ``llm_tokens`` long: the real prompt,
    then random non-special answer tokens as labels."""
    from sepit.data.prompts import IGNORE_INDEX
    from sepit.models.protein_batch import collate_proteins

    prompt = processor.encode_prompt("What is the function of <protein>?")
    answer_len = llm_tokens - (len(prompt) - 1) - (residues + 2)
    if answer_len < 1:
        raise ValueError(f"llm_tokens={llm_tokens} leaves no room for an answer after {residues} residues")
    g = torch.Generator().manual_seed(seed)
    vocab = processor.vocab_size
    ids_ = processor.token_ids  # <pad>, <bop>, <protein>, <eop>, bos, eos
    reserved = {ids_.pad, ids_.bop, ids_.protein, ids_.eop, ids_.eos, ids_.bos} - {None}
    special = torch.tensor(sorted(reserved | set(processor.tokenizer.all_special_ids)))
    answers = torch.randint(0, vocab, (batch, answer_len), generator=g)
    plain = next(i for i in range(vocab) if i not in set(special.tolist()))
    answers[torch.isin(answers, special)] = plain  # no <protein>/<pad>/eos inside an answer
    ids = torch.cat([torch.tensor(prompt).expand(batch, -1), answers], 1)
    labels = torch.cat([torch.full((batch, len(prompt)), IGNORE_INDEX), answers], 1)
    mask = torch.ones_like(ids)
    mask[1:, -1] = 0  # one padded position: the padded-batch attention path, as in training
    protein = collate_proteins(model.encoder.alphabet, synthetic_proteins(batch, residues, seed))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "protein": protein}


def stage0_batch(model, batch: int, residues: int, text_tokens: int, seed: int = 0) -> dict:
    from sepit.models.protein_batch import collate_proteins

    protein = collate_proteins(model.encoder.alphabet, synthetic_proteins(batch, residues, seed))
    words = " ".join(["catalyzes the hydrolysis of ATP coupled with calcium transport"] * text_tokens)
    text = model.tokenizer([words] * batch, padding="max_length", truncation=True, max_length=text_tokens,
                           return_tensors="pt")
    return {"protein": protein, "text_input_ids": text["input_ids"], "text_attention_mask": text["attention_mask"]}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def build_stage_model(stage: int, preset: str):
    """(model, optimizer groups, SepitProcessor or None for stage 0) of a stage at ``preset`` sizes,
    random weights, on CPU."""
    from sepit.pipeline import recipe

    if stage == 0:
        from sepit.models.clip import ProteinTextCLIP

        model = ProteinTextCLIP(recipe(preset).stage0.model)
        return model, model.param_groups(base_lr=1e-6), None
    from sepit.train.stage1 import initial_model

    model, processor = initial_model(recipe(preset).stage1.model)
    if stage == 2:
        from sepit.models.moe import upcycle_to_moe

        model.freeze(encoder=True)
        upcycle_to_moe(model, num_experts=4, use_deepspeed=True)
    return model, model.param_groups(base_lr=2e-5), processor


def flops_per_step(plan, stage: int) -> float:
    """Model FLOPs of one training step: 6·N per token for trained weights (forward + backward),
    2·N for the frozen no-grad encoder of stage 2, attention 12·layers·width·length per token
    (4 for a forward only), MoE counting the top-k experts a token visits."""
    p, s = plan.params, plan.shapes
    B, L = s.micro_batch, s.encoder_tokens
    enc_attn = 12 * s.encoder_layers * s.encoder_dim * L
    if stage == 0:
        return B * L * (6 * p.trainable_dense + enc_attn)
    T = s.llm_tokens
    if stage == 1:
        llm = llm_and_projector_parameters(s)
        encoder = B * L * (6 * (p.trainable_dense - llm) + enc_attn)
        experts = 0.0
    else:
        llm = p.trainable_dense  # projector + attention + routers + embeddings
        encoder = B * L * (2 * p.frozen + enc_attn / 3)
        experts = p.expert_total / s.num_experts * s.top_k
    return encoder + B * T * (6 * (llm + experts) + 12 * s.llm_layers * s.llm_hidden * T)


def llm_and_projector_parameters(s) -> int:
    """Parameters of the Llama LLM and the projector, from the plan's shapes."""
    from sepit.plan.params import llama_parameters

    llm = llama_parameters(s.vocab, s.llm_hidden, s.llm_intermediate, s.llm_layers, s.llm_heads, s.llm_kv_heads)
    projector = s.encoder_dim * s.llm_hidden + 2 * s.llm_hidden + s.llm_hidden * s.llm_hidden
    return llm["total"] + projector


def run_stage(stage: int, args, device: torch.device) -> dict:
    import deepspeed

    from sepit.plan import GIB, PlanRequest, make_plan
    from sepit.train.config import TrainConfig
    from sepit.train.deepspeed_config import build_deepspeed_config

    model, groups, processor = build_stage_model(stage, args.preset)
    vocab = None if stage == 0 else model.llm.get_input_embeddings().num_embeddings
    micro = args.micro_batch
    while True:
        plan = make_plan(PlanRequest(preset=args.preset, stage=stage, gpus=1, micro_batch_size=micro,
                                     vocab_size=vocab, gpu_mem_gib=torch.cuda.get_device_properties(0).total_memory / GIB))
        s = plan.shapes
        residues = s.encoder_tokens - 2
        batch = (stage0_batch(model, s.micro_batch, residues, s.text_tokens) if stage == 0
                 else instruction_batch(model, processor, s.micro_batch, residues, s.llm_tokens))
        cfg = TrainConfig(micro_batch_size=s.micro_batch, zero_stage=2, precision="bf16", device="cuda")
        if stage == 2:
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        optimizer = torch.optim.AdamW(groups, lr=1e-5)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          config=build_deepspeed_config(cfg, precision="bf16", moe=stage == 2))
        batch = to_device(batch, device)
        try:
            times = []
            torch.cuda.reset_peak_memory_stats()
            for i in range(args.steps + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = engine(**batch)
                engine.backward(out.loss)
                engine.step()
                torch.cuda.synchronize()
                if i:  # step 0 warms up kernels and allocates optimizer states
                    times.append(time.perf_counter() - t0)
            break
        except torch.cuda.OutOfMemoryError:
            del engine, optimizer, batch
            gc.collect()
            torch.cuda.empty_cache()
            if micro == 1:
                raise
            micro = max(1, (micro or s.micro_batch) // 2)
            print(f"  stage {stage}: out of memory, retrying with micro-batch {micro}")
            model, groups, processor = build_stage_model(stage, args.preset)
    step = sorted(times)[len(times) // 2]
    tokens = s.micro_batch * (s.encoder_tokens if stage == 0 else s.llm_tokens)
    peak = torch.cuda.max_memory_allocated()
    estimate = plan.peak_bytes(checkpointing=False)
    flops_peak = bf16_peak_flops(torch.cuda.get_device_name(0)) or args.peak_tflops * 1e12
    mfu = flops_per_step(plan, stage) / step / flops_peak if flops_peak else None
    result = {"stage": stage, "micro_batch": s.micro_batch, "encoder_tokens": s.encoder_tokens,
              "llm_tokens": s.llm_tokens, "step_s": step, "tokens_per_s": tokens / step,
              "peak_bytes": peak, "plan_peak_bytes": estimate, "plan_ratio": estimate / peak, "mfu": mfu,
              "plan_states": plan.states_by_zero[2], "plan_activations": plan.activations,
              "loss": float(out.loss)}
    verdict = "within" if abs(estimate / peak - 1) <= PLAN_MARGIN else "OUTSIDE"
    print(f"stage {stage}: micro-batch {s.micro_batch} x ({s.encoder_tokens} protein, {s.llm_tokens} LLM tokens) "
          f"step {step:.3f} s, {tokens / step:,.0f} tokens/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'}")
    print(f"  peak memory {peak / GIB:.2f} GiB measured vs {estimate / GIB:.2f} GiB planned "
          f"(ratio {estimate / peak:.2f}: {verdict} ±{PLAN_MARGIN:.0%})")
    if stage == 2 and args.generate:
        result["generation"] = generate(engine.module, processor, device)
    del engine, optimizer, model, batch, out
    gc.collect()
    torch.cuda.empty_cache()
    return result


def generate(model, processor, device: torch.device, new_tokens: int = 64, batch: int = 8) -> dict:
    """Greedy decoding from the exported (plain-PyTorch MoE) stage-2 model in bf16."""
    from sepit.models.moe import export_for_inference

    export_for_inference(model)
    model.eval()
    proteins = synthetic_proteins(batch, 300, seed=1)
    questions = ["What is the function of <protein>?"] * batch
    model.generate(**processor.generation_inputs(questions[:1], proteins[:1]), max_new_tokens=4)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ids = model.generate(**processor.generation_inputs(questions, proteins), max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    n = sum(len(r) for r in ids)
    print(f"generation: {batch} prompts x up to {new_tokens} new tokens: {n / took:,.0f} tokens/s ({took:.2f} s)")
    return {"batch": batch, "new_tokens": n, "seconds": took, "tokens_per_s": n / took}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=["tiny", "small", "paper"])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage (after one warm-up)")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak of an unlisted GPU")
    parser.add_argument("--no-generate", dest="generate", action="store_false")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: skipped: no CUDA device")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    init_single_process_group("nccl")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(0)
    print(f"gpu_smoke: {name}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
          f"torch {torch.__version__}, preset {args.preset}")
    results = {"device": name, "preset": args.preset, "stages": [run_stage(st, args, device) for st in args.stages]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_smoke.json").write_text(json.dumps(results, indent=1))
    print(f"gpu_smoke: wrote {out / 'gpu_smoke.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
