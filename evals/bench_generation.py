"""Generation throughput: in-process batch 1/8/32, and ``sepit evaluate`` with 1 and 2 replicas.

``--engine direct`` (default) measures the model alone: ``model.generate`` on the same real
questions and proteins at each batch size, in one process with ``--threads`` torch threads, the
batch sizes interleaved over ``--repeats`` rounds (so drifts of a shared machine hit them alike).
It reports wall and CPU-time tokens/s (median over rounds) and their ratios to batch 1, a phase
profile per row (tokenise, encoder + splice, LLM prefill, decode steps) at batch 1 and the largest
batch, and the load average before and after.  CPU time (this process only) is the steadier
figure when other jobs share the cores.

``--engine ray`` measures every (replicas, batch size) setting with the real generation path
(:func:`sepit.evaluation.generate.generate_predictions`: Ray Data ``map_batches`` over an actor
pool, journalled predictions), on the same real questions and proteins from the bundled QA
sample, greedy decoding with a fixed token budget.  Per setting it reports

* end-to-end tokens/s: all new tokens / wall time, replica start-up and model loading included;
* steady tokens/s: tokens after the first returned batch / time after it (start-up excluded;
  reported only when at least 4 batches follow the first);

and the ratios against 1 replica at batch size 1 and against 1 replica at the same batch size.

    python evals/bench_generation.py --preset tiny --out evals/results/bench_generation_cpu.json
    python evals/bench_generation.py --engine ray --preset tiny   # the evaluate path on Ray
    python evals/bench_generation.py --model runs/small/stage2/model --rows 96 --out bench.json

Each replica reserves ``--cpus-per-replica`` logical CPUs and uses as many torch threads, so 2
replicas use twice the cores of 1 (on a GPU node pass ``--gpus-per-replica 1``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()

MIN_STEADY_BATCHES = 4


def build_model(preset: str, out: Path) -> Path:
    """A random-init SEPIT model of ``preset`` sizes, saved as a model folder."""
    import torch

    from sepit.models.sepit_lm import SepitConfig
    from sepit.train.stage1 import initial_model

    torch.manual_seed(0)
    model, processor = initial_model(SepitConfig.preset(preset))
    folder = model.eval().save_pretrained(out / f"{preset}_model")
    processor.save_pretrained(folder)
    return folder


def workload(n: int, max_residues: int) -> list[dict]:
    """``n`` valid rows of the bundled QA sample with proteins up to ``max_residues``."""
    from sepit.evaluation.examples import load_eval_data
    from sepit.resources import data_path

    rows = [r for r in load_eval_data(data_path("derived", "qa.jsonl.gz")).rows if len(r["sequence"]) <= max_residues]
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} bundled rows have proteins <= {max_residues} residues")
    return rows[:n]


def run_setting(rows, model_dir: Path, replicas: int, batch: int, args, tmp: Path) -> dict:
    from sepit.evaluation.generate import GenerationConfig, GenerationTask, generate_predictions
    from sepit.evaluation.predictions import PredictionsStore

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch, num_replicas=replicas,
                           cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica)
    store = PredictionsStore(tmp / f"r{replicas}_b{batch}")  # fresh: nothing is resumed
    s = generate_predictions([GenerationTask("bench", rows, store)], str(model_dir), cfg)["bench"]
    steady_s = s.seconds - s.first_batch_seconds
    # Batches stream back as replicas finish them; with few batches the "after the first" window
    # is one straggler and the rate is meaningless, so it needs MIN_STEADY_BATCHES after the first.
    ok = s.n_batches - 1 >= MIN_STEADY_BATCHES and steady_s > 0
    steady = (s.new_tokens - s.first_batch_tokens) / steady_s if ok else float("nan")
    return {"replicas": replicas, "batch_size": batch, "rows": s.n_rows, "new_tokens": s.new_tokens,
            "batches": s.n_batches, "seconds": round(s.seconds, 2), "startup_and_first_batch_s": round(s.first_batch_seconds, 2),
            "tokens_per_s": round(s.tokens_per_second, 2), "steady_tokens_per_s": round(steady, 2)}


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5, 15 minutes): the machine is shared."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def phase_profile(model, processor, rows, batch: int, max_new_tokens: int) -> dict:
    """Per-row milliseconds (CPU time) of each generation phase for one batch of ``batch`` rows."""
    import torch

    from sepit.models.generation import DecodeBatch

    qs, ps = [r["question"] for r in rows[:batch]], [(r["sequence"], None, None) for r in rows[:batch]]
    clock = time.process_time
    with torch.no_grad():
        t0 = clock()
        ids = [processor.encode_prompt(q) for q in qs]
        t1 = clock()
        s = model.build_generation_inputs(**processor.generation_inputs(qs, ps, prompt_ids=ids))
        t2 = clock()
        b = DecodeBatch.prefill(model, model.llm, s.inputs_embeds, s.attention_mask, s.position_ids, max_new_tokens)
        t3 = clock()
        for _ in range(max_new_tokens - 1):  # every row runs the full budget: the steady per-step cost
            b.step(b.logits.argmax(-1))
        t4 = clock()
    per_row = lambda x: round(x * 1000 / batch, 2)  # noqa: E731
    return {"batch_size": batch, "prompt_tokens_padded": s.inputs_embeds.shape[1],
            "tokenise_ms_per_row": per_row(t1 - t0), "encoder_splice_ms_per_row": per_row(t2 - t1),
            "prefill_ms_per_row": per_row(t3 - t2), "decode_ms_per_row": per_row(t4 - t3),
            "decode_step_ms": round((t4 - t3) * 1000 / max(max_new_tokens - 1, 1), 3)}


def run_direct(args) -> int:
    import statistics

    import torch

    from sepit.models.sepit_lm import SepitForConditionalGeneration
    from sepit.processing import SepitProcessor

    torch.set_num_threads(args.threads)
    before = uptime()
    if args.model:
        model = SepitForConditionalGeneration.from_pretrained(args.model).eval()
        processor = SepitProcessor.from_pretrained(args.model)
    else:
        from sepit.models.sepit_lm import SepitConfig
        from sepit.train.stage1 import initial_model

        torch.manual_seed(0)
        model, processor = initial_model(SepitConfig.preset(args.preset))
        model.eval()
    rows = workload(args.rows, args.max_residues)
    qs, ps = [r["question"] for r in rows], [(r["sequence"], None, None) for r in rows]

    def measure(batch: int) -> tuple[float, float, int]:
        wall, cpu, tokens = time.perf_counter(), time.process_time(), 0
        for i in range(0, len(rows), batch):
            out = model.generate(**processor.generation_inputs(qs[i:i + batch], ps[i:i + batch]),
                                 max_new_tokens=args.max_new_tokens)
            tokens += sum(len(r) for r in out)
        return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu), tokens

    measure(max(args.batch_sizes))  # warm-up: first-call allocations are not timed
    rounds: dict[int, list[tuple[float, float, int]]] = {b: [] for b in args.batch_sizes}
    for rnd in range(args.repeats):
        for b in args.batch_sizes:
            rounds[b].append(measure(b))
            print(f"round {rnd} batch {b}: {rounds[b][-1][0]:.1f} tok/s wall, {rounds[b][-1][1]:.1f} tok/s cpu",
                  flush=True)
    results = []
    for b in args.batch_sizes:
        results.append({"batch_size": b, "tokens": rounds[b][0][2],
                        "wall_tokens_per_s": round(statistics.median(r[0] for r in rounds[b]), 1),
                        "cpu_tokens_per_s": round(statistics.median(r[1] for r in rounds[b]), 1),
                        "rounds": [[round(r[0], 1), round(r[1], 1)] for r in rounds[b]]})
    base = results[0]
    for r in results:
        r["wall_ratio_vs_first"] = round(r["wall_tokens_per_s"] / base["wall_tokens_per_s"], 2)
        r["cpu_ratio_vs_first"] = round(r["cpu_tokens_per_s"] / base["cpu_tokens_per_s"], 2)
    phases = [phase_profile(model, processor, rows, b, args.max_new_tokens) for b in (min(args.batch_sizes), max(args.batch_sizes))]
    print("\nbatch  tok/s(wall)  x(b1)  tok/s(cpu)  x(b1)")
    for r in results:
        print(f"{r['batch_size']:>5}  {r['wall_tokens_per_s']:>11}  {r['wall_ratio_vs_first']:>5}  "
              f"{r['cpu_tokens_per_s']:>10}  {r['cpu_ratio_vs_first']:>5}")
    print("phases (CPU ms per row):")
    for ph in phases:
        print(" ", json.dumps(ph))
    meta = {"engine": "direct", "model": str(args.model or f"random-init {args.preset} preset"), "rows": len(rows),
            "max_new_tokens": args.max_new_tokens, "torch_threads": args.threads, "repeats": args.repeats,
            "uptime_before": before, "uptime_after": uptime(), "cpu_count": os.cpu_count()}
    print(json.dumps(meta))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "phases": phases}, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: build --preset)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    p.add_argument("--rows", type=int, default=None,
                   help="questions per setting (default: 64 direct; 320 ray, >= 5 batches at the largest size)")
    p.add_argument("--max-residues", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: enough for the pool)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--engine", choices=["direct", "ray"], default="direct",
                   help="direct: model.generate in this process; ray: sepit evaluate's Ray Data actor pool")
    p.add_argument("--threads", type=int, default=1, help="torch threads (direct engine)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per batch size (direct engine)")
    args = p.parse_args()
    if args.rows is None:
        args.rows = 64 if args.engine == "direct" else 320
    if args.engine == "direct":
        return run_direct(args)

    import ray

    from sepit.ray_runtime import init_ray

    init_ray(num_cpus=args.ray_cpus or max(2, int(math.ceil(max(args.replicas) * args.cpus_per_replica)) + 1))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = Path(args.model) if args.model else build_model(args.preset, tmp)
        rows = workload(args.rows, args.max_residues)
        results = []
        for replicas in args.replicas:
            for batch in args.batch_sizes:
                t = time.perf_counter()
                r = run_setting(rows, model_dir, replicas, batch, args, tmp)
                results.append(r)
                print(json.dumps(r), f"({time.perf_counter() - t:.1f}s)", flush=True)
    base = {r["batch_size"]: r for r in results if r["replicas"] == min(args.replicas)}
    first = results[0]
    for r in results:
        for key in ("tokens_per_s", "steady_tokens_per_s"):
            same_batch = base[r["batch_size"]][key]
            r[f"{key}_vs_first"] = round(r[key] / first[key], 2) if first[key] and not math.isnan(first[key]) else None
            r[f"{key}_vs_1_replica"] = round(r[key] / same_batch, 2) if same_batch and not math.isnan(same_batch) else None
    print("\nreplicas batch  tok/s(e2e)  x(1,b1)  x(1 rep)  tok/s(steady)  x(1,b1)  x(1 rep)")
    for r in results:
        print(f"{r['replicas']:>8} {r['batch_size']:>5}  {r['tokens_per_s']:>10}  {r['tokens_per_s_vs_first']!s:>7}  "
              f"{r['tokens_per_s_vs_1_replica']!s:>8}  {r['steady_tokens_per_s']:>13}  {r['steady_tokens_per_s_vs_first']!s:>7}  "
              f"{r['steady_tokens_per_s_vs_1_replica']!s:>8}")
    meta = {"model": str(args.model or f"random-init {args.preset} preset"), "rows": args.rows,
            "max_new_tokens": args.max_new_tokens, "cpus_per_replica": args.cpus_per_replica,
            "gpus_per_replica": args.gpus_per_replica, "load_average_at_end": os.getloadavg(),
            "cpu_count": os.cpu_count()}
    print(json.dumps(meta))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
