"""``sepit plan``: per-GPU memory of a training stage, and the divisibility rules, before launch.

    sepit plan --preset paper --stage 2 --gpus 8
    sepit plan --preset paper --stage 2 --gpus 8 --ep-size 2 --zero 1 --micro-batch 2 --gpu-mem-gib 80

Everything is counted from the preset's real config classes (no model is built):

* **parameters** in closed form: fair-esm ESM-2 (+ the structure bias), the Llama LLM, the
  projector, the stage-0 heads, DeepSpeed MoE experts and routers.  ``tests/test_plan.py`` checks
  every count against the models built on the meta device.
* **model states** per ZeRO stage, as DeepSpeed 0.19 lays them out in bf16: bf16 weights (frozen
  parts too: the engine casts the whole module), bf16 gradients, fp32 master weights + Adam m, v
  (12 bytes per trainable parameter).  ZeRO-1 partitions the 12, ZeRO-2 also the gradients,
  ZeRO-3 also the weights.  Expert parameters are held ``num_experts / ep_size`` per rank and
  partitioned over the expert-data-parallel group (``gpus / ep_size``).
* **activations** (tensors saved for backward) per token of the longest batch, listed per op
  (see :mod:`sepit.plan.activations`), with and without activation checkpointing of the LLM blocks.
* **transient**: the loss-time logits buffers and DeepSpeed's gradient buckets, on top.

The estimate is for ``torch.cuda.max_memory_allocated`` (CUDA context and allocator slack are
not in it); ``evals/gpu_smoke.py`` prints it next to a measured peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from sepit.errors import SepitError
from sepit.plan.activations import ActivationShapes, activation_bytes
from sepit.plan.params import ParamCounts, count_stage_parameters

GIB = 1024**3
#: DeepSpeed bucket sizes set by sepit.train.deepspeed_config (elements).
REDUCE_BUCKET = int(5e7)
ALLGATHER_BUCKET = int(5e7)
#: Prompt tokens around the protein span: the system prompt + question template of
#: ``sepit.data.prompts`` is 92 tokens with the pipeline's own BPE (fewer with Llama's tokenizer).
PROMPT_TOKENS = 96


class PlanError(SepitError, ValueError):
    """A configuration that cannot launch as asked; the message names the rule."""


@dataclass
class PlanRequest:
    preset: str = "paper"
    """tiny | small | paper: model sizes and training defaults of that recipe (sepit.config.recipes)."""
    stage: int = 2
    """Training stage 0, 1 or 2."""
    gpus: int = 8
    """World size: data-parallel ranks, one GPU each (Ray Train workers)."""
    zero_stage: int | None = None
    """DeepSpeed ZeRO stage (None = the preset's)."""
    micro_batch_size: int | None = None
    """Examples per GPU per forward/backward (None = the preset's)."""
    ep_size: int = 1
    """Stage 2: expert-parallel group size (must divide gpus and num_experts)."""
    num_experts: int | None = None
    """Stage 2: experts per upcycled layer (None = MoEConfig's default)."""
    residues: int | None = None
    """Longest protein in a batch (None = the preset's train.max_residues)."""
    answer_tokens: int | None = None
    """Longest answer in LLM tokens (None = the stage preset's max_answer_tokens)."""
    vocab_size: int | None = None
    """LLM vocabulary incl. SEPIT's 4 added tokens (None = preset vocab + 4)."""
    precision: str = "bf16"
    """bf16 (GPU) or fp32 (CPU)."""
    gpu_mem_gib: float = 80.0
    """Memory of one GPU, GiB (A100/H100 80 GB; H200 141 GB)."""
    device: str = "cuda"
    """cuda, or cpu (counts the copies CPU kernels make of linear inputs; for tests)."""


@dataclass
class StagePlan:
    request: PlanRequest
    params: ParamCounts
    shapes: ActivationShapes
    states_by_zero: dict[int, dict[str, int]]
    """ZeRO stage -> {weights, gradients, optimizer} bytes per GPU."""
    activations: dict[str, int]
    """Saved-for-backward bytes per GPU by part, without checkpointing."""
    activations_ckpt: dict[str, int]
    """The same with the LLM blocks checkpointed (one block's activations live at a time)."""
    transient: dict[str, int]
    """Short-lived buffers on top: logits at the loss, DeepSpeed buckets, fp32 grad partition."""
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def zero(self) -> int:
        return int(self.request.zero_stage)

    def peak_bytes(self, checkpointing: bool = False, zero: int | None = None) -> int:
        states = self.states_by_zero[self.zero if zero is None else zero]
        acts = self.activations_ckpt if checkpointing else self.activations
        return sum(states.values()) + sum(acts.values()) + max(self.transient.values(), default=0)

    def fits(self, checkpointing: bool = False) -> bool:
        return self.peak_bytes(checkpointing) <= self.request.gpu_mem_gib * GIB

    def as_dict(self) -> dict[str, Any]:
        return {"request": asdict(self.request), "params": asdict(self.params), "shapes": asdict(self.shapes),
                "states_by_zero": self.states_by_zero, "activations": self.activations,
                "activations_ckpt": self.activations_ckpt, "transient": self.transient,
                "peak_bytes": self.peak_bytes(False), "peak_bytes_ckpt": self.peak_bytes(True),
                "fits": self.fits(False), "fits_ckpt": self.fits(True), "notes": self.notes, "errors": self.errors}


def model_state_bytes(p: ParamCounts, zero: int, gpus: int, ep_size: int, precision: str) -> dict[str, int]:
    """Weights / gradients / optimizer bytes on one GPU at ``zero`` (see the module docstring)."""
    lp = 2 if precision == "bf16" else 4            # bytes of a weight and of a gradient
    opt = 12 if precision == "bf16" else 8          # fp32 master + m + v, or m + v
    dense, frozen = p.trainable_dense, p.frozen
    experts_here = p.expert_total // ep_size        # parameters of the experts this rank holds
    edp = gpus // ep_size                           # ranks sharing one expert's ZeRO partition
    weights = lp * (dense + frozen) / (gpus if zero == 3 else 1) + lp * experts_here
    grads = lp * dense / (gpus if zero >= 2 else 1) + lp * experts_here / (edp if zero >= 2 else 1)
    optim = opt * dense / (gpus if zero >= 1 else 1) + opt * experts_here / (edp if zero >= 1 else 1)
    return {"weights": int(weights), "gradients": int(grads), "optimizer": int(optim)}


def resolve_request(req: PlanRequest) -> tuple[PlanRequest, dict[str, Any]]:
    """Fill the preset's defaults; returns the request and the stage config values used."""
    from sepit.config.base import ConfigError, to_dict
    from sepit.config.recipes import PRESETS
    from sepit.pipeline import recipe
    from sepit.models.moe import MoEConfig

    if req.preset not in PRESETS:
        raise PlanError(f"--preset {req.preset!r}: choose one of {list(PRESETS)}")
    if req.stage not in (0, 1, 2):
        raise PlanError(f"--stage {req.stage}: choose 0, 1 or 2")
    if req.gpus < 1:
        raise PlanError(f"--gpus {req.gpus}: need at least one GPU")
    if req.precision not in ("bf16", "fp32"):
        raise PlanError(f"--precision {req.precision!r}: choose bf16 or fp32")
    steps = recipe(req.preset)
    train = to_dict(getattr(steps, f"stage{req.stage}").train)
    answer = getattr(steps, f"stage{max(req.stage, 1)}").max_answer_tokens
    moe = MoEConfig()
    out = PlanRequest(**asdict(req))
    out.zero_stage = train["zero_stage"] if req.zero_stage is None else req.zero_stage
    out.micro_batch_size = train["micro_batch_size"] if req.micro_batch_size is None else req.micro_batch_size
    out.num_experts = moe.num_experts if req.num_experts is None else req.num_experts
    out.residues = train["max_residues"] if req.residues is None else req.residues
    out.answer_tokens = answer if req.answer_tokens is None else req.answer_tokens
    if out.zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"--zero {out.zero_stage}: choose 0, 1, 2 or 3")
    if out.micro_batch_size < 1:
        raise PlanError(f"--micro-batch {out.micro_batch_size}: must be >= 1")
    if not 1 <= out.residues <= 1022:
        raise PlanError(f"--residues {out.residues}: ESM-2 takes 1 to 1022 residues")
    if req.stage == 2:
        try:
            MoEConfig(num_experts=out.num_experts, ep_size=req.ep_size)
        except ConfigError as exc:
            raise PlanError(f"--num-experts/--ep-size: {exc}") from None
    return out, train


