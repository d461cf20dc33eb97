"""Figures of the HTML report, each returned as PNG bytes (matplotlib, no files, no pyplot state).

Curves over seeds are drawn as the mean with a ±1 sample-std band (:func:`curve_mean_std`); the
accuracy-matrix heat-map reuses :func:`adaptsim.cl.plots.plot_accuracy_matrix`. Accuracy
against ε (:func:`epsilon_png`, also the federated runs' ``accuracy_vs_epsilon.png``) drops
non-finite ε (no DP) and says so on the figure.
"""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["curve_mean_std", "accuracy_matrix_png", "band_png", "epsilon_png", "Series"]

#: (label, x, mean, std or None) of one curve.
Series = tuple[str, Sequence[float], Sequence[float], "Sequence[float] | None"]


def _figure(width: float = 5.2, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")  # keeps a legend below the axes
    return buf.getvalue()


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax, labels: Sequence[str]) -> None:
    """In the axes for short labels; below them for long ones (study group names can be long)."""
    if not any(labels):
        return
    if max(len(s) for s in labels) > 24:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    else:
        ax.legend(fontsize=8)


def curve_mean_std(curves: Sequence[Sequence[float | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Point-wise mean and sample std (ddof=1) of curves of possibly different lengths.

    Args:
        curves: one curve per seed; missing points (shorter curves, None) are ignored.

    Returns:
        ``(mean, std)`` of the longest length; std is NaN where fewer than two curves have a point.
    """
    n = max((len(c) for c in curves), default=0)
    a = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        a[i, : len(c)] = [np.nan if v is None else float(v) for v in c]
    count = np.sum(np.isfinite(a), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.nansum(a, axis=0) / np.maximum(count, 1), np.nan)
        dev = np.nansum((a - mean) ** 2, axis=0)
        std = np.where(count > 1, np.sqrt(dev / np.maximum(count - 1, 1)), np.nan)
    return mean, std


def accuracy_matrix_png(R: np.ndarray, title: str) -> bytes:
    """The R[t, k] heat-map (%, untested cells blank) as PNG bytes."""
    from adaptsim.cl.plots import plot_accuracy_matrix

    buf = io.BytesIO()
    plot_accuracy_matrix(np.asarray(R, dtype=float), buf, title)
    return buf.getvalue()


def band_png(series: Sequence[Series], *, xlabel: str, ylabel: str, title: str = "",
             scale: float = 100.0, ylim: tuple[float | None, float | None] | None = (0, 100)) -> bytes:
    """Mean curves with a shaded ±std band (where the std is finite).

    Args:
        series: ``(label, x, mean, std)`` per curve, values in raw units.
        xlabel, ylabel, title: axis labels and title.
        scale: multiplies every value (100 for accuracies in %).
        ylim: y range (``None`` in it leaves that end to matplotlib), or None for matplotlib's choice.
    """
    fig, ax = _figure()
    for label, x, mean, std in series:
        x = np.asarray(x, dtype=float)
        m = scale * np.asarray(mean, dtype=float)
        (line,) = ax.plot(x, m, marker="o", markersize=3, label=label)
        if std is not None:
            s = scale * np.asarray(std, dtype=float)
            ok = np.isfinite(s)
            if ok.any():
                ax.fill_between(x[ok], (m - s)[ok], (m + s)[ok], color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _integer_x(ax)
    if ylim is not None:
        ax.set_ylim(bottom=ylim[0], top=ylim[1])
    ax.grid(alpha=0.3)
    _legend(ax, [label for label, *_ in series])
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)


def epsilon_png(series: Mapping[str, tuple[Sequence[float | None], Sequence[float]]], title: str = "") -> bytes:
    """Accuracy (y, 0..1 → %) against ε spent (x) per named series; non-finite ε is dropped.

    Args:
        series: label -> (epsilons per round, accuracies per round).
        title: figure title.
    """
    fig, ax = _figure()
    drawn = 0
    for label, (eps, acc) in series.items():
        pts = [(e, a) for e, a in zip(eps, acc, strict=False) if e is not None and math.isfinite(e) and a is not None]
        if pts:
            ax.plot([e for e, _ in pts], [100 * a for _, a in pts], marker="o", markersize=3, label=label)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no DP (ε = ∞): nothing to plot", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("ε spent (max over clients)")
    ax.set_ylabel("global test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if drawn:
        _legend(ax, list(series))
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)
