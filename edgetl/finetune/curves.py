"""``curves.png``: the phases' training histories, one after the other."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgetl.finetune.phases import PHASES


def plot_curves(phases: dict, path: Path) -> None:
    """Accuracy and loss per epoch, phases one after the other; each phase's best epoch (the weights early stopping
    kept) marked on its validation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = 0
    for name in PHASES:
        rec = phases.get(name, {})
        hist = rec.get("history")
        if not hist:
            continue
        n = len(hist.get("loss", []))
        xs = np.arange(offset + 1, offset + n + 1)
        best = rec.get("best_epoch")
        for key, ax in (("accuracy", axes[0]), ("loss", axes[1])):
            if key in hist:
                ax.plot(xs, hist[key], label=f"{name} train")
            if f"val_{key}" in hist:
                (line,) = ax.plot(xs, hist[f"val_{key}"], "--", label=f"{name} val")
                if best and 1 <= best <= n:
                    ax.plot(
                        [offset + best],
                        [hist[f"val_{key}"][best - 1]],
                        marker="*",
                        markersize=13,
                        color=line.get_color(),
                        linestyle="none",
                        label=f"{name} best (epoch {best})" if key == "accuracy" else None,
                    )
                    ax.axvline(offset + best, color=line.get_color(), alpha=0.25, linewidth=1)
        offset += n
    for ax, title in zip(axes, ("accuracy", "loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch (phases in order)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
