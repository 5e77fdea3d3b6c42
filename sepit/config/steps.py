"""The one registry of sepit's steps: name -> where its config class and run function live.

``sepit.cli`` (commands), ``sepit.pipeline`` (the steps it chains, and the typed recipe of each)
and the stage commands (their config class) all read it.  Modules are imported only when a step
is used, so ``sepit --help`` and the commands that do not train never import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Step:
    command: str
    """The ``sepit`` sub-command (and ``jobs/`` entry point) that runs this step alone."""
    module: str
    """Module holding the config class, the run function and the command's argument parser."""
    config: str
    """Name of the step's config dataclass in ``module``."""
    run: str
    """Name of the step's Python entry point in ``module`` (what the pipeline calls)."""
    help: str
    """One line for ``sepit --help``."""

    def load(self) -> tuple[type, Callable[..., Any]]:
        """(config class, run function), importing the module now."""
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.run)


#: The pipeline's steps, in pipeline order, then the steps only run on their own.
STEPS: dict[str, Step] = {
    "preprocess": Step("preprocess", "sepit.data.preprocess", "PreprocessConfig", "run_preprocess",
                       "structure files -> validated protein store (Ray Data)"),
    "dataset": Step("build-dataset", "sepit.data.build", "BuildConfig", "build_dataset",
                    "protein store + annotations -> stage 0/1/2 instruction data"),
    "stage0": Step("stage0", "sepit.train.stage0", "Stage0JobConfig", "run_stage0",
                   "stage 0: structure warm-up of the protein encoder"),
    "stage1": Step("stage1", "sepit.train.stage1", "Stage1JobConfig", "run_stage1",
                   "stage 1: caption instruction tuning"),
    "stage2": Step("stage2", "sepit.train.stage2", "Stage2JobConfig", "run_stage2",
                   "stage 2: MoE instruction tuning"),
    "evaluate": Step("evaluate", "sepit.evaluation.run", "EvaluateConfig", "evaluate",
                     "batched generation + metrics + report"),
    "sweep": Step("sweep-experts", "sepit.tune.sweep", "SweepConfig", "run_sweep",
                  "Ray Tune sweep of stage 2 over expert counts"),
}
#: The steps ``sepit pipeline`` chains, in order.
PIPELINE_STEPS = ("preprocess", "dataset", "stage0", "stage1", "stage2", "evaluate")
