"""Metrics against independent references (torchmetrics, brute force, direct argmax), the
threshold sweep against per-threshold recomputation, and the evaluation stage end to end."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from amnseg.data.base import SegDataset
from amnseg.errors import AmnsegError
from amnseg.io import ScoreMaps, load_json, load_score_maps, save_score_maps
from amnseg.metrics import (
    IGNORE_INDEX,
    class_accuracy,
    confusion_matrix,
    foreground_background_gap,
    image_miou,
    iou_from_confusion,
    miou,
    optimal_thresholds,
    per_image_oracle,
    pixel_accuracy,
    scores_to_labels,
    sweep_confusions,
)
from amnseg.report.plots import plot_optimal_threshold_histogram, plot_sweep
from amnseg.stages.evaluate import evaluate_at_threshold, evaluate_maps

GRID = [round(0.05 * i, 2) for i in range(20)]


def random_labels(rng: np.random.Generator, shape, n: int, ignore: float = 0.1) -> np.ndarray:
    labels = rng.integers(0, n, shape).astype(np.uint8)
    labels[rng.random(shape) < ignore] = IGNORE_INDEX
    return labels


def quantised_scores(rng: np.random.Generator, k: int, shape) -> np.ndarray:
    """Scores on the 0.05 grid (as float32), so many pixels tie exactly with a grid threshold
    and with each other."""
    scores = (rng.integers(0, 21, (k, *shape)) * 0.05).astype(np.float32)
    scores[:, rng.random(shape) < 0.1] = 0.0  # also ties at t = 0
    return scores


def reference_labels(scores: np.ndarray, class_ids, threshold: float) -> np.ndarray:
    """The reference procedure: pad a threshold channel in the maps' dtype, argmax, map ids."""
    padded = np.concatenate([np.full((1, *scores.shape[1:]), threshold, scores.dtype), scores])
    return np.concatenate([[0], class_ids])[np.argmax(padded, axis=0)]


# --------------------------------------------------------------------------- confusion, IoU


def test_confusion_matches_brute_force():
    rng = np.random.default_rng(0)
    n = 4
    gt = random_labels(rng, (5, 7), n, ignore=0.2)
    pred = rng.integers(0, n, (5, 7))
    expected = np.zeros((n, n), dtype=np.int64)
    for g, p in zip(gt.ravel(), pred.ravel(), strict=True):
        if g != IGNORE_INDEX:
            expected[g, p] += 1
    confusion = confusion_matrix(pred, gt, n)
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, expected)


@pytest.mark.parametrize("bad", [-1, 4, 255])
def test_confusion_rejects_predictions_out_of_range(bad):
    gt = np.zeros((2, 2), np.uint8)
    pred = np.zeros((2, 2), np.int64)
    pred[0, 1] = bad
    with pytest.raises(ValueError, match=rf"prediction label {bad} outside \[0, 4\)"):
        confusion_matrix(pred, gt, 4)


def test_confusion_rejects_bad_ground_truth_but_skips_ignore():
    pred = np.zeros((2, 2), np.uint8)
    for bad in (7, 4):  # 4: one past the last class of N = 4
        with pytest.raises(ValueError, match=rf"ground-truth label {bad} outside \[0, 4\)"):
            confusion_matrix(pred, np.array([[0, bad], [0, 0]], np.uint8), 4)
    with pytest.raises(ValueError, match=r"ground-truth label -1 outside"):
        confusion_matrix(pred, np.array([[0, -1], [0, 0]], np.int64), 4)
    # A wild prediction under an ignored pixel is never counted, so it is no error.
    gt = np.array([[0, IGNORE_INDEX], [1, 1]], np.uint8)
    pred = np.array([[0, 200], [1, 0]], np.uint8)
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 2), [[1, 0], [1, 1]])


