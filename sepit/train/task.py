"""What a training stage plugs into the generic loop (:mod:`sepit.train.loop`).

A :class:`TrainTask` owns everything stage-specific: building the model on a worker, its
parameter groups (lr ratios, frozen modules), turning dataset rows into a batch, the loss, the
validation metrics and the export.  The loop owns distribution, DeepSpeed, schedule, clipping,
checkpoints and logging.  Tasks are pickled to every Ray Train worker, so they hold configs and
paths, never built models or open files.

``model`` arguments receive the DeepSpeed engine (calling it runs the wrapped module's forward
with ZeRO hooks); use :func:`unwrap` for the plain module's other methods.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import torch


def unwrap(model: Any) -> torch.nn.Module:
    """The ``nn.Module`` behind a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside dicts / lists / tuples / dataclasses to ``device`` (others unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, str):
        moved = [to_device(v, device) for v in obj]
        return type(obj)(moved) if not hasattr(obj, "_fields") else type(obj)(*moved)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


class TrainTask:
    """Base class of a stage's training task; subclasses override the methods marked *required*."""

    #: Stage name used in logs, MLflow and lineage (``stage0`` ...).
    stage: str = "task"
    #: True when the model holds DeepSpeed MoE layers (stage 2): ZeRO <= 2 and MoE optimizer groups.
    uses_moe: bool = False
    #: Parquet columns the task reads (None = all).
    columns: list[str] | None = None

    # ------------------------------------------------------------------ model (required)
    def build_model(self) -> torch.nn.Module:
        """Build the model on the worker (the loop has seeded the RNGs identically on all ranks)."""
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
        """Trainable parameter groups, each ``{"name": str, "params": [...], "lr": float}``.

        Frozen parameters must have ``requires_grad=False`` and appear in no group.  The default
        is one group of every trainable parameter at ``lr``.
        """
        return [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    # ------------------------------------------------------------------ data (required)
    def row_length(self, row: dict[str, Any]) -> int:
        """Length used to bucket rows into similarly sized batches (e.g. residues + text tokens)."""
        raise NotImplementedError

    def collate(self, rows: list[dict[str, Any]], *, train: bool) -> dict[str, Any]:
        """Rows -> one batch, padded to its own longest example.

        Must return ``num_examples`` and ``num_tokens`` (non-padding tokens, for tokens/s) as ints
        alongside the tensors.  Raise a clear error naming the row id for bad rows.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ losses (required)
    def forward_loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss to back-propagate and its parts as floats (e.g. ``lm_loss``, ``aux_loss``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional hooks
    def evaluate(self, model: Any, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Validation metrics over this rank's batches, reduced over ranks.

        The example-weighted mean of the loss (``val_loss``) and of every loss part
        (``val_<part>``) of :meth:`validation_step`, plus :meth:`validation_metrics` of its
        counters summed over batches and ranks.  Every rank must run the same number of batches
        (the loop guarantees it) because ZeRO-3 forwards are collective.
        """
        import torch.distributed as dist

        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        n = 0.0
        for batch in batches:
            loss, parts, counters = self.validation_step(model, batch)
            k = float(batch["num_examples"])
            for name, v in {"loss": float(loss.detach()), **parts}.items():
                sums[name] = sums.get(name, 0.0) + float(v) * k
            for name, v in counters.items():
                counts[name] = counts.get(name, 0.0) + float(v)
            n += k
        # the same keys on every rank: each runs the same number of batches of the same task
        keys, count_keys = sorted(sums), sorted(counts)
        t = torch.tensor([sums[k] for k in keys] + [counts[k] for k in count_keys] + [n], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            t = t.to(next(unwrap(model).parameters()).device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(t)
            t = t.cpu()
        values = t.tolist()
        total = values[-1]
        if total == 0:
            return {}
        metrics = {f"val_{k}": v / total for k, v in zip(keys, values)}
        metrics.update(self.validation_metrics(dict(zip(count_keys, values[len(keys):-1]))))
        return metrics

    def validation_step(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        """(loss, loss parts, counters) of one validation batch; the default counts nothing."""
        loss, parts = self.forward_loss(model, batch)
        return loss, parts, {}

    def validation_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        """Extra validation metrics from the counters summed over batches and ranks."""
        return {}

    def step_metrics(self, model: Any) -> dict[str, float]:
        """Extra per-step metrics read from the model after a step (e.g. tokens per expert)."""
        return {}

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write the self-contained exported model folder (rank 0, plain module, full weights)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Task parameters worth logging (MLflow params, lineage)."""
        return {"stage": self.stage}
