"""Training throughput of stages 0-2 on Ray Train + DeepSpeed (CPU), with 1 and 2 workers.

    python evals/bench_training.py --out /tmp/bench_training [--data DATASET] [--preset tiny] [--steps 40]

For each worker count it runs stage 0 -> 1 -> 2 for ``--steps`` optimizer steps on the bundled
real data (the dataset is built first when ``--data`` is not given) and reports, from the
rank-0 step log (the first ``--warmup`` steps dropped; medians):

* tokens/s (non-padding protein residues + text tokens, summed over workers),
* the share of step time spent waiting for data (Ray Data read + bucketing + collate),
* stage 2 (4 experts, top-1) time per token relative to stage 1 dense, plus an in-process
  forward+backward comparison of the same stage-1 model dense vs upcycled on identical batches,
* model FLOPs utilisation: FLOPs per token counted by ``torch.utils.flop_counter`` on a real
  batch x tokens/s, over the FLOP/s of a plain fp32 matmul measured in this run with the
  workers' thread count, times the number of workers.

Writes ``OUT/bench_training.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()

import torch  # noqa: E402

from sepit.pipeline import command_config  # noqa: E402


def build_dataset(out: Path) -> Path:
    from sepit.data.build import BuildConfig, build_dataset as build
    from sepit.data.build_inputs import default_annotation_files
    from sepit.data.preprocess import PreprocessConfig, run_preprocess

    run_preprocess(PreprocessConfig(out=str(out / "store")))
    files = [f for f in default_annotation_files() if "deeploc" not in f and "qa.jsonl" not in f]
    build(BuildConfig(proteins=str(out / "store"), out=str(out / "dataset"), annotations=files, executor="local"))
    return out / "dataset"


def matmul_flops(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of an fp32 n x n matmul on ``threads`` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(old)
    return 2 * n**3 / best


def flops_per_token(task, rows: list[dict], micro_batch: int = 8) -> float:
    """Forward + backward FLOPs over real batches / their non-padding tokens (matmuls, attention;
    elementwise work such as the structure bias's basis functions is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = task.build_model().train()
    flops = tokens = 0
    for i in range(0, len(rows), micro_batch):
        batch = task.collate(rows[i:i + micro_batch], train=True)
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = task.forward_loss(model, batch)
            loss.backward()
        model.zero_grad(set_to_none=True)
        flops += counter.get_total_flops()
        tokens += batch["num_tokens"]
    return flops / tokens


def step_stats(out_dir: Path, warmup: int) -> dict[str, float]:
    from sepit.train.step_log import read_step_log

    steps = [r for s, r in read_step_log(out_dir / "train_log.jsonl").items() if s > warmup]
    med = lambda k: statistics.median(r[k] for r in steps)  # noqa: E731
    return {"tokens_per_s": med("tokens_per_s"), "data_wait_share": med("data_wait_share"),
            "step_time_s": med("step_time_s"), "tokens_per_step": statistics.median(r["tokens_per_s"] * r["step_time_s"] for r in steps)}


def moe_vs_dense(stage1_model: Path, data: Path, batches: int = 6, micro_batch: int = 8) -> dict[str, float]:
    """Forward+backward seconds per batch: the stage-1 model dense vs upcycled to 4 experts top-1,
    same weights, same stage-2 batches, one process (DeepSpeed MoE with ep_size 1, no process group)."""
    import pyarrow.parquet as pq

    from sepit.models.moe import upcycle_to_moe
    from sepit.models.sepit_lm import SepitForConditionalGeneration
    from sepit.train.lm_task import InstructionTask

    rows = pq.read_table(data / "stage2" / "train.parquet").slice(0, batches * micro_batch).to_pylist()
    task = InstructionTask(tokenizer_path=str(stage1_model / "tokenizer"), alphabet="ESM-1b", max_residues=128,
                           max_answer_tokens=96)
    collated = [task.collate(rows[i:i + micro_batch], train=True) for i in range(0, len(rows), micro_batch)]

    def timed(model) -> float:
        model.train()
        times = []
        for b in collated:
            t0 = time.perf_counter()
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], protein=b["protein"],
                        labels=b["labels"])
            out.loss.backward()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        return statistics.median(times[1:])

    torch.manual_seed(0)
    dense = SepitForConditionalGeneration.from_pretrained(stage1_model)
    t_dense = timed(dense)
    moe = upcycle_to_moe(SepitForConditionalGeneration.from_pretrained(stage1_model), num_experts=4, top_k=1)
    t_moe = timed(moe)
    return {"dense_s_per_batch": t_dense, "moe_s_per_batch": t_moe, "moe_over_dense": t_moe / t_dense}