def test_iou_matches_torchmetrics_on_present_classes():
    rng = np.random.default_rng(1)
    n = 6
    gt = random_labels(rng, (4, 40, 50), n)
    pred = rng.integers(0, n - 1, (4, 40, 50)).astype(np.uint8)  # class n-1 never predicted
    gt[gt == 2] = 3  # class 2 absent from the ground truth but predicted
    confusion = confusion_matrix(pred, gt, n)
    ours = iou_from_confusion(confusion)

    metric = MulticlassJaccardIndex(num_classes=n, ignore_index=IGNORE_INDEX, average=None)
    theirs = metric(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
    present = np.isin(np.arange(n), np.concatenate([gt[gt != IGNORE_INDEX], pred[gt != 255]]))
    assert np.array_equal(~np.isnan(ours), present)
    np.testing.assert_allclose(ours[present], theirs.numpy()[present], rtol=1e-6)
    assert miou(confusion) == pytest.approx(float(np.mean(theirs.numpy()[present])), rel=1e-6)


def test_iou_nan_for_absent_class_and_pixel_accuracy():
    confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    iou = iou_from_confusion(confusion)
    np.testing.assert_allclose(iou[:2], [3 / 4, 2 / 3])
    assert np.isnan(iou[2])
    assert miou(confusion) == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert pixel_accuracy(confusion) == pytest.approx(5 / 6)
    assert np.isnan(miou(np.zeros((3, 3), np.int64)))
    batched = miou(np.stack([confusion, np.eye(3, dtype=np.int64)]))
    np.testing.assert_allclose(batched, [(3 / 4 + 2 / 3) / 2, 1.0])


def test_pixel_and_class_accuracy_against_direct_counts():
    # Rows are the ground truth: row sums (4, 4, 0) differ from column sums (5, 3, 0).
    confusion = np.array([[3, 1, 0], [2, 2, 0], [0, 0, 0]])
    recall = class_accuracy(confusion)
    np.testing.assert_allclose(recall[:2], [3 / 4, 2 / 4])
    assert np.isnan(recall[2])
    single = np.array([[1, 0], [0, 0]])  # one pixel in all
    assert pixel_accuracy(single) == 1.0 and isinstance(pixel_accuracy(single), float)
    assert miou(single) == 1.0  # the one class that occurs
    batch = np.stack([confusion, 2 * np.eye(3, dtype=np.int64), np.zeros((3, 3), np.int64),
                      np.pad(single, ((0, 1), (0, 1)))])
    np.testing.assert_allclose(pixel_accuracy(batch), [5 / 8, 1.0, np.nan, 1.0])
    np.testing.assert_allclose(class_accuracy(batch),
                               [[3 / 4, 2 / 4, np.nan], [1.0, 1.0, 1.0], [np.nan] * 3,
                                [1.0, np.nan, np.nan]])
    np.testing.assert_allclose(miou(batch), [(3 / 6 + 2 / 5) / 2, 1.0, np.nan, 1.0])


# --------------------------------------------------------------------------- thresholding


@pytest.mark.parametrize("threshold", [0.0, 0.15, 0.25, 0.5, 1.0])
def test_scores_to_labels_equals_reference_argmax_with_ties(threshold):
    rng = np.random.default_rng(2)
    scores = quantised_scores(rng, 3, (30, 30))
    class_ids = np.array([4, 2, 9])
    # Ties of scores with the (float32) threshold must exist for the test to mean something.
    assert np.any(scores.max(axis=0) == np.float32(threshold))
    labels = scores_to_labels(scores, class_ids, threshold)
    assert labels.dtype == np.uint8 and labels.shape == (30, 30)
    np.testing.assert_array_equal(labels, reference_labels(scores, class_ids, threshold))
    # Ties go to background: foreground exactly where the best score is strictly above t.
    np.testing.assert_array_equal(labels > 0, scores.max(axis=0) > np.float32(threshold))


def test_scores_are_compared_in_their_own_precision():
    """float64 maps stay float64 (the reference pads the threshold into the maps' dtype): a
    score just above the threshold wins there, and ties with it in float32."""
    score = np.full((1, 1, 1), 0.30000001)
    assert scores_to_labels(score, np.array([1]), 0.3)[0, 0] == 1
    assert scores_to_labels(score.astype(np.float32), np.array([1]), 0.3)[0, 0] == 0


def test_scores_to_labels_class_ties_take_first_channel_and_no_classes():
    scores = np.full((2, 1, 2), 0.7, np.float32)
    np.testing.assert_array_equal(scores_to_labels(scores, np.array([5, 3]), 0.2), [[5, 5]])
    empty = scores_to_labels(np.zeros((0, 2, 3), np.float32), np.zeros(0, np.int64), 0.2)
    np.testing.assert_array_equal(empty, np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="class ids"):
        scores_to_labels(scores, np.array([1]), 0.2)


def test_sweep_equals_per_threshold_recomputation():
    rng = np.random.default_rng(3)
    n = 5
    gt = random_labels(rng, (25, 31), n)
    thresholds = [0.3, 0.0, 0.15, 0.95, 0.15, 0.5, 1.0, 0.05]  # unsorted, repeated, on ties
    for k, dtype in itertools.product((0, 1, 3), (np.float32, np.float64)):
        class_ids = rng.choice(np.arange(1, n), k, replace=False)
        scores = quantised_scores(rng, k, gt.shape).astype(dtype)
        sweep = sweep_confusions(scores, class_ids, gt, thresholds, n)
        assert sweep.shape == (len(thresholds), n, n) and sweep.dtype == np.int64
        for t, confusion in zip(thresholds, sweep, strict=True):
            expected = confusion_matrix(scores_to_labels(scores, class_ids, t), gt, n)
            np.testing.assert_array_equal(confusion, expected, err_msg=f"k={k} t={t} {dtype}")


def test_sweep_on_continuous_scores_and_input_checks():
    rng = np.random.default_rng(4)
    gt = random_labels(rng, (40, 40), 4)
    scores = rng.random((2, 40, 40), dtype=np.float32)
    class_ids = np.array([1, 3])
    sweep = sweep_confusions(scores, class_ids, gt, GRID, 4)
    for t, confusion in zip(GRID, sweep, strict=True):
        np.testing.assert_array_equal(
            confusion, confusion_matrix(scores_to_labels(scores, class_ids, t), gt, 4)
        )
    for ids in ([1, 4], [0, 1]):  # 0 is the background, 4 is past the last class
        with pytest.raises(ValueError, match=r"class ids must lie in \[1, 4\)"):
            sweep_confusions(scores, np.array(ids), gt, GRID, 4)
    with pytest.raises(ValueError, match="ground truth"):
        sweep_confusions(scores, class_ids, gt[:-1], GRID, 4)
    with pytest.raises(ValueError, match="thresholds"):
        sweep_confusions(scores, class_ids, gt, [], 4)


# --------------------------------------------------------------------------- per-image optima


def test_optimal_threshold_ties_go_to_lowest_threshold():
    # Image 0: one bright square, perfect for every t in [0, 0.5); image 1 undefined.
    gt = np.zeros((6, 6), np.uint8)
    gt[1:3, 1:3] = 1
    scores = np.where(gt == 1, 0.6, 0.0).astype(np.float32)[None]
    thresholds = [0.7, 0.45, 0.1, 0.3]
    confusions = np.stack([
        sweep_confusions(scores, np.array([1]), gt, thresholds, 2),
        sweep_confusions(scores, np.array([1]), np.full_like(gt, 255), thresholds, 2),
    ])
    best = optimal_thresholds(confusions, thresholds)
    assert best.index.tolist() == [2, -1]
    assert best.threshold[0] == 0.1 and np.isnan(best.threshold[1])
    assert best.miou[0] == 1.0 and np.isnan(best.miou[1])
    single = optimal_thresholds(confusions[0], thresholds)
    assert int(single.index) == 2


def test_optimum_at_the_first_threshold_undefined_thresholds_and_an_empty_oracle():
    perfect = np.array([[5, 0], [0, 3]])
    worse = np.array([[4, 1], [1, 2]])
    empty = np.zeros((2, 2), np.int64)  # no labelled pixel: mIoU NaN at that threshold
    thresholds = [0.2, 0.5, 0.1]
    confusions = np.stack([
        np.stack([perfect, worse, worse]),  # best at index 0 (not the lowest threshold)
        np.stack([worse, perfect, empty]),  # the lowest threshold is undefined: never picked
    ])
    best = optimal_thresholds(confusions, thresholds)
    assert best.index.tolist() == [0, 1]
    np.testing.assert_array_equal(best.threshold, [0.2, 0.5])
    np.testing.assert_array_equal(best.miou, [1.0, 1.0])
    oracle = per_image_oracle(confusions, thresholds)
    np.testing.assert_array_equal(oracle.confusion, 2 * perfect)  # index 0 counts too
    assert oracle.miou == 1.0
    nothing = per_image_oracle(np.zeros((2, 3, 2, 2), np.int64), thresholds)
    assert nothing.confusion.shape == (2, 2) and nothing.confusion.dtype == np.int64
    assert not nothing.confusion.any() and np.isnan(nothing.miou)
    assert nothing.optimum.index.tolist() == [-1, -1]


def make_image(rng: np.random.Generator, size: int = 24, classes: int = 3):
    """A GT with one or two blobs and maps whose contrast varies across images, so each image
    prefers a different threshold."""
    gt = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    ids = np.sort(rng.choice(np.arange(1, classes + 1), rng.integers(1, 3), replace=False))
    maps = []
    level = rng.uniform(0.1, 0.8)  # where this image's object/background boundary lies
    for cls in ids:
        cy, cx, r = rng.integers(5, size - 5), rng.integers(5, size - 5), rng.integers(3, 7)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        gt[blob] = cls
        edge = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
        maps.append(np.clip(1.0 - (1.0 - level) * edge + rng.normal(0, 0.05, edge.shape), 0, 1))
    gt[rng.random(gt.shape) < 0.03] = IGNORE_INDEX
    return np.stack(maps).astype(np.float32), ids, gt


def test_per_image_oracle_beats_best_global_threshold():
    rng = np.random.default_rng(5)
    n = 4
    confusions = np.stack([
        sweep_confusions(scores, ids, gt, GRID, n)
        for scores, ids, gt in (make_image(rng) for _ in range(12))
    ])
    oracle = per_image_oracle(confusions, GRID)
    global_best = np.nanmax(miou(confusions.sum(axis=0)))
    assert oracle.miou >= global_best
    assert oracle.optimum.threshold.shape == (12,)
    assert np.unique(oracle.optimum.threshold).size > 2  # the images disagree
    for i, index in enumerate(oracle.optimum.index):
        scores = image_miou(confusions[i])
        assert oracle.optimum.miou[i] == pytest.approx(np.nanmax(scores))
        assert scores[index] == np.nanmax(scores)
    np.testing.assert_array_equal(
        oracle.confusion, sum(confusions[i, j] for i, j in enumerate(oracle.optimum.index))
    )


def test_foreground_background_gap():
    gt = np.array([[0, 1, 2], [0, IGNORE_INDEX, 2]], np.uint8)
    scores = np.array([
        [[0.1, 0.9, 0.2], [0.3, 1.0, 0.0]],
        [[0.2, 0.1, 0.6], [0.0, 1.0, 0.8]],
        [[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]],  # class 3 is not in the GT
    ], np.float32)
    split = foreground_background_gap(scores, gt, np.array([1, 2, 3]))
    np.testing.assert_allclose(np.sort(split.fg), [0.6, 0.8, 0.9])
    np.testing.assert_allclose(np.sort(split.bg), [0.2, 0.3])
    assert split.fg_mean == pytest.approx(2.3 / 3)
    assert split.bg_mean == pytest.approx(0.25)
    assert split.gap == pytest.approx(2.3 / 3 - 0.25)
    fg, bg = foreground_background_gap(scores, gt)  # without ids: max over all channels
    assert np.allclose(fg, 0.9) and np.allclose(bg, 0.9)


# --------------------------------------------------------------------------- evaluation stage


class ArrayDataset(SegDataset):
    """A dataset whose masks live in memory (images are never read by the evaluation)."""

    class_names = ["cat", "dog", "bird"]

    def __init__(self, masks: dict[str, np.ndarray | None],
                 labels: dict[str, np.ndarray] | None = None):
        self.masks = masks
        self.stems = list(masks)
        self.labels = labels or {}  # class ids by stem; else the classes of the mask

    def image_path(self, stem: str) -> Path:
        return Path(f"/nonexistent/{stem}.png")

    def label(self, stem: str) -> np.ndarray:
        ids = self.labels.get(stem)
        if ids is None:
            mask = self.masks[stem]
            ids = [] if mask is None else [c for c in np.unique(mask)
                                           if 0 < c <= self.num_classes]
        label = np.zeros(self.num_classes, np.float32)
        label[np.asarray(ids, dtype=int) - 1] = 1
        return label

    def mask(self, stem: str) -> np.ndarray | None:
        return self.masks[stem]

    @property
    def has_masks(self) -> bool:
        return all(m is not None for m in self.masks.values())


@pytest.fixture
def maps_set(tmp_path):
    """Three images with maps (plus one stem without a map file), and their GT masks."""
    rng = np.random.default_rng(6)
    masks, labels, images = {}, {}, {}
    for i, stem in enumerate(["a 1", "b_2", "c.3", "no_maps"]):
        scores, ids, gt = make_image(rng, size=20 + 4 * i)
        masks[stem], labels[stem] = gt, ids
        if stem != "no_maps":
            images[stem] = (scores, ids, gt)
            strided = scores[:, ::4, ::4]
            save_score_maps(tmp_path / "maps" / f"{stem}.npz", ScoreMaps(ids, strided, scores))
    return tmp_path / "maps", ArrayDataset(masks, labels), images


def test_evaluate_maps_end_to_end(tmp_path, maps_set):
    maps_dir, dataset, images = maps_set
    result = evaluate_maps(maps_dir, dataset, GRID, tmp_path / "eval", name="cam",
                           threshold=0.12, robust_range=(0.1, 0.6))
    saved = load_json(tmp_path / "eval" / "cam_sweep.json")
    assert saved == result
    for key in ("name", "maps", "use", "images", "thresholds", "miou", "best_threshold",
                "best_miou", "threshold", "miou_at_threshold", "per_class_iou_at_best",
                "robust_range", "miou_range", "oracle_miou", "optimal_thresholds",
                "per_image_best_miou", "optimal_threshold_mean", "optimal_threshold_std",
                "optimal_threshold_quantiles", "fg_mean_activation", "bg_mean_activation",
                "fg_bg_gap"):
        assert key in result, key
    assert result["images"] == 3 and result["thresholds"] == GRID
    assert set(result["optimal_thresholds"]) == set(images)

    # Every number against a direct recomputation with the plain per-threshold functions.
    n = 4
    direct = [sum(confusion_matrix(scores_to_labels(s, ids, t), gt, n)
                  for s, ids, gt in images.values()) for t in GRID]
    np.testing.assert_allclose(result["miou"], [miou(c) for c in direct])
    best = int(np.argmax(result["miou"]))
    assert result["best_threshold"] == GRID[best]
    assert result["best_miou"] == pytest.approx(max(result["miou"]))
    assert result["miou_at_threshold"] == pytest.approx(
        evaluate_at_threshold(maps_dir, dataset, 0.12))
    assert list(result["per_class_iou_at_best"]) == ["background", "cat", "dog", "bird"]
    inside = [m for t, m in zip(GRID, result["miou"], strict=True) if 0.1 <= t <= 0.6]
    assert result["miou_range"] == pytest.approx(max(inside) - min(inside))
    assert result["oracle_miou"] >= result["best_miou"]
    optima = np.array(list(result["optimal_thresholds"].values()))
    assert result["optimal_threshold_mean"] == pytest.approx(optima.mean())
    assert result["optimal_threshold_std"] == pytest.approx(optima.std())
    assert list(result["optimal_threshold_quantiles"]) == ["p10", "p25", "p50", "p75", "p90"]
    np.testing.assert_allclose(list(result["optimal_threshold_quantiles"].values()),
                               np.quantile(optima, [0.10, 0.25, 0.50, 0.75, 0.90]))
    fg = np.concatenate([foreground_background_gap(s, g, i).fg for s, i, g in images.values()])
    bg = np.concatenate([foreground_background_gap(s, g, i).bg for s, i, g in images.values()])
    assert result["fg_mean_activation"] == pytest.approx(fg.mean())
    assert result["fg_bg_gap"] == pytest.approx(fg.mean() - bg.mean())

    # The strided maps are compared with the mask at every 4th pixel.
    strided = evaluate_maps(maps_dir, dataset, GRID, tmp_path / "eval", name="s", use="strided")
    assert strided["use"] == "strided"
    direct_strided = [
        miou(sum(confusion_matrix(scores_to_labels(s[:, ::4, ::4], ids, t), gt[::4, ::4], n)
                 for s, ids, gt in images.values()))
        for t in GRID
    ]
    np.testing.assert_allclose(strided["miou"], direct_strided)
    assert strided["best_miou"] == pytest.approx(max(direct_strided))


def test_evaluate_maps_in_worker_processes_gives_the_same_result(tmp_path, maps_set):
    maps_dir, dataset, images = maps_set
    alone = evaluate_maps(maps_dir, dataset, GRID, tmp_path / "one", name="cam", threshold=0.12)
    pooled = evaluate_maps(maps_dir, dataset, GRID, tmp_path / "two", name="cam", threshold=0.12,
                           workers=2)
    # Sums in dataset order: the float sums too, and the per-image tables in the same order.
    assert pooled == alone
    assert list(pooled["optimal_thresholds"]) == list(alone["optimal_thresholds"]) == \
        [stem for stem in dataset.stems if (maps_dir / f"{stem}.npz").is_file()]
    # A bad file met in a worker is the same one-line error, naming it.
    broken = maps_dir / f"{dataset.stems[1]}.npz"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(AmnsegError, match=f"^{broken}: not a valid score map file"):
        evaluate_maps(maps_dir, dataset, GRID, tmp_path / "three", workers=2)
    assert not (tmp_path / "three" / "cam_sweep.json").exists()


def test_oracle_counts_images_whose_optimum_is_the_lowest_threshold(tmp_path, maps_set):
    maps_dir, dataset, images = maps_set
    # A faint object: only at threshold 0.00 does it beat the background fill.
    gt = np.zeros((24, 24), np.uint8)
    gt[5:15, 6:18] = 2
    faint = np.where(gt == 2, 0.01, 0.0).astype(np.float32)[None]
    save_score_maps(maps_dir / "faint.npz", ScoreMaps(np.array([2]), faint[:, ::4, ::4], faint))
    dataset = ArrayDataset({**dataset.masks, "faint": gt}, dataset.labels)
    images = {**images, "faint": (faint, np.array([2]), gt)}
    result = evaluate_maps(maps_dir, dataset, GRID, tmp_path / "eval", name="cam")
    assert result["optimal_thresholds"]["faint"] == 0.0
    # The oracle: every image's confusion at its own optimal threshold, summed.
    oracle = sum(confusion_matrix(scores_to_labels(s, ids, result["optimal_thresholds"][stem]),
                                  gt_, 4) for stem, (s, ids, gt_) in images.items())
    assert result["oracle_miou"] == pytest.approx(miou(oracle))


def test_optimal_thresholds_and_their_statistics_on_images_with_known_optima(tmp_path):
    # Each image: an object at 0.9 on a background at b. Every threshold in [b, 0.9) labels it
    # perfectly, so its optimum is the lowest grid value at or above b (ties go to background).
    backgrounds = {"a": 0.12, "b": 0.23, "c": 0.38, "d": 0.52, "e": 0.57}
    expected = {"a": 0.15, "b": 0.25, "c": 0.40, "d": 0.55, "e": 0.60}
    masks = {}
    for stem, level in backgrounds.items():
        gt = np.zeros((16, 16), np.uint8)
        gt[4:12, 3:10] = 2
        scores = np.where(gt == 2, 0.9, level).astype(np.float32)[None]
        save_score_maps(tmp_path / "maps" / f"{stem}.npz",
                        ScoreMaps(np.array([2]), scores[:, ::4, ::4], scores))
        masks[stem] = gt
    result = evaluate_maps(tmp_path / "maps", ArrayDataset(masks), GRID, tmp_path / "eval",
                           threshold=None)
    assert result["optimal_thresholds"] == pytest.approx(expected)
    assert result["per_image_best_miou"] == pytest.approx(dict.fromkeys(expected, 1.0))
    assert result["oracle_miou"] == pytest.approx(1.0)
    optima = np.array(list(expected.values()))
    assert result["optimal_threshold_mean"] == pytest.approx(0.39)
    assert result["optimal_threshold_std"] == pytest.approx(optima.std())
    assert result["optimal_threshold_quantiles"] == pytest.approx(
        {"p10": 0.19, "p25": 0.25, "p50": 0.40, "p75": 0.55, "p90": 0.58})
    # Every threshold in [0.60, 0.9) labels all five perfectly: the lowest is the best.
    assert result["best_threshold"] == pytest.approx(0.60) and result["best_miou"] == 1.0
    assert result["miou_at_threshold"] is None
    # mIoU rises with the threshold up to 0.60 here: the robust range's spread runs from its
    # lower end (0.10, included) to its upper end (0.60).
    curve = dict(zip(GRID, result["miou"], strict=True))
    assert curve[0.1] < curve[0.15] and curve[0.55] < curve[0.6]
    assert result["miou_range"] == pytest.approx(curve[0.6] - curve[0.1])
    assert result["fg_mean_activation"] == pytest.approx(0.9)
    assert result["bg_mean_activation"] == pytest.approx(np.mean(list(backgrounds.values())))


def test_evaluate_maps_errors(tmp_path, maps_set):
    maps_dir, dataset, _ = maps_set
    out = tmp_path / "eval"
    with pytest.raises(AmnsegError, match="not found"):
        evaluate_maps(tmp_path / "missing", dataset, GRID, out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AmnsegError, match="holds no .npz"):
        evaluate_maps(tmp_path / "empty", dataset, GRID, out)
    no_gt = ArrayDataset(dict.fromkeys(dataset.stems), dataset.labels)
    with pytest.raises(AmnsegError, match="no ground-truth masks"):
        evaluate_maps(maps_dir, no_gt, GRID, out)
    ignored = ArrayDataset({stem: np.full_like(mask, 255) for stem, mask in
                            dataset.masks.items()}, dataset.labels)
    with pytest.raises(AmnsegError, match=r"the ground-truth masks of the 3 "
                       r"evaluated images label no pixel \(all 255, ignored\)"):
        evaluate_maps(maps_dir, ignored, GRID, out)
    with pytest.raises(AmnsegError, match="use="):
        evaluate_maps(maps_dir, dataset, GRID, out, use="half")
    # Class ids must lie in 1..C (0 is the background, which maps files do not hold).
    path = maps_dir / "c.3.npz"
    good = load_score_maps(path)
    for bad_id in (0, 4):
        ids = good.class_ids.copy()
        ids[0] = bad_id
        save_score_maps(path, ScoreMaps(ids, good.strided, good.full))
        with pytest.raises(AmnsegError, match=rf"c\.3\.npz: class ids .*{bad_id}.* outside 1\.\.3"):
            evaluate_maps(maps_dir, dataset, GRID, out)
    save_score_maps(path, good)
    dataset.masks["b_2"] = dataset.masks["b_2"][:-1]
    with pytest.raises(AmnsegError, match=r"b_2\.npz.*differ|b_2\.npz: maps are") as error:
        evaluate_maps(maps_dir, dataset, GRID, out)
    assert "\n" not in str(error.value)
    assert not (out / "cam_sweep.json").exists()


def test_plots_write_png(tmp_path, maps_set):
    maps_dir, dataset, _ = maps_set
    cam = evaluate_maps(maps_dir, dataset, GRID, tmp_path / "eval", name="cam")
    amn = dict(cam, miou=[m and min(1.0, m + 0.05) for m in cam["miou"]],
               optimal_thresholds={k: min(0.95, v + 0.1) for k, v in
                                   cam["optimal_thresholds"].items()})
    for plot, file in ((plot_sweep, "sweep.png"), (plot_optimal_threshold_histogram, "hist.png")):
        for results in ({"CAM": cam}, {"CAM": cam, "AMN": amn}):
            path = plot(results, tmp_path / "plots" / file)
            assert path == tmp_path / "plots" / file
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["hist.png", "sweep.png"]


def test_sweep_table_shows_undefined_values_and_the_runs_robust_range(tmp_path, maps_set):
    from rich.console import Console

    from amnseg.cli import sweep_table

    maps_dir, dataset, _ = maps_set
    # A sweep that holds no threshold of its robust range: the range's spread is undefined.
    result = evaluate_maps(maps_dir, dataset, [0.7, 0.8], tmp_path / "eval", name="cam",
                           robust_range=(0.1, 0.6))
    assert result["miou_range"] is None
    assert result["threshold"] == 0.15 and result["miou_at_threshold"] is not None  # default
    console = Console(record=True, width=200)
    console.print(sweep_table({"CAM": result, "other": dict(result, oracle_miou=None,
                                                            fg_bg_gap=None)}))
    text = console.export_text()
    assert "range 0.1-0.6" in text
    cam_row = next(line for line in text.splitlines() if "CAM" in line)
    assert f"{100 * result['best_miou']:.1f}" in cam_row and "n/a" in cam_row
    other_row = next(line for line in text.splitlines() if "other" in line)
    assert other_row.count("n/a") == 3
    assert "│      3 │" in cam_row and "different numbers of images" not in text
    # Sets over other images are said to be so.
    console = Console(record=True, width=200)
    console.print(sweep_table({"CAM": result, "AMN": dict(result, images=1)}))
    text = console.export_text()
    assert "the map sets cover different numbers of images" in text
    assert "│      1 │" in next(line for line in text.splitlines() if "AMN" in line)


def test_evaluate_label_maps_by_hand(tmp_path):
    """Seeds/pseudo masks against GT: 255 (unsure) counts as background, the unsure fraction
    pools every pixel, an image's mIoU averages the classes in its GT or prediction."""
    from amnseg.io import save_label_png
    from amnseg.stages.evaluate import evaluate_label_maps

    gt_a = np.array([[0, 0, 1, 1]], np.uint8)
    seeds_a = np.array([[0, 255, 1, 255]], np.uint8)  # as background: [0, 0, 1, 0]
    gt_b = np.array([[2, 2, 0, 255]], np.uint8)  # the last pixel is ignored
    seeds_b = np.array([[2, 3, 0, 1]], np.uint8)
    for stem, seeds in (("a", seeds_a), ("b", seeds_b)):
        save_label_png(tmp_path / "seeds" / f"{stem}.png", seeds)
    dataset = ArrayDataset({"a": gt_a, "b": gt_b})
    result = evaluate_label_maps(tmp_path / "seeds", dataset, tmp_path / "eval", "cam_seeds")
    assert load_json(tmp_path / "eval" / "cam_seeds.json") == result
    assert result["images"] == 2 and result["unsure_fraction"] == pytest.approx(2 / 8)
    # Pooled: background TP 3 (a: 2, b: 1), FP 1 (a's 4th pixel); class 1: TP 1, FN 1;
    # class 2: TP 1, FN 1; class 3: FP 1.
    iou = {"background": 3 / 4, "cat": 1 / 2, "dog": 1 / 2, "bird": 0.0}
    assert result["per_class_iou"] == pytest.approx(iou)
    assert result["miou"] == pytest.approx(np.mean(list(iou.values())))
    assert result["per_image_miou"] == pytest.approx({"a": (2 / 3 + 1 / 2) / 2,
                                                      "b": (1 + 1 / 2 + 0) / 3})
    # A class beyond the dataset's is named (4 for 3 classes; 3 is fine, as above).
    save_label_png(tmp_path / "seeds" / "b.png", np.array([[2, 4, 0, 1]], np.uint8))
    with pytest.raises(AmnsegError, match=r"b.png: holds class 4, the dataset has 3$"):
        evaluate_label_maps(tmp_path / "seeds", dataset, tmp_path / "eval", "cam_seeds")


def test_maps_of_other_classes_than_their_image_are_named(tmp_path, maps_set):
    """Maps of another dataset, or made before a label changed, are not scored."""
    maps_dir, dataset, images = maps_set
    ids = images["b_2"][1]
    others = [c for c in (1, 2, 3) if c not in ids]
    relabelled = ArrayDataset(dataset.masks, {**dataset.labels, "b_2": others})
    names = dict(enumerate(["cat", "dog", "bird"], start=1))
    with pytest.raises(AmnsegError, match=re.escape(
            f"b_2.npz: maps of the classes {', '.join(names[c] for c in ids)}, but the image is "
            f"labelled {', '.join(names[c] for c in others)} (maps of another dataset, or made "
            "before its labels changed: make them again)")):
        evaluate_maps(maps_dir, relabelled, GRID, tmp_path / "eval")
    with pytest.raises(AmnsegError, match="but the image is labelled none"):
        evaluate_maps(maps_dir, ArrayDataset(dataset.masks, {**dataset.labels, "b_2": []}),
                      GRID, tmp_path / "eval")
