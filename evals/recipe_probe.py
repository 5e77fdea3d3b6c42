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

Two more questions, for when a recipe does not learn:

    python evals/recipe_probe.py --data DATA --task location --steps 600 --eval-rows 400 --out loc.json
    python evals/recipe_probe.py --data DATA --task encoder --out enc.json

``--task location`` trains on the open location questions only and scores the first answer
token among the commonest locations (can the LM read the protein at all?); ``--task encoder``
fits a logistic regression on the frozen random encoder's ``<cls>`` vector (is the information
in what the LLM is given?).
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


def location_readout(model, processor, rows: list[dict], classes: list[str]) -> float:
    """Share of open location questions whose most likely first answer token is the gold
    location's, among ``classes`` (locations with distinct first tokens): can the LM read the
    protein at all, without the closed-set formats in the way?"""
    import torch

    from sepit.models.tokenizer import IGNORE_INDEX

    firsts = [_first_answer_token(processor, rows[0]["question"], c) for c in classes]
    hits = 0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            chunk = rows[i:i + 32]
            exs = [processor.encode_example(r["question"], r["answer"]) for r in chunk]
            pad = processor.pad([e["input_ids"] for e in exs], labels=[e["labels"] for e in exs])
            protein = processor.protein_batch([(r["sequence"], r["coords"], r["coord_mask"]) for r in chunk], True)
            out = model(pad["input_ids"], pad["attention_mask"], protein, labels=pad["labels"])
            for j, r in enumerate(chunk):
                pos = int((out.labels[j] != IGNORE_INDEX).nonzero()[0])
                hits += classes[int(out.logits[j, pos - 1, firsts].argmax())] == r["answer"]
    return 100.0 * hits / len(rows)


def _first_answer_token(processor, question: str, answer: str) -> int:
    from sepit.models.tokenizer import IGNORE_INDEX

    return next(x for x in processor.encode_example(question, answer)["labels"] if x != IGNORE_INDEX)


def encoder_linear_probe(args: argparse.Namespace) -> dict:
    """Is location information in what the LLM is given?  A logistic regression (scikit-learn) on
    the frozen, randomly initialised small encoder's ``<cls>`` vector (hidden_states[-2], the
    layer the projector reads; proteins cut to ``--max-residues``) and, for reference, on the
    amino-acid composition of the same residues: one protein per row, the ten commonest
    locations of the open location questions, trained on the train split, scored on the test split."""
    from collections import Counter

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from sepit.models.sepit_lm import SepitConfig
    from sepit.train.stage1 import initial_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def proteins(split):
        rows = [r for r in pq.read_table(Path(args.data) / "stage2" / f"{split}.parquet").to_pylist()
                if r["task"] == "open" and r["category"] == "location"]
        return list({r["protein_id"]: r for r in rows}.values())

    train, test = proteins("train"), proteins("test")
    classes = [a for a, _ in Counter(r["answer"] for r in train).most_common(10)]
    train = [r for r in train if r["answer"] in classes]
    test = [r for r in test if r["answer"] in classes]
    cfg = SepitConfig.preset(args.preset)
    cfg.crop_residues = args.max_residues
    model, processor = initial_model(cfg)
    model.eval()

    def cls_vectors(rows):
        out = []
        for i in range(0, len(rows), 64):
            batch = processor.protein_batch([(r["sequence"], None, None) for r in rows[i:i + 64]], True)
            with torch.no_grad():
                hidden = model.encoder(batch.tokens, None, None, return_hidden_states=True).hidden_states[-2]
            out.append(hidden[:, 0].numpy())
        return np.concatenate(out)

    alphabet = "ACDEFGHIKLMNPQRSTVWY"

    def composition(rows):
        return np.array([[r["sequence"][:args.max_residues].count(a) / len(r["sequence"][:args.max_residues])
                          for a in alphabet] for r in rows])

    y_train, y_test = [r["answer"] for r in train], [r["answer"] for r in test]
    result = {"classes": classes, "n_train": len(train), "n_test": len(test),
              "majority": 100.0 * sum(y == classes[0] for y in y_test) / len(y_test)}
    for name, features in (("cls", cls_vectors), ("composition", composition)):
        a, b = features(train), features(test)
        scaler = StandardScaler().fit(a)
        clf = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(a), y_train)
        result[name] = 100.0 * float(np.mean(clf.predict(scaler.transform(b)) == np.array(y_test)))
    print(json.dumps(result), flush=True)
    return {"args": vars(args), "majority": {"location": result["majority"]}, "eval_rows": len(test),
            "curve": [], "encoder_probe": result}


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
    if args.task == "location":
        from collections import Counter

        def loc(rs):
            return [r for r in rs if r["task"] == "open" and r["category"] == "location"]

        train = loc(train)
        common = [a for a, _ in Counter(r["answer"] for r in train).most_common(10)]
        rows = None
    else:
        rows = _closed_rows(test, args.eval_rows, args.seed)
        baseline = majority_accuracy(train, rows)
    cfg = SepitConfig.preset(args.preset)
    cfg.crop_residues = args.max_residues
    cfg.residue_dropout = args.residue_dropout
    model, processor = initial_model(cfg)
    model.freeze(encoder=True)
    if rows is None:  # --task location: the ten commonest locations with distinct first tokens
        firsts = Counter(_first_answer_token(processor, train[0]["question"], c) for c in common)
        classes = [c for c in common if firsts[_first_answer_token(processor, train[0]["question"], c)] == 1]
        rows = [r for r in loc(test) if r["answer"] in classes]
        random.Random(args.seed).shuffle(rows)
        rows = rows[:args.eval_rows]
        baseline = {"location": 100.0 * sum(r["answer"] == classes[0] for r in rows) / len(rows)}
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
            acc = (likelihood_accuracy(model, processor, rows) if args.task == "closed"
                   else {"location": location_readout(model, processor, rows, classes)})
            model.train()
            point = {"step": step, "examples": step * args.batch, "loss": float(loss.detach()),
                     "seconds_per_step": (time.time() - t0) / step,
                     **{f"{k}_likelihood" if args.task == "closed" else f"{k}_first_token": v for k, v in acc.items()}}
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
        if "encoder_probe" in result:
            mlflow.log_metrics({f"linear_probe_{k}": result["encoder_probe"][k] for k in ("cls", "composition")})
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
    ap.add_argument("--task", choices=("closed", "location", "encoder"), default="closed",
                    help="closed: train on the whole stage-2 split, score closed-set test rows by likelihood; "
                         "location: train on open location questions only, score the first answer token; "
                         "encoder: no LM, a logistic regression on the random encoder's <cls> vector")
    ap.add_argument("--residue-dropout", type=float, default=0.0,
                    help="share of each protein's residue vectors dropped in training (SepitConfig.residue_dropout)")
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
        result = encoder_linear_probe(args) if args.task == "encoder" else run_probe(args)
        out.write_text(json.dumps(result, indent=1))
    print(f"MLflow run {log_to_mlflow(result, uri, out.stem)} in {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
