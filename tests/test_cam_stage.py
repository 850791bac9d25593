"""The CAM stage on a tiny folder dataset: training, resume, maps, and the map files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from amnseg.checkpoints import load_model
from amnseg.data.transforms import paste_crop, random_crop_box
from amnseg.errors import AmnsegError
from amnseg.io import load_checkpoint, load_score_maps
from amnseg.ops.multiscale import max_normalize, multiscale_cam, multiscale_inputs
from amnseg.stages import cam as cam_stage
from amnseg.training import TrainingState, poly_lr_lambda


def test_random_crop_cuts_large_and_pads_small_sides():
    rng = np.random.default_rng(0)
    image = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3) + 1
    for _ in range(20):
        box = random_crop_box(10, 3, 6, rng)
        crop = paste_crop(image, box, 6, 0.0)
        assert crop.shape == (2, 6, 6)
        nonzero_cols = np.flatnonzero(crop[0].any(axis=0))
        assert len(nonzero_cols) == 3 and np.all(np.diff(nonzero_cols) == 1)  # whole width
        rows = crop[0][:, nonzero_cols]
        assert np.all(np.diff(rows[:, 0]) == 3)  # six consecutive image rows


def test_random_crop_offsets_cover_every_position_and_no_other():
    """The reference's offsets: randrange over every position that keeps the window inside
    the image (a long side) or the image inside the canvas (a short side), both ends included."""
    rng = np.random.default_rng(1)
    cut, placed = set(), set()
    for _ in range(400):
        canvas_rows, canvas_cols, image_rows, image_cols = random_crop_box(9, 4, 6, rng)
        assert (canvas_rows.stop - canvas_rows.start, image_rows.stop - image_rows.start) == (6, 6)
        assert canvas_rows.start == 0 and image_cols == slice(0, 4)
        cut.add(image_rows.start)
        placed.add(canvas_cols.start)
    assert cut == {0, 1, 2, 3}  # 9 rows, a window of 6
    assert placed == {0, 1, 2}  # 4 columns on a canvas of 6
    # A side as long as the crop is taken whole, at offset 0 both ways.
    assert random_crop_box(6, 6, 6, rng) == (slice(0, 6),) * 4


def test_random_resize_long_draws_every_long_side_in_the_range():
    from amnseg.data.transforms import random_resize_long

    rng = np.random.default_rng(2)
    portrait = np.zeros((40, 20, 3), np.uint8)  # the long side is the height
    sides = {random_resize_long(portrait, 30, 32, rng).shape[:2] for _ in range(200)}
    assert sides == {(30, 15), (31, 16), (32, 16)}  # round(20 * s / 40) for s in 30..32
    landscape = np.zeros((2, 10, 3), np.uint8)
    assert random_resize_long(landscape, 20, 20, rng).shape[:2] == (4, 20)
    tiny = np.zeros((2, 2, 3), np.uint8)  # sides shorter than the channel count
    assert random_resize_long(tiny, 4, 4, rng).shape[:2] == (4, 4)


def test_cam_training_transform_draws_the_long_side_flips_and_pads_with_zero():
    """The reference's CAM augmentation through the transform itself: long side drawn from the
    whole range, a horizontal flip by default, the ImageNet normalisation, zero padding."""
    from amnseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ClassificationTrainTransform

    image = np.zeros((40, 20, 3), np.uint8)
    image[:, :10] = 255  # left half white: a flip moves it to the right
    transform = ClassificationTrainTransform((30, 32), crop_size=36)
    assert transform.flip is True
    rng = np.random.default_rng(3)
    sizes, white_sides = set(), []
    white = (1.0 - IMAGENET_MEAN) / IMAGENET_STD
    for _ in range(200):
        crop = transform(image, rng).numpy()
        assert crop.shape == (3, 36, 36)
        inside = crop[0] != 0  # the pad is 0, both halves of the image are not
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        sizes.add((len(rows), len(cols)))
        middle = crop[:, rows[len(rows) // 2]]
        left, right = middle[:, cols[0]], middle[:, cols[-1]]
        white_sides.append("left" if np.allclose(left, white, atol=1e-5) else
                           "right" if np.allclose(right, white, atol=1e-5) else "?")
    assert sizes == {(30, 15), (31, 16), (32, 16)}
    assert set(white_sides) == {"left", "right"}
    assert 70 <= white_sides.count("right") <= 130  # flipped with probability 1/2


def test_poly_schedule_matches_formula():
    schedule = poly_lr_lambda(100, 0.9)
    assert schedule(0) == 1.0
    assert schedule(50) == pytest.approx(0.5**0.9)
    assert schedule(100) == 0.0


def test_train_and_make_cams(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run")
    checkpoint_path = cam_stage.train_cam(config)
    checkpoint = load_checkpoint(checkpoint_path)
    assert checkpoint["class_names"] == ["square", "disc"]
    log = (tmp_path / "run" / "cam" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2
    # 8 images in batches of 4, 2 epochs: the poly decay spans 4 steps, so after epoch 1
    # (step 2) the lr is lr (1 - 2/4)^0.9 (head: 10x), and 0 at the end.
    # Two steps per epoch: a steady rate (after the first step) is logged.
    assert all(json.loads(line)["steady_images_per_s"] > 0 for line in log)
    first, last = json.loads(log[0])["lr"], json.loads(log[1])["lr"]
    lr = config.cam.lr * 0.5**config.cam.poly_power
    assert first == pytest.approx([lr, lr * config.cam.head_lr_mult], rel=1e-9)
    assert last == [0.0, 0.0]

    maps_dir = cam_stage.make_cams(config)
    files = sorted(maps_dir.glob("*.npz"))
    assert len(files) == 8
    assert not list(maps_dir.glob(".*"))  # no temporary files left

    # Every file equals an independent computation with the saved model.
    from amnseg.data import build_dataset

    dataset = build_dataset(config.data, "train")
    model = load_model(checkpoint_path, "cam", dataset.class_names).eval()
    for stem in dataset.stems[:3]:
        sample = dataset[dataset.index_of(stem)]
        maps = load_score_maps(maps_dir / f"{stem}.npz")
        expected_ids = np.flatnonzero(sample.label) + 1
        assert maps.class_ids.tolist() == expected_ids.tolist()
        strided, full = multiscale_cam(
            model.cam, multiscale_inputs(sample.image, config.cam.scales), sample.image.shape[:2], 8
        )
        keep = torch.as_tensor(expected_ids - 1)
        np.testing.assert_allclose(maps.full, max_normalize(full[keep]).numpy(), atol=1e-6)
        np.testing.assert_allclose(maps.strided, max_normalize(strided[keep]).numpy(), atol=1e-6)
        assert maps.strided.shape[1:] == (8, 8) and maps.full.shape[1:] == (32, 32)

    # compress_maps=false: the same arrays, stored without zip compression.
    plain_config = tiny_config(tiny_dataset, tmp_path / "plain", "compress_maps=false")
    plain_dir = cam_stage.make_cams(plain_config, checkpoint_path)
    for path in files:
        with zipfile.ZipFile(path) as packed, zipfile.ZipFile(plain_dir / path.name) as plain:
            assert {i.compress_type for i in packed.infolist()} == {zipfile.ZIP_DEFLATED}
            assert {i.compress_type for i in plain.infolist()} == {zipfile.ZIP_STORED}
        for key in ("class_ids", "strided", "full"):
            with np.load(path) as packed, np.load(plain_dir / path.name) as plain:
                np.testing.assert_array_equal(packed[key], plain[key])

    # Resume per image: a deleted map is recomputed identically, the others are kept.
    victim = files[3]
    before = victim.read_bytes()
    kept_mtime = files[0].stat().st_mtime_ns
    victim.unlink()
    cam_stage.make_cams(config)
    assert victim.read_bytes() == before
    assert files[0].stat().st_mtime_ns == kept_mtime


def test_training_resumes_from_last_epoch(tiny_dataset, tmp_path, monkeypatch):
    straight = tiny_config(tiny_dataset, tmp_path / "straight")
    reference = load_checkpoint(cam_stage.train_cam(straight))["model"]

    resumed = tiny_config(tiny_dataset, tmp_path / "resumed")
    original_save = TrainingState.save

    def save_then_die(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(TrainingState, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cam_stage.train_cam(resumed)
    monkeypatch.setattr(TrainingState, "save", original_save)
    assert not (tmp_path / "resumed" / "cam" / "cam.pt").exists()
    result = load_checkpoint(cam_stage.train_cam(resumed))["model"]
    for key, value in reference.items():
        assert torch.equal(value, result[key]), key


def test_checkpoint_for_wrong_class_count_is_refused(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run", "cam.epochs=1")
    path = cam_stage.train_cam(config)
    with pytest.raises(AmnsegError, match="checkpoint is for 2 classes, the dataset has 3"):
        load_model(path, "cam", ["a", "b", "c"])


def save_random_cam_checkpoint(config) -> Path:
    """A CAM checkpoint of random weights (classifier ~ N(0, 1)) at the run's usual place."""
    from amnseg.checkpoints import save_model
    from amnseg.data import build_dataset
    from amnseg.layout import checkpoint_path
    from amnseg.models import CAMNet, build_backbone

    dataset = build_dataset(config.data, "train")
    torch.manual_seed(0)
    model = CAMNet(build_backbone(config.backbone), dataset.num_classes)
    torch.nn.init.normal_(model.classifier.weight)
    checkpoint = checkpoint_path(config, "cam")
    save_model(checkpoint, "cam", model, dataset.class_names, config.backbone)
    return checkpoint


