"""The paper's two analyses as pictures: mIoU against the global threshold, and the spread of
per-image optimal thresholds, for one or several map sets (e.g. CAM vs AMN)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amnseg.io import atomic_path

COLORS = ["#d1495b", "#00798c", "#edae49", "#66a182", "#2e4057", "#8d96a3"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
    _pyplot().close(figure)
    return path


def plot_sweep(results: dict[str, dict], path: Path) -> Path:
    """mIoU (%) vs threshold for each map set; best points marked, robust range shaded."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    low, high = next(iter(results.values()))["robust_range"]
    axis.axvspan(low, high, color="0.92", zorder=0, label=f"range {low:.2f}-{high:.2f}")
    for color, (name, result) in zip(COLORS, results.items(), strict=False):
        thresholds = np.array(result["thresholds"])
        values = 100 * np.array(result["miou"])
        spread = result.get("miou_range")
        label = f"{name}: best {100 * result['best_miou']:.1f} @ {result['best_threshold']:.2f}"
        if spread is not None:
            label += f", range {100 * spread:.1f}"
        axis.plot(thresholds, values, "-o", color=color, markersize=3.5, linewidth=2, label=label)
        axis.plot([result["best_threshold"]], [100 * result["best_miou"]], "*", color=color,
                  markersize=14, markeredgecolor="black", markeredgewidth=0.6)
    axis.set_xlabel("global background threshold")
    axis.set_ylabel("mIoU (%)")
    axis.set_title("Seed mIoU against the threshold")
    axis.grid(alpha=0.35)
    axis.set_xlim(min(r["thresholds"][0] for r in results.values()),
                  max(r["thresholds"][-1] for r in results.values()))
    axis.legend(fontsize=8, loc="lower center")
    return _save(figure, path)


def plot_optimal_threshold_histogram(results: dict[str, dict], path: Path) -> Path:
    """Histogram of each image's optimal threshold, overlaid per map set."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    first = next(iter(results.values()))["thresholds"]
    step = first[1] - first[0] if len(first) > 1 else 0.05
    edges = np.arange(first[0] - step / 2, first[-1] + step, step)
    for color, (name, result) in zip(COLORS, results.items(), strict=False):
        optima = np.array(list(result["optimal_thresholds"].values()))
        if optima.size == 0:
            continue
        axis.hist(optima, bins=edges, alpha=0.55, color=color, edgecolor="white",
                  weights=np.full(optima.size, 100.0 / optima.size),
                  label=f"{name}: mean {optima.mean():.2f}, std {optima.std():.2f}")
    axis.set_xlabel("per-image optimal threshold")
    axis.set_ylabel("images (%)")
    axis.set_title("Where each image's best threshold lies")
    axis.grid(alpha=0.35)
    axis.legend(fontsize=8)
    return _save(figure, path)
