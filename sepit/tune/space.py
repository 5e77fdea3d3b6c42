"""The stage-2 search space: which hyper-parameters a sweep varies, and how.

Each searched parameter is a :class:`ParamSpec`, written in YAML (or a dotted override) as

    num_experts: [2, 4, 8]                 # a list = grid search (every value, every sample)
    top_k: 1                               # a scalar = fixed for all trials
    capacity_factor: {choice: [1.0, 1.25]} # sampled uniformly from the list, once per trial
    aux_loss_coef: {loguniform: [1e-3, 1e-1]}
    lr: {uniform: [1e-4, 5e-4]}

``grid`` values are crossed with each other (Tune's ``grid_search``); ``num_samples`` repeats the
whole grid, re-drawing the sampled parameters each time.  The five named parameters map onto the
stage-2 config (:data:`PARAM_PATHS`); ``extra`` adds any other stage-2 field by its dotted path
(e.g. ``train.warmup_steps: [0, 10]``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from sepit.config.base import ConfigError

SPEC_KINDS = ("value", "grid", "choice", "uniform", "loguniform")

#: Named search parameters -> their dotted field path in the stage-2 config (Stage2JobConfig).
PARAM_PATHS: dict[str, str] = {
    "num_experts": "moe.num_experts",
    "top_k": "moe.top_k",
    "capacity_factor": "moe.capacity_factor",
    "aux_loss_coef": "moe.aux_loss_coef",
    "lr": "train.lr",
}
#: Parameters that must be whole numbers (no continuous ranges).
INTEGER_PARAMS = ("num_experts", "top_k")


def _number(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: ``kind`` in SPEC_KINDS and its ``values`` ((lo, hi) for ranges)."""

    kind: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, raw: Any, name: str, integer: bool = False) -> "ParamSpec":
        """Scalar -> value, list -> grid, ``{kind: ...}`` -> that kind; errors name ``name``."""
        if isinstance(raw, ParamSpec):
            spec = raw
        elif isinstance(raw, Mapping):
            if len(raw) != 1 or next(iter(raw)) not in SPEC_KINDS:
                raise ConfigError(f"{name}={dict(raw)!r}: write a scalar, a list (grid) or one of "
                                  f"{{kind: values}} with kind in {list(SPEC_KINDS)}")
            kind, vals = next(iter(raw.items()))
            vals = [vals] if kind == "value" else vals
            if not isinstance(vals, (list, tuple)):
                raise ConfigError(f"{name}.{kind}: expected a list, got {vals!r}")
            spec = cls(kind, tuple(vals))
        elif isinstance(raw, (list, tuple)):
            spec = cls("grid", tuple(raw))
        else:
            spec = cls("value", (raw,))
        # YAML 1.1 reads "1e-5" as a string; numbers written that way are numbers.
        spec = cls(spec.kind, tuple(_number(v) for v in spec.values))
        spec._check(name, integer)
        if integer:
            spec = cls(spec.kind, tuple(int(v) for v in spec.values))
        return spec

    def _check(self, name: str, integer: bool) -> None:
        if self.kind not in SPEC_KINDS:
            raise ConfigError(f"{name}: unknown kind {self.kind!r}; choose one of {list(SPEC_KINDS)}")
        if not self.values:
            raise ConfigError(f"{name}.{self.kind}: needs at least one value")
        for v in self.values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name}.{self.kind}: {v!r} is not a finite number")
        if self.kind in ("uniform", "loguniform"):
            if integer:
                raise ConfigError(f"{name}: whole-number parameter; use a value, a grid list or {{choice: [...]}}, "
                                  f"not {self.kind}")
            if len(self.values) != 2 or not self.values[0] < self.values[1]:
                raise ConfigError(f"{name}.{self.kind}={list(self.values)!r}: give [low, high] with low < high")
            if self.kind == "loguniform" and self.values[0] <= 0:
                raise ConfigError(f"{name}.loguniform={list(self.values)!r}: the low end must be > 0")
        elif self.kind == "value" and len(self.values) != 1:
            raise ConfigError(f"{name}.value: expected one value, got {list(self.values)!r}")
        if integer and any(float(v) != int(v) for v in self.values):
            raise ConfigError(f"{name}={list(self.values)!r}: must be whole numbers")
        if self.kind in ("grid", "choice") and len(set(self.values)) != len(self.values):
            raise ConfigError(f"{name}.{self.kind}={list(self.values)!r} repeats a value")

    @property
    def candidates(self) -> tuple[Any, ...]:
        """Values a trial can take (the two ends for ranges): what config validation tries."""
        return self.values

    @property
    def grid_size(self) -> int:
        return len(self.values) if self.kind == "grid" else 1

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "value":
            return self.values[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        return tune.loguniform(*self.values)

    def describe(self) -> str:
        if self.kind == "value":
            return repr(self.values[0])
        return f"{self.kind}{list(self.values)}"


@dataclass
class SearchSpace:
    num_experts: Any = field(default_factory=lambda: [2, 4, 8])
    """Experts per upcycled layer (default: grid over 2, 4, 8)."""
    top_k: Any = None
    """Experts per token; None keeps the stage-2 config's value (top-1 by default)."""
    capacity_factor: Any = None
    """Training capacity factor; None keeps the stage-2 config's value."""
    aux_loss_coef: Any = None
    """Load-balancing loss coefficient; None keeps the stage-2 config's value."""
    lr: Any = None
    """Base learning rate (stage-2 ``train.lr``); None keeps the stage-2 config's value."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other stage-2 field by dotted path, e.g. ``{"train.warmup_steps": [0, 10]}``."""

    def __post_init__(self) -> None:
        for name in PARAM_PATHS:
            raw = getattr(self, name)
            if raw is not None:
                setattr(self, name, ParamSpec.parse(raw, f"space.{name}", integer=name in INTEGER_PARAMS))
        parsed = {}
        for path, raw in (self.extra or {}).items():
            if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
                raise ConfigError(f"space.extra: {path!r} is not a dotted stage-2 field path")
            if path in PARAM_PATHS.values():
                name = next(k for k, v in PARAM_PATHS.items() if v == path)
                raise ConfigError(f"space.extra.{path}: search it as space.{name} instead")
            parsed[path] = ParamSpec.parse(raw, f"space.extra.{path}")
        self.extra = parsed

    def specs(self) -> dict[str, ParamSpec]:
        """``{trial config key: spec}``: named parameters by name, extras by dotted path."""
        out = {name: getattr(self, name) for name in PARAM_PATHS if getattr(self, name) is not None}
        out.update(self.extra)
        return out

    def to_tune(self) -> dict[str, Any]:
        """Tune ``param_space`` (flat: named keys and dotted extra paths)."""
        return {key: spec.to_tune() for key, spec in self.specs().items()}

    def grid_size(self) -> int:
        return math.prod(spec.grid_size for spec in self.specs().values())

    def candidate_points(self) -> Iterator[dict[str, Any]]:
        """Every combination of candidate values (range ends included): all discrete trials a
        sweep can produce, so checking each one validates the sweep before anything runs."""
        specs = self.specs()
        keys = list(specs)
        for combo in itertools.product(*(specs[k].candidates for k in keys)):
            yield dict(zip(keys, combo))


def stage_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's params -> nested stage-2 config overrides (``{"moe": {"num_experts": 4}, ...}``)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        path = PARAM_PATHS.get(key, key)
        node = out
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out
