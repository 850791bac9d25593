"""Evaluation of score maps (threshold sweeps, per-image optimal thresholds) and of label maps
(seeds, pseudo masks) against the ground truth; results as JSON in the run folder.

Score maps are the ``<stem>.npz`` files of ``amnseg.io.save_score_maps``; only the dataset's
stems that have such a file are evaluated, in dataset order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from amnseg.config import EvalConfig
from amnseg.data.base import SegDataset, read_index_png
from amnseg.errors import AmnsegError
from amnseg.io import ScoreMaps, load_score_maps, save_json
from amnseg.metrics import (
    confusion_matrix,
    foreground_background_gap,
    iou_from_confusion,
    miou,
    optimal_thresholds,
    scores_to_labels,
    sweep_confusions,
)
from amnseg.progress import progress_bar
from amnseg.workers import in_order_with_job

MAP_KINDS = ("full", "strided")
STRIDE = 4  # of the "strided" maps (ScoreMaps.strided)
QUANTILES = {"p10": 0.10, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p90": 0.90}
_SAME = 1e-9  # thresholds closer than this are the same grid point


def _dataset_name(dataset: SegDataset) -> str:
    return str(getattr(dataset, "root", type(dataset).__name__))


def _stems_with(folder: Path, dataset: SegDataset, suffix: str) -> list[str]:
    """The dataset's stems that have ``<stem><suffix>`` in ``folder``, in dataset order."""
    if not folder.is_dir():
        raise AmnsegError(f"{folder}: folder not found")
    if not dataset.has_masks:
        raise AmnsegError(
            f"{_dataset_name(dataset)}: the dataset has no ground-truth masks to evaluate on"
        )
    stems = [s for s in dataset.stems if (folder / f"{s}{suffix}").is_file()]
    if not stems:
        raise AmnsegError(
            f"{folder}: holds no {suffix} file of the dataset's {len(dataset.stems)} images"
        )
    return stems


def _gt(dataset: SegDataset, stem: str, shape: tuple[int, ...], path: Path,
        stride: int = 1) -> np.ndarray:
    """The GT mask of ``stem`` (subsampled by ``stride``), checked against ``shape``."""
    gt = dataset.mask(stem)
    if gt is None:
        raise AmnsegError(f"{dataset.mask_source(stem)}: no ground-truth mask for {stem!r}")
    if stride > 1:
        # Stride-4 maps have (H - 1) // 4 + 1 rows: exactly the rows 0, 4, 8, ... of the mask.
        gt = gt[::stride, ::stride]
    if gt.shape != tuple(shape):
        raise AmnsegError(
            f"{path}: maps are {shape[-1]}x{shape[-2]} but the ground-truth mask of {stem!r} "
            f"is {gt.shape[1]}x{gt.shape[0]}" + (f" at stride {stride}" if stride > 1 else "")
        )
    return gt


def class_table(dataset: SegDataset, iou: np.ndarray) -> dict[str, float | None]:
    """{class name: IoU}, "background" first; None for classes absent from GT and prediction."""
    names = ["background", *dataset.class_names]
    return {name: _number(v) for name, v in zip(names, iou, strict=True)}


def _number(value: Any) -> float | None:
    """A JSON-safe float: NaN (undefined) becomes null."""
    value = float(value)
    return None if math.isnan(value) else value


def _iterate_maps(
    maps_dir: Path, dataset: SegDataset, use: str, desc: str
) -> Iterator[tuple[str, Path, ScoreMaps, np.ndarray, np.ndarray]]:
    """Yield (stem, file, maps, scores (K, h, w), gt (h, w)) for every map file of the dataset,
    with a progress bar; every problem with a file becomes a one-line AmnsegError naming it."""
    maps_dir = Path(maps_dir)
    for stem in progress_bar(_map_stems(maps_dir, dataset, use), desc=desc, unit="img",
                             leave=False):
        yield stem, *_load_maps_and_gt(maps_dir, dataset, use, stem)


