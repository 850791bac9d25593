"""Segmentation metrics: confusion matrices, IoU, threshold sweeps, per-image optimal thresholds.

Conventions: label maps are (H, W) integers, 0 = background, 1..C classes, 255 = ignore (in the
ground truth only); N = C + 1 counts the background. Score maps are (K, H, W) maps of the
classes ``class_ids`` (K,) of one image. Thresholding prepends a constant background channel
equal to the threshold and takes the argmax, exactly as the reference evaluates CAMs
(METHOD.md section 2): a pixel is foreground only where its best score is strictly above the
threshold, because ``np.argmax`` returns the first (background) channel on ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- validation


def _float_scores(scores: np.ndarray) -> np.ndarray:
    """Scores as a floating array, keeping float32/float64 as they are.

    The dtype matters: the reference pads the background channel with ``np.pad``, which casts
    the threshold into the maps' own dtype, so comparisons happen in that dtype.
    """
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float32)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (K, H, W), got shape {scores.shape}")
    return scores


def _class_keys(class_ids: np.ndarray, channels: int, num_classes: int | None) -> np.ndarray:
    """(K,) int64 class ids, checked against the channel count and the class range."""
    keys = np.asarray(class_ids, dtype=np.int64).ravel()
    if keys.size != channels:
        raise ValueError(f"{keys.size} class ids for {channels} score channels")
    upper = IGNORE_INDEX if num_classes is None else num_classes
    if keys.size and (keys.min() < 1 or keys.max() >= upper):
        raise ValueError(f"class ids must lie in [1, {upper}), got {keys.tolist()}")
    return keys


def _valid_gt(gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask of non-ignored pixels, their int64 labels), raising on labels outside [0, N)."""
    gt = np.asarray(gt).ravel()
    valid = gt != IGNORE_INDEX
    labels = gt[valid].astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels.max() if labels.max() >= num_classes else labels.min()
        raise ValueError(
            f"ground-truth label {bad} outside [0, {num_classes}) (and not {IGNORE_INDEX})"
        )
    return valid, labels


# ----------------------------------------------------------------------------- confusion, IoU


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, N) int64 pixel counts, rows = ground truth, columns = prediction.

    ``pred`` and ``gt`` have the same number of pixels (any shape); pixels where gt is 255 are
    skipped. ``num_classes`` N counts the background. Predictions outside [0, N) or ground-truth
    labels outside [0, N) other than 255 raise ValueError (they would silently shift counts into
    other cells of the flattened bincount).
    """
    pred = np.asarray(pred).ravel()
    if pred.shape != np.asarray(gt).ravel().shape:
        raise ValueError(f"prediction has {pred.size} pixels, ground truth {np.asarray(gt).size}")
    valid, labels = _valid_gt(gt, num_classes)
    pred = pred[valid]
    if not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(f"predictions must be integer labels, got dtype {pred.dtype}")
    pred = pred.astype(np.int64)
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        bad = pred.max() if pred.max() >= num_classes else pred.min()
        raise ValueError(f"prediction label {bad} outside [0, {num_classes})")
    counts = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """(..., N) IoU of each class from (..., N, N) confusions; batched over leading axes.

    NaN where a class is neither in the ground truth nor predicted (its union is empty).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(axis=-1) + confusion.sum(axis=-2) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


# The first release called it this; kept so both names work.
iou_per_class = iou_from_confusion


def miou(confusion: np.ndarray) -> float | np.ndarray:
    """Mean IoU over the classes with a non-empty union (NaN-mean) of (..., N, N) confusions.

    A float for one matrix, a (...) array for a batch; NaN where no class occurs at all.
    """
    iou = iou_from_confusion(confusion)
    counts = np.sum(~np.isnan(iou), axis=-1)
    result = np.where(counts > 0, np.nansum(iou, axis=-1) / np.maximum(counts, 1), np.nan)
    return float(result) if np.ndim(result) == 0 else result


def image_miou(confusion: np.ndarray) -> float | np.ndarray:
    """One image's mIoU: the mean IoU over the classes in its ground truth or its prediction
    (pixels ignored in the ground truth do not count). The same arithmetic as ``miou``; named
    separately because per-image scores are what the optimal-threshold analysis ranks."""
    return miou(confusion)


def pixel_accuracy(confusion: np.ndarray) -> float | np.ndarray:
    """Fraction of labelled pixels predicted correctly, from (..., N, N) confusions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum(axis=(-2, -1))
    correct = np.trace(confusion, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(total > 0, correct / np.maximum(total, 1), np.nan)
    return float(result) if np.ndim(result) == 0 else result


def class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """(..., N) recall of each class (correct / ground-truth pixels); NaN for absent classes."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diagonal(confusion, axis1=-2, axis2=-1) / support, np.nan)


