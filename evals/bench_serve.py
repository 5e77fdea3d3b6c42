"""Load benchmark of the SEPIT HTTP endpoint: continuous batching vs batch size 1, loopback only.

One run deploys the same model twice on a local Ray Serve (127.0.0.1), as two applications:
with iteration-level batching (up to ``--max-batch-size`` rows decoding together) and with
``max_batch_size=1``.  At each concurrency (1, 4, 16, 64 closed-loop clients: each sends its
next request when its previous answer arrives) it drives ``POST /v1/answer`` of one
application, then of the other.  Requests are real questions and sequences from the bundled QA
sample (``sepit/resources/data/derived/qa.jsonl.gz``), greedy, a fixed token budget.  It reports
requests/s, p50/p99 latency, the server's admission-size histogram and mean rows per decode
step, and per concurrency the batching gain (requests/s batched / batch=1) and the batched p99
over the batched single-client p50.  The load average is recorded before and after: on a shared
machine only ratios measured in one run mean anything.

    python evals/bench_serve.py --preset tiny --out evals/results/bench_serve_cpu.json
    python evals/bench_serve.py --model runs/small/stage2/export --out bench.json

Bounded: ``--requests`` per measurement and a wall-clock ``--timeout``.
The clients run in this process, on the same machine as the server (they compete for its CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5, 15 minutes): the machine is shared."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_workload(max_residues: int, n: int) -> list[dict]:
    """Real (question, sequence) pairs from the bundled QA sample, proteins up to ``max_residues``."""
    from sepit.resources import data_path

    out = []
    with gzip.open(data_path("derived", "qa.jsonl.gz"), "rt") as fh:
        for line in fh:
            row = json.loads(line)
            seq = row.get("sequence") or ""
            if 0 < len(seq) <= max_residues and row.get("question"):
                out.append({"sequence": seq, "questions": [row["question"]]})
            if len(out) >= n:
                break
    if not out:
        raise SystemExit("no usable QA rows in the bundled sample")
    return out


def build_model(preset: str, out_dir: Path) -> str:
    from sepit.models.sepit_lm import SepitConfig
    from sepit.train.stage1 import initial_model

    model, processor = initial_model(SepitConfig.preset(preset))
    folder = model.save_pretrained(out_dir / f"{preset}-random")
    processor.save_pretrained(folder)
    return str(folder)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def drive(url: str, workload: list[dict], clients: int, per_client: int, max_new_tokens: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0

    async def client(idx: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        for j in range(per_client):
            body = dict(workload[(idx * per_client + j) % len(workload)], max_new_tokens=max_new_tokens)
            t0 = time.perf_counter()
            r = await http.post("/v1/answer", json=body)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {
        "clients": clients, "requests": len(latencies), "errors": errors, "wall_s": round(wall, 3),
        "rps": round(len(latencies) / wall, 2) if wall > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1) if latencies else None,
    }


def runner_stats(url: str) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=60) as http:
        return http.get("/v1/stats").json()["runner"]


def measure(name: str, url: str, workload, clients: int, per_client: int, max_new_tokens: int) -> dict:
    before = runner_stats(url)
    row = asyncio.run(drive(url, workload, clients, per_client, max_new_tokens))
    after = runner_stats(url)
    hist = {k: v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
    row["batch_sizes"] = {k: v for k, v in hist.items() if v}
    steps = after["decode_steps"] - before["decode_steps"]
    row["mean_rows_per_step"] = round((after["step_rows"] - before["step_rows"]) / steps, 2) if steps else 0.0
    print(f"  {name:9s} clients={clients:3d}  {row['rps']:8.2f} req/s  p50 {row['p50_ms']:8.1f} ms  "
          f"p99 {row['p99_ms']:8.1f} ms  errors {row['errors']}  rows/step {row['mean_rows_per_step']}  "
          f"admissions {row['batch_sizes']}", flush=True)
    return row


def drive_runner(runner, workload: list[dict], clients: int, per_client: int, max_new_tokens: int) -> dict:
    """Closed-loop clients calling the replica's decode loop directly (no HTTP, no Ray hop)."""
    import threading

    from sepit.serve.protocol import GenerationItem

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(idx: int) -> None:
        for j in range(per_client):
            row = workload[(idx * per_client + j) % len(workload)]
            item = GenerationItem(question=row["questions"][0], sequence=row["sequence"], max_new_tokens=max_new_tokens)
            t0 = time.perf_counter()
            refusal, request = runner._request(item, 300.0)
            result = refusal or runner.batcher.submit(request).result()
            with lock:
                if result.error:
                    errors[0] += 1
                else:
                    latencies.append(time.perf_counter() - t0)

    before = runner.stats()
    wall, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = runner.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    return {
        "clients": clients, "requests": len(latencies), "errors": errors[0], "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3), "rps": round(len(latencies) / wall, 2),
        "requests_per_cpu_s": round(len(latencies) / cpu, 2) if cpu > 0 else None,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1) if latencies else None,
        "mean_rows_per_step": round((after["step_rows"] - before["step_rows"]) / steps, 2) if steps else 0.0,
    }