def _map_stems(maps_dir: Path, dataset: SegDataset, use: str) -> list[str]:
    """The dataset's stems that have a map file in ``maps_dir``; ``use`` checked."""
    if use not in MAP_KINDS:
        raise AmnsegError(f"use={use!r}: expected one of {', '.join(MAP_KINDS)}")
    return _stems_with(maps_dir, dataset, ".npz")


def _load_maps_and_gt(maps_dir: Path, dataset: SegDataset, use: str, stem: str
                      ) -> tuple[Path, ScoreMaps, np.ndarray, np.ndarray]:
    """(file, maps, scores (K, h, w), gt (h, w)) of ``stem``, checked: ``use``'s maps and the
    GT mask at their resolution."""
    path = maps_dir / f"{stem}.npz"
    maps = load_score_maps(path, dataset.num_classes)
    _check_classes(path, maps.class_ids, dataset, stem)
    scores = maps.full if use == "full" else maps.strided
    gt = _gt(dataset, stem, scores.shape[1:], path, 1 if use == "full" else STRIDE)
    return path, maps, scores, gt


def _check_classes(path: Path, class_ids: np.ndarray, dataset: SegDataset, stem: str) -> None:
    """A map file holds the maps of its image's classes (those of its label): other classes
    mean maps of another dataset, or made before the labels changed."""
    labelled = np.flatnonzero(dataset.label(stem)) + 1
    if not np.array_equal(np.sort(np.asarray(class_ids)), labelled):
        def names(ids: np.ndarray) -> str:
            return ", ".join(dataset.class_names[int(i) - 1] for i in ids) or "none"

        raise AmnsegError(
            f"{path}: maps of the classes {names(np.sort(class_ids))}, but the image is labelled "
            f"{names(labelled)} (maps of another dataset, or made before its labels changed: "
            "make them again)")


def _sweep_grid(
    thresholds: Sequence[float], extra: float | None
) -> tuple[list[float], int, int | None]:
    """(grid, sweep size, position of ``extra`` in the grid): the sorted unique sweep
    thresholds, then ``extra`` appended unless it is already on them."""
    values = sorted({float(t) for t in thresholds})
    if not values or not all(math.isfinite(t) for t in values):
        raise AmnsegError(f"thresholds {list(thresholds)!r}: need at least one finite value")
    if extra is None:
        return values, len(values), None
    extra = float(extra)
    if not math.isfinite(extra):
        raise AmnsegError(f"threshold {extra}: must be a finite number")
    for index, value in enumerate(values):
        if abs(value - extra) <= _SAME:
            return values, len(values), index
    return [*values, extra], len(values), len(values)


class _SweepJob(NamedTuple):
    maps_dir: Path
    dataset: SegDataset
    use: str
    grid: tuple[float, ...]


class _ImageSweep(NamedTuple):
    """One image's share of a sweep: its (T, N, N) confusions at the grid's thresholds and its
    peak activations' sums and counts on GT foreground and background."""

    confusions: np.ndarray
    fg_sum: float
    bg_sum: float
    fg_pixels: int
    bg_pixels: int


def _sweep_image(job: _SweepJob, stem: str) -> _ImageSweep:
    path, maps, scores, gt = _load_maps_and_gt(job.maps_dir, job.dataset, job.use, stem)
    try:
        confusions = sweep_confusions(scores, maps.class_ids, gt, job.grid,
                                      job.dataset.num_classes + 1)
    except ValueError as exc:  # e.g. a mask label beyond the dataset's classes
        raise AmnsegError(f"{path}: {exc}") from None
    split = foreground_background_gap(scores, gt, maps.class_ids)
    return _ImageSweep(confusions, float(split.fg.sum(dtype=np.float64)),
                       float(split.bg.sum(dtype=np.float64)), split.fg.size, split.bg.size)