def test_map_groups_of_mixed_sizes_equal_one_image_at_a_time(tiny_dataset, tmp_path):
    """map_batch_images groups consecutive images of one size into one forward pass; the maps
    are those of one image at a time (to float rounding), whatever the sizes' order, and a
    map deleted after the run is recomputed in its group, byte for byte."""
    from PIL import Image

    from amnseg.layout import checkpoint_path

    for stem in ("img 02", "img 03", "img 06"):
        path = tiny_dataset / "images" / f"{stem}.png"
        Image.open(path).resize((40, 24)).save(path)
        mask = tiny_dataset / "masks" / f"{stem}.png"
        Image.open(mask).resize((40, 24), Image.NEAREST).save(mask)
    one = tiny_config(tiny_dataset, tmp_path / "one", "map_batch_images=1")
    save_random_cam_checkpoint(one)
    single = cam_stage.make_cams(one)
    grouped_config = tiny_config(tiny_dataset, tmp_path / "grouped", "map_batch_images=3")
    grouped = cam_stage.make_cams(grouped_config, checkpoint_path(one, "cam"))
    assert sorted(p.name for p in grouped.iterdir()) == sorted(p.name for p in single.iterdir())
    for path in single.iterdir():
        a, b = load_score_maps(path), load_score_maps(grouped / path.name)
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
        np.testing.assert_allclose(b.full, a.full, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.strided, a.strided, rtol=1e-5, atol=1e-6)
    victim = grouped / "img 05.npz"  # in the group img 04, img 05
    before = victim.read_bytes()
    victim.unlink()
    cam_stage.make_cams(grouped_config, checkpoint_path(one, "cam"))
    assert victim.read_bytes() == before
    with pytest.raises(AmnsegError, match="map_batch_images=0: must be an integer >= 1"):
        tiny_config(tiny_dataset, tmp_path / "bad", "map_batch_images=0")