def run_chain(data: Path, out: Path, preset: str, steps: int, workers: int) -> dict[str, Path]:
    from sepit.train.stage0 import run_stage0
    from sepit.train.stage1 import run_stage1
    from sepit.train.stage2 import run_stage2

    common = [f"data.dataset_dir={data}", f"train.max_steps={steps}", f"train.num_workers={workers}",
              "train.cpus_per_worker=1", f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    dirs = {n: out / f"w{workers}" / f"stage{n}" for n in range(3)}
    run_stage0(command_config("stage0", preset, overrides=[*common, f"train.output_dir={dirs[0]}"]))
    run_stage1(command_config("stage1", preset, overrides=[*common, f"train.output_dir={dirs[1]}", f"init={dirs[0]}"]))
    run_stage2(command_config("stage2", preset, overrides=[*common, f"train.output_dir={dirs[2]}", f"init={dirs[1]}"]))
    return dirs


def sample_rows(data: Path, stage: int, n: int, seed: int = 0) -> list[dict]:
    """``n`` training rows drawn at random (fixed seed), as the training batches mix them."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(data / f"stage{stage}" / "train.parquet")
    pick = np.random.default_rng(seed).choice(table.num_rows, size=min(n, table.num_rows), replace=False)
    return table.take(pick).to_pylist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="built dataset folder (default: build one from the bundled data)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --out")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from sepit.ray_runtime import init_ray

    init_ray(num_cpus=max(4, 2 * max(args.workers)))  # logical CPUs: workers + Ray Data tasks
    data = Path(args.data) if args.data else build_dataset(out / "data")
    # Ray sets OMP_NUM_THREADS to a worker's CPU share (1 here); the matmul reference uses the same.
    threads = 1
    peak_1 = matmul_flops(threads)
    results: dict = {"preset": args.preset, "steps": args.steps, "warmup": args.warmup,
                     "matmul_flops_per_s_1_thread": peak_1, "cpu_count": os.cpu_count(), "runs": {}}

    chains = {}
    for w in args.workers:
        done = out / f"w{w}" / "stage2" / "model"
        if args.reuse and done.is_dir():  # re-measure FLOPs / MoE timing on finished runs
            chains[w] = {n: out / f"w{w}" / f"stage{n}" for n in range(3)}
        else:
            chains[w] = run_chain(data, out, args.preset, args.steps, w)
    from sepit.train.stage0 import Stage0Task
    from sepit.train.stage1 import Stage1Task

    cfg0 = command_config("stage0", args.preset)
    cfg1 = command_config("stage1", args.preset)
    first = chains[args.workers[0]]
    from sepit.train.stage2 import Stage2Task

    cfg2 = command_config("stage2", args.preset, overrides=[f"init={first[1]}"])
    fpt = {
        0: flops_per_token(Stage0Task(cfg0), sample_rows(data, 0, 32)),
        1: flops_per_token(Stage1Task(cfg1, str(first[1] / "tokenizer")), sample_rows(data, 1, 32)),
        2: flops_per_token(Stage2Task(cfg2, str(first[1] / "model"), "ESM-1b"), sample_rows(data, 2, 32)),
    }
    results["flops_per_token"] = fpt
    for w, dirs in chains.items():
        for n, d in dirs.items():
            s = step_stats(d, args.warmup)
            s["mfu"] = fpt[n] * s["tokens_per_s"] / (peak_1 * w)
            results["runs"][f"stage{n}_w{w}"] = s
    for w in args.workers:
        r1, r2 = results["runs"][f"stage1_w{w}"], results["runs"][f"stage2_w{w}"]
        results[f"stage2_over_stage1_time_per_token_w{w}"] = r1["tokens_per_s"] / r2["tokens_per_s"]
    results["moe_vs_dense_same_batches"] = moe_vs_dense(first[1] / "model", data)
    (out / "bench_training.json").write_text(json.dumps(results, indent=1))

    print(f"matmul reference: {peak_1 / 1e9:.2f} GFLOP/s per thread; preset {args.preset}, {args.steps} steps")
    print(f"{'run':<12} {'tok/s':>9} {'step s':>8} {'data wait':>10} {'MFU':>7}")
    for name, s in results["runs"].items():
        print(f"{name:<12} {s['tokens_per_s']:>9.0f} {s['step_time_s']:>8.3f} {s['data_wait_share']:>10.1%} {s['mfu']:>7.1%}")
    for w in args.workers:
        print(f"stage 2 / stage 1 time per token, {w} worker(s): {results[f'stage2_over_stage1_time_per_token_w{w}']:.2f}")
    m = results["moe_vs_dense_same_batches"]
    print(f"same batches, fwd+bwd: dense {m['dense_s_per_batch']:.3f} s, MoE 4x top-1 {m['moe_s_per_batch']:.3f} s "
          f"(x{m['moe_over_dense']:.2f})")
    print(f"wrote {out / 'bench_training.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