def evaluate_maps(
    maps_dir: Path,
    dataset: SegDataset,
    thresholds: Sequence[float],
    out_dir: Path,
    name: str = "cam",
    use: str = "full",
    threshold: float | None = 0.15,
    robust_range: Sequence[float] = tuple(EvalConfig().robust_range),
    workers: int = 1,
) -> dict[str, Any]:
    """Sweep the background threshold over score maps; write ``<out_dir>/<name>_sweep.json``.

    ``use``: "full" compares the (K, H, W) maps with the mask; "strided" the (K, h4, w4) maps
    with the mask subsampled to every 4th row and column. ``threshold`` (e.g. the config's
    eval threshold; None to skip) is reported as ``miou_at_threshold``; it need not lie on the
    sweep grid, and per-image optima are searched on the grid only. ``workers`` > 1 reads and
    sweeps the images in that many worker processes (the same results: they are summed in
    dataset order either way).

    Dataset mIoU sums the confusions of all images (the standard, pixel-weighted definition).
    An image's own mIoU averages over the classes in its GT or prediction; its optimal threshold
    is the lowest grid value reaching its best mIoU; the oracle mIoU sums each image's confusion
    at its own optimum. The FG/BG gap pools all pixels: mean peak activation (max over the GT
    classes' maps) on GT foreground minus on GT background.

    JSON fields: name, maps, use, images, thresholds, miou (per threshold), best_threshold,
    best_miou, threshold, miou_at_threshold, per_class_iou_at_best, robust_range, miou_range
    (max - min mIoU over thresholds inside the robust range), oracle_miou, optimal_thresholds
    ({stem: t}), per_image_best_miou ({stem: mIoU}), optimal_threshold_mean / _std /
    _quantiles (p10..p90), fg_mean_activation, bg_mean_activation, fg_bg_gap. Undefined values
    are null.
    """
    maps_dir = Path(maps_dir)
    grid, count, at_position = _sweep_grid(thresholds, threshold)
    sweep = grid[:count]  # the grid may end with the extra `threshold`
    n = dataset.num_classes + 1

    total = np.zeros((len(grid), n, n), dtype=np.int64)
    oracle = np.zeros((n, n), dtype=np.int64)
    optimum: dict[str, float] = {}
    optimum_miou: dict[str, float] = {}
    fg_sum = bg_sum = 0.0
    fg_pixels = bg_pixels = 0
    images = 0
    stems = _map_stems(maps_dir, dataset, use)
    scored = in_order_with_job(_sweep_image, _SweepJob(maps_dir, dataset, use, tuple(grid)),
                               stems, workers)
    for stem, image in zip(stems, progress_bar(scored, total=len(stems), desc=f"eval {name}",
                                               unit="img", leave=False), strict=True):
        confusions = image.confusions
        total += confusions
        best = optimal_thresholds(confusions[:count], sweep)
        if best.index >= 0:  # an image with only ignored pixels has no optimum
            oracle += confusions[int(best.index)]
            optimum[stem] = sweep[int(best.index)]
            optimum_miou[stem] = float(best.miou)
        fg_sum += image.fg_sum
        bg_sum += image.bg_sum
        fg_pixels += image.fg_pixels
        bg_pixels += image.bg_pixels
        images += 1

    curve = np.asarray(miou(total), dtype=np.float64)
    if np.all(np.isnan(curve)):
        raise AmnsegError(f"{_dataset_name(dataset)}: the ground-truth masks of the "
                          f"{images} evaluated images label no pixel (all 255, ignored); "
                          f"nothing to score the maps of {maps_dir} on")
    best_index = int(np.nanargmax(curve[:count]))  # first maximum = lowest threshold
    low, high = (float(v) for v in robust_range)
    inside = [m for t, m in zip(sweep, curve, strict=False)
              if low - _SAME <= t <= high + _SAME and not math.isnan(m)]
    optima = np.array(list(optimum.values()), dtype=np.float64)
    fg_mean = fg_sum / fg_pixels if fg_pixels else math.nan
    bg_mean = bg_sum / bg_pixels if bg_pixels else math.nan
    result: dict[str, Any] = {
        "name": name,
        "maps": str(maps_dir),
        "use": use,
        "images": images,
        "thresholds": sweep,
        "miou": [_number(m) for m in curve[:count]],
        "best_threshold": sweep[best_index],
        "best_miou": float(curve[best_index]),
        "threshold": None if threshold is None else float(threshold),
        "miou_at_threshold": None if at_position is None else _number(curve[at_position]),
        "per_class_iou_at_best": class_table(dataset, iou_from_confusion(total[best_index])),
        "robust_range": [low, high],
        "miou_range": float(max(inside) - min(inside)) if inside else None,
        "oracle_miou": _number(miou(oracle)),
        "optimal_thresholds": optimum,
        "per_image_best_miou": optimum_miou,
        "optimal_threshold_mean": float(optima.mean()) if optima.size else None,
        "optimal_threshold_std": float(optima.std()) if optima.size else None,
        "optimal_threshold_quantiles": (
            {key: float(np.quantile(optima, q)) for key, q in QUANTILES.items()}
            if optima.size else None
        ),
        "fg_mean_activation": _number(fg_mean),
        "bg_mean_activation": _number(bg_mean),
        "fg_bg_gap": _number(fg_mean - bg_mean),
    }
    save_json(Path(out_dir) / f"{name}_sweep.json", result)
    return result


