"""Pictures for the run report: colourised label maps, heat maps, gallery rows, and the
foreground/background activation histograms."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from amnseg.data.voc import voc_palette


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """(H, W) uint8 class ids (255 = ignore) -> (H, W, 3) uint8 in the VOC palette."""
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[labels]


def heatmap(scores: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.55) -> np.ndarray:
    """(K, H, W) maps -> (H, W, 3) uint8 jet heat map of their per-pixel max (over the image)."""
    from matplotlib import colormaps

    peak = scores.max(axis=0) if len(scores) else np.zeros(scores.shape[1:], np.float32)
    colored = colormaps["jet"](np.clip(peak, 0.0, 1.0))[..., :3] * 255
    if image is not None:
        colored = alpha * colored + (1 - alpha) * image
    return colored.astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def activation_histograms(
    samples: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 40
) -> Path:
    """Histograms of the max activation on GT foreground vs background pixels, one panel per
    map set. ``samples``: name -> (foreground values, background values)."""
    from matplotlib.figure import Figure

    from amnseg.report.plots import save_figure

    figure = Figure(figsize=(5.2 * len(samples), 3.6), dpi=120)
    axes = figure.subplots(1, len(samples), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for axis, (name, (fg, bg)) in zip(axes[0], samples.items(), strict=True):
        axis.hist(bg, bins=edges, alpha=0.6, density=True, color="#4c72b0",
                  label=f"background (mean {bg.mean():.2f})" if len(bg) else "background")
        axis.hist(fg, bins=edges, alpha=0.6, density=True, color="#dd8452",
                  label=f"foreground (mean {fg.mean():.2f})" if len(fg) else "foreground")
        gap = (fg.mean() if len(fg) else 0) - (bg.mean() if len(bg) else 0)
        axis.set_title(f"{name}: FG-BG gap {gap:.2f}")
        axis.set_xlabel("activation (max over the image's classes)")
        axis.set_ylabel("density")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
