"""Self-contained model folders: ``model.safetensors`` + ``config.json`` (+ extra files).

Every sepit model saves to and loads from such a folder; nothing is pickled.  Tied weights
(e.g. an LM head sharing the token embedding) share storage, which safetensors refuses to write
twice, so each alias is stored once and recorded in the file's metadata; :func:`load_state`
hands the alias back as the *same* tensor, so ``load_state_dict(strict=True)`` sees every key.

    save_folder(out, model.state_dict(), {"model_type": "protein_encoder", ...},
                extra_files={"README.md": "...", "lineage.json": {...}})
    state = load_state(out)          # dict[str, Tensor] on CPU
    cfg = read_config(out)           # the dict written as config.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sepit.errors import SepitError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_ALIAS_KEY = "sepit_aliases"  # safetensors metadata entry: JSON {alias_name: stored_name}


class ModelFolderError(SepitError, ValueError):
    """A model folder is missing, incomplete or unreadable; the message names the path."""


def _storage_key(t: torch.Tensor) -> tuple:
    # Two state-dict entries are the same weight when they view the same bytes the same way.
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save_folder(
    directory: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config_dict: Mapping[str, Any],
    extra_files: Mapping[str, str | bytes | Mapping | list] | None = None,
) -> Path:
    """Write weights (safetensors), ``config.json`` and extra files into ``directory``.

    ``extra_files`` maps a relative file name to its content: ``str`` (text), ``bytes``, or a
    JSON-serialisable mapping/list (written as pretty JSON).  Returns the folder path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ModelFolderError(f"{out}: state entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.device.type == "meta":
            raise ModelFolderError(f"{out}: cannot save {name!r}: it lives on the meta device (no data)")
        key = _storage_key(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # clone() so tensors that share storage but view it differently are written independently.
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    try:
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", _ALIAS_KEY: json.dumps(aliases)})
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelFolderError(f"{out / WEIGHTS_NAME}: could not write weights: {exc}") from None
    (out / CONFIG_NAME).write_text(json.dumps(dict(config_dict), indent=2, sort_keys=True, default=str))
    for rel, content in (extra_files or {}).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content, indent=2, sort_keys=True, default=str))
    return out


def _require(directory: Path, name: str) -> Path:
    if not directory.is_dir():
        raise ModelFolderError(f"model folder {directory} does not exist (or is not a folder)")
    path = directory / name
    if not path.is_file():
        raise ModelFolderError(f"model folder {directory} has no {name}; is it a sepit model folder?")
    return path


def load_state(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` from ``directory``; aliased (tied) names share one tensor."""
    path = _require(Path(directory), WEIGHTS_NAME)
    try:
        state = load_file(str(path), device=str(device))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFolderError(f"{path}: not a readable safetensors file ({exc})") from None
    for alias, stored in json.loads(meta.get(_ALIAS_KEY, "{}")).items():
        if stored not in state:
            raise ModelFolderError(f"{path}: alias {alias!r} points at missing tensor {stored!r}")
        state[alias] = state[stored]
    return state


def read_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder as a dict."""
    path = _require(Path(directory), CONFIG_NAME)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object at the top level")
    return data
