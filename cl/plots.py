"""Run plots: the accuracy-matrix heat-map and the accuracy curve (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_matrix(R: np.ndarray, path: str | Path, title: str = "") -> None:
    """Heat-map of R[t, k] (rows: after training on t; columns: test experience k)."""
    plt = pyplot()
    R = np.asarray(R, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * R.shape[1], 1.0 + 0.6 * R.shape[0]))
    im = ax.imshow(R * 100, vmin=0, vmax=100, cmap="viridis")
    for t in range(R.shape[0]):
        for k in range(R.shape[1]):
            if np.isnan(R[t, k]):  # untested (R is NaN above the diagonal without eval_future)
                continue
            ax.text(k, t, f"{100 * R[t, k]:.0f}", ha="center", va="center",
                    color="white" if R[t, k] < 0.6 else "black", fontsize=8)
    ax.set_xlabel("test experience k")
    ax.set_ylabel("after training on t")
    ax.set_xticks(range(R.shape[1]))
    ax.set_yticks(range(R.shape[0]))
    ax.set_title(title or "accuracy matrix R[t, k] (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(y: list[float] | np.ndarray, path: str | Path, *, xlabel: str = "experience",
               ylabel: str = "accuracy on seen classes A_t (%)", title: str = "",
               x: list[float] | None = None, label: str | None = None) -> None:
    """A simple line plot (accuracy curve, accuracy vs round, ...)."""
    plt = pyplot()
    y = 100 * np.asarray(y, dtype=float)
    x = list(range(1, len(y) + 1)) if x is None else x
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if label:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
