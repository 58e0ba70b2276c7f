"""Training curves: loss components and validation map_50 per epoch, as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib
from matplotlib.figure import Figure

from lipdet.io import atomic_path


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw ``history`` (one dict per epoch, as in ``metrics.jsonl``) into ``path`` (PNG, atomically).

    Left: training loss and its parts (loc, cls) per epoch. Right: validation map_50 (and map),
    titled with the last record's ``validation`` (``"validation (400 images held out of train, seed
    0)"``: the images the run validated on). An empty history still yields a (blank-axes) figure,
    so callers never special-case it.
    """
    matplotlib.use("Agg", force=False)
    path = Path(path)
    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_map = fig.subplots(1, 2)
    for key, style in (("loss", "-"), ("loc", "--"), ("cls", ":")):
        ys = [r.get(key) for r in history]
        if epochs and all(isinstance(y, (int, float)) for y in ys):
            ax_loss.plot(epochs, ys, style, marker="o", markersize=3, label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("MultiBox loss (cls + 2 x loc)")
    ax_loss.grid(alpha=0.3)
    for key, label in (("val_map_50", "map_50"), ("val_map", "map (0.5:0.95)")):
        ys = [r.get(key) for r in history]
        if epochs and all(isinstance(y, (int, float)) for y in ys):
            ax_map.plot(epochs, ys, marker="o", markersize=3, label=label)
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("validation mAP")
    ax_map.set_ylim(0.0, 1.0)
    ax_map.set_title(str(history[-1].get("validation") or "validation") if history else "validation")
    ax_map.grid(alpha=0.3)
    for ax in (ax_loss, ax_map):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
