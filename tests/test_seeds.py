"""Seeds (METHOD.md section 3): thresholds, the CRF's exact parameters, and whole seed files
against a direct pydensecrf computation written here."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from conftest import tiny_config, write_tiny_folder_dataset
from pydensecrf.utils import unary_from_labels

from amnseg.config import CrfConfig, load_config
from amnseg.data import build_dataset
from amnseg.data.base import read_index_png
from amnseg.io import ScoreMaps, save_score_maps
from amnseg.ops.crf import crf_refine_labels, crf_refine_labels_many
from amnseg.stages import seeds as seeds_stage


def direct_crf(image: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """The seed CRF as METHOD.md section 3 states it, with its constants written out."""
    height, width = labels.shape
    crf = dcrf.DenseCRF2D(width, height, count)
    crf.setUnaryEnergy(unary_from_labels(labels, count, gt_prob=0.7, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image.copy()),
                             compat=10)
    return np.array(crf.inference(10)).argmax(axis=0).reshape(height, width)


def direct_seed(image, scores, class_ids, fg_threshold, bg_threshold) -> np.ndarray:
    keys = np.array([0, *class_ids])
    count = len(keys)

    def refined(threshold: float) -> np.ndarray:
        padded = np.concatenate([np.full((1, *scores.shape[1:]), threshold), scores])
        return keys[direct_crf(image, padded.argmax(axis=0), count)]

    fg, bg = refined(fg_threshold), refined(bg_threshold)
    seed = fg.astype(np.uint8)
    seed[fg == 0] = 255
    seed[(fg == 0) & (bg == 0)] = 0
    return seed


def scene(height: int = 27, width: int = 41, seed: int = 0):
    """An image with two coloured regions on a textured background and smooth, asymmetric maps
    of two classes that spill over the regions' edges (so the CRF has work to do)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    image = rng.integers(30, 90, (height, width, 3)).astype(np.uint8)
    left = (yy - 12) ** 2 / 60 + (xx - 11) ** 2 / 40 < 1
    right = (abs(yy - 15) < 7) & (abs(xx - 29) < 8)
    image[left] = (210, 70, 50)
    image[right] = (40, 90, 220)
    first = np.exp(-((yy - 11) ** 2 + (xx - 13) ** 2) / 50.0)
    second = np.exp(-((yy - 16) ** 2 + (xx - 27) ** 2) / 80.0) * 0.8
    scores = np.stack([first, second]).astype(np.float32)
    return image, scores, np.array([2, 5])


def test_make_seed_equals_direct_crf_computation():
    image, scores, class_ids = scene()
    got = seeds_stage.make_seed(image, scores, class_ids, 0.30, 0.05, CrfConfig())
    expected = direct_seed(image, scores, class_ids, 0.30, 0.05)
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) == {0, 2, 5, 255}  # every outcome occurs
    # The CRF matters on this input: plain thresholding gives another seed.
    plain = np.concatenate([np.full((1, *scores.shape[1:]), 0.30), scores]).argmax(0)
    assert (np.array([0, 2, 5])[plain] != np.where(got == 255, 0, got)).any()


def test_seed_thresholds_come_from_the_config():
    config = load_config(None, [])
    assert seeds_stage.seed_thresholds(config, "cam") == (0.30, 0.05)
    assert seeds_stage.seed_thresholds(config, "amn") == (0.45, 0.15)
    changed = load_config(None, ["seeds.amn_fg_threshold=0.5", "seeds.amn_bg_threshold=0.2"])
    assert seeds_stage.seed_thresholds(changed, "amn") == (0.5, 0.2)


