"""Learning-curve probe for a training recipe: how fast does the SEPIT LM learn closed-set answers?

    python evals/recipe_probe.py --data runs/pipeline-small/dataset --steps 700 --batch 8 \
        --max-residues 64 --lr 1.5e-3 --loss-per example --eval-every 100 --out probe.json

Trains the `small` SepitForConditionalGeneration (dense LLM, frozen encoder as in stage 2) on
the stage-2 training split in process (no Ray, no DeepSpeed: minutes instead of a pipeline run),
and every ``--eval-every`` steps scores a fixed seeded sample of closed-set test rows by option
likelihood (``sepit.evaluation.likelihood``) next to the majority-class baseline on the same rows.
Every probe is an MLflow run (experiment ``sepit-recipe-probes``: params, the curve as step
metrics, the JSON as an artifact), so recipes can be compared side by side.  It answers "does
this recipe learn, and how many examples does it need" before paying for a full pipeline run;
the pipeline's own stage 2 (MoE, DeepSpeed, Ray Train) is what the README reports.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path


def _closed_rows(test: list[dict], n: int, seed: int) -> list[dict]:
    rows = [r for r in test if r["task"] in ("yes_no", "multiple_choice")]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def likelihood_accuracy(model, processor, rows: list[dict]) -> dict[str, float]:
    """Per closed-set task, the share of rows whose most likely option is the gold one (scored
    exactly as `sepit evaluate` scores them: options, then the gold answer read afterwards)."""
    from sepit.evaluation.answer_parsing import gold_letter, normalize_yes_no
    from sepit.evaluation.likelihood import closed_set_options, score_options
    from sepit.evaluation.predictions import PredictionRecord
    from sepit.evaluation.task_metrics import likelihood_outcome

    out = {}
    for task in ("yes_no", "multiple_choice"):
        rs = [r for r in rows if r["task"] == task]
        if not rs:
            continue
        opts = [closed_set_options(task, r.get("choices")) for r in rs]
        scores = score_options(model, processor, [r["question"] for r in rs],
                               [(r["sequence"], r["coords"], r["coord_mask"]) for r in rs], opts, max_rows=48, truncate=True)
        correct = 0.0
        for r, sc in zip(rs, scores):
            rec = PredictionRecord(r["id"], task, r.get("category") or "other", r["question"], r["answer"], "",
                                   choices=r.get("choices"), answer_letter=r.get("answer_letter"), options=sc.options,
                                   option_logprob=sc.logprob, option_tokens=sc.n_tokens)
            gold = normalize_yes_no(r["answer"]) if task == "yes_no" else gold_letter(r["answer"], r["choices"],
                                                                                     r.get("answer_letter"))
            correct += likelihood_outcome(rec, gold)["ll_correct"]
        out[task] = correct / len(rs)
    return out


def majority_accuracy(train: list[dict], rows: list[dict]) -> dict[str, float]:
    from sepit.evaluation.baselines import majority_baseline
    from sepit.evaluation.task_metrics import closed_set_outcome

    recs = majority_baseline(train, rows)
    out = {}
    for task in ("yes_no", "multiple_choice"):
        rs = [r for r in recs if r.task == task]
        if rs:
            out[task] = 100.0 * sum(closed_set_outcome(r)[2] for r in rs) / len(rs)
    return out


def run_probe(args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq
    import torch

    from sepit.models.sepit_lm import SepitConfig
    from sepit.train.lm_task import example_mean_lm_loss
    from sepit.train.stage1 import initial_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    train = pq.read_table(data / "stage2" / "train.parquet").to_pylist()
    test = pq.read_table(data / "stage2" / "test.parquet").to_pylist()
    rows = _closed_rows(test, args.eval_rows, args.seed)
    baseline = majority_accuracy(train, rows)
    cfg = SepitConfig.preset(args.preset)
    cfg.crop_residues = args.max_residues
    model, processor = initial_model(cfg)
    model.freeze(encoder=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng = random.Random(args.seed + 1)
    curve, t0 = [], time.time()
    model.train()
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, args.batch)
        exs = [processor.encode_example(r["question"], r["answer"]) for r in batch]
        rows_ = processor.pad([e["input_ids"] for e in exs], labels=[e["labels"] for e in exs])
        protein = processor.protein_batch([(r["sequence"], r["coords"], r["coord_mask"]) for r in batch], True)
        out = model(rows_["input_ids"], rows_["attention_mask"], protein, labels=rows_["labels"])
        loss = example_mean_lm_loss(out.logits, out.labels) if args.loss_per == "example" else out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            acc = likelihood_accuracy(model, processor, rows)
            model.train()
            point = {"step": step, "examples": step * args.batch, "loss": float(loss.detach()),
                     "seconds_per_step": (time.time() - t0) / step, **{f"{k}_likelihood": v for k, v in acc.items()}}
            curve.append(point)
            print(json.dumps(point), flush=True)
    return {"args": vars(args), "majority": baseline, "eval_rows": len(rows), "curve": curve}


def log_to_mlflow(result: dict, tracking_uri: str, run_name: str | None = None) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("sepit-recipe-probes")
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: v for k, v in result["args"].items() if k not in ("out", "tracking_uri")})
        mlflow.log_metrics({f"majority_{k}": v for k, v in result["majority"].items()})
        for p in result["curve"]:
            mlflow.log_metrics({k: v for k, v in p.items() if k != "step"}, step=p["step"])
        mlflow.log_dict(result, "probe.json")
        return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="built dataset folder (sepit build-dataset)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-residues", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--loss-per", choices=("token", "example"), default="token")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-rows", type=int, default=160, help="closed-set test rows scored at each point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="JSON file for the curve")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite next to --out)")
    ap.add_argument("--import-json", action="store_true", help="log an existing --out JSON to MLflow and stop")
    args = ap.parse_args(argv)
    out = Path(args.out)
    uri = args.tracking_uri or f"sqlite:///{out.resolve().parent / 'mlflow.db'}"
    if args.import_json:
        result = json.loads(out.read_text())
    else:
        result = run_probe(args)
        out.write_text(json.dumps(result, indent=1))
    print(f"MLflow run {log_to_mlflow(result, uri, out.stem)} in {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
