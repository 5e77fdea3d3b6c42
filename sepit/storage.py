"""Where sepit reads and writes: a local folder, ``file://``, or an object store (``s3://``, ``gs://``).

Every output or input location in sepit (a training run's ``output_dir``, a dataset folder, a
model folder, ``--init``) may be an object-store URI.  :func:`resolve` turns a reference into a
:class:`Location`: a pyarrow filesystem plus the path on it, the one thing Ray Train
(``RunConfig(storage_path, storage_filesystem)``), Ray Data (``read_parquet(path, filesystem=)``)
and pyarrow (``pq.read_metadata(path, filesystem=)``) all accept.

    loc = resolve("s3://bucket/runs/stage1")        # Location(S3FileSystem, "bucket/runs/stage1")
    loc.join("model", "config.json").read_text()
    upload_dir(local_model, loc.join("model"))       # write locally, then upload
    local = localize_dir("s3://bucket/runs/stage1/model")  # cached local copy, re-used while unchanged

S3 settings come from the standard AWS environment: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
(an S3-compatible server such as MinIO), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (else the default AWS
chain: profile, instance role).  Keys found in the environment are put into the filesystem object
itself, so Ray workers and Ray Data tasks that receive it (pickled) reach the store even where
their own environment lacks the variables.  ``gs://`` uses pyarrow's GCS filesystem with Google's
default credentials.

Local copies of remote folders (:func:`localize_dir`) and the local working folder of a run whose
output is remote (:func:`staging_dir`) live under ``$SEPIT_CACHE_DIR`` (default
``~/.cache/sepit``), in a tree that mirrors the URI (``remote/s3/bucket/key``), so a cached path
still says where it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from sepit.errors import SepitError

#: Schemes handled by an object-store filesystem; everything else is a local path.
REMOTE_SCHEMES = ("s3", "gs", "gcs")
CACHE_ENV = "SEPIT_CACHE_DIR"
#: Beside each cached folder: the remote listing it was downloaded from (to detect changes).
_SOURCE_SUFFIX = ".source.json"


class StorageError(SepitError, FileNotFoundError, ValueError):
    """A storage location cannot be used; the message names the URI and the reason (missing path,
    missing bucket, no credentials, unreachable endpoint).  A FileNotFoundError and a ValueError,
    so each command's handler for a missing or bad input prints it as a one-line error."""


def is_remote(ref: str | Path | None) -> bool:
    """True for ``s3://``, ``gs://`` (object-store) references."""
    return isinstance(ref, str) and urlparse(ref).scheme.lower() in REMOTE_SCHEMES


def _explain(uri: str, exc: BaseException) -> str:
    """A short reason for a failed filesystem call, from pyarrow's/AWS's error text."""
    text = str(exc)
    bucket = urlparse(uri).netloc
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "bucket does not exist" in text:
        return f"{uri}: bucket {bucket!r} does not exist"
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                               "INVALID_ACCESS_KEY", "Forbidden", "credentials")):
        return (f"{uri}: access denied (no or invalid credentials; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                f"or AWS_PROFILE): {text.splitlines()[0]}")
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not resolve" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default"
        return f"{uri}: cannot reach the storage endpoint ({endpoint}): {text.splitlines()[0]}"
    return f"{uri}: {text}"


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment variables (module doc)."""
    env = os.environ
    kwargs: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A folder or file on some filesystem: ``uri`` as the user writes it, ``path`` as the
    ``filesystem`` wants it (``bucket/key`` on object stores, an absolute path locally)."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise StorageError(f"{self.uri} is not a local path")
        return Path(self.path)

    def join(self, *parts: str) -> "Location":
        rel = "/".join(p.strip("/") for p in parts if p)
        return Location(f"{self.uri.rstrip('/')}/{rel}", self.filesystem, f"{self.path.rstrip('/')}/{rel}")

    def __str__(self) -> str:
        return self.uri

    # ------------------------------------------------------------------ queries
    def info(self) -> pafs.FileInfo:
        try:
            return self.filesystem.get_file_info(self.path)
        except OSError as exc:
            raise StorageError(_explain(self.uri, exc)) from None

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        if self.is_local:
            return Path(self.path).is_dir()
        # Object stores have no folders: a prefix "exists" when some object lies under it.
        try:
            return bool(self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=False,
                                                                          allow_not_found=True)))
        except OSError as exc:
            raise StorageError(_explain(self.uri, exc)) from None

    def size(self) -> int:
        info = self.info()
        if info.type != pafs.FileType.File:
            raise missing(self, "file")
        return int(info.size)

    def files(self) -> dict[str, tuple[int, float]]:
        """``{relative path: (bytes, mtime seconds)}`` of every file under this folder."""
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageError(_explain(self.uri, exc)) from None
        root = self.path.rstrip("/") + "/"
        return {i.path[len(root):]: (int(i.size), i.mtime.timestamp() if i.mtime else 0.0)
                for i in infos if i.type == pafs.FileType.File and i.path.startswith(root)}

    # ------------------------------------------------------------------ content
    def read_bytes(self) -> bytes:
        try:
            with self.filesystem.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise missing(self, "file") from None
        except OSError as exc:
            raise StorageError(_explain(self.uri, exc)) from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        try:
            if self.is_local:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self.filesystem.open_output_stream(self.path) as f:
                f.write(data)
        except OSError as exc:
            raise StorageError(_explain(self.uri, exc)) from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))


def resolve(ref: str | Path) -> Location:
    """A local path, ``file://`` URI, ``s3://bucket/key`` or ``gs://bucket/key`` as a :class:`Location`."""
    if isinstance(ref, Location):
        return ref
    text = str(ref)
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file"):
        path = Path(parsed.path if scheme == "file" else text).expanduser().resolve()
        return Location(str(path), pafs.LocalFileSystem(), str(path))
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{text}: unsupported storage scheme {scheme!r}; use a local path, file://, s3:// or gs://")
    if not parsed.netloc:
        raise StorageError(f"{text}: no bucket in the URI (expected {scheme}://bucket/prefix)")
    path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    uri = f"{scheme}://{path}"
    try:
        fs = s3_filesystem() if scheme == "s3" else pafs.GcsFileSystem()
    except (OSError, ValueError) as exc:
        raise StorageError(_explain(uri, exc)) from None
    return Location(uri, fs, path)


