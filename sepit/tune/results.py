"""A finished sweep's results: one row per trial, the best trial, and the files users read.

Trial status, in the table and in MLflow:

* ``TERMINATED``: the stage-2 run finished; its objective is the final validation metric and
  its exported model is in ``model_dir``.  Only these can be the best trial.
* ``STOPPED``: the scheduler (ASHA) stopped it early; its objective is the last validation
  metric it reported and it has no final model.
* ``ERROR``: the run raised; ``error`` holds the message (``trials/<id>/trial.json`` the traceback).

Written to ``<out>``: ``sweep_results.csv`` (every trial), ``best.json`` (best params, objective,
model folder, MLflow run) and ``sweep.md`` (the table sorted by objective, then the failures).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable

from .trial import read_trial_file, write_trial_file

STATUSES = ("TERMINATED", "STOPPED", "ERROR")
#: Metric columns shown for every trial (when the stage reports them).
METRIC_COLUMNS = ("loss", "first_loss", "val_lm_loss", "val_aux_loss", "step", "wall_s")


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _records_by_tune_dir(out: Path) -> dict[str, dict[str, Any]]:
    recs = {}
    for f in sorted((out / "trials").glob("*/trial.json")):
        rec = read_trial_file(f.parent)
        if rec and rec.get("tune_dir"):
            recs[str(Path(rec["tune_dir"]).resolve())] = rec
    return recs


def trial_rows(results: Iterable[Any], param_keys: list[str], metric: str, out: Path) -> list[dict[str, Any]]:
    """Tune ``Result`` objects -> one row per trial (join with ``trial.json``: :func:`attach_trial_files`).

    ``result.metrics`` is the last report of the trial (for a finished one, the final metrics).
    """
    rows = []
    by_tune_dir = None
    for res in results:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id")
        if trial_id is None:  # failed before its first report: find its trial.json by Tune folder
            if by_tune_dir is None:
                by_tune_dir = _records_by_tune_dir(out)
            rec = by_tune_dir.get(str(Path(str(res.path)).resolve())) if res.path else None
            trial_id = (rec or {}).get("trial_id") or Path(str(res.path)).name
        config = dict(res.config or {})
        row: dict[str, Any] = {"trial_id": trial_id}
        row.update({k: config.get(k) for k in param_keys})
        if res.error is not None:
            status = "ERROR"
        elif m.get("completed"):
            status = "TERMINATED"
        else:
            status = "STOPPED"
        row["status"] = status
        row["objective"] = _finite(m.get(metric))
        row[metric] = row["objective"]
        row[f"best_{metric}"] = _finite(m.get(f"best_{metric}", m.get(metric)))
        for k in METRIC_COLUMNS:
            row[k] = _finite(m.get(k))
        if row["wall_s"] is None:  # stopped early: Tune's own clock of the trial
            row["wall_s"] = _finite(m.get("time_total_s"))
        row["model_dir"] = m.get("model_dir") if status == "TERMINATED" else ""
        row["mlflow_run_id"] = m.get("mlflow_run_id") or ""
        row["output_dir"] = ""
        row["error"] = _error_text(res.error) if res.error is not None else ""
        rows.append(row)
    return rows


def short_error(text: str, limit: int = 600) -> str:
    """One line for tables: the error's first line and, when it differs, the exception it ended
    with (Ray Train errors embed whole worker tracebacks; trial.json keeps the full text)."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    first, last = lines[0], lines[-1]
    out = first if first == last or last.startswith("...") else f"{first.rstrip(':')} ... {last}"
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _error_text(err: BaseException) -> str:
    text = str(err).strip()
    # Tune wraps the trial's exception in a traceback; keep from our TrialError line on.
    marker = text.find("TrialError:")
    return short_error(text[marker + len("TrialError:"):] if marker >= 0 else text or type(err).__name__)