def divisibility_errors(req: PlanRequest, params: ParamCounts) -> list[str]:
    """The launch-time rules stage configs and DeepSpeed enforce, checked up front."""
    errors = []
    if req.stage == 2:
        if req.gpus % req.ep_size:
            errors.append(f"ep_size={req.ep_size} must divide the world size gpus={req.gpus} "
                          f"(Stage2JobConfig: moe.ep_size must divide train.num_workers)")
        if req.num_experts % req.ep_size:
            errors.append(f"ep_size={req.ep_size} must divide num_experts={req.num_experts}")
        if req.zero_stage == 3:
            errors.append("ZeRO-3 is refused for stage 2: DeepSpeed MoE does not support it (use 0, 1 or 2)")
    elif req.zero_stage == 3 and params.has_structure_bias:
        errors.append(f"ZeRO-3 is refused for stage {req.stage}: the encoder's 3D structure bias hangs "
                      "ZeRO-3's parameter gathers (use 0, 1 or 2)")
    return errors


def make_plan(req: PlanRequest) -> StagePlan:
    """The plan for one stage; ``errors`` lists broken rules (the numbers are still computed)."""
    req, train = resolve_request(req)
    params, shapes = count_stage_parameters(req.preset, req.stage, num_experts=req.num_experts,
                                            vocab_size=req.vocab_size, residues=req.residues,
                                            answer_tokens=req.answer_tokens, prompt_tokens=PROMPT_TOKENS,
                                            micro_batch=req.micro_batch_size)
    errors = divisibility_errors(req, params)
    ep = req.ep_size if req.stage == 2 and req.gpus % req.ep_size == 0 else 1
    states = {z: model_state_bytes(params, z, req.gpus, ep, req.precision) for z in range(4)}
    e = 2 if req.precision == "bf16" else 4
    acts = activation_bytes(shapes, e, checkpointing=False, device=req.device)
    acts_ckpt = activation_bytes(shapes, e, checkpointing=True, device=req.device)
    tokens = shapes.micro_batch * shapes.llm_tokens
    transient = {}
    if req.stage > 0:
        # At the loss: the e-byte logits, their fp32 copy for the cross-entropy and its gradient.
        transient["logits_at_loss"] = tokens * shapes.vocab * (e + 4 + 4)
    if req.zero_stage >= 1:
        transient["deepspeed_buckets"] = e * (REDUCE_BUCKET + ALLGATHER_BUCKET)
    trainable_here = params.trainable_dense / (req.gpus if req.zero_stage >= 1 else 1)
    transient["fp32_grads_at_step"] = int(4 * trainable_here) if req.precision == "bf16" else 0
    notes = [f"global batch = {req.micro_batch_size} x grad_accum {train['grad_accum_steps']} x {req.gpus} GPUs"
             f" = {req.micro_batch_size * train['grad_accum_steps'] * req.gpus} examples per optimizer step"]
    if req.stage == 2:
        notes.append(f"experts per rank: {req.num_experts // ep} of {req.num_experts} in each of "
                     f"{params.moe_layers} MoE layers (ep_size={ep}); expert ZeRO group = {req.gpus // ep} ranks")
    if req.stage > 0:
        notes.append("activation checkpointing of the LLM blocks: SepitForConditionalGeneration."
                     "gradient_checkpointing_enable(); the stage jobs train without it today")
    return StagePlan(req, params, shapes, states, acts, acts_ckpt, transient, notes, errors)