class RecordingCRF:
    """Stands in for pydensecrf's DenseCRF2D: records every call with its arguments bound to
    the parameter names of pydensecrf's own methods."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, width, height, labels):
        RecordingCRF.calls.append(("init", {"width": width, "height": height, "labels": labels}))
        self.shape = (labels, height * width)

    def setUnaryEnergy(self, unary):  # noqa: N802 (pydensecrf's name)
        RecordingCRF.calls.append(("unary", {"unary": np.array(unary)}))

    def addPairwiseGaussian(self, sxy, compat, kernel=None, normalization=None):  # noqa: N802
        RecordingCRF.calls.append(("gaussian", {"sxy": sxy, "compat": compat}))

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=None,  # noqa: N802
                             normalization=None):
        RecordingCRF.calls.append(
            ("bilateral", {"sxy": sxy, "srgb": srgb, "rgbim": np.array(rgbim), "compat": compat})
        )

    def inference(self, iterations):
        RecordingCRF.calls.append(("inference", {"iterations": iterations}))
        marginals = np.zeros(self.shape, np.float32)
        marginals[1] = 1.0
        return marginals


def test_crf_parameters_reach_pydensecrf(monkeypatch):
    monkeypatch.setattr(dcrf, "DenseCRF2D", RecordingCRF)
    RecordingCRF.calls = []
    image, scores, _ = scene(height=9, width=14)
    labels = np.random.default_rng(1).integers(0, 3, (9, 14))
    refined = crf_refine_labels(image, labels, 3, CrfConfig())
    assert refined.shape == (9, 14) and (refined == 1).all()
    calls = dict(RecordingCRF.calls)
    assert [name for name, _ in RecordingCRF.calls] == [
        "init", "unary", "gaussian", "bilateral", "inference"]
    assert calls["init"] == {"width": 14, "height": 9, "labels": 3}
    np.testing.assert_array_equal(
        calls["unary"]["unary"], unary_from_labels(labels, 3, gt_prob=0.7, zero_unsure=False))
    assert calls["gaussian"] == {"sxy": 3, "compat": 3}
    bilateral = calls["bilateral"]
    np.testing.assert_array_equal(bilateral.pop("rgbim"), image)
    assert bilateral == {"sxy": 50, "srgb": 5, "compat": 10}
    assert calls["inference"] == {"iterations": 10}

    RecordingCRF.calls = []
    custom = CrfConfig(iterations=4, gt_prob=0.9, gaussian_sxy=2, gaussian_compat=7,
                       bilateral_sxy=30, bilateral_srgb=11, bilateral_compat=6)
    crf_refine_labels(image, labels, 3, custom)
    calls = dict(RecordingCRF.calls)
    np.testing.assert_array_equal(
        calls["unary"]["unary"], unary_from_labels(labels, 3, gt_prob=0.9, zero_unsure=False))
    assert calls["gaussian"] == {"sxy": 2, "compat": 7}
    calls["bilateral"].pop("rgbim")
    assert calls["bilateral"] == {"sxy": 30, "srgb": 11, "compat": 6}
    assert calls["inference"] == {"iterations": 4}


def test_seed_crfs_share_one_lattice_and_equal_separate_crfs(monkeypatch):
    image, scores, class_ids = scene()
    labels = [np.random.default_rng(k).integers(0, 3, scores.shape[1:]) for k in range(3)]
    shared = crf_refine_labels_many(image, labels, 3, CrfConfig())
    for got, alone in zip(shared, labels, strict=True):
        np.testing.assert_array_equal(got, crf_refine_labels(image, alone, 3, CrfConfig()))
        np.testing.assert_array_equal(got, direct_crf(image, alone, 3))
    assert not np.array_equal(shared[0], shared[1])  # each map got its own unary
    # make_seed builds the kernels once: one CRF, the fg unary, then the bg unary, in order.
    monkeypatch.setattr(dcrf, "DenseCRF2D", RecordingCRF)
    RecordingCRF.calls = []
    seeds_stage.make_seed(image, scores, class_ids, 0.30, 0.05, CrfConfig())
    assert [name for name, _ in RecordingCRF.calls] == [
        "init", "unary", "gaussian", "bilateral", "inference", "unary", "inference"]
    unaries = [args["unary"] for name, args in RecordingCRF.calls if name == "unary"]
    for unary, threshold in zip(unaries, (0.30, 0.05), strict=True):
        labels = seeds_stage.threshold_argmax(scores, threshold)
        np.testing.assert_array_equal(
            unary, unary_from_labels(labels, 3, gt_prob=0.7, zero_unsure=False))


@pytest.mark.parametrize("channels", [0, 1, 3])
def test_threshold_pair_is_two_threshold_argmaxes_ties_included(channels):
    rng = np.random.default_rng(channels)
    # Scores on a coarse grid: many equal to a threshold or to each other.
    scores = (rng.integers(0, 8, (channels, 9, 11)) / 20).astype(np.float32)
    assert (scores == np.float32(0.30)).any() or channels == 0
    # Python floats, as the config gives: float32(0.3) > 0.3 in float64, not in float32.
    fg, bg = seeds_stage.threshold_pair(scores, 0.30, 0.05)
    np.testing.assert_array_equal(fg, seeds_stage.threshold_argmax(scores, 0.30))
    np.testing.assert_array_equal(bg, seeds_stage.threshold_argmax(scores, 0.05))
    assert fg.shape == bg.shape == (9, 11)


def test_crf_accepts_read_only_images():
    # Images decoded by PIL and memory-mapped arrays can be read-only; pydensecrf needs a
    # writable buffer, so the CRF works on its own copy.
    image = np.zeros((30, 30, 3), np.uint8)
    image[:, 15:] = 200
    labels = np.zeros((30, 30), np.int64)
    labels[:, 12:] = 1
    expected = crf_refine_labels(image, labels, 2, CrfConfig())
    image.setflags(write=False)
    np.testing.assert_array_equal(crf_refine_labels(image, labels, 2, CrfConfig()), expected)


def test_crf_follows_image_edges():
    image = np.zeros((30, 30, 3), np.uint8)
    image[:, 15:] = 200
    labels = np.zeros((30, 30), np.int64)
    labels[:, 12:] = 1  # the label edge is 3 px off the image edge
    refined = crf_refine_labels(image, labels, 2, CrfConfig())
    assert (refined[:, 15:] == 1).mean() > 0.95
    assert (refined[:, :12] == 0).mean() > 0.95
    assert (refined[:, 12:15] == 0).mean() > 0.5  # pulled back to the colour edge


@pytest.mark.parametrize("source", ["cam", "amn"])
def test_seed_files_equal_direct_computation_for_any_worker_count(tmp_path, source):
    data = write_tiny_folder_dataset(tmp_path / "data", count=6)
    config = tiny_config(data, tmp_path / "run")
    dataset = build_dataset(config.data, "train")
    rng = np.random.default_rng(4)
    maps = {}
    for stem in dataset.stems:
        class_ids = np.flatnonzero(dataset.label(stem)) + 1
        full = rng.random((len(class_ids), 32, 32)).astype(np.float32) ** 2
        maps[stem] = (full, class_ids)
        save_score_maps(tmp_path / "run" / source / "maps" / f"{stem}.npz",
                        ScoreMaps(class_ids, full[:, ::4, ::4], full))
    fg, bg = (0.30, 0.05) if source == "cam" else (0.45, 0.15)
    outputs = {}
    for workers in (1, 2, 3):
        out = seeds_stage.make_seeds(config, source, out_dir=tmp_path / f"s{workers}",
                                     workers=workers)
        outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}
    assert len(outputs[1]) == 6
    assert outputs[1] == outputs[2] == outputs[3]
    for stem, (full, class_ids) in maps.items():
        expected = direct_seed(dataset.image(stem), full, class_ids, fg, bg)
        np.testing.assert_array_equal(read_index_png(tmp_path / "s1" / f"{stem}.png"), expected)
    # The default output folder is the run's seeds/<source>.
    assert seeds_stage.make_seeds(config, source, workers=1) == tmp_path / "run" / "seeds" / source