def missing(loc: Location, what: str = "file") -> StorageError:
    """The error for a path that is not there: says whether the bucket itself is missing."""
    require_bucket(loc)
    return StorageError(f"{loc.uri}: no such {what}")


def location_of(filesystem: pafs.FileSystem, path: str) -> Location:
    """The :class:`Location` of ``path`` on ``filesystem`` (e.g. a Ray ``Checkpoint``'s)."""
    scheme = {"s3": "s3", "gcs": "gs", "local": ""}.get(filesystem.type_name, filesystem.type_name)
    return Location(f"{scheme}://{path}" if scheme else path, filesystem, path)


def require_bucket(loc: Location) -> None:
    """Fail early, naming the URI, when an object store's bucket is missing or unreadable."""
    if loc.is_local:
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        info = loc.filesystem.get_file_info(bucket)
    except OSError as exc:
        raise StorageError(_explain(loc.uri, exc)) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{loc.uri}: bucket {bucket!r} does not exist")


# --------------------------------------------------------------------------- folder copies
def copy_dir(src: Location, dst: Location, *, replace: bool = True) -> None:
    """Copy the folder ``src`` to ``dst`` (any filesystems); ``replace`` empties ``dst`` first so no
    stale file of an earlier copy remains."""
    if not src.is_dir():
        raise missing(src, "folder")
    try:
        if replace and dst.is_local and Path(dst.path).exists():
            shutil.rmtree(dst.path)
        elif replace and not dst.is_local:
            dst.filesystem.delete_dir_contents(dst.path, missing_dir_ok=True)
        if src.is_local and dst.is_local:
            shutil.copytree(src.path, dst.path, dirs_exist_ok=True)
            return
        if dst.is_local:
            Path(dst.path).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src.path, dst.path, source_filesystem=src.filesystem, destination_filesystem=dst.filesystem)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(_explain(dst.uri if src.is_local else src.uri, exc)) from None


def upload_dir(local: str | Path, dst: Location | str) -> Location:
    """Copy a local folder to ``dst`` (replacing what was there); returns the destination."""
    dst = resolve(dst)
    copy_dir(resolve(Path(local)), dst)
    return dst


def download_dir(src: Location | str, local: str | Path) -> Path:
    """Copy the folder ``src`` into the local folder ``local`` (replacing it); returns it."""
    copy_dir(resolve(src), resolve(Path(local)))
    return Path(local)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sepit").expanduser()


def _mirror(loc: Location, kind: str) -> Path:
    scheme = urlparse(loc.uri).scheme
    return cache_root() / kind / scheme / loc.path


def staging_dir(ref: str | Path) -> Path:
    """The local working folder for ``ref``: the folder itself when local; for an object-store
    URI, ``$SEPIT_CACHE_DIR/staging/<scheme>/<bucket>/<key>`` (stable, so a re-run on the same
    machine finds its local state again)."""
    loc = resolve(ref)
    return loc.local_path if loc.is_local else _mirror(loc, "staging")


def localize_dir(ref: str | Path | Location) -> Path:
    """A local folder with the content of ``ref``: local paths as they are; a remote folder is
    downloaded once into the cache and downloaded again only when its listing changed (a file
    added or removed, or its size or last-modified time, which object stores keep in seconds)."""
    loc = resolve(ref)
    if loc.is_local:
        return loc.local_path
    listing = loc.files()
    if not listing:
        raise missing(loc, "folder (nothing stored under this prefix)")
    target = _mirror(loc, "remote")
    source_file = target.with_name(target.name + _SOURCE_SUFFIX)
    wanted = json.dumps(sorted(listing.items()))
    if target.is_dir() and source_file.is_file() and source_file.read_text() == wanted:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target, then swap: a concurrent reader never sees half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        copy_dir(loc, resolve(tmp), replace=False)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():  # another process won the swap: its copy is as good
            raise
    source_file.write_text(wanted)
    return target


def localize_file(ref: str | Path | Location) -> Path:
    """A local copy of one file (the path itself when local); re-downloaded when size/mtime changed."""
    loc = resolve(ref)
    if loc.is_local:
        if not loc.local_path.is_file():
            raise StorageError(f"{loc.uri}: no such file")
        return loc.local_path
    info = loc.info()
    if info.type != pafs.FileType.File:
        raise missing(loc, "file")
    target = _mirror(loc, "remote")
    source_file = target.with_name(target.name + _SOURCE_SUFFIX)
    wanted = json.dumps([int(info.size), info.mtime.timestamp() if info.mtime else 0.0])
    if target.is_file() and source_file.is_file() and source_file.read_text() == wanted:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(loc.read_bytes())
    os.replace(tmp, target)
    source_file.write_text(wanted)
    return target


def first_file(root: str | Path | Location, candidates: list[str]) -> Location | None:
    """The first of ``candidates`` (paths relative to ``root``) that is a file, or None."""
    loc = resolve(root)
    for rel in candidates:
        cand = loc.join(rel)
        if cand.is_file():
            return cand
    return None
