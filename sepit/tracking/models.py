"""Exported stages as MLflow Models in the model registry, and MLflow model URIs back to folders.

Every stage run logs its export folder as an MLflow Model (``mlflow.pyfunc`` flavour, see
:mod:`sepit.tracking.pyfunc`: signature, pinned pip requirements, the folder unchanged inside),
registers it as a new version of ``sepit-<stage>`` (or ``train.registered_model``) and moves
the alias ``@newest`` to that version (MLflow reserves the alias name ``latest``; sepit resolves
``models:/NAME@latest`` itself, as the highest version, like MLflow's ``models:/NAME/latest``)::

    logged = log_model(model_dir, registered_name="sepit-stage2")   # inside the stage's run
    folder = localize_model("models:/sepit-stage2@latest")           # a local folder with config.json

:func:`localize_model` is what ``sepit serve --model``, ``sepit evaluate --model`` and
``--init`` call on a reference: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` and
``runs:/RUN_ID/PATH`` are downloaded from the tracking server (``tracking_uri``, else
``MLFLOW_TRACKING_URI``) into ``$SEPIT_CACHE_DIR/mlflow/`` on the node that asks (a Serve
replica resolves its model on its own node); local folders and ``s3://`` / ``gs://`` folders go
through :func:`sepit.storage.localize_dir` as before.  A registered version never changes, so
its copy is reused; an alias is looked up again on every call (it may have moved).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepit.errors import SepitError

#: Alias moved to each newly registered stage version (MLflow reserves the alias name "latest").
NEWEST_ALIAS = "newest"
#: ``models:/NAME@latest`` / ``models:/NAME/latest``: the highest version, resolved by sepit (as
#: MLflow resolves ``models:/NAME/latest``); it equals ``@newest`` unless that alias was moved by hand.
LATEST = "latest"
#: Name of the MLflow Model inside a stage run (``runs:/RUN_ID/model``).
MODEL_NAME = "model"
MODEL_URI_PREFIXES = ("models:/", "runs:/")
#: Name of the export folder among the MLflow Model's artifacts (``MLmodel`` records its path).
FOLDER_ARTIFACT = "sepit_model"


class ModelURIError(SepitError, FileNotFoundError, ValueError):
    """A model reference cannot be resolved; the message names the URI, the store and the reason.
    A FileNotFoundError and a ValueError, so each command's handler prints it as a one-line error."""


def is_model_uri(ref: Any) -> bool:
    """True for MLflow model references (``models:/...``, ``runs:/...``)."""
    return isinstance(ref, str) and ref.startswith(MODEL_URI_PREFIXES)


def default_registered_name(stage: str) -> str:
    return f"sepit-{stage}"


