"""Where a trained stage came from: parent stage, data fingerprints, config, code version.

``lineage.json`` sits in every exported model folder and is logged to the stage's MLflow run
(with the ``sepit.parent`` tags), so any model can be traced back to the data and code that made
it.  :func:`resolve_parent` turns ``--init`` (a previous stage's folder, an ``s3://`` / ``gs://``
URI of one, a registered model ``models:/NAME@ALIAS``, or its MLflow run id) into a local model
folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sepit.errors import SepitError

if TYPE_CHECKING:
    from sepit.storage import Location

LINEAGE_FILE = "lineage.json"
#: The MLflow Model inside a stage run's artifacts (``runs:/RUN_ID/model``).
MODEL_ARTIFACT = "model"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ParentNotFoundError(SepitError, FileNotFoundError):
    """``--init`` names neither an existing model folder nor a resolvable MLflow run."""


@dataclass
class ParentRef:
    path: str
    """Local folder holding the parent stage's exported model."""
    run_id: str | None = None
    """MLflow run id of the parent stage when it was given as one (or recorded in its lineage)."""
    stage: str | None = None
    """The parent's stage name, read from its lineage.json when present."""
    uri: str | None = None
    """Where the parent was read from when it is an object-store or MLflow model URI (``path`` is
    its local copy)."""


def sha256_file(path: "str | Path | Location", chunk: int = 1 << 20) -> str:
    """sha256 of a local file or of a :class:`sepit.storage.Location` (streamed, not held whole)."""
    from sepit.storage import Location

    h = hashlib.sha256()
    if isinstance(path, Location):
        with path.filesystem.open_input_stream(path.path) as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: Set by whoever submits a job (``--runtime-env-json '{"env_vars": {"SEPIT_GIT_COMMIT": ...}}'``):
#: Ray uploads the working directory without ``.git``, so the job itself cannot ask git.
GIT_COMMIT_ENV = "SEPIT_GIT_COMMIT"


def git_commit(start: str | Path | None = None) -> str | None:
    """HEAD of the git checkout holding ``start`` (default: this package), ``+dirty`` if modified;
    else ``$SEPIT_GIT_COMMIT``; else None."""
    where = Path(start) if start else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(GIT_COMMIT_ENV) or None  # no checkout here (wheel, job upload)
    return f"{sha}+dirty" if dirty else sha


def read_lineage(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_parent(ref: str, tracking_uri: str | None, download_to: str | Path | None = None) -> ParentRef:
    """A previous stage's exported folder (local, ``s3://`` / ``gs://``), an MLflow model URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``) or a bare run id
    (= ``runs:/RUN_ID/model``).  Remote folders and MLflow models are copied into
    ``download_to``/model when given (the stage's output folder, which workers can read), else
    into the local cache."""
    from sepit.storage import download_dir, is_remote, localize_dir, resolve
    from sepit.tracking.models import ModelURIError, is_model_uri, localize_model

    if is_remote(ref):
        loc = resolve(ref)
        if loc.join("model", "config.json").is_file() and not loc.join("config.json").is_file():
            loc = loc.join("model")  # a stage's output folder
        if not loc.join("config.json").is_file():
            raise ParentNotFoundError(f"--init {ref}: no model folder there (no config.json under {loc.uri})")
        local = download_dir(loc, Path(download_to) / "model") if download_to else localize_dir(loc)
        lin = read_lineage(local) or {}
        return ParentRef(path=str(local), run_id=lin.get("mlflow_run_id"), stage=lin.get("stage"), uri=loc.uri)
    path = Path(ref).expanduser()
    if not is_model_uri(ref) and path.is_dir():
        if (path / "model").is_dir() and not (path / "config.json").is_file():
            path = path / "model"  # a stage's output folder was given instead of its model folder
        lin = read_lineage(path) or {}
        return ParentRef(path=str(path.resolve()), run_id=lin.get("mlflow_run_id"), stage=lin.get("stage"))
    if _RUN_ID.match(ref):
        ref = f"runs:/{ref}/{MODEL_ARTIFACT}"
    if is_model_uri(ref):
        try:
            local = localize_model(ref, tracking_uri=tracking_uri,
                                   dst=Path(download_to) / "model" if download_to else None)
        except ModelURIError as exc:
            raise ParentNotFoundError(f"--init {exc}") from None
        lin = read_lineage(local) or {}
        run_id = lin.get("mlflow_run_id") or (ref.split("/")[1] if ref.startswith("runs:/") else None)
        return ParentRef(path=str(local), run_id=run_id, stage=lin.get("stage"), uri=ref)
    raise ParentNotFoundError(f"--init {ref!r} is neither an existing folder, an MLflow model URI "
                              "(models:/NAME@ALIAS, runs:/RUN_ID/model) nor an MLflow run id (32 hex digits)")


def dataset_fingerprint(dataset_dir: str | Path, stage: str) -> dict[str, Any]:
    """sha256 of the stage's split files and of the dataset card, plus the card's manifest entries
    (the dataset may be a local folder or an object-store prefix)."""
    from sepit.storage import resolve

    root = resolve(dataset_dir)
    files = {}
    for split in ("train", "val", "test"):
        p = root.join(stage, f"{split}.parquet")
        if p.is_file():
            files[f"{stage}/{split}.parquet"] = sha256_file(p)
    out: dict[str, Any] = {"dataset_dir": root.uri, "files": files}
    card = root.join("card.json")
    if card.is_file():
        out["card_sha256"] = sha256_file(card)
        try:
            data = json.loads(card.read_text())
        except json.JSONDecodeError:
            data = {}
        for key, value in data.items() if isinstance(data, dict) else ():
            if "manifest" in key or "checksum" in key or key in ("store", "store_path"):
                if isinstance(value, dict):  # keep the summary, not long id lists
                    value = {k: v for k, v in value.items() if not isinstance(v, (list, dict)) or len(v) <= 20}
                out[f"card.{key}"] = value
    return out


def build_lineage(*, stage: str, config: dict[str, Any], parent: ParentRef | None,
                  data: dict[str, Any], mlflow_run_id: str | None, tracking_uri: str | None,
                  metrics: dict[str, float], checkpoint: str | None) -> dict[str, Any]:
    return {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parent": asdict(parent) if parent else None,
        "data": data,
        "config": config,
        "git_commit": git_commit(),
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
        "checkpoint": checkpoint,
        "final_metrics": metrics,
    }


def write_lineage(model_dir: str | Path, lineage: dict[str, Any]) -> Path:
    path = Path(model_dir) / LINEAGE_FILE
    path.write_text(json.dumps(lineage, indent=1, default=str))
    return path
