"""Evaluation of score maps (threshold sweeps, per-image optimal thresholds) and of label maps
(seeds, pseudo masks) against the ground truth; results as JSON in the run folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from amnseg.data.base import SegDataset, read_index_png
from amnseg.errors import AmnsegError
from amnseg.io import load_score_maps, save_json
from amnseg.metrics import (
    confusion_matrix,
    foreground_background_gap,
    iou_per_class,
    miou,
    optimal_thresholds,
    scores_to_labels,
    sweep_confusions,
)


def _stems_with(folder: Path, dataset: SegDataset, suffix: str) -> list[str]:
    if not folder.is_dir():
        raise AmnsegError(f"{folder}: folder not found")
    if not dataset.has_masks:
        raise AmnsegError(f"{dataset.root}: the dataset has no ground-truth masks to evaluate on")
    stems = [s for s in dataset.stems if (folder / f"{s}{suffix}").is_file()]
    if not stems:
        raise AmnsegError(f"{folder}: holds no {suffix} file of the dataset's images")
    return stems


def _gt(dataset: SegDataset, stem: str, shape: tuple[int, ...], path: Path) -> np.ndarray:
    gt = dataset.mask(stem)
    if gt is None:
        raise AmnsegError(f"{stem}: no ground-truth mask")
    if gt.shape != tuple(shape):
        raise AmnsegError(
            f"{path}: size {shape[-1]}x{shape[-2]} differs from the ground truth "
            f"{gt.shape[1]}x{gt.shape[0]}"
        )
    return gt


def class_table(dataset: SegDataset, iou: np.ndarray) -> dict[str, float | None]:
    names = ["background", *dataset.class_names]
    return {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou, strict=True)}


def evaluate_maps(
    maps_dir: Path,
    dataset: SegDataset,
    thresholds: Sequence[float],
    out_dir: Path,
    name: str = "cam",
    threshold: float = 0.15,
    robust_range: tuple[float, float] = (0.10, 0.60),
    use: str = "full",
) -> dict[str, Any]:
    """Sweep the background threshold over score maps; write ``<out_dir>/<name>_sweep.json``.

    Reports mIoU per threshold, the best threshold and mIoU, mIoU at ``threshold``, per-class
    IoU at the best threshold, the mIoU range within ``robust_range``, each image's optimal
    threshold with their spread, the "oracle" mIoU (every image at its own optimum) and the
    foreground/background activation gap.
    """
    maps_dir = Path(maps_dir)
    stems = _stems_with(maps_dir, dataset, ".npz")
    thresholds = [float(t) for t in thresholds]
    grid = thresholds if threshold in thresholds else sorted([*thresholds, float(threshold)])
    n = dataset.num_classes + 1
    total = np.zeros((len(grid), n, n), dtype=np.int64)
    oracle = np.zeros((n, n), dtype=np.int64)
    optimum: dict[str, float] = {}
    fg_sum = bg_sum = 0.0
    fg_count = bg_count = 0
    for stem in tqdm(stems, desc=f"evaluate {name}", leave=False):
        path = maps_dir / f"{stem}.npz"
        maps = load_score_maps(path)
        scores = maps.full if use == "full" else maps.strided
        gt = _gt(dataset, stem, scores.shape[1:], path)
        confusions = sweep_confusions(scores, maps.class_ids, gt, grid, n)
        total += confusions
        best, _ = optimal_thresholds(confusions[None], grid)
        if best[0] >= 0:
            oracle += confusions[best[0]]
            optimum[stem] = grid[best[0]]
        fg, bg = foreground_background_gap(scores, gt)
        fg_sum, fg_count = fg_sum + float(fg.sum()), fg_count + fg.size
        bg_sum, bg_count = bg_sum + float(bg.sum()), bg_count + bg.size
    curve = miou(total)
    sweep = [float(curve[grid.index(t)]) for t in thresholds]
    best_index = int(np.nanargmax(sweep))
    low, high = robust_range
    in_range = [m for t, m in zip(thresholds, sweep, strict=True) if low - 1e-9 <= t <= high + 1e-9]
    optima = np.array(list(optimum.values()))
    fg_mean = fg_sum / max(fg_count, 1)
    bg_mean = bg_sum / max(bg_count, 1)
    result = {
        "name": name,
        "maps": str(maps_dir),
        "images": len(stems),
        "thresholds": thresholds,
        "miou": sweep,
        "best_threshold": thresholds[best_index],
        "best_miou": sweep[best_index],
        "threshold": float(threshold),
        "miou_at_threshold": float(curve[grid.index(float(threshold))]),
        "per_class_iou_at_best": class_table(dataset, iou_per_class(total[grid.index(
            thresholds[best_index])])),
        "robust_range": [low, high],
        "miou_range": float(max(in_range) - min(in_range)) if in_range else None,
        "oracle_miou": float(miou(oracle)),
        "optimal_threshold_mean": float(optima.mean()) if optima.size else None,
        "optimal_threshold_std": float(optima.std()) if optima.size else None,
        "optimal_threshold_quantiles": (
            {q: float(np.quantile(optima, float(q))) for q in ("0.1", "0.25", "0.5", "0.75", "0.9")}
            if optima.size else None
        ),
        "optimal_thresholds": optimum,
        "fg_mean_activation": fg_mean,
        "bg_mean_activation": bg_mean,
        "fg_bg_gap": fg_mean - bg_mean,
    }
    save_json(Path(out_dir) / f"{name}_sweep.json", result)
    return result


def evaluate_label_maps(
    folder: Path, dataset: SegDataset, out_dir: Path, name: str
) -> dict[str, Any]:
    """mIoU of label PNGs (seeds or pseudo masks; 255 in a prediction counts as background,
    i.e. an unsure seed pixel is not a correct one); writes ``<out_dir>/<name>.json`` with
    per-class and per-image IoU."""
    folder = Path(folder)
    stems = _stems_with(folder, dataset, ".png")
    n = dataset.num_classes + 1
    total = np.zeros((n, n), dtype=np.int64)
    per_image: dict[str, float] = {}
    unsure = 0
    pixels = 0
    for stem in tqdm(stems, desc=f"evaluate {name}", leave=False):
        path = folder / f"{stem}.png"
        labels = read_index_png(path)
        gt = _gt(dataset, stem, labels.shape, path)
        unsure += int((labels == 255).sum())
        pixels += labels.size
        prediction = np.where(labels == 255, 0, labels)
        if prediction.max(initial=0) >= n:
            raise AmnsegError(f"{path}: holds class {prediction.max()}, the dataset has {n - 1}")
        confusion = confusion_matrix(prediction, gt, n)
        total += confusion
        score = miou(confusion)
        if not np.isnan(score):
            per_image[stem] = float(score)
    result = {
        "name": name,
        "folder": str(folder),
        "images": len(stems),
        "miou": float(miou(total)),
        "per_class_iou": class_table(dataset, iou_per_class(total)),
        "unsure_fraction": unsure / max(pixels, 1),
        "per_image_miou": per_image,
    }
    save_json(Path(out_dir) / f"{name}.json", result)
    return result


def evaluate_at_threshold(
    maps_dir: Path, dataset: SegDataset, threshold: float
) -> float:
    """mIoU of score maps at one threshold (a direct, sweep-free computation)."""
    stems = _stems_with(Path(maps_dir), dataset, ".npz")
    n = dataset.num_classes + 1
    total = np.zeros((n, n), dtype=np.int64)
    for stem in stems:
        maps = load_score_maps(Path(maps_dir) / f"{stem}.npz")
        prediction = scores_to_labels(maps.full, maps.class_ids, threshold)
        total += confusion_matrix(prediction, _gt(dataset, stem, prediction.shape, maps_dir), n)
    return float(miou(total))