def test_map_files_written_by_writer_threads_equal_those_written_in_turn(tiny_dataset,
                                                                         tmp_path):
    """With loader workers the map files are compressed and written on threads
    (io.BackgroundWriter); the files are byte for byte those of the one-thread stage."""
    in_turn = tiny_config(tiny_dataset, tmp_path / "in_turn", "data.num_workers=0")
    checkpoint = save_random_cam_checkpoint(in_turn)
    written_in_turn = cam_stage.make_cams(in_turn)
    threaded = cam_stage.make_cams(
        tiny_config(tiny_dataset, tmp_path / "threaded", "data.num_workers=2"), checkpoint)
    names = sorted(p.name for p in written_in_turn.iterdir())
    assert names == sorted(p.name for p in threaded.iterdir()) and len(names) == 8
    for name in names:
        assert (threaded / name).read_bytes() == (written_in_turn / name).read_bytes(), name


@pytest.mark.gpu
def test_gpu_map_stage_equals_the_cpu_one(tiny_dataset, tmp_path, monkeypatch):
    """On CUDA the stage normalises uint8 inputs on the device and takes the maps back
    asynchronously, a group late, while threads write the files: the same maps as the CPU
    stage's, to float rounding (with TF32 off: PyTorch's default TF32 convolutions alone
    differ from the CPU by ~1e-3 relative, which would hide nothing this test looks for)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    on_cpu = tiny_config(tiny_dataset, tmp_path / "cpu", "map_batch_images=3")
    checkpoint = save_random_cam_checkpoint(on_cpu)
    expected = cam_stage.make_cams(on_cpu)
    on_gpu = cam_stage.make_cams(tiny_config(
        tiny_dataset, tmp_path / "gpu", "device=cuda", "map_batch_images=3",
        "data.num_workers=2"), checkpoint)
    names = sorted(p.name for p in expected.iterdir())
    assert names == sorted(p.name for p in on_gpu.iterdir()) and len(names) == 8
    for name in names:
        a, b = load_score_maps(expected / name), load_score_maps(on_gpu / name)
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
        np.testing.assert_allclose(b.full, a.full, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b.strided, a.strided, rtol=1e-4, atol=1e-5)



def test_logged_loss_is_the_image_weighted_mean_of_every_step(tiny_dataset, tmp_path,
                                                              monkeypatch):
    """The loop reads each step's loss one step late; every step still counts once."""
    import amnseg.training as training

    returned: list[float] = []
    original = training.train_step

    def recording_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        returned.append(loss.item())
        return loss

    monkeypatch.setattr(training, "train_step", recording_step)
    config = tiny_config(tiny_dataset, tmp_path / "run")
    cam_stage.train_cam(config)
    log = [json.loads(line) for line in
           (tmp_path / "run" / "cam" / "log.jsonl").read_text().splitlines()]
    # 8 images in batches of 4: two steps per epoch, 4 images each.
    assert len(returned) == 4 and [r["steps"] for r in log] == [2, 2]
    for epoch, record in enumerate(log):
        step_losses = returned[2 * epoch: 2 * epoch + 2]
        assert record["loss"] == (step_losses[0] * 4 + step_losses[1] * 4) / 8