def run_in_process(args, workload: list[dict]) -> int:
    """Both arms as replicas in this process (one torch thread): the decode loop's own gain."""
    import torch

    from sepit.serve.config import GenerationDefaults, LimitsConfig, ServeConfig
    from sepit.serve.model_runner import SepitModelRunner

    torch.set_num_threads(1)
    report = {"engine": "in-process", "max_new_tokens": args.max_new_tokens, "requests": args.requests,
              "uptime_before": uptime(), "cpu_count": os.cpu_count(), "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(args.preset, Path(tmp))
        report["model"] = model_dir
        common = dict(model_dir=model_dir, limits=LimitsConfig(max_new_tokens=max(args.max_new_tokens, 64)),
                      generation=GenerationDefaults(max_new_tokens=args.max_new_tokens))
        arms = [("batched", SepitModelRunner(ServeConfig(max_batch_size=args.max_batch_size,
                                                         batch_wait_timeout_s=args.batch_wait_timeout_s, **common))),
                ("batch=1", SepitModelRunner(ServeConfig(max_batch_size=1, batch_wait_timeout_s=0.0, **common)))]
        report["settings"] = [{"setting": name, "results": []} for name, _ in arms]
        for clients in args.concurrency:
            per_client = max(2, args.requests // clients)
            for entry, (name, runner) in zip(report["settings"], arms):
                row = drive_runner(runner, workload, clients, per_client, args.max_new_tokens)
                entry["results"].append(row)
                print(f"  {name:9s} clients={clients:3d}  {row['rps']:8.2f} req/s  {row['requests_per_cpu_s']} req/cpu-s  "
                      f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  rows/step {row['mean_rows_per_step']}",
                      flush=True)
        for _, runner in arms:
            runner.batcher.stop()
    return finish_report(report, args)


def finish_report(report: dict, args) -> int:
    report["uptime_after"] = uptime()
    batched, single = (s["results"] for s in report["settings"])
    report["batching_gain"] = {str(b["clients"]): round(b["rps"] / s["rps"], 2) if s["rps"] else None
                               for b, s in zip(batched, single)}
    if all(b.get("requests_per_cpu_s") for b in batched + single):
        report["batching_gain_cpu"] = {str(b["clients"]): round(b["requests_per_cpu_s"] / s["requests_per_cpu_s"], 2)
                                       for b, s in zip(batched, single)}
    solo = next((b for b in batched if b["clients"] == 1), None)
    if solo and solo["p50_ms"]:
        report["batched_p99_over_single_client_p50"] = {str(b["clients"]): round(b["p99_ms"] / solo["p50_ms"], 2)
                                                        for b in batched if b["p99_ms"]}
    print("\nclients | batched req/s  p50 ms  p99 ms | batch=1 req/s  p50 ms  p99 ms | gain")
    for b, s in zip(batched, single):
        print(f"{b['clients']:7d} | {b['rps']:13.2f} {b['p50_ms']:7.1f} {b['p99_ms']:7.1f} | "
              f"{s['rps']:12.2f} {s['p50_ms']:7.1f} {s['p99_ms']:7.1f} | {report['batching_gain'][str(b['clients'])]}")
    print("batched p99 / single-client p50:", report.get("batched_p99_over_single_client_p50"))
    if "batching_gain_cpu" in report:
        print("gain in requests per CPU-second:", report["batching_gain_cpu"])
    print("uptime before:", report["uptime_before"], "| after:", report["uptime_after"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="exported model folder")
    src.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="random-init model to build")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=64,
                   help="requests per measurement, split over the clients (at least 2 each)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-residues", type=int, default=300, help="workload proteins up to this length")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--timeout", type=float, default=1200, help="give up after this many seconds")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--in-process", action="store_true",
                   help="drive two model replicas' decode loops in this process (no Ray, no HTTP)")
    args = p.parse_args(argv)

    import signal

    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("benchmark --timeout reached")))
    signal.alarm(int(args.timeout))

    import httpx
    from ray import serve

    from sepit.ray_runtime import init_ray
    from sepit.serve.app import build_app
    from sepit.serve.config import GenerationDefaults, LimitsConfig, ServeConfig

    workload = load_workload(args.max_residues, 64)
    if args.in_process:
        return run_in_process(args, workload)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(args.preset, Path(tmp))
        init_ray(num_cpus=args.num_cpus)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = dict(model_dir=model_dir, port=port, num_cpus_per_replica=1,
                      max_ongoing_requests=max(64, max(args.concurrency) * 2), request_timeout_s=300,
                      limits=LimitsConfig(max_new_tokens=max(args.max_new_tokens, 64)),
                      generation=GenerationDefaults(max_new_tokens=args.max_new_tokens))
        print(f"model {model_dir}; {len(workload)} distinct workload requests; {args.max_new_tokens} new tokens; "
              f"{args.requests} requests per measurement", flush=True)
        settings = [
            ("batched", ServeConfig(app_name="batched", route_prefix="/batched", max_batch_size=args.max_batch_size,
                                    batch_wait_timeout_s=args.batch_wait_timeout_s, **common)),
            ("batch=1", ServeConfig(app_name="single", route_prefix="/single", max_batch_size=1,
                                    batch_wait_timeout_s=0.0, **common)),
        ]
        # Both applications stay up (an idle replica costs memory, not CPU) and are measured in
        # turn at each concurrency, so slow drifts of a shared machine hit both alike.
        serve.run_many([serve.RunTarget(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
                        for _, cfg in settings])
        urls = {name: f"http://127.0.0.1:{port}{cfg.route_prefix}" for name, cfg in settings}
        for url in urls.values():  # one request each so lazy setup is not timed
            with httpx.Client(base_url=url, timeout=120) as http:
                assert http.post("/v1/answer", json=dict(workload[0], max_new_tokens=2)).status_code == 200
        report = {"model": model_dir, "max_new_tokens": args.max_new_tokens, "requests": args.requests,
                  "uptime_before": uptime(), "cpu_count": os.cpu_count(),
                  "settings": [{"setting": name, "max_batch_size": cfg.max_batch_size,
                                "batch_wait_timeout_s": cfg.batch_wait_timeout_s, "results": []}
                               for name, cfg in settings]}
        for clients in args.concurrency:
            per_client = max(2, args.requests // clients)
            for entry, (name, _) in zip(report["settings"], settings):
                entry["results"].append(measure(name, urls[name], workload, clients, per_client, args.max_new_tokens))
        serve.shutdown()
    return finish_report(report, args)


if __name__ == "__main__":
    sys.exit(main())
