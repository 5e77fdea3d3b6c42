"""Typed configs: plain dataclasses, loaded from YAML / dicts with dotted command-line overrides.

Each component owns a small ``@dataclass`` config (fields documented by a docstring line right
under them, validated in ``__post_init__`` with the helpers below).  This module only knows how
to turn nested dicts into those dataclasses with exact, named errors:

    cfg = load_config(PipelineConfig, "my.yaml", overrides=["model.encoder.num_layers=6"])

An unknown key, a wrong type or a value outside the allowed set raises :class:`ConfigError`
whose message names the full dotted field path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import yaml

from sepit.errors import SepitError

T = TypeVar("T")


class ConfigError(SepitError, ValueError):
    """A config value is invalid; the message names the dotted field path and the reason."""


# --------------------------------------------------------------------------- validation helpers
def check_choice(value: Any, name: str, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {allowed}")


def check_range(
    value: float, name: str, lo: float | None = None, hi: float | None = None,
    lo_inclusive: bool = True, hi_inclusive: bool = True,
) -> None:
    if lo is not None and (value < lo or (value == lo and not lo_inclusive)):
        op = ">=" if lo_inclusive else ">"
        raise ConfigError(f"{name}={value!r} is out of range; it must be {op} {lo}")
    if hi is not None and (value > hi or (value == hi and not hi_inclusive)):
        op = "<=" if hi_inclusive else "<"
        raise ConfigError(f"{name}={value!r} is out of range; it must be {op} {hi}")


# --------------------------------------------------------------------------- dict -> dataclass
def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, path: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{path}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, _path=path)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        check_choice(value, path, typing.get_args(tp))
        return value
    if origin in (list, tuple, typing.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], _path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = _path or cls.__name__
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{_path}.{name}" if _path else name
        kwargs[name] = _coerce(value, hints[name], path)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if _path and not str(exc).startswith(_path):
            raise ConfigError(f"{_path}.{exc}") from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict of YAML-safe values (Paths become strings, tuples lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge, everything else replaces."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1,2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> T:
    """The one config loader: ``base`` (a preset's section, :func:`sepit.config.recipes.load`)
    <- YAML file <- named flags (dotted key -> value, None = not given) <- dotted ``key=value``
    overrides; ``prepare`` may rework the merged dict; then typed + validated."""
    data: dict[str, Any] = dict(base or {})
    if path:
        data = merge(data, load_yaml(path))
    data = merge(data, nested(flags or {}))
    data = merge(data, parse_overrides(overrides))
    if prepare is not None:
        data = prepare(data)
    return from_dict(cls, data)


def nested(flags: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.output_dir": "x", "init": None}`` -> ``{"train": {"output_dir": "x"}}`` (None = unset)."""
    out: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


#: What every run (stage, sweep, evaluation, pipeline) writes into its output folder: its fully
#: resolved config, which ``--config`` reads back.
RUN_CONFIG = "config.yaml"


def write_run_config(cfg: Any, out_dir: str | Path) -> Path:
    """Write ``cfg`` as ``<out_dir>/config.yaml`` (the folder is created)."""
    path = Path(out_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, path)
    return path
