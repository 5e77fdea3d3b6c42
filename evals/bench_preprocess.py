"""Benchmark (not a test): structures per second of the bare parser loop vs the Ray Data
preprocess job with 1 and 2 workers, on the bundled real structures, in one run.

    .venv/bin/python evals/bench_preprocess.py [--repeats 3] [--scale 1] [--json out.json]

- bare loop: ``parse_file`` on every input file in one process (no Ray, no Parquet writing).
- Ray Data job: ``run_preprocess`` end to end (plan, parallel parse, shard writing, manifest),
  on an already started local Ray; a first untimed run starts and warms the worker processes.
- ``--scale K`` copies the input set K times (renamed files) to see how the job scales once
  parsing, not fixed per-run overhead, dominates.

Each mode runs ``--repeats`` times; the table shows the median wall time and the ratio of
throughputs to the bare loop.  Numbers depend on the machine and its load: report them with
``nproc`` and the load average (printed in the header).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.ray_runtime import init_ray, set_local_defaults  # noqa: E402

set_local_defaults()

from sepit.data.preprocess import PreprocessConfig, run_preprocess  # noqa: E402
from sepit.structure.inputs import default_inputs, discover_inputs  # noqa: E402
from sepit.structure.parse import parse_file  # noqa: E402


def scaled_inputs(scale: int, workdir: Path) -> list[str]:
    """The bundled structure folders, or ``scale`` renamed copies of their files in ``workdir``."""
    if scale == 1:
        return default_inputs()
    files = discover_inputs(default_inputs()).files
    for k in range(scale):
        for f in files:
            dest = workdir / f"copy{k}" / f.source.replace("/", "__")
            dest.parent.mkdir(parents=True, exist_ok=True)
            name = dest.name.split(".", 1)
            dest = dest.with_name(f"{name[0]}_c{k}.{name[1]}")  # distinct record ids per copy
            shutil.copy(f.path, dest)
    return [str(workdir / f"copy{k}") for k in range(scale)]


def bare_loop(inputs: list[str]) -> tuple[float, int, int]:
    files = discover_inputs(inputs).files
    t0 = time.perf_counter()
    n_records = sum(len(parse_file(f.path, source=f.source).records) for f in files)
    return time.perf_counter() - t0, len(files), n_records


def ray_job(inputs: list[str], out: Path, workers: int) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    manifest = run_preprocess(PreprocessConfig(inputs=inputs, out=str(out), num_workers=workers))
    return time.perf_counter() - t0, manifest["n_input_files"], manifest["n_records"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="copies of the bundled set")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        inputs = scaled_inputs(args.scale, work / "inputs")
        t_init = time.perf_counter()
        init_ray()
        t_init = time.perf_counter() - t_init
        ray_job(inputs, work / "warmup", 2)  # untimed: starts and warms Ray's worker processes
        rows = []
        modes = [("bare loop", None), ("Ray Data job", 1), ("Ray Data job", 2)]
        for mode, workers in modes:
            times = []
            for r in range(args.repeats):
                if workers is None:
                    dt, n_files, n_records = bare_loop(inputs)
                else:
                    dt, n_files, n_records = ray_job(inputs, work / f"out_{workers}_{r}", workers)
                times.append(dt)
            rows.append({"mode": mode, "workers": workers, "files": n_files, "records": n_records,
                         "median_s": statistics.median(times), "times_s": times})
        bare_rate = rows[0]["files"] / rows[0]["median_s"]
        print(f"# bundled structures x{args.scale}: {rows[0]['files']} files, {rows[0]['records']} records; "
              f"nproc={os.cpu_count()} load={os.getloadavg()[0]:.1f}; ray init {t_init:.1f} s (not counted); "
              f"median of {args.repeats}")
        print(f"{'mode':<14} {'workers':>7} {'wall s':>8} {'structures/s':>13} {'vs bare':>8}")
        for row in rows:
            rate = row["files"] / row["median_s"]
            row["structures_per_s"], row["ratio_vs_bare"] = rate, rate / bare_rate
            print(f"{row['mode']:<14} {row['workers'] or '-':>7} {row['median_s']:>8.2f} {rate:>13.1f} {rate / bare_rate:>8.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"scale": args.scale, "nproc": os.cpu_count(), "rows": rows}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