def test_compile_and_cudnn_options_reach_the_training_loop(tiny_dataset, tmp_path,
                                                           monkeypatch):
    compiled: list[tuple[torch.nn.Module, str]] = []

    def fake_compile(module, mode=None):  # the wiring only: compiling takes minutes
        compiled.append((module, mode))
        return module

    import amnseg.training as training

    searching: list[bool] = []  # cuDNN's algorithm search during each training step
    original = training.train_step

    def recording_step(*args, **kwargs):
        searching.append(torch.backends.cudnn.benchmark)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(training, "train_step", recording_step)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    plain = cam_stage.train_cam(tiny_config(tiny_dataset, tmp_path / "plain"))
    assert compiled == [] and searching == [False] * 4
    fast = cam_stage.train_cam(tiny_config(tiny_dataset, tmp_path / "fast",
                                           "compile_training=reduce-overhead",
                                           "cudnn_benchmark=true"))
    assert [mode for _, mode in compiled] == ["reduce-overhead"]
    assert searching[4:] == [True] * 4
    assert torch.backends.cudnn.benchmark is False  # the next stages keep their setting
    plain_weights, fast_weights = load_checkpoint(plain)["model"], load_checkpoint(fast)["model"]
    assert all(torch.equal(plain_weights[key], fast_weights[key]) for key in plain_weights)


def test_compile_without_a_compiler_is_a_one_line_error(tiny_dataset, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    config = tiny_config(tiny_dataset, tmp_path / "run", "compile_training=default")
    with pytest.raises(AmnsegError, match="compile_training=default: torch.compile needs a C"):
        cam_stage.train_cam(config)