# ----------------------------------------------------------------------------- thresholding


def scores_to_labels(scores: np.ndarray, class_ids: np.ndarray, threshold: float) -> np.ndarray:
    """(K, H, W) scores of classes ``class_ids`` (K,) -> (H, W) uint8 labels (0 = background).

    Exactly ``np.argmax`` over ``[threshold, *scores]`` with the threshold in the scores' dtype
    (as the reference's ``np.pad`` makes it), channel index mapped back to class id: ties between
    the threshold and a score go to background, ties between classes to the earlier channel.
    Integer scores are taken as float32.
    """
    scores = _float_scores(scores)
    keys = np.concatenate([[0], _class_keys(class_ids, len(scores), None)]).astype(np.uint8)
    background = np.full((1, *scores.shape[1:]), threshold, dtype=scores.dtype)
    return keys[np.argmax(np.concatenate([background, scores], axis=0), axis=0)]


def sweep_confusions(
    scores: np.ndarray,
    class_ids: np.ndarray,
    gt: np.ndarray,
    thresholds: Sequence[float],
    num_classes: int,
) -> np.ndarray:
    """(T, N, N) confusion matrices of one image at each of the T thresholds (in given order).

    Equal, threshold by threshold, to ``confusion_matrix(scores_to_labels(scores, class_ids, t),
    gt, N)``, but the argmax over classes runs once: the winning class and its score do not
    depend on t, and a pixel is foreground at t exactly when that score is > t. Each pixel gets
    a "level" = the number of thresholds strictly below its score (it is foreground for those
    and background for the rest); one bincount over (level, gt, class) and a cumulative sum over
    levels then give every matrix. Cost O(pixels + T N^2) instead of O(T pixels K).

    ``scores`` (K, H, W) float, ``class_ids`` (K,) in [1, N), ``gt`` (H, W) with 255 ignored.
    """
    scores = _float_scores(scores)
    keys = _class_keys(class_ids, len(scores), num_classes)
    if scores.shape[1:] != np.shape(gt):
        raise ValueError(f"scores are {scores.shape[1:]} but the ground truth is {np.shape(gt)}")
    # Cast like scores_to_labels does, so a score equal to float32(t) ties exactly there too.
    levels_of = np.asarray(thresholds, dtype=np.float64).ravel().astype(scores.dtype)
    if levels_of.size == 0 or not np.all(np.isfinite(levels_of)):
        raise ValueError("thresholds must be a non-empty list of finite numbers")
    valid, labels = _valid_gt(gt, num_classes)
    count, size = levels_of.size, num_classes * num_classes
    if len(keys) == 0:  # no class maps: every pixel is background at every threshold
        background = np.bincount(labels * num_classes, minlength=size).reshape(
            num_classes, num_classes
        )
        return np.repeat(background[None], count, axis=0)

    flat = scores.reshape(len(scores), -1)[:, valid]
    peak = flat.max(axis=0)
    winner = keys[flat.argmax(axis=0)]
    order = np.argsort(levels_of, kind="stable")
    # side="left": thresholds equal to the peak do not count, i.e. ties stay background.
    # A NaN peak sorts after every threshold, i.e. foreground, as np.argmax picks NaN too.
    level = np.searchsorted(levels_of[order], peak, side="left")
    fg = np.bincount(level * size + labels * num_classes + winner, minlength=(count + 1) * size)
    bg = np.bincount(level * size + labels * num_classes, minlength=(count + 1) * size)
    fg, bg = fg.reshape(count + 1, size), bg.reshape(count + 1, size)
    # At the j-th smallest threshold: pixels of level > j are foreground, level <= j background.
    fg_below = np.cumsum(fg, axis=0)[:count]
    bg_below = np.cumsum(bg, axis=0)[:count]
    by_rank = fg.sum(axis=0) - fg_below + bg_below
    result = np.empty((count, size), dtype=np.int64)
    result[order] = by_rank
    return result.reshape(count, num_classes, num_classes)


# ----------------------------------------------------------------------------- per-image optima


class ThresholdOptimum(NamedTuple):
    """Each image's best threshold on a sweep grid; arrays shaped like the leading axes."""

    index: np.ndarray  # int64 position in the given thresholds; -1 where undefined
    threshold: np.ndarray  # float64; NaN where undefined
    miou: np.ndarray  # float64 best image mIoU; NaN where undefined


