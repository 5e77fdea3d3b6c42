"""The loss-curve figure logged with every stage (training loss per step, validation loss)."""

from __future__ import annotations

from pathlib import Path

from .step_log import read_step_log


def plot_loss_curve(train_log: str | Path, png: str | Path, title: str) -> Path | None:
    """Plot ``loss`` (and ``val_loss``) against the optimizer step; None when nothing was logged."""
    train = read_step_log(Path(train_log), "train")
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    val = read_step_log(Path(train_log), "val")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(list(train), [r["loss"] for r in train.values()], label="train loss", lw=1)
    if val:
        ax.plot(list(val), [r.get("val_loss", float("nan")) for r in val.values()], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