# --------------------------------------------------------------------------- logging a stage
@contextlib.contextmanager
def _quiet():
    """No per-file progress bars on the console, and none of MLflow's advice that does not apply
    here (the signature is explicit, so no type hints and no input example are needed)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(type hint|input example|input_example).*")
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@dataclass
class LoggedModel:
    model_uri: str
    """``runs:/RUN_ID/model``: the logged MLflow Model."""
    registered_name: str | None
    """Registered model it became a version of (None when registration is off)."""
    version: str | None
    """The new registry version (the one ``@newest`` now points at)."""
    seconds: float
    """Wall time of logging + registering (copying the folder dominates for big models)."""

    @property
    def version_uri(self) -> str | None:
        """``models:/NAME/VERSION``: the immutable reference of this export."""
        return f"models:/{self.registered_name}/{self.version}" if self.registered_name and self.version else None


def pip_requirements() -> list[str]:
    """sepit's runtime dependencies pinned to the installed versions (local labels such as
    ``+cpu`` dropped: a GPU host installs its own build), and sepit itself (the pyfunc imports it)."""
    import importlib.metadata as md
    import re

    out = []
    for req in md.requires("sepit") or []:
        if "extra ==" in req:
            continue  # dev/test extras are not needed to load the model
        name = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]
        try:
            version = md.version(name).split("+", 1)[0]
        except md.PackageNotFoundError:
            out.append(req.split(";")[0].strip())
            continue
        out.append(f"{name}=={version}")
    out.append(f"sepit=={md.version('sepit')}")
    return out


def log_model(model_dir: str | Path, *, registered_name: str | None, alias: str = NEWEST_ALIAS,
              metadata: dict[str, Any] | None = None) -> LoggedModel:
    """Log ``model_dir`` as the MLflow Model ``model`` among the active run's artifacts; register it
    as a new version of ``registered_name`` (skipped when empty) and point ``alias`` at it.

    The model is saved with ``mlflow.pyfunc.save_model`` and logged as run artifacts (not as an
    MLflow 3 "logged model" entity): ``runs:/RUN_ID/model`` and the run's artifact list keep
    holding the export, as they did before models were registered."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model needs an active MLflow run (sepit.tracking.start_run)")
    t0 = time.perf_counter()
    with _quiet(), tempfile.TemporaryDirectory(prefix="sepit-mlflow-model-") as tmp:
        from .pyfunc import SepitPyfuncModel, model_type, signature_for  # MLflow comments on the class at import

        local = Path(tmp) / MODEL_NAME
        mlflow.pyfunc.save_model(
            path=str(local), python_model=SepitPyfuncModel(), artifacts={FOLDER_ARTIFACT: str(model_dir)},
            signature=signature_for(model_dir), pip_requirements=pip_requirements(),
            metadata={"sepit_model_type": model_type(model_dir), **(metadata or {})})
        mlflow.log_artifacts(str(local), MODEL_NAME)
    version = None
    if registered_name:
        uri = mlflow.get_tracking_uri()  # the run's store (start_run set it)
        client = MlflowClient(tracking_uri=uri, registry_uri=registry_uri(uri))
        try:
            client.create_registered_model(registered_name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_NAME}"
        version = str(client.create_model_version(registered_name, source, run_id=run.info.run_id).version)
        if alias:
            client.set_registered_model_alias(registered_name, alias, version)
    return LoggedModel(model_uri=f"runs:/{run.info.run_id}/{MODEL_NAME}", registered_name=registered_name or None,
                       version=version, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- resolving a reference
def registry_uri(tracking_uri: str) -> str:
    """The model registry: ``MLFLOW_REGISTRY_URI`` when set, else the tracking store itself (an
    explicit value, so a registry URI set globally by other code in this process cannot capture it)."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri


def _tracking_uri(ref: str, tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ModelURIError(f"{ref}: no MLflow tracking URI to resolve it from (pass --tracking-uri or set "
                            "MLFLOW_TRACKING_URI)")
    return uri


def _registered_version(ref: str, client: Any, uri: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version), with errors that say
    which part is unknown."""
    from mlflow.exceptions import MlflowException

    body = ref[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        version = None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        alias = None
    else:
        raise ModelURIError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise ModelURIError(f"{ref}: no registered model {name!r} at {uri}") from None
    if LATEST in ((alias or "").lower(), (version or "").lower()):
        versions = [int(v.version) for v in client.search_model_versions(f"name = '{name}'")]
        if not versions:
            raise ModelURIError(f"{ref}: registered model {name!r} at {uri} has no versions")
        return name, str(max(versions))
    if alias is not None:
        try:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            known = sorted(registered.aliases) if registered.aliases else []
            raise ModelURIError(f"{ref}: registered model {name!r} at {uri} has no alias {alias!r} "
                                f"(aliases: {known or 'none'})") from None
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise ModelURIError(f"{ref}: registered model {name!r} at {uri} has no version {version!r}") from None
    return name, str(version)


def _run_reference(ref: str, client: Any, uri: str) -> tuple[str, str]:
    """``runs:/RUN_ID/PATH`` -> (run id, path), checking that the run exists."""
    from mlflow.exceptions import MlflowException

    run_id, _, path = ref[len("runs:/"):].strip("/").partition("/")
    if not run_id or not path:
        raise ModelURIError(f"{ref}: expected runs:/RUN_ID/PATH (e.g. runs:/<id>/{MODEL_NAME})")
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ModelURIError(f"{ref}: no run {run_id!r} at {uri}") from None
    return run_id, path


def sepit_folder(root: str | Path) -> Path:
    """The export folder inside a downloaded MLflow Model (its ``MLmodel`` records where), or
    ``root`` itself when it is a plain folder (a run artifact logged before models were)."""
    import yaml

    root = Path(root)
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
        entry = (flavor.get("artifacts") or {}).get(FOLDER_ARTIFACT)
        if entry and (root / entry["path"]).is_dir():
            return root / entry["path"]
        raise ModelURIError(f"{root}: an MLflow Model without a sepit folder (no artifact {FOLDER_ARTIFACT!r})")
    if any(root.iterdir()):
        return root
    raise ModelURIError(f"{root}: empty download")


def _download(source: str, uri: str, target: Path) -> None:
    """Download ``source`` beside ``target`` and swap it in: a concurrent reader (another replica on
    this node) never sees half a folder."""
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # MLflow puts the download at dst_path/<last part of the URI> (or dst_path itself).
        with _quiet():
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri,
                                                           registry_uri=registry_uri(uri)))
        if not got.is_dir():
            raise ModelURIError(f"{source} at {uri} is a file, not a model folder")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(got, target)
    except ModelURIError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for missing artifacts
        if not (isinstance(exc, OSError) and target.is_dir()):  # else another process won the swap
            raise ModelURIError(f"{source} at {uri}: download failed: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def localize_model(ref: str | Path, *, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A local folder holding the exported model ``ref`` names (see the module doc).

    ``dst`` puts an MLflow download in a chosen folder (e.g. a stage's output folder that training
    workers on other nodes can read); default: ``$SEPIT_CACHE_DIR/mlflow/<store>/...``."""
    if not is_model_uri(ref):
        from sepit.storage import localize_dir

        return localize_dir(ref)
    from mlflow.tracking import MlflowClient

    from sepit.storage import cache_root

    ref = str(ref)
    uri = _tracking_uri(ref, tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=registry_uri(uri))
    store = cache_root() / "mlflow" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if ref.startswith("models:/"):
        name, version = _registered_version(ref, client, uri)
        source, target, immutable = f"models:/{name}/{version}", store / "models" / name / version, True
    else:
        run_id, path = _run_reference(ref, client, uri)
        source, target, immutable = f"runs:/{run_id}/{path}", store / "runs" / run_id / path, False
    if dst is not None:
        target, immutable = Path(dst), False
    marker = target.with_name(target.name + ".source.json")
    record = json.dumps({"source": source, "tracking_uri": uri})
    if not (immutable and target.is_dir() and marker.is_file() and marker.read_text() == record):
        _download(source, uri, target)
        marker.write_text(record)
    return sepit_folder(target)


def pin_model_uri(ref: str, tracking_uri: str | None = None) -> str:
    """``models:/NAME@ALIAS`` (or ``models:/NAME/latest``) -> ``models:/NAME/VERSION``, the version
    it names now, so every Serve replica, including ones an autoscaler starts later, loads the same
    version; any other reference is returned unchanged."""
    if not (isinstance(ref, str) and ref.startswith("models:/")
            and ("@" in ref or ref.rstrip("/").lower().endswith("/" + LATEST))):
        return ref
    from mlflow.tracking import MlflowClient

    uri = _tracking_uri(ref, tracking_uri)
    name, version = _registered_version(ref, MlflowClient(tracking_uri=uri, registry_uri=registry_uri(uri)), uri)
    return f"models:/{name}/{version}"