# ---------------------------------------------------------------------------------- report
def _gib(n: float) -> str:
    return f"{n / GIB:7.2f}"


def format_plan(plan: StagePlan) -> str:
    r, p, s = plan.request, plan.params, plan.shapes
    lines = [f"sepit plan: preset={r.preset} stage={r.stage} gpus={r.gpus} zero={r.zero_stage} "
             f"micro_batch={r.micro_batch_size} precision={r.precision}"
             + (f" experts={r.num_experts} ep_size={r.ep_size}" if r.stage == 2 else ""),
             f"  parameters: {p.total / 1e6:,.1f} M total = {p.trainable_dense / 1e6:,.1f} M trainable dense"
             f" + {p.expert_total / 1e6:,.1f} M experts + {p.frozen / 1e6:,.1f} M frozen",
             f"  longest batch: {s.micro_batch} x ({s.encoder_tokens} encoder tokens"
             + (f", {s.llm_tokens} LLM tokens" if r.stage > 0 else "") + ")",
             "", "  model states per GPU (GiB)   weights  grads  optimizer  total"]
    zero3_refused = r.stage == 2 or p.has_structure_bias
    for z, st in plan.states_by_zero.items():
        mark = "<-" if z == r.zero_stage else "  "
        lines.append(f"   {mark} ZeRO-{z}                 {_gib(st['weights'])}{_gib(st['gradients'])}"
                     f"{_gib(st['optimizer'])}{_gib(sum(st.values()))}"
                     + ("   (refused for this stage)" if z == 3 and zero3_refused else ""))
    lines += ["", "  activations per GPU (GiB)    no ckpt   LLM ckpt"]
    for k in plan.activations:
        lines.append(f"     {k:<24}{_gib(plan.activations[k])}  {_gib(plan.activations_ckpt[k])}")
    lines.append(f"     {'total':<24}{_gib(sum(plan.activations.values()))}  {_gib(sum(plan.activations_ckpt.values()))}")
    lines += ["", "  transient on top (GiB, the largest counts): "
              + ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan.transient.items())]
    cap = r.gpu_mem_gib
    for ck in (False, True):
        peak = plan.peak_bytes(ck) / GIB
        verdict = "fits" if peak <= cap else "does NOT fit"
        lines.append(f"  peak per GPU {'with' if ck else 'without'} LLM checkpointing: {peak:.1f} GiB "
                     f"-> {verdict} in {cap:g} GiB")
    lines += [f"  note: {n}" for n in plan.notes]
    lines += [f"  ERROR: {e}" for e in plan.errors]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="paper", help="tiny | small | paper (default: paper)")
    parser.add_argument("--stage", type=int, default=2, help="training stage 0, 1 or 2 (default: 2)")
    parser.add_argument("--gpus", type=int, default=8, help="world size, one GPU per rank (default: 8)")
    parser.add_argument("--zero", type=int, dest="zero_stage", help="DeepSpeed ZeRO stage (default: the preset's)")
    parser.add_argument("--micro-batch", type=int, dest="micro_batch_size", help="examples per GPU per step")
    parser.add_argument("--ep-size", type=int, default=1, help="stage 2 expert-parallel size (default: 1)")
    parser.add_argument("--num-experts", type=int, help="stage 2 experts per layer (default: 4)")
    parser.add_argument("--residues", type=int, help="longest protein (default: train.max_residues)")
    parser.add_argument("--answer-tokens", type=int, help="longest answer in LLM tokens (default: the preset's)")
    parser.add_argument("--vocab-size", type=int, help="LLM vocabulary incl. the 4 SEPIT tokens")
    parser.add_argument("--precision", default="bf16", help="bf16 (GPU, default) or fp32")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default: 80)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    req = PlanRequest(**{k: getattr(args, k) for k in PlanRequest.__dataclass_fields__ if hasattr(args, k)})
    try:
        plan = make_plan(req)
    except SepitError as exc:
        print(f"sepit plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan))
    if plan.errors:
        print("sepit plan: this configuration would be refused at launch (see ERROR lines)", file=sys.stderr)
        return 1
    return 0

