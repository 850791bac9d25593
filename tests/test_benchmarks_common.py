"""benchmarks/common.py: RESULTS.md sections are replaced by name, and a GPU machine's figures
carry the card's model in the name, so that two cards' figures do not overwrite each other."""

from __future__ import annotations

import pytest
import torch

from benchmarks import common


def test_sections_are_replaced_by_name_and_named_after_the_card(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    common.write_section("Walk", "cpu figures")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    common.write_section("Walk", "first H100 figures")
    common.write_section("Walk", "second H100 figures")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    common.write_section("Walk (H200)", "H200 figures")  # a name that has the card already
    text = (tmp_path / "RESULTS.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Walk", "## Walk (H100)", "## Walk (H200)"]
    assert "cpu figures" in text and "second H100 figures" in text and "H200 figures" in text
    assert "first H100 figures" not in text


def test_card_name_is_the_model_or_the_whole_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for full, short in [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100"),
                        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090")]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0, full=full: full)
        assert common.card_name() == short
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.card_name() is None


def make_files(folder, times):
    """Files 000.png, 001.png, ... with the given modification times (seconds)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    for index, moment in enumerate(times):
        path = folder / f"{index:03d}.png"
        path.write_bytes(b"")
        os.utime(path, (moment, moment))


def test_steady_rate_leaves_out_the_start_up(tmp_path):
    from benchmarks.bench_pipeline import steady_rate_from_files

    # Two slow files (start-up), then one every 0.5 s: 2 files/s from the last one left out.
    make_files(tmp_path / "out", [1000.0, 1005.0] + [1005.0 + 0.5 * k for k in range(1, 19)])
    assert steady_rate_from_files(tmp_path / "out", "*.png") == pytest.approx(2.0)
    assert steady_rate_from_files(tmp_path / "out", "*.npz") is None  # other files only
    make_files(tmp_path / "few", [1.0, 2.0, 3.0])
    assert steady_rate_from_files(tmp_path / "few", "*.png") is None
    make_files(tmp_path / "same", [7.0] * 8)
    assert steady_rate_from_files(tmp_path / "same", "*.png") is None
    # Files in one burst at the end of a 5 s stage: their 0.07 s says nothing of a rate.
    make_files(tmp_path / "burst", [1000.0 + 0.01 * k for k in range(8)])
    assert steady_rate_from_files(tmp_path / "burst", "*.png", least_seconds=5 / 4) is None
    assert steady_rate_from_files(tmp_path / "out", "*.png", least_seconds=2.0) == \
        pytest.approx(2.0)  # 9 s of steady files


def test_per_image_stages_read_their_own_files_or_their_seeds_when_beside(tmp_path):
    from amnseg.config import load_config
    from amnseg.layout import maps_dir, masks_dir, seeds_dir
    from benchmarks.bench_pipeline import per_image_steady_rate

    config = load_config(None, [f"run_dir={tmp_path}"])
    base = 1000.0
    for folder, pattern, step in ((maps_dir(config, "cam"), "npz", 0.1),
                                  (seeds_dir(config, "cam"), "png", 0.25),
                                  (maps_dir(config, "amn"), "npz", 0.2),
                                  (seeds_dir(config, "amn"), "png", 0.5),
                                  (masks_dir(config), "png", 1.0)):
        make_files(folder, [base + step * k for k in range(10)])
        if pattern == "npz":
            for path in folder.glob("*.png"):
                path.rename(path.with_suffix(".npz"))
    serial = {stage: per_image_steady_rate(config, stage, beside=False)
              for stage in ("cam_maps", "cam_seeds", "amn_maps", "amn_seeds", "masks", "cam")}
    assert serial == pytest.approx({"cam_maps": 10.0, "cam_seeds": 4.0, "amn_maps": 5.0,
                                    "amn_seeds": 2.0, "masks": 1.0, "cam": None})
    assert per_image_steady_rate(config, "cam_maps", beside=True) == pytest.approx(4.0)
    assert per_image_steady_rate(config, "amn_maps", beside=True) == pytest.approx(2.0)
    assert per_image_steady_rate(config, "amn_seeds", beside=True) is None
    # cam_maps' files span 0.9 s: a rate for a stage of 3.6 s at most, none for a longer one.
    assert per_image_steady_rate(config, "cam_maps", False, 3.5) == pytest.approx(10.0)
    assert per_image_steady_rate(config, "cam_maps", False, 3.7) is None


def test_projection_is_fixed_seconds_plus_images_at_the_steady_rate():
    from benchmarks.bench_pipeline import projected_hours

    # 100 images in 30 s at a steady 5 images/s: 10 s fixed, then 10,000 images take 2,000 s.
    assert projected_hours(30.0, 100, 5.0, 10_000) == pytest.approx(2010 / 3600)
    assert projected_hours(30.0, 100, None, 10_000) == pytest.approx(3000 / 3600)
    assert projected_hours(10.0, 100, 5.0, 1_000) == pytest.approx(200 / 3600)  # fixed >= 0
    # 10 of the 30 s evaluated the 100 images: 500 evaluated images take 50 s, and the 20 s
    # left are the 100 images at 5 images/s, with nothing fixed.
    assert projected_hours(30.0, 100, 5.0, 10_000, 10.0, 500) == pytest.approx(2050 / 3600)
    assert projected_hours(30.0, 100, None, 10_000, 10.0, 500) == pytest.approx(2050 / 3600)


def test_convolution_flop_counts_each_product_of_forward_and_backward():
    from benchmarks.bench_seg_convs import convolution_flop

    # 8 -> 4 channels, 3x3 dilation 2 padding 2 on 10x12: the output keeps its size.
    signature = (8, 10, 12, 4, 3, 3, (1, 1), (2, 2), (2, 2), False, True)
    products = 2 * 4 * 10 * 12 * 8 * 3 * 3  # multiply-adds of one forward of 2 images
    assert convolution_flop(signature, 2) == 3 * 2 * products
    # Without the input gradient (the image's own convolution): forward + weight gradient.
    assert convolution_flop(signature[:-1] + (False,), 2) == 2 * 2 * products
    # Stride 2, no padding, 1x1: ceil-free output size (10 - 1) // 2 + 1 = 5 by 6.
    strided = (8, 10, 12, 4, 1, 1, (2, 2), (0, 0), (1, 1), True, True)
    assert convolution_flop(strided, 1) == 3 * 2 * (4 * 5 * 6 * 8)


def test_operator_count_tells_forwards_from_the_rest():
    from benchmarks.bench_map_ops import CountedModel, OperatorCount

    layer = torch.nn.Linear(3, 2)
    count = OperatorCount()
    model = CountedModel(layer, count)
    with count:
        inputs = torch.ones(4, 3) * 2  # two operators outside: ones, mul
        model(inputs)
    assert count.outside == 2 and count.inside >= 1
    assert model.out_features == 2  # the network's attributes pass through