def attach_trial_files(rows: list[dict[str, Any]], out: Path) -> None:
    """Fill output folders, MLflow run ids and error texts from ``trials/<id>/trial.json``."""
    for row in rows:
        trial_dir = out / "trials" / str(row["trial_id"])
        rec = read_trial_file(trial_dir)
        if rec is None:
            continue
        row["output_dir"] = str(trial_dir)
        if row["status"] == "ERROR" and rec.get("error"):
            row["error"] = short_error(rec["error"])
        if row["status"] == "STOPPED" and rec.get("status") != "STOPPED":
            # Stopping ended the trial's process; its stage may have seen its workers vanish and
            # recorded that as an error first.  The scheduler's decision is what happened.
            rec.update(status="STOPPED", stopped_by="scheduler", stopped_at_step=row["step"])
            write_trial_file(trial_dir, rec)
        if not row["mlflow_run_id"]:
            run_file = trial_dir / "mlflow_run.json"  # written by the stage run when it starts
            if run_file.is_file():
                row["mlflow_run_id"] = json.loads(run_file.read_text()).get("run_id", "")


def sort_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Finished trials by objective, then stopped ones by their last objective, then errors."""
    sign = 1.0 if mode == "min" else -1.0
    rank = {s: i for i, s in enumerate(STATUSES)}

    def key(r):
        obj = r["objective"]
        return (rank[r["status"]], obj is None, sign * obj if obj is not None else 0.0, str(r["trial_id"]))

    return sorted(rows, key=key)


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "TERMINATED" and r["objective"] is not None]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r["objective"])


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def best_record(best: dict[str, Any] | None, param_keys: list[str], metric: str, mode: str,
                sweep_run_id: str, tracking_uri: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"metric": metric, "mode": mode, "sweep_mlflow_run_id": sweep_run_id,
                           "tracking_uri": tracking_uri}
    if best is None:
        rec.update(trial_id=None, reason="no trial finished")
        return rec
    rec.update(trial_id=best["trial_id"], objective=best["objective"],
               params={k: best[k] for k in param_keys}, model_dir=best["model_dir"],
               output_dir=best["output_dir"], mlflow_run_id=best["mlflow_run_id"],
               metrics={k: best[k] for k in (f"best_{metric}", *METRIC_COLUMNS) if best.get(k) is not None})
    return rec


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v).replace("|", "\\|")


def summary_markdown(rows: list[dict[str, Any]], best: dict[str, Any] | None, param_keys: list[str],
                     metric: str, mode: str, header: dict[str, Any]) -> str:
    """The sweep report: settings, the trial table sorted by objective, best trial, failures."""
    lines = ["# Stage-2 expert sweep", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines += [f"- **trials**: {len(rows)} ({counts['TERMINATED']} finished, {counts['STOPPED']} stopped early, "
              f"{counts['ERROR']} failed)", ""]
    cols = ["trial_id", "status", *param_keys, f"{metric} ({mode})", f"best_{metric}", "loss", "step", "wall_s"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [r["trial_id"], r["status"], *(r[k] for k in param_keys), r["objective"], r[f"best_{metric}"],
                r["loss"], r["step"], r["wall_s"]]
        mark = " **(best)**" if best is not None and r["trial_id"] == best["trial_id"] else ""
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + mark + " |")
    lines.append("")
    if best is not None:
        lines += ["## Best trial", "",
                  f"`{best['trial_id']}`: {metric} = {_fmt(best['objective'])} with "
                  + ", ".join(f"{k}={_fmt(best[k])}" for k in param_keys) + ".", "",
                  f"- model folder: `{best['model_dir']}`", f"- MLflow run: `{best['mlflow_run_id']}`", ""]
    else:
        lines += ["## Best trial", "", "No trial finished, so there is no best model.", ""]
    failed = [r for r in rows if r["status"] == "ERROR"]
    if failed:
        lines += ["## Failed trials", ""]
        lines += [f"- `{r['trial_id']}` (" + ", ".join(f"{k}={_fmt(r[k])}" for k in param_keys) + f"): {r['error']}"
                  for r in failed]
        lines.append("")
    return "\n".join(lines)
