"""What registering a stage costs: ``log_model`` (pyfunc save + upload + register + alias) against
the plain ``log_artifacts`` of the same export folder it replaced, and a run with system metrics
against one without.

Each round, in a fresh sqlite store (the default for a stage) and, with ``--server URI``, against
a running ``mlflow server``: one run logs the folder with ``mlflow.log_artifacts`` (the baseline),
another with :func:`sepit.tracking.models.log_model`; rounds interleave the two so a busy machine
hits them alike.  Reports medians, their ratio and the extra seconds per stage, and
``localize_model("models:/NAME@latest")`` (download) and its cached second call.

    python evals/bench_mlflow_models.py --out evals/results/bench_mlflow_models_cpu.json
    python evals/bench_mlflow_models.py --model runs/small/stage2/model --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _tiny_model(root: Path) -> Path:
    import torch

    from sepit.models.sepit_lm import SepitConfig
    from sepit.train.stage1 import initial_model

    torch.manual_seed(0)
    model, processor = initial_model(SepitConfig.preset("tiny"))
    return processor.save_pretrained(model.save_pretrained(root / "model"))


def _round(model_dir: Path, uri: str, name: str) -> dict[str, float]:
    import mlflow

    from sepit.tracking import start_run
    from sepit.tracking.models import localize_model, log_model

    out: dict[str, float] = {}
    for label, system in (("run_plain", False), ("run_system_metrics", True)):
        t0 = time.perf_counter()
        with start_run("bench-run", tracking_uri=uri, system_metrics=system):
            pass
        out[label] = time.perf_counter() - t0
    with start_run("bench-artifacts", tracking_uri=uri, system_metrics=False):
        t0 = time.perf_counter()
        mlflow.log_artifacts(str(model_dir), "model")
        out["log_artifacts"] = time.perf_counter() - t0
    with start_run("bench-model", tracking_uri=uri, system_metrics=False):
        out["log_model"] = log_model(model_dir, registered_name=name).seconds
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SEPIT_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        localize_model(f"models:/{name}@latest", tracking_uri=uri)
        out["localize_download"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        localize_model(f"models:/{name}@latest", tracking_uri=uri)
        out["localize_cached"] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="export folder to log (default: a tiny SEPIT model made here)")
    parser.add_argument("--server", help="also measure against this mlflow server URI")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = Path(args.model) if args.model else _tiny_model(root)
        size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
        stores = {"sqlite": f"sqlite:///{root / 'mlflow.db'}"}
        if args.server:
            stores["server"] = args.server
        result: dict = {"model_dir": str(model_dir), "model_bytes": size, "rounds": args.rounds, "stores": {}}
        for store, uri in stores.items():
            name = f"bench-{os.getpid()}-{store}"
            rows = [_round(model_dir, uri, name) for _ in range(args.rounds)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            result["stores"][store] = {
                "median_s": {k: round(v, 4) for k, v in med.items()},
                "log_model_over_log_artifacts": round(med["log_model"] / med["log_artifacts"], 2),
                "log_model_extra_s": round(med["log_model"] - med["log_artifacts"], 3),
                "system_metrics_extra_s": round(med["run_system_metrics"] - med["run_plain"], 3),
            }
    result["loadavg_before"] = [round(x, 2) for x in load_before]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