def evaluate_at_threshold(
    maps_dir: Path, dataset: SegDataset, threshold: float, use: str = "full"
) -> float:
    """Dataset mIoU of score maps at one threshold, by direct thresholding (no sweep, no file
    written); ``use`` as in ``evaluate_maps``."""
    n = dataset.num_classes + 1
    total = np.zeros((n, n), dtype=np.int64)
    for _, path, maps, scores, gt in _iterate_maps(Path(maps_dir), dataset, use, "eval"):
        prediction = scores_to_labels(scores, maps.class_ids, threshold)
        try:
            total += confusion_matrix(prediction, gt, n)
        except ValueError as exc:
            raise AmnsegError(f"{path}: {exc}") from None
    return float(miou(total))


def evaluate_label_maps(
    folder: Path, dataset: SegDataset, out_dir: Path, name: str
) -> dict[str, Any]:
    """mIoU of label PNGs (seeds or pseudo masks; 255 in a prediction counts as background,
    i.e. an unsure seed pixel is not a correct one); writes ``<out_dir>/<name>.json`` with
    miou, per_class_iou, unsure_fraction and per_image_miou."""
    folder = Path(folder)
    stems = _stems_with(folder, dataset, ".png")
    n = dataset.num_classes + 1
    total = np.zeros((n, n), dtype=np.int64)
    per_image: dict[str, float] = {}
    unsure = 0
    pixels = 0
    for stem in progress_bar(stems, desc=f"eval {name}", unit="img", leave=False):
        path = folder / f"{stem}.png"
        labels = read_index_png(path)
        gt = _gt(dataset, stem, labels.shape, path)
        unsure += int((labels == 255).sum())
        pixels += labels.size
        prediction = np.where(labels == 255, 0, labels)
        if prediction.max(initial=0) >= n:
            raise AmnsegError(f"{path}: holds class {prediction.max()}, the dataset has {n - 1}")
        try:
            confusion = confusion_matrix(prediction, gt, n)
        except ValueError as exc:
            raise AmnsegError(f"{dataset.mask_source(stem)}: {exc}") from None
        total += confusion
        score = miou(confusion)
        if not np.isnan(score):
            per_image[stem] = float(score)
    result = {
        "name": name,
        "folder": str(folder),
        "images": len(stems),
        "miou": float(miou(total)),
        "per_class_iou": class_table(dataset, iou_from_confusion(total)),
        "unsure_fraction": unsure / max(pixels, 1),
        "per_image_miou": per_image,
    }
    save_json(Path(out_dir) / f"{name}.json", result)
    return result