def optimal_thresholds(
    confusions: np.ndarray, thresholds: Sequence[float]
) -> ThresholdOptimum:
    """The threshold maximising each image's mIoU, from (..., T, N, N) per-image confusions.

    Ties go to the lowest threshold (whatever the order of ``thresholds``): among equally good
    thresholds the smallest is the first at which the image reaches its best, and a fixed rule
    keeps the histogram of optima reproducible. An image with no labelled pixel has no defined
    mIoU: index -1, threshold and mIoU NaN.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    confusions = np.asarray(confusions)
    if confusions.shape[-3] != thresholds.size:
        raise ValueError(f"{confusions.shape[-3]} confusions for {thresholds.size} thresholds")
    order = np.argsort(thresholds, kind="stable")
    scores = np.asarray(image_miou(confusions), dtype=np.float64)[..., order]
    defined = ~np.all(np.isnan(scores), axis=-1)
    rank = np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=-1)  # first = lowest t
    index = np.where(defined, order[rank], -1)
    best = np.take_along_axis(scores, rank[..., None], axis=-1)[..., 0]
    return ThresholdOptimum(
        index=index.astype(np.int64),
        threshold=np.where(defined, thresholds[np.maximum(index, 0)], np.nan),
        miou=np.where(defined, best, np.nan),
    )


@dataclass(frozen=True)
class OracleResult:
    """Every image thresholded at its own optimum (the paper's per-image oracle)."""

    optimum: ThresholdOptimum  # (I,) arrays
    confusion: np.ndarray  # (N, N) sum of each image's confusion at its optimal threshold
    miou: float  # dataset mIoU of ``confusion``


def per_image_oracle(confusions: np.ndarray, thresholds: Sequence[float]) -> OracleResult:
    """Per-image optimal thresholds and the oracle dataset mIoU from (I, T, N, N) confusions.

    The oracle accumulates each image's confusion at its own best threshold; images without a
    defined optimum (no labelled pixel) add nothing. Never below the best global threshold's
    mIoU in practice, though not guaranteed: per-image mIoU and dataset mIoU weigh pixels
    differently.
    """
    confusions = np.asarray(confusions)
    optimum = optimal_thresholds(confusions, thresholds)
    defined = optimum.index >= 0
    picked = confusions[np.flatnonzero(defined), optimum.index[defined]]
    total = picked.sum(axis=0) if len(picked) else np.zeros(confusions.shape[-2:], np.int64)
    return OracleResult(optimum=optimum, confusion=total, miou=float(miou(total)))


# ----------------------------------------------------------------------------- activations


class ActivationSplit(NamedTuple):
    """Per-pixel peak activations on GT foreground and GT background (ignore pixels dropped).

    Unpacks as ``fg, bg``; the means and their gap (the paper's FG/BG activation gap) are
    properties, NaN where a side has no pixel.
    """

    fg: np.ndarray  # (P_fg,) peak score on pixels with gt in 1..C
    bg: np.ndarray  # (P_bg,) peak score on pixels with gt == 0

    @property
    def fg_mean(self) -> float:
        return float(self.fg.mean(dtype=np.float64)) if self.fg.size else float("nan")

    @property
    def bg_mean(self) -> float:
        return float(self.bg.mean(dtype=np.float64)) if self.bg.size else float("nan")

    @property
    def gap(self) -> float:
        return self.fg_mean - self.bg_mean


def foreground_background_gap(
    scores: np.ndarray, gt: np.ndarray, class_ids: np.ndarray | None = None
) -> ActivationSplit:
    """Max-over-classes activation of (K, H, W) ``scores`` on GT foreground vs GT background.

    With ``class_ids`` (K,), only the channels of classes present in ``gt`` take part (the
    max over the GT classes); without, all channels do (the maps hold the image's label classes,
    which for most datasets are its GT classes). No channel left means activation 0.
    """
    scores = _float_scores(scores)
    gt = np.asarray(gt)
    if scores.shape[1:] != gt.shape:
        raise ValueError(f"scores are {scores.shape[1:]} but the ground truth is {gt.shape}")
    if class_ids is not None:
        keys = _class_keys(class_ids, len(scores), None)
        scores = scores[np.isin(keys, np.unique(gt))]
    peak = scores.max(axis=0) if len(scores) else np.zeros(gt.shape, dtype=np.float32)
    foreground = (gt != 0) & (gt != IGNORE_INDEX)
    return ActivationSplit(fg=peak[foreground], bg=peak[gt == 0])
