"""Segmentation metrics: confusion matrices, IoU, threshold sweeps, per-image optimal thresholds.

Conventions: label maps are (H, W) integers, 0 = background, 1..C classes, 255 = ignore (in the
ground truth only). Score maps are (K, H, W) maps of the classes ``class_ids`` (K,) of an image;
thresholding prepends a constant background channel equal to the threshold and takes the argmax
(ties go to background), exactly as the reference evaluates CAMs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, N) int64 counts, rows = ground truth, columns = prediction; gt 255 is skipped.

    ``num_classes`` N counts the background. Predictions outside [0, N) raise ValueError.
    """
    pred = np.asarray(pred).ravel()
    gt = np.asarray(gt).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
    valid = gt != IGNORE_INDEX
    pred, gt = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction values must lie in [0, {num_classes})")
    if gt.size and gt.max() >= num_classes:
        raise ValueError(f"ground-truth values must lie in [0, {num_classes}) or be 255")
    return np.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN where the class is neither in the ground truth nor predicted."""
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(axis=-1) + confusion.sum(axis=-2) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


def miou(confusion: np.ndarray) -> float | np.ndarray:
    """Mean IoU over the classes that occur (NaN-mean); batched over leading axes."""
    iou = iou_per_class(confusion)
    with np.errstate(invalid="ignore"):
        counts = np.sum(~np.isnan(iou), axis=-1)
        result = np.where(counts > 0, np.nansum(iou, axis=-1) / np.maximum(counts, 1), np.nan)
    return float(result) if np.ndim(result) == 0 else result


def scores_to_labels(scores: np.ndarray, class_ids: np.ndarray, threshold: float) -> np.ndarray:
    """(K, H, W) scores -> (H, W) class ids: argmax over [threshold, scores], channel -> id."""
    keys = np.concatenate([[0], np.asarray(class_ids, dtype=np.int64)])
    background = np.full((1, *scores.shape[1:]), threshold, dtype=np.float32)
    stacked = np.concatenate([background, np.asarray(scores, dtype=np.float32)], axis=0)
    return keys[np.argmax(stacked, axis=0)]


def sweep_confusions(
    scores: np.ndarray,
    class_ids: np.ndarray,
    gt: np.ndarray,
    thresholds: Sequence[float],
    num_classes: int,
) -> np.ndarray:
    """(T, N, N) confusion matrices of one image at every threshold, argmax computed once.

    The winning foreground class and its score do not depend on the threshold; a pixel is
    foreground at threshold t exactly when that score is > t (strictly: ties go to background).
    """
    keys = np.asarray(class_ids, dtype=np.int64)
    valid = gt.ravel() != IGNORE_INDEX
    gt_flat = gt.ravel()[valid].astype(np.int64)
    result = np.zeros((len(thresholds), num_classes, num_classes), dtype=np.int64)
    if len(keys) == 0:
        counts = np.bincount(gt_flat * num_classes, minlength=num_classes**2)
        result[:] = counts.reshape(num_classes, num_classes)
        return result
    scores32 = np.asarray(scores, dtype=np.float32)
    best = scores32.argmax(axis=0).ravel()[valid]
    peak = scores32.max(axis=0).ravel()[valid]
    fg_class = keys[best]
    # Sort pixels by peak score; for each threshold, pixels above it are foreground.
    order = np.argsort(peak, kind="stable")
    sorted_peak = peak[order]
    fg_codes = gt_flat[order] * num_classes + fg_class[order]
    bg_codes = gt_flat[order] * num_classes
    size = num_classes**2
    # Cumulative counts of foreground codes from the top and background codes from the bottom.
    for t_index, threshold in enumerate(thresholds):
        split = np.searchsorted(sorted_peak, np.float32(threshold), side="right")
        counts = np.bincount(bg_codes[:split], minlength=size) + np.bincount(
            fg_codes[split:], minlength=size
        )
        result[t_index] = counts.reshape(num_classes, num_classes)
    return result


def image_miou(confusion: np.ndarray) -> float | np.ndarray:
    """An image's mIoU: mean IoU over the classes in its ground truth or its prediction."""
    return miou(confusion)


def optimal_thresholds(
    per_image_confusions: np.ndarray, thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (index of the best threshold, its mIoU) from (I, T, N, N) confusions.

    Ties go to the lowest threshold. Images whose mIoU is undefined (nothing but ignore) get
    index -1.
    """
    scores = image_miou(per_image_confusions)  # (I, T)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    best = np.argmax(scores, axis=1)
    best_value = scores[np.arange(len(best)), best]
    undefined = ~np.isfinite(best_value)
    best[undefined] = -1
    return best, np.where(undefined, np.nan, best_value)


def foreground_background_gap(
    scores: np.ndarray, gt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Max-over-classes activation on GT foreground pixels and on GT background pixels."""
    if len(scores) == 0:
        peak = np.zeros(gt.shape, dtype=np.float32)
    else:
        peak = np.asarray(scores, dtype=np.float32).max(axis=0)
    return peak[(gt != 0) & (gt != IGNORE_INDEX)], peak[gt == 0]
