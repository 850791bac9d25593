"""The paper's two analyses as pictures: mIoU against the global threshold, and the spread of
per-image optimal thresholds, for one or several map sets (e.g. CAM vs AMN).

Both take ``{display name: evaluate_maps result}`` (the ``<name>_sweep.json`` contents). The
figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot's global state,
so they render headless (Agg) without switching the backend of a caller's interactive session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from amnseg.io import atomic_path

COLORS = ["#d1495b", "#00798c", "#edae49", "#66a182", "#2e4057", "#8d96a3"]
FIGSIZE = (7.0, 4.4)
DPI = 120


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _check(results: dict[str, dict[str, Any]]) -> None:
    if not results:
        raise ValueError("nothing to plot: no evaluation results given")


def _percent(values: Any) -> np.ndarray:
    """mIoU fractions (null = undefined) as percentages (NaN)."""
    return 100 * np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _robust_range(results: dict[str, dict[str, Any]]) -> tuple[float, float] | None:
    for result in results.values():
        if result.get("robust_range"):
            low, high = result["robust_range"]
            return float(low), float(high)
    return None


def plot_sweep(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """mIoU (%) against the global background threshold, one curve per map set.

    Each curve's best threshold is starred (and dotted down to the axis); the robust range of
    the evaluation (where a flat curve means threshold robustness) is shaded and the legend
    gives each set's best mIoU and its max - min spread within that range.
    """
    _check(results)
    figure = Figure(figsize=FIGSIZE)
    axis = figure.add_subplot()
    span = _robust_range(results)
    if span is not None:
        axis.axvspan(*span, color="0.9", zorder=0,
                     label=f"robust range {span[0]:.2f}–{span[1]:.2f}")
    lowest = np.inf
    for color, (name, result) in zip(COLORS * len(results), results.items(), strict=False):
        thresholds = np.asarray(result["thresholds"], dtype=np.float64)
        values = _percent(result["miou"])
        best_t, best = result["best_threshold"], 100 * result["best_miou"]
        label = f"{name}: best {best:.1f}% at t={best_t:.2f}"
        if result.get("miou_range") is not None:
            label += f", spread {100 * result['miou_range']:.1f} pts in range"
        axis.plot(thresholds, values, "-o", color=color, linewidth=2, markersize=3.5,
                  label=label, zorder=3)
        axis.axvline(best_t, color=color, linestyle=":", linewidth=1.2, zorder=2)
        axis.plot([best_t], [best], "*", color=color, markersize=15, markeredgecolor="black",
                  markeredgewidth=0.7, zorder=4)
        lowest = min(lowest, np.nanmin(values))
    thresholds = [t for r in results.values() for t in r["thresholds"]]
    axis.set_xlim(min(thresholds), max(thresholds))
    if np.isfinite(lowest):
        axis.set_ylim(max(0.0, lowest - 5), None)
    axis.set_xlabel("global background threshold t")
    axis.set_ylabel("mIoU (%)")
    axis.set_title("Map mIoU against the background threshold")
    axis.grid(alpha=0.35)
    # Below the axes: inside, it would hide the low ends of the curves.
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    return save_figure(figure, path)


def _bin_edges(results: dict[str, dict[str, Any]]) -> np.ndarray:
    """Bin edges centred on the sweep thresholds (optima only ever take those values)."""
    grid = np.unique([t for r in results.values() for t in r["thresholds"]])
    if grid.size == 1:
        return np.array([grid[0] - 0.025, grid[0] + 0.025])
    middles = (grid[1:] + grid[:-1]) / 2
    return np.concatenate([[grid[0] - (middles[0] - grid[0])], middles,
                           [grid[-1] + (grid[-1] - middles[-1])]])


def plot_optimal_threshold_histogram(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Histogram of each image's optimal threshold (share of images, %), overlaid per map set,
    with each set's mean marked and its mean +- std in the legend. A wide spread is the paper's
    argument that one global threshold cannot suit every image."""
    _check(results)
    figure = Figure(figsize=FIGSIZE)
    axis = figure.add_subplot()
    edges = _bin_edges(results)
    drawn = False
    for color, (name, result) in zip(COLORS * len(results), results.items(), strict=False):
        optima = np.asarray(list(result.get("optimal_thresholds", {}).values()), np.float64)
        if optima.size == 0:
            continue
        weights = np.full(optima.size, 100.0 / optima.size)
        label = f"{name}: mean {optima.mean():.2f} ± {optima.std():.2f} (n={optima.size})"
        axis.hist(optima, bins=edges, weights=weights, histtype="stepfilled", alpha=0.4,
                  color=color, label=label)
        axis.hist(optima, bins=edges, weights=weights, histtype="step", linewidth=1.6,
                  color=color)
        axis.axvline(optima.mean(), color=color, linestyle="--", linewidth=1.5)
        drawn = True
    axis.set_xlim(edges[0], edges[-1])
    axis.set_xlabel("per-image optimal threshold")
    axis.set_ylabel("images (%)")
    axis.set_title("Where each image's best threshold lies")
    axis.grid(alpha=0.35)
    if drawn:
        axis.legend(fontsize=8, framealpha=0.9)
    else:
        axis.text(0.5, 0.5, "no per-image optima", transform=axis.transAxes, ha="center")
    return save_figure(figure, path)
