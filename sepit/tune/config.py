"""``SweepConfig``: a Ray Tune sweep of stage 2 over expert counts (and top-k, capacity, aux, lr).

Every trial is one stage-2 training run (:func:`sepit.train.stage2.run_stage2`) started from the
same stage-1 model, with the trial's sampled values written into its stage-2 config.  The
``stage2`` section is the typed stage-2 config shared by all trials (a ``Stage2JobConfig``:
``init`` = the stage-1 folder or MLflow run id, ``data.dataset_dir``, ``train``, ``moe`` ...): the
stage-2 section of the recipe named by ``preset`` (:mod:`sepit.config.recipes`, the same stage 2
that ``sepit stage2`` and ``sepit pipeline`` train) with the fields given under ``stage2`` on top; the sweep sets each trial's ``train.output_dir``
(``<out>/trials/<trial_id>``), ``train.run_name``, ``train.tracking_uri`` and
``train.parent_run_id`` itself.

:func:`validate_sweep` builds the stage-2 config of every discrete trial the space can produce
(range ends included) before Ray starts, so a bad combination fails in a second with its name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping, Optional

from sepit.config.base import ConfigError, check_range, from_dict, merge, to_dict

from .space import PARAM_PATHS, SearchSpace, stage_overrides

if TYPE_CHECKING:
    from sepit.train.stage2 import Stage2JobConfig

#: Stage-2 ``train`` fields the sweep owns per trial (user values are replaced).
TRIAL_OWNED_TRAIN_FIELDS = ("output_dir", "run_name", "tracking_uri", "parent_run_id", "ray_address")
#: Most trials validate_sweep will dry-build (a larger space is checked on its first N points).
MAX_VALIDATED_POINTS = 10_000


@dataclass
class SweepConfig:
    out: str = "runs/sweep"
    """Output folder: trials/<trial_id>/ (each trial's stage-2 run), tune/ (Ray Tune state),
    sweep_results.csv, best.json, sweep.md, config.yaml, mlflow.db (default store)."""
    preset: Literal["tiny", "small", "paper"] = "small"
    """Recipe (sepit.config.recipes) whose stage-2 section the ``stage2`` fields go on top of."""
    stage2: Any = field(default_factory=dict)
    """The stage-2 config shared by all trials (a ``Stage2JobConfig``; given as a mapping of its
    fields, which go on the recipe's stage-2 section: ``init`` is required, ``data.dataset_dir``)."""
    space: SearchSpace = field(default_factory=SearchSpace)
    """What the trials vary (see sepit.tune.space)."""
    num_samples: int = 1
    """Repeats of the grid; sampled parameters are re-drawn for every repeat."""
    max_concurrent_trials: int = 1
    """Trials running at once (each runs its own Ray Train workers)."""
    metric: str = "val_lm_loss"
    """Objective: a validation metric the stage-2 run reports (at every eval and at the end).
    The default is the validation LM loss: ``val_loss`` adds ``aux_loss_coef x aux loss``, so it
    is not comparable across trials with different aux coefficients."""
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["none", "asha"] = "none"
    """``asha`` stops poor trials early, judged on the validation metric every ``train.eval_every`` steps."""
    grace_period: int = 10
    """ASHA: optimizer steps every trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: keep 1/reduction_factor of the trials at each rung."""
    seed: Optional[int] = 0
    """Seed of the search (sampled values); trials all train with stage2.train.seed, so they
    see the same data order and differ only in the searched values."""
    trial_cpus: float = 0.01
    """CPUs reserved by the trial itself; its Ray Train workers reserve their own
    (stage2.train.num_workers x cpus_per_worker), so the trial needs ~0."""
    trial_max_failures: int = 0
    """Times Tune restarts a trial that raised (stage 2 itself already retries worker failures)."""
    num_cpus: Optional[int] = None
    """Logical CPUs of a local Ray; default: enough for the concurrent trials' workers and their
    data feeding (may exceed the cores, see docs/environment.md)."""
    ray_address: Optional[str] = None
    """Ray cluster to join; default ``RAY_ADDRESS`` or a local Ray on loopback."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; default ``MLFLOW_TRACKING_URI``, else sqlite at ``<out>/mlflow.db``."""
    experiment: str = "sepit"
    """MLflow experiment of the sweep run and its nested trial runs."""
    run_name: str = "sweep-experts"
    """Name of the sweep's MLflow run."""
    parent_run_id: Optional[str] = None
    """MLflow run to nest the sweep run under (e.g. a pipeline run)."""

    def __post_init__(self) -> None:
        check_range(self.num_samples, "num_samples", lo=1)
        check_range(self.max_concurrent_trials, "max_concurrent_trials", lo=1)
        check_range(self.grace_period, "grace_period", lo=1)
        check_range(self.reduction_factor, "reduction_factor", lo=1, lo_inclusive=False)
        check_range(self.trial_cpus, "trial_cpus", lo=0)
        check_range(self.trial_max_failures, "trial_max_failures", lo=-1)
        if self.num_cpus is not None:
            check_range(self.num_cpus, "num_cpus", lo=1)
        if not self.out:
            raise ConfigError("out: an output folder is required")
        if not self.metric.startswith("val_"):
            raise ConfigError(f"metric={self.metric!r}: the objective is a validation metric of the stage-2 run "
                              "(val_lm_loss, val_loss, ...)")
        self.stage2 = shared_stage2(self.preset, self.stage2)
        if not self.stage2.init:
            raise ConfigError("stage2.init is required: the stage-1 model folder (or its MLflow run id) "
                              "every trial starts from")

    def stage2_dict(self) -> dict[str, Any]:
        """The shared stage-2 config as a dict (what every trial's values go on)."""
        return to_dict(self.stage2)

    @property
    def out_path(self) -> Path:
        return Path(self.out).resolve()

    @property
    def n_trials(self) -> int:
        return self.space.grid_size() * self.num_samples


def shared_stage2(preset: str, stage2: Any) -> "Stage2JobConfig":
    """``stage2`` as a typed ``Stage2JobConfig``: a mapping goes on the stage-2 section of recipe
    ``preset``; a ``Stage2JobConfig`` is kept.  Errors name ``stage2.<field>``."""
    from sepit.config.recipes import sections
    from sepit.train.stage2 import Stage2JobConfig

    if isinstance(stage2, Stage2JobConfig):
        return stage2
    if not isinstance(stage2, Mapping):
        raise ConfigError(f"stage2: expected a mapping of stage-2 config fields, got {type(stage2).__name__}")
    try:
        return from_dict(Stage2JobConfig, merge(sections(preset)["stage2"], dict(stage2)))
    except ConfigError as exc:
        raise ConfigError(f"stage2.{exc}") from None


def load_sweep(preset: str | None = None, path: str | Path | None = None,
               flags: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> SweepConfig:
    """The sweep's config: ``preset`` (which recipe's stage-2 section the ``stage2`` section goes
    on) <- YAML file <- named flags <- dotted overrides."""
    from sepit.config.recipes import DEFAULT_PRESET, load

    return load(SweepConfig, None, preset, path, flags, overrides, base={"preset": preset or DEFAULT_PRESET},
                prepare=prepare_sweep_data)


def prepare_sweep_data(data: dict[str, Any]) -> dict[str, Any]:
    """The loader's hook (:func:`sepit.config.recipes.load`): ``space`` is built here, not by
    from_dict, for an error that lists what can be searched."""
    space = data.get("space")
    if isinstance(space, dict):
        data = dict(data, space=SearchSpace(**_space_kwargs(space)))
    return data


def _space_kwargs(space: dict[str, Any]) -> dict[str, Any]:
    known = set(PARAM_PATHS) | {"extra"}
    unknown = sorted(set(space) - known)
    if unknown:
        raise ConfigError(f"space: unknown parameter(s) {unknown}; search {sorted(PARAM_PATHS)} "
                          "or add a stage-2 field under space.extra by its dotted path")
    return dict(space)


def trial_stage_dict(cfg: SweepConfig, params: dict[str, Any], *, output_dir: str, run_name: str,
                     tracking_uri: str | None, parent_run_id: str | None) -> dict[str, Any]:
    """The stage-2 config dict of one trial: shared section <- trial values <- sweep-owned paths."""
    data = merge(cfg.stage2_dict(), stage_overrides(params))
    # Trials are candidates, not releases: none is registered in the MLflow model registry (each
    # would move the stage's alias); the best trial's folder is in best.json.
    owned = {"output_dir": output_dir, "run_name": run_name, "tracking_uri": tracking_uri,
             "parent_run_id": parent_run_id, "ray_address": None, "registered_model": ""}
    return merge(data, {"train": owned})


def _check_point(point: dict[str, Any], stage: Any, where: str) -> None:
    moe, train = stage.moe, stage.train
    if moe.top_k > moe.num_experts:
        raise ConfigError(f"{where}: top_k={moe.top_k} exceeds num_experts={moe.num_experts}")
    if train.zero_stage > 2:
        raise ConfigError(f"{where}: stage2.train.zero_stage={train.zero_stage}: DeepSpeed MoE refuses "
                          "ZeRO-3; stage-2 sweeps run ZeRO 0-2")


def validate_sweep(cfg: SweepConfig) -> list[Any]:
    """Dry-build the stage-2 config of every candidate trial; returns them (typed Stage2JobConfig).

    Raises :class:`ConfigError` naming the trial values and the reason for the first bad one, or
    when the dataset has no stage-2 training split.
    """
    from sepit.train.data import DatasetNotFoundError, count_rows, split_path
    from sepit.train.stage2 import Stage2JobConfig

    built = []
    for i, point in enumerate(cfg.space.candidate_points()):
        if i >= MAX_VALIDATED_POINTS:
            break
        where = "trial " + ", ".join(f"{k}={v}" for k, v in point.items()) if point else "trial"
        try:
            stage = from_dict(Stage2JobConfig, trial_stage_dict(
                cfg, point, output_dir=str(cfg.out_path / "trials" / "validate"), run_name="validate",
                tracking_uri=None, parent_run_id=None))
        except ConfigError as exc:
            raise ConfigError(f"{where}: stage2.{exc}") from None
        _check_point(point, stage, where)
        built.append(stage)
    first = built[0]
    aux = cfg.space.aux_loss_coef
    if cfg.metric == "val_loss" and aux is not None and aux.kind != "value":
        warnings.warn("metric=val_loss includes aux_loss_coef x aux loss, and the sweep varies aux_loss_coef: "
                      "trials are not compared on the same loss (use metric=val_lm_loss)", stacklevel=2)
    if cfg.scheduler == "asha":
        tr = first.train
        if tr.eval_every == 0:
            raise ConfigError("scheduler=asha needs intermediate validation losses: set stage2.train.eval_every "
                              f"to a step count below train.max_steps={tr.max_steps}")
        if cfg.grace_period >= tr.max_steps:
            raise ConfigError(f"grace_period={cfg.grace_period} must be below stage2.train.max_steps={tr.max_steps} "
                              "or no trial can be stopped early")
        if cfg.grace_period < tr.eval_every:
            raise ConfigError(f"grace_period={cfg.grace_period} is shorter than stage2.train.eval_every="
                              f"{tr.eval_every}: trials are only judged at validation steps")
    try:
        for split in ("train", "val"):
            split_path(first.data.dataset_dir, "stage2", split)
    except DatasetNotFoundError as exc:
        raise ConfigError(f"stage2.data.dataset_dir: {exc}") from None
    if count_rows(first.data.dataset_dir, "stage2", "val") == 0:
        raise ConfigError(f"stage2.data.dataset_dir: {first.data.dataset_dir}/stage2/val.parquet has no rows; "
                          f"the sweep's objective {cfg.metric} needs a validation split")
    return built


def resolve_inputs(cfg: SweepConfig, tracking_uri: str | None) -> SweepConfig:
    """A copy of ``cfg`` whose ``stage2.init`` is the local stage-1 model folder (an MLflow run id
    is fetched once, into ``<out>/init``, so every trial, on any node sharing ``out``, reads the
    same copy) and whose dataset folder is absolute (Tune runs each trial in its own working
    folder)."""
    from sepit.train.lineage import ParentNotFoundError, resolve_parent
    from sepit.train.stage2 import SEPIT_MODEL_TYPE
    from sepit.train.stage_common import StageInitError, check_model_folder

    try:
        parent = resolve_parent(str(cfg.stage2.init), tracking_uri, download_to=cfg.out_path / "init")
        check_model_folder(parent.path, SEPIT_MODEL_TYPE, "a stage-1 SEPIT model export")
    except (ParentNotFoundError, StageInitError) as exc:
        raise ConfigError(f"stage2.init: {exc}") from None
    saved = json.loads((Path(parent.path) / "config.json").read_text())
    if (saved.get("sepit") or {}).get("moe"):
        raise ConfigError(f"stage2.init: {parent.path} is already an MoE (stage-2) model; "
                          "the sweep upcycles a dense stage-1 model")
    data = dataclasses.replace(cfg.stage2.data, dataset_dir=str(Path(cfg.stage2.data.dataset_dir).resolve()))
    return dataclasses.replace(cfg, stage2=dataclasses.replace(cfg.stage2, init=parent.path, data=data))


def local_cpus_needed(cfg: SweepConfig, stage: Any) -> int:
    """Logical CPUs a local Ray needs: the concurrent trials' workers plus one for each trial's
    Ray Data feeding and one spare (a starved data pipeline hangs the trainer, docs/environment.md)."""
    tr = stage.train
    workers = cfg.max_concurrent_trials * tr.num_workers * tr.cpus_per_worker
    return math.ceil(workers + cfg.max_concurrent_trials * cfg.trial_cpus) + cfg.max_concurrent_trials + 1
