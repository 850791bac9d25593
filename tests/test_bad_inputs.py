"""Bad inputs and faults, as a demanding new user meets them: every one ends in one clear line
naming the file or option (exit status 2) or in a correct result; nothing is written outside
the run folder and no partial output is left.

Classes: paths, images, labels, masks, configs, checkpoints, the run folder, the skip policy,
and a property-based test feeding random bytes and label rows.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, write_tiny_folder_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_pipeline import FAST

from amnseg.cli import main
from amnseg.config import CrfConfig
from amnseg.data.base import read_index_png, read_rgb
from amnseg.errors import AmnsegError
from amnseg.io import output_file

TINY = ["device=cpu", "data.num_workers=0", "backbone.depth=18", "backbone.width=0.125",
        "backbone.strides=[2,2,1,1]", "backbone.pretrained=null", "backbone.norm=batch",
        "cam.epochs=1", "cam.batch_size=4", "cam.resize_long=[24,40]", "cam.crop_size=32",
        *FAST]


def folder_args(data: Path, run: Path) -> list[str]:
    return [f"run_dir={run}", "data.kind=folder", f"data.root={data}", "data.train_split=train",
            "data.infer_split=train", "data.val_split=val", *TINY]


def amnseg(capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in this process: (exit status, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["amnseg", *map(str, args)]
    try:
        main()
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(capsys, *args: str) -> str:
    """The single error line of a command that must fail with status 2."""
    status, _, err = amnseg(capsys, *args)
    # Progress bars redraw their line with carriage returns; the error is a line of its own.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()
             and "it/s" not in line and "img/s" not in line and "%|" not in line]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("amnseg: error: "), err
    return lines[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_tiny_folder_dataset(tmp_path / "data", count=8)


def no_outputs(run: Path) -> bool:
    """True when the run wrote no stage output (maps, seeds, masks, checkpoints)."""
    return not [p for p in run.rglob("*") if p.suffix in (".npz", ".png", ".pt")]


# --- paths ----------------------------------------------------------------------------------


def write_voc_with_split(root: Path, lines: list[str]) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(voc / "JPEGImages" / "a.jpg")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(lines) + "\n")
    return voc


def test_split_id_that_climbs_out_is_refused(tmp_path, capsys):
    outside = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(outside)
    voc = write_voc_with_split(tmp_path, ["a", "../../../x"])
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "voc12", f"data.root={voc}", "data.train_split=train",
                          f"run_dir={run}", *TINY)
    assert "train.txt:2" in line and "'../../../x' is not a plain image name" in line
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.png").exists()
    assert no_outputs(run)


def test_a_stem_with_a_control_character_is_named_as_such():
    from amnseg.data.base import check_stem

    with pytest.raises(AmnsegError, match=r"train.txt:3: '2007_000032\\x00' is not a plain "
                       r"image name \(it holds a control character\)"):
        check_stem("2007_000032\x00", "train.txt:3")
    with pytest.raises(AmnsegError, match=r"no folders allowed"):
        check_stem("a/b", "train.txt:4")
    assert check_stem("2007_000032", "train.txt:5") == "2007_000032"


@pytest.mark.parametrize("name", ["/etc/passwd", "..", "a/b", "a\\b", ""])
def test_coco_file_names_with_folders_are_refused(tmp_path, name):
    from amnseg.data.coco import COCODataset

    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": name, "width": 4, "height": 4}],
         "categories": [{"id": 1, "name": "person"}], "annotations": []}))
    with pytest.raises(AmnsegError, match=r"instances_train2014.json \(image id 1\): .* is not a "
                                          "plain image name"):
        COCODataset(root, "train")


@pytest.mark.parametrize("stem", ["../x", "a/b", "..", "."])
def test_outputs_never_leave_their_folder(tmp_path, stem):
    with pytest.raises(AmnsegError, match="refusing to write"):
        output_file(tmp_path, stem, ".png")
    assert output_file(tmp_path, "img 01", ".png") == tmp_path / "img 01.png"


# --- images ---------------------------------------------------------------------------------


def test_unreadable_image_stops_the_run_before_any_stage(data, tmp_path, capsys):
    (data / "images" / "img 03.png").write_bytes(b"this is not a png")
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, run))
    assert "img 03.png: unreadable image (not an image format PIL can read)" in line
    assert no_outputs(run)


def test_truncated_image_is_named(data, tmp_path, capsys):
    path = data / "images" / "img 02.png"
    path.write_bytes(path.read_bytes()[:200])  # the header survives, the pixels do not
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, tmp_path / "run"),
                          "--to", "cam")
    assert "img 02.png: unreadable image (" in line and "truncated" in line


def test_very_large_image_is_refused_with_the_option_to_change(data, tmp_path, capsys):
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, tmp_path / "run"),
                          "data.max_pixels=1000")
    assert "(0.0 MP), above data.max_pixels=1000" in line and ".png: image is 32x32" in line


@pytest.mark.parametrize("size", [(1, 1), (7, 40)])
def test_tiny_image_is_refused_before_any_stage(data, tmp_path, capsys, size):
    # At the 0.5 map scale a 1x1 image has no pixel left (PIL refused it deep in a worker).
    from PIL import Image

    Image.new("RGB", size).save(data / "images" / "img 04.png")
    Image.new("L", size).save(data / "masks" / "img 04.png")
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, run))
    assert (f"img 04.png: image is {size[0]}x{size[1]}; both sides must be at least 8 pixels"
            in line)
    assert no_outputs(run)


def test_sixteen_bit_images_are_read_by_value(tmp_path):
    gradient = (np.arange(64 * 8, dtype=np.uint16).reshape(8, 64) * 128)
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    rgb = read_rgb(tmp_path / "deep.png")
    expected = np.round(gradient / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert rgb.min() == 0 and (rgb < 255).mean() > 0.99  # not the white of PIL's conversion


def test_missing_image_of_a_split_is_named(tmp_path, capsys):
    voc = write_voc_with_split(tmp_path, ["a", "b"])
    line = one_error_line(capsys, "run", "voc12", f"data.root={voc}", "data.train_split=train",
                          f"run_dir={tmp_path / 'run'}", *TINY)
    assert "JPEGImages/b.jpg: image listed in the dataset but not found" in line


# --- labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("row, words", [
    ("img 00,square;triangle", "unknown class 'triangle'"),
    ("img 00,square,disc", "expected 2 columns"),
    ("ghost,square", "image 'ghost' not found"),
    ("img 00.png,square", "(labels.csv names images by their stem, without the extension: "
     "'img 00')"),
    ("img 00,Square", "unknown class 'Square' (not in classes.txt) (did you mean 'square'? "
     "class names are case-sensitive)"),
    ("folder,square", "image 'folder' not found in"),
    (",square", "empty image stem"),
    # A stray quote runs the row into the next ones.
    ('"img 00,square', "a quoted field runs on to line 9 (a stray '\"'?)"),
    ("img 00\tsquare", "one column, with a tab in it: columns are separated by commas"),
    ("img 00;square", "one column, with ';' in it"),
    # Only the first row may be the header (a second one: files joined with their headers).
    ("stem,classes", "unknown class 'classes'"),
])
def test_bad_label_rows_are_named_with_their_line(data, tmp_path, capsys, row, words):
    labels = data / "labels.csv"
    rows = labels.read_text().splitlines()
    rows[1] = row
    labels.write_text("\n".join(rows) + "\n")
    (data / "images" / "folder.png").mkdir()
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, tmp_path / "run"))
    assert "labels.csv:2" in line and words in line
    if row.startswith("folder"):
        assert "(folder.png is there but is not a readable file)" in line


# --- masks ----------------------------------------------------------------------------------


def test_out_of_range_mask_value_is_found_before_training(data, tmp_path, capsys):
    mask = read_index_png(data / "masks" / "img 05.png")
    mask[3, 3] = 7  # two classes: 7 is no class
    Image.fromarray(mask).save(data / "masks" / "img 05.png")
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, run))
    assert "masks/img 05.png: mask value 7 is not a class (0..2) or 255" in line
    assert not (run / "cam" / "cam.pt").exists() and no_outputs(run)


def test_sixteen_bit_masks(tmp_path):
    small = np.array([[0, 1], [2, 255]], dtype=np.uint16)
    Image.fromarray(small).save(tmp_path / "ok.png")
    np.testing.assert_array_equal(read_index_png(tmp_path / "ok.png"), small)
    Image.fromarray(np.array([[0, 257]], dtype=np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(AmnsegError, match="wide.png: mask value 257 does not fit"):
        read_index_png(tmp_path / "wide.png")
    # 1-bit masks (a one-class dataset's binary masks) are their 0/1 values.
    binary = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    Image.fromarray(binary).save(tmp_path / "binary.png")
    assert Image.open(tmp_path / "binary.png").mode == "1"
    read = read_index_png(tmp_path / "binary.png")
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, binary.astype(np.uint8))


def test_mask_of_another_size_and_rgb_mask(data, tmp_path, capsys):
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(data / "masks" / "img 01.png")
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, tmp_path / "a"))
    assert "masks/img 01.png: mask size 32x30 differs from image size 32x32" in line
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "masks" / "img 01.png")
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, tmp_path / "b"))
    assert "img 01.png: mask must be an index PNG (mode P or L), found mode RGB" in line


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("override, words", [
    ("cam.epochs=0", "cam.epochs=0: must be a number >= 1"),
    ("amn.epochs=-1", "amn.epochs=-1: must be a number >= 1"),
    ("irn.batch_size=0", "irn.batch_size=0: must be a number >= 1"),
    ("amn.crop_size=0", "amn.crop_size=0: must be a number >= 8"),
    ("cam.lr=0", "cam.lr=0.0: must be a number > 0"),
    ("amn.head_lr=-0.1", "amn.head_lr=-0.1: must be a number > 0"),
    ("seeds.amn_fg_threshold=1.5", "seeds.amn_fg_threshold=1.5: must lie in [0, 1]"),
    ("seeds.cam_bg_threshold=0.5", "seeds.cam_bg_threshold=0.5: must not exceed"),
    ("eval.sweep_step=0", "eval.sweep_step=0.0: must be a number > 0"),
    ("cam.scales=[]", "cam.scales=[]: must be a list of one or more numbers > 0"),
    ("seg.iterations=0", "seg.iterations=0: must be a number >= 1"),
    ("amn.label_smoothing=1.0", "amn.label_smoothing=1.0: must lie in [0, 1)"),
    # A 16-cell stride-4 crop holds no source cell whose radius-10 pairs all fit.
    ("irn.crop_size=64", "irn.crop_size=64: must be at least 76 for irn.radius=10"),
    ("data.on_bad_image=maybe", "data.on_bad_image='maybe': expected one of error, skip"),
    ("cam.epochs=three", "cam.epochs: Value 'three' of type 'str' could not be converted to "
     "Integer"),
    ("cam.epochz=3", "cam.epochz: unknown option (did you mean cam.epochs?)"),
    ("cam.flip=maybe", "cam.flip: Value 'maybe' is not a valid bool"),
    ("runn_dir=x", "runn_dir: unknown option (did you mean run_dir?)"),
    ("device=tpu", "device='tpu': must be auto, cpu, cuda or cuda:N"),
    ("device=cuda:x", "device='cuda:x': must be auto, cpu, cuda or cuda:N"),
    ("device=mps", "device='mps': must be auto, cpu, cuda or cuda:N"),
    ("seed=-1", "seed=-1: must be an integer in 0 .. 2^32 - 1"),
    ("cam.resize_long=abc", "cam.resize_long: expected a list, e.g. [1, 2]"),
    ("data=3", "data is a section of options, not a value: set its options one by one"),
    ("cam=null", "cam: is a section of options and cannot be null"),
    ("=3", "an override needs an option name before '='"),
    ("data.num_workers=100000", "data.num_workers=100000: at most"),
    ("seeds.workers=100000", "seeds.workers=100000: at most"),
    ("seg.crf_workers=100000", "seg.crf_workers=100000: at most"),
    ("eval.robust_range=[0.5,3]", "eval.robust_range=[0.5, 3.0]: must lie in [0, 1]"),
    ("seg.msc_scales=[0.5,0.001]", "seg.msc_scales=[0.5, 0.001]: must leave a pixel of the "
     "seg.crop_size=321 crops"),
    ("backbone.strides=[3,3,3,3]", "backbone.strides=[3, 3, 3, 3]: must be [2, s2, s3, s4]"),
    ("backbone.strides=[1,2,2,1]", "backbone.strides=[1, 2, 2, 1]: must be [2, s2, s3, s4]"),
    ("seg.backbone.strides=[2,2,4,1]", "seg.backbone.strides=[2, 2, 4, 1]: must be [2, s2,"),
    # an interpolation of the wrong type, whose OmegaConf error names no option
    ("seg.rescale=${cam.lr}", "seg.rescale: expected a list"),
    ("irn.walk_radius=33", "irn.walk_radius=33: must be at most 32"),
    ("irn.infer_pad_size=100000", "irn.infer_pad_size=100000: must be at most 4096"),
])
def test_bad_config_values_are_refused_at_load_time(tmp_path, capsys, override, words):
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "voc12", f"run_dir={run}", override)
    assert words in line
    assert not run.exists()  # nothing written


# Every kind of check, then every option's own limit, at its edge: the value on the line is
# accepted, the one past it refused (overrides joined by spaces are given together).
CHECK_EDGES = [
    ("cam.epochs=1", "cam.epochs=0", "cam.epochs=0: must be a number >= 1"),
    ("cam.crop_size=8", "cam.crop_size=7", "cam.crop_size=7: must be a number >= 8"),
    ("cam.weight_decay=0", "cam.weight_decay=-1e-9", "must be a number >= 0"),
    ("cam.lr=1e-12", "cam.lr=0", "cam.lr=0.0: must be a number > 0"),
    ("cam.eval_threshold=1", "cam.eval_threshold=1.001", "must lie in [0, 1]"),
    ("cam.eval_threshold=0", "cam.eval_threshold=-0.001", "must lie in [0, 1]"),
    ("cam.momentum=0", "cam.momentum=1", "cam.momentum=1.0: must lie in [0, 1)"),
    ("cam.momentum=0.999", "cam.momentum=-0.001", "must lie in [0, 1)"),
    ("cam.scales=[1.0]", "cam.scales=[]", "cam.scales=[]: must be a list of one or more "
     "numbers > 0"),
    ("cam.scales=[1.0,0.001]", "cam.scales=[1.0,0]", "must be a list of one or more numbers"),
    ("backbone.strides=[2,2,2,1]", "backbone.strides=[2,2,2]", "must be a list of 4 numbers > 0"),
    ("amn.rescale=[0.5,0.5]", "amn.rescale=[0.5,0.499]", "must be [low, high] with 0 < low <= "
     "high"),
    ("amn.rescale=[0.001,2]", "amn.rescale=[0,2]", "amn.rescale=[0.0, 2.0]: must be [low, high] "
     "with 0 < low"),
    ("eval.robust_range=[0,0.5]", "eval.robust_range=[-0.001,0.5]", "must be [low, high] with "
     "0 <= low <= high"),
    ("eval.robust_range=[0.5,0.5]", "eval.robust_range=[0.5,0.4]", "with 0 <= low <= high"),
]
LIMIT_EDGES = [
    ("seeds.crf.iterations=0", "seeds.crf.iterations=-1", "must be a number >= 0"),
    ("seg.crf.iterations=1000", "seg.crf.iterations=1001", "seg.crf.iterations=1001: must be "
     "at most 1000"),
    ("seeds.crf.gt_prob=0.001", "seeds.crf.gt_prob=0", "seeds.crf.gt_prob=0.0: must lie in "
     "(0, 1)"),
    ("seeds.crf.gt_prob=0.999", "seeds.crf.gt_prob=1", "seeds.crf.gt_prob=1.0: must lie in"),
    ("seed=4294967295", "seed=4294967296", "seed=4294967296: must be an integer in 0 .. 2^32"),
    ("map_batch_images=1", "map_batch_images=0", "map_batch_images=0: must be an integer >= 1"),
    ("data.max_pixels=0", "data.max_pixels=-1", "data.max_pixels=-1: must be a number >= 0"),
    ("data.train_split=x", 'data.train_split=""', "data.train_split='': must be set"),
    ("backbone.depth=34", "backbone.depth=35", "backbone.depth=35: expected one of 18, 34, 50, "
     "101"),
    ("backbone.strides=[2,1,1,2]", "backbone.strides=[2,3,2,1]", "must be [2, s2, s3, s4]"),
    ("backbone.fold_norm=true", "backbone.fold_norm=true backbone.norm=batch",
     "backbone.fold_norm=True: needs backbone.norm=frozen"),
    ("seeds.cam_bg_threshold=0.3", "seeds.cam_bg_threshold=0.31",
     "seeds.cam_bg_threshold=0.31: must not exceed seeds.cam_fg_threshold=0.3"),
    ("seeds.crf_batch_images=1", "seeds.crf_batch_images=0", "must be a number >= 1"),
    ("seeds.crf_device=cuda:1", "seeds.crf_device=gpu", "seeds.crf_device='gpu': must be auto"),
    ("seeds.overlap=true", "seeds.overlap=true seeds.crf_device=cuda",
     "seeds.overlap='true': seeds beside the maps need seeds.crf_device=cpu, not cuda"),
    ("irn.radius=2 irn.walk_radius=2", "irn.radius=1", "irn.radius=1: must be a number >= 2"),
    ("irn.exp_times=16", "irn.exp_times=17", "irn.exp_times=17: must be at most 16"),
    ("irn.walk_radius=32", "irn.walk_radius=33", "must be at most 32"),
    ("irn.infer_pad_size=4096", "irn.infer_pad_size=4097", "must be at most 4096"),
    # radius 10 (the reference's): pairs reach 9 stride-4 cells each way, so 19 cells = 76
    # pixels.
    ("irn.crop_size=76", "irn.crop_size=75", "irn.crop_size=75: must be at least 76 for "
     "irn.radius=10"),
    ("irn.momentum=0.999", "irn.momentum=1", "irn.momentum=1.0: must lie in [0, 1)"),
    ("seg.momentum=0.999", "seg.momentum=1", "seg.momentum=1.0: must lie in [0, 1)"),
    ("seg.crop_size=16", "seg.crop_size=15", "seg.crop_size=15: must be a number >= 16"),
    ("seg.msc_scales=[]", "seg.msc_scales=[0.5,0]", "must be a list of numbers > 0"),
    ("seg.crop_size=16 seg.msc_scales=[0.0625]", "seg.crop_size=16 seg.msc_scales=[0.062]",
     "must leave a pixel of the seg.crop_size=16 crops"),
    ("seg.fused_accumulation=true", "seg.fused_accumulation=true seg.backbone.norm=batch",
     "seg.fused_accumulation=True: needs seg.backbone.norm=frozen"),
    ("eval.sweep_start=0.5 eval.sweep_stop=0.5", "eval.sweep_start=0.6 eval.sweep_stop=0.5",
     "eval.sweep_start=0.6: must not exceed eval.sweep_stop=0.5"),
    # (1 - 0.5) / 0.00005 = 10000 steps, the most; 10000.5 is refused.
    ("eval.sweep_start=0.5 eval.sweep_stop=1 eval.sweep_step=0.00005",
     "eval.sweep_start=0.5 eval.sweep_stop=1 eval.sweep_step=0.0000499975",
     "gives more than 10000 thresholds"),
    ("eval.robust_range=[0.5,1]", "eval.robust_range=[0.5,1.001]", "must lie in [0, 1]"),
]


@pytest.mark.parametrize("accepted, refused, words", CHECK_EDGES + LIMIT_EDGES)
def test_config_checks_and_limits_at_their_edges(accepted, refused, words):
    from amnseg.config import load_config

    load_config(None, accepted.split())
    with pytest.raises(AmnsegError, match=re.escape(words)):
        load_config(None, refused.split())


@pytest.mark.parametrize("cores, most", [(16, 128), (4, 64), (None, 64)])
def test_process_counts_are_capped_by_the_cores(monkeypatch, cores, most):
    """At most 8 processes a core, and 64 on any machine: beyond that only memory and start-up
    grow, and a typo (seeds.workers=1600) would fork until the machine stalls."""
    from amnseg.config import load_config

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    for key, kind in (("data.num_workers", "loader"), ("seeds.workers", "CRF worker"),
                      ("seg.crf_workers", "CRF worker")):
        load_config(None, [f"{key}={most}"])
        with pytest.raises(AmnsegError, match=re.escape(
                f"{key}={most + 1}: at most {most} {kind} processes on this machine of {cores} "
                "cores")):
            load_config(None, [f"{key}={most + 1}"])


def test_a_run_that_cannot_start_leaves_no_run_folder(tmp_path, capsys, data):
    run = tmp_path / "runs" / "first"
    args = folder_args(data, run)
    line = one_error_line(capsys, "run", "demo", *args, "data.train_split=nope")
    assert "nope.txt: split list not found" in line
    assert not run.exists() and (tmp_path / "runs").is_dir()
    line = one_error_line(capsys, "run", "demo", *args, "cam.batch_size=1000")  # past the check
    assert "fewer than one batch of 1000" in line and not run.exists()
    # a folder that was there stays
    run.mkdir(parents=True)
    one_error_line(capsys, "run", "demo", *args, "data.train_split=nope")
    assert run.is_dir()
    # and a run that did start keeps what it made when a later stage fails
    other = tmp_path / "second"
    status, _, err = amnseg(capsys, "run", "demo", *folder_args(data, other), "--to", "cam")
    assert status == 0, err
    line = one_error_line(capsys, "run", "demo", *folder_args(data, other), "seeds.workers=-1")
    assert (other / "cam" / "cam.pt").is_file() and (other / "manifest.json").is_file()


@pytest.mark.parametrize("content, words", [
    (b"cam: [unclosed\n", "not valid YAML (while parsing a flow sequence"),
    (b"- 1\n- 2\n", "expected a mapping of options (key: value) at the top level"),
    (b"hello\n", "expected a mapping of options (key: value) at the top level"),
    (b"cam:\n  epochs: 2\n\xff\xfe\n", "unreadable config file ('utf-8' codec"),
])
def test_malformed_config_files_are_one_line_errors(tmp_path, capsys, content, words):
    config = tmp_path / "mine.yaml"
    config.write_bytes(content)
    line = one_error_line(capsys, "run", str(config), f"run_dir={tmp_path / 'run'}")
    assert f"{config}: {words}" in line
    assert not (tmp_path / "run").exists()


def test_override_that_is_not_utf8_is_named(tmp_path):
    from amnseg.config import load_config

    # A Latin-1 byte in a path reaches Python as a lone surrogate.
    word = b"run_dir=/tmp/r\xff".decode("utf-8", "surrogateescape")
    with pytest.raises(AmnsegError, match=r"run_dir=/tmp/r\\udcff'?: not UTF-8 text "
                       r"\(character 15\)"):
        load_config("voc12", [word])


def test_override_value_that_is_not_yaml_is_named(tmp_path, capsys):
    line = one_error_line(capsys, "run", "voc12", f"run_dir={tmp_path / 'run'}", "cam.scales=[1,")
    assert "override 'cam.scales=[1,': the value is not valid YAML" in line


# --- checkpoints ----------------------------------------------------------------------------


@pytest.fixture
def cam_checkpoint(data, tmp_path, capsys) -> Path:
    status, _, err = amnseg(capsys, "train-cam", "voc12", *folder_args(data, tmp_path / "ref"))
    assert status == 0, err
    return tmp_path / "ref" / "cam" / "cam.pt"


def test_checkpoint_for_other_classes_is_refused(data, tmp_path, capsys, cam_checkpoint):
    (data / "classes.txt").write_text("disc\nsquare\n")  # same count, other order
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, tmp_path / "run"),
                          f"cam.checkpoint={cam_checkpoint}", "--to", "cam_maps")
    assert "cam.pt: checkpoint class 1 is 'square', the dataset's is 'disc'" in line
    (data / "classes.txt").write_text("square\ndisc\ntriangle\n")
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, tmp_path / "run2"),
                          f"cam.checkpoint={cam_checkpoint}")
    assert "checkpoint is for 2 classes, the dataset has 3" in line


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/amnseg_pwned",))


@pytest.mark.parametrize("entry", ["import", "run", "predict", "eval-seg"])
def test_pickle_payloads_are_never_executed(data, tmp_path, capsys, entry):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"resnet50.conv1.weight": Payload(), "format": Payload()}, f)
    args = {
        "import": ["import-checkpoint", "cam", evil, tmp_path / "out.pt"],
        "run": ["run", "voc12", *folder_args(data, tmp_path / "run"), f"cam.checkpoint={evil}"],
        "predict": ["predict", evil, data / "images", "--out", tmp_path / "pred"],
        "eval-seg": ["eval-seg", "voc12", *folder_args(data, tmp_path / "run"),
                     "--checkpoint", evil],
    }[entry]
    line = one_error_line(capsys, *args)
    assert "evil.pth: not a readable checkpoint" in line
    assert not Path("/tmp/amnseg_pwned").exists()


def test_pickle_payload_error_is_one_line_outside_pytest(tmp_path):
    """As a user sees it (a process of its own, Python's default warning filters): torch warns
    about the file's pickle protocol before refusing it; only the error line may be printed."""
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"format": Payload()}, f, protocol=4)
    result = subprocess.run(
        [sys.executable, "-m", "amnseg", "import-checkpoint", "cam", str(evil),
         str(tmp_path / "out.pt")],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("amnseg: error: ")
    assert "evil.pth: not a readable checkpoint" in lines[0]
    assert "never unpickled" in lines[0] and "weights_only` set to `False`" not in lines[0]
    assert not Path("/tmp/amnseg_pwned").exists()


def test_garbage_and_wrong_kind_of_checkpoint(data, tmp_path, capsys, cam_checkpoint):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(300))
    line = one_error_line(capsys, "predict", garbage, data / "images", "--out", tmp_path / "o")
    assert "garbage.pt: not a readable checkpoint" in line
    line = one_error_line(capsys, "predict", cam_checkpoint, data / "images", "--out",
                          tmp_path / "o")
    assert "cam.pt: an amnseg cam checkpoint, not a segmentation network" in line
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, tmp_path / "run"),
                          f"amn.checkpoint={cam_checkpoint}", "--to", "amn")
    assert "expected an amnseg amn checkpoint, found an amnseg cam checkpoint" in line


def test_missing_imagenet_weights_name_both_ways_out(tmp_path, capsys, monkeypatch, data):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    from amnseg.models import resnet

    monkeypatch.setitem(resnet.IMAGENET_URLS, 18, (tmp_path / "resnet18-00000000.pth").as_uri())
    line = one_error_line(capsys, "train-cam", "voc12", *folder_args(data, tmp_path / "run"),
                          "backbone.pretrained=hub")
    assert "could not be downloaded" in line and "backbone.pretrained=null" in line


# --- the run folder -------------------------------------------------------------------------


def fail_writes_under(folder: Path, code: int, monkeypatch) -> None:
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_read_only_folder_and_full_disk_are_one_line(data, tmp_path, capsys, monkeypatch, code):
    run = tmp_path / "run"
    run.mkdir()
    fail_writes_under(run, code, monkeypatch)
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, run))
    assert str(run) in line and os.strerror(code) in line
    assert not list(run.rglob("*.tmp"))


def test_failed_stage_is_marked_failed(data, tmp_path, capsys, monkeypatch):
    from amnseg.stages import seeds

    def broken(*args, **kwargs):
        raise AmnsegError("the CRF fell over")

    monkeypatch.setattr(seeds, "make_seed", broken)
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, run), "--to", "cam_seeds")
    assert "the CRF fell over" in line
    record = json.loads((run / "manifest.json").read_text())["stages"]["cam_seeds"]
    assert record["status"] == "failed" and record["error"] == "the CRF fell over"


def test_concurrent_run_is_refused(data, tmp_path, capsys):
    from amnseg.pipeline import run_folder_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"the running run": "its config"}')
    with run_folder_lock(run):
        line = one_error_line(capsys, "run", "voc12", *folder_args(data, run))
    assert "another amnseg run" in line and str(os.getpid()) in line
    assert (run / "config.json").read_text() == '{"the running run": "its config"}'


# --- the skip policy ------------------------------------------------------------------------


def test_skip_policy_finishes_and_lists_every_skipped_file(data, tmp_path, capsys):
    (data / "images" / "img 03.png").write_bytes(b"not an image")
    broken = data / "images" / "img 06.png"
    broken.write_bytes(broken.read_bytes()[:150])  # truncated: found by decoding
    run = tmp_path / "run"
    status, out, err = amnseg(capsys, "run", "voc12", *folder_args(data, run),
                              "--on-bad-image", "skip", "--to", "cam_seeds")
    assert status == 0, err
    skipped = json.loads((run / "skipped_images.json").read_text())
    assert set(skipped) == {"img 03", "img 06"}
    assert "unreadable image" in skipped["img 03"] and "img 03.png" in skipped["img 03"]
    assert "skipped img 03:" in out and "skipped img 06:" in out
    assert len(list((run / "seeds" / "cam").glob("*.png"))) == 6
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["cam"]["metrics"]["train_images"] == 6  # the 8 less the 2
    from amnseg.report.html import build_report

    page = build_report(run).read_text()
    assert "Skipped images (2)" in page and "img 06" in page
    # Without its list of skipped images, the run checks the images again (it does not
    # stumble over the bad ones).
    (run / "skipped_images.json").unlink()
    status, _, err = amnseg(capsys, "run", "voc12", *folder_args(data, run),
                            "--on-bad-image", "skip", "--to", "cam_seeds")
    assert status == 0, err
    assert set(json.loads((run / "skipped_images.json").read_text())) == {"img 03", "img 06"}
    # Result files edited into something else are named by the report.
    skipped = run / "skipped_images.json"
    skipped.write_text(json.dumps({"img 03": 5}))
    line = one_error_line(capsys, "report", run)
    assert "skipped_images.json: expected image names and the reason" in line
    skipped.unlink()
    sweep = run / "eval" / "cam_sweep.json"
    good = sweep.read_text()
    sweep.write_text(json.dumps({"a": 1}))
    assert "cam_sweep.json: no thresholds" in one_error_line(capsys, "report", run)
    sweep.write_text(json.dumps({**json.loads(good), "thresholds": "many"}))
    line = one_error_line(capsys, "report", run)
    assert 'cam_sweep.json: thresholds is "many", not a list (damaged: delete it' in line
    sweep.write_text(json.dumps({**json.loads(good), "best_miou": [1]}))
    line = one_error_line(capsys, "report", run)
    assert "cam_sweep.json: best_miou is [1], not a number" in line
    sweep.write_text(json.dumps({**json.loads(good), "thresholds": [0.1, "x"]}))
    line = one_error_line(capsys, "report", run)
    assert "a result file of the run does not fit its dataset" in line and "edited" in line
    sweep.write_text(json.dumps({**json.loads(good), "optimal_threshold_mean": None,
                                 "optimal_threshold_std": None}))
    status, _, err = amnseg(capsys, "report", run)
    assert status == 0, err
    # A dataset moved since the run: the report is made from the results, without pictures.
    before = build_report(run).read_text()
    moved = data.with_name("moved")
    data.rename(moved)
    try:
        page = build_report(run).read_text()
    finally:
        moved.rename(data)
    assert "The dataset is not at" in page and "(train, not found)" in page
    assert "(train, 8 images)" in before  # the list of skipped images was deleted above

    def stage_table(text: str) -> str:
        return text.split("<h2>mIoU per stage and class (%)</h2>")[1].split("<h2>")[0]

    assert stage_table(page) == stage_table(before)
    assert "<th>square</th>" in stage_table(page)


# --- random bytes and rows ------------------------------------------------------------------

VALID_IMAGE = None


def png_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    image=st.one_of(st.binary(max_size=300), st.just(png_bytes(np.zeros((12, 10, 3), np.uint8)))),
    mask=st.one_of(st.binary(max_size=200), st.just(png_bytes(np.zeros((12, 10), np.uint8))),
                   st.just(png_bytes(np.full((12, 10), 9, np.uint8)))),
    row=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
)
def test_random_files_and_rows_give_a_clear_error_or_work(tmp_path_factory, image, mask, row):
    from amnseg.data.check import check_dataset
    from amnseg.data.folder import FolderDataset

    root = tmp_path_factory.mktemp("random")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    (root / "images" / "a.png").write_bytes(image)
    (root / "masks" / "a.png").write_bytes(mask)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "labels.csv").write_text("stem,classes\na,square\n" + row + "\n", encoding="utf-8")
    try:
        dataset = FolderDataset(root, "train")
        check_dataset(dataset, 4_000_000, decode=True)
        for stem in dataset.stems:
            dataset[dataset.index_of(stem)]
    except AmnsegError as error:
        assert "\n" not in str(error) and str(error)


def test_output_folder_that_is_a_file_is_one_line(data, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file where a folder is wanted")
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, taken), "--to", "cam")
    assert line == f"amnseg: error: {taken}: exists and is not a folder"
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, taken / "run"),
                          "--to", "cam")
    assert f"{taken / 'run'}" in line and "is a file, not a folder" in line
    assert taken.read_text() == "a file where a folder is wanted"


def test_broken_score_map_files_are_named_without_pickle_advice(tmp_path):
    from amnseg.io import ScoreMaps, load_score_maps, save_score_maps

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"garbage")  # np.load alone would offer to unpickle it
    with pytest.raises(AmnsegError, match=r"garbage.npz: not a valid score map file \(not an "
                       r"\.npz archive\)$"):
        load_score_maps(garbage)
    good = tmp_path / "good.npz"
    save_score_maps(good, ScoreMaps(np.array([1]), np.zeros((1, 2, 2), np.float32),
                                    np.zeros((1, 5, 5), np.float32)))
    assert load_score_maps(good).full.shape == (1, 5, 5)
    with np.load(good) as arrays:
        np.savez(tmp_path / "partial.npz", strided=arrays["strided"])
    with pytest.raises(AmnsegError, match="partial.npz: not a valid score map file .*class_ids"):
        load_score_maps(tmp_path / "partial.npz")
    # Maps from elsewhere, outside [0, 1] (a 0-255 heat map, logits), are named.
    for name, low, high, words in (("heat", 0, 255, r"full maps range over \[0, 255\]"),
                                   ("logits", -0.5, 0.5, r"full maps range over \[-0.5, 0.5\]"),
                                   ("edge", 0, 1 + 1e-4, None)):
        full = np.full((1, 5, 5), high, np.float32)
        full[0, 0, 0] = low
        save_score_maps(tmp_path / f"{name}.npz", ScoreMaps(np.array([1]), full[:, ::4, ::4],
                                                            full))
        if words is None:
            assert load_score_maps(tmp_path / f"{name}.npz").full.max() > 1
            continue
        with pytest.raises(AmnsegError, match=rf"{name}.npz: {words}; score maps lie in \[0, 1\]"):
            load_score_maps(tmp_path / f"{name}.npz")


@pytest.mark.parametrize("args, words", [
    (["make-cam-seeds", "demo", "--maps", "x"], "No such option: --maps"),
    (["nosuchcommand"], "No such command 'nosuchcommand'."),
    (["status"], "Missing argument 'run_dir'."),
])
def test_command_line_usage_errors_are_one_line(capsys, args, words):
    line = one_error_line(capsys, *args)
    assert words in line and "--help` lists them" in line


# --- found by a bad-input audit of the command line ---------------------------------------------


def png_with_declared_size(source: Path, target: Path, width: int, height: int) -> None:
    """``source``'s PNG with its header saying ``width`` x ``height`` (the CRC recomputed)."""
    data = bytearray(source.read_bytes())
    header = data[12:29]  # b"IHDR" + 13 bytes
    header[4:12] = struct.pack(">II", width, height)
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(header)))
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_decompression_bomb_header_is_one_line(data, tmp_path, capsys, folder):
    path = data / folder / "img 03.png"
    png_with_declared_size(path, path, 60000, 60000)
    line = one_error_line(capsys, "run", "demo", *folder_args(data, tmp_path / "run"))
    assert f"{folder}/img 03.png: unreadable" in line and "DecompressionBombError" in line


def test_image_just_under_pil_limit_gives_only_our_line(data, tmp_path, capsys):
    path = data / "images" / "img 03.png"
    png_with_declared_size(path, path, 10000, 10000)  # 100 MP: PIL warns, amnseg refuses
    line = one_error_line(capsys, "run", "demo", *folder_args(data, tmp_path / "run"))
    assert "img 03.png: image is 10000x10000" in line and "data.max_pixels" in line


def test_predict_never_overwrites_its_inputs_and_checks_them_first(tmp_path, capsys):
    from test_seg import save_tiny_seg_checkpoint

    checkpoint = save_tiny_seg_checkpoint(tmp_path / "seg.pt")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            images / f"{name}.png")
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    line = one_error_line(capsys, "predict", checkpoint, images, "--out", images,
                          "--device", "cpu")
    assert "a.png: the output would replace this input image" in line
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    # An image too small for the network's smallest scale (0.5), after a good one: nothing
    # is written.
    Image.new("RGB", (1, 1)).save(images / "c.png")
    line = one_error_line(capsys, "predict", checkpoint, images, "--out", tmp_path / "out",
                          "--device", "cpu")
    assert "c.png: 1x1 pixels is too small to segment (at least 2 pixels a side" in line
    # An image above --max-pixels likewise (its CRF would take minutes and many GB).
    Image.new("RGB", (30, 20)).save(images / "c.png")
    line = one_error_line(capsys, "predict", checkpoint, images, "--out", tmp_path / "out",
                          "--device", "cpu", "--max-pixels", "599")
    assert "c.png: image is 30x20 (0.0 MP), above --max-pixels=599" in line
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out").exists()
    line = one_error_line(capsys, "predict", checkpoint, images / "a.png", "--out",
                          tmp_path / "out", "--device", "mps")
    assert "device=mps: expected auto, cpu, cuda or cuda:N" in line
    # Masks already in the output folder (a dataset's ground truth, say) stay as they are
    # unless --overwrite is given.
    Image.new("RGB", (30, 20)).save(images / "c.png")
    truth = tmp_path / "SegmentationClass"
    truth.mkdir()
    Image.new("L", (24, 20), 3).save(truth / "b.png")
    line = one_error_line(capsys, "predict", checkpoint, images, "--out", truth,
                          "--device", "cpu", "--no-crf")
    assert line.endswith("SegmentationClass/b.png: already exists (1 of the outputs do); "
                         "pass --overwrite to replace them, or choose another --out"), line
    assert sorted(p.name for p in truth.iterdir()) == ["b.png"]
    status, _, err = amnseg(capsys, "predict", checkpoint, images, "--out", truth,
                            "--device", "cpu", "--no-crf", "--overwrite")
    assert status == 0, err
    with Image.open(truth / "b.png") as mask:
        assert mask.mode == "P" and mask.size == (24, 20)


@pytest.mark.parametrize("content", [b'{"stages": ', b"\x00\xff", b"[]", b'{"stages": []}'])
def test_damaged_manifest_is_one_line(data, tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_bytes(content)
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run), "--to", "cam")
    assert "manifest.json: " in line and ("restore it or delete it" in line)
    line = one_error_line(capsys, "status", run)
    assert "manifest.json: " in line


def test_log_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from amnseg.training import keep_log_lines

    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": 0.4}\n{"epoch": 3, "lo')
    keep_log_lines(log, epochs_done=2)
    assert log.read_text() == '{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": 0.4}\n'
    # A record without an epoch (a note added by hand) belongs to none: kept even at epoch 0.
    log.write_text('{"note": "lr raised"}\n{"epoch": 1, "loss": 0.5}\n')
    keep_log_lines(log, epochs_done=0)
    assert log.read_text() == '{"note": "lr raised"}\n'


def test_reversed_stage_range_and_bad_threshold(data, tmp_path, capsys):
    line = one_error_line(capsys, "run", "demo", *folder_args(data, tmp_path / "run"),
                          "--from", "masks", "--to", "cam")
    assert "--from masks comes after --to cam" in line
    line = one_error_line(capsys, "eval", "demo", *folder_args(data, tmp_path / "run"),
                          "--maps", tmp_path, "--kind", "cam", "--threshold", "1.5")
    assert "--threshold 1.5: must lie in [0, 1]" in line


def test_bad_val_split_is_named_before_any_stage(data, tmp_path, capsys):
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run),
                          "data.val_split=test")
    assert "splits/test.txt: split list not found" in line
    assert not (run / "cam").exists()
    (data / "splits" / "val.txt").write_text("\n")
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run))
    assert "splits/val.txt: the split lists no image" in line
    assert not (run / "cam").exists()


@pytest.mark.parametrize("names, words", [
    ([f"c{i}" for i in range(254)], None),
    ([f"c{i}" for i in range(255)], "classes.txt: 255 classes; at most 254 fit amnseg's uint8 "
     "masks"),
    (["Background", "square", "disc"], "classes.txt:1: 'Background' listed as a class; list "
     "only the foreground classes"),
])
def test_class_lists_that_uint8_masks_cannot_hold(tmp_path, names, words):
    from amnseg.data.folder import read_class_names

    path = tmp_path / "classes.txt"
    path.write_text("\n".join(names) + "\n")
    if words is None:
        assert read_class_names(path) == names
        return
    with pytest.raises(AmnsegError, match=re.escape(words)):
        read_class_names(path)


def test_class_list_for_import_follows_the_dataset_rules(tmp_path, capsys):
    duplicated, not_utf8 = tmp_path / "dup.txt", tmp_path / "bad.txt"
    duplicated.write_text("square\nsquare\n")
    not_utf8.write_bytes(b"a\xff\nb\n")
    source = tmp_path / "missing.pth"
    source.write_bytes(b"")
    line = one_error_line(capsys, "import-checkpoint", "cam", source, tmp_path / "o.pt",
                          "--classes", duplicated)
    assert "dup.txt:2: class 'square' is listed twice" in line
    line = one_error_line(capsys, "import-checkpoint", "cam", source, tmp_path / "o.pt",
                          "--classes", not_utf8)
    assert "bad.txt" in line and "UTF-8" in line


def test_writing_onto_a_folder_names_the_folder(tmp_path):
    from amnseg.io import save_json

    (tmp_path / "taken").mkdir()
    with pytest.raises(AmnsegError, match=r"taken: is a folder; expected the path of a file"):
        save_json(tmp_path / "taken", {})
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_seg_mask_folder_is_checked_and_its_files_named(data, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in sorted((data / "masks").iterdir()):
        (masks / path.name).write_bytes(path.read_bytes())
    args = ["train-seg", "demo", *folder_args(data, tmp_path / "run"), f"seg.masks={masks}"]
    (masks / "img 05.png").unlink()
    line = one_error_line(capsys, *args)
    assert "masks/img 05.png: mask not found (1 of the 8 training images have none" in line
    assert not (tmp_path / "run" / "seg" / "last.pt").exists()
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(masks / "img 05.png")
    line = one_error_line(capsys, *args)
    assert "masks/img 05.png: mask value 9 is not a class (0..2) or 255" in line
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / "img 05.png")
    line = one_error_line(capsys, *args)
    assert "masks/img 05.png: mask is 16x16, the image is 32x32" in line
    # A trained network stays when a new folder's mask is bad: every mask is checked before
    # the stage clears what it made.
    (masks / "img 05.png").write_bytes((data / "masks" / "img 05.png").read_bytes())
    status, _, err = amnseg(capsys, *args)
    assert status == 0, err
    other = tmp_path / "other masks"
    other.mkdir()
    for path in sorted(masks.iterdir()):
        (other / path.name).write_bytes(path.read_bytes())
    Image.fromarray(np.full((32, 32), 3, np.uint8)).save(other / "img 07.png")
    line = one_error_line(capsys, *args[:-1], f"seg.masks={other}")
    assert "other masks/img 07.png: mask value 3 is not a class (0..2) or 255" in line
    for path in other.iterdir():
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(path)
    line = one_error_line(capsys, *args[:-1], f"seg.masks={other}")
    assert "other masks: every pixel of every mask is 255 (ignored)" in line
    assert (tmp_path / "run" / "seg" / "seg.pt").is_file()


def test_edited_checkpoints_are_one_line(tmp_path, capsys):
    from test_seg import save_tiny_seg_checkpoint

    from amnseg.io import load_checkpoint, save_checkpoint

    good = load_checkpoint(save_tiny_seg_checkpoint(tmp_path / "seg.pt"))
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    first = next(iter(good["model"]))
    edits = {
        "missing": (lambda c: c["model"].pop(first), f"1 weights missing, first {first}"),
        "extra": (lambda c: c["model"].update(extra=torch.zeros(1)),
                  "1 unknown weights, first extra"),
        "shape": (lambda c: c["model"].update({first: torch.zeros(2, 2)}),
                  f"1 weights of another shape, first {first} (2, 2) for"),
        "names": (lambda c: c.update(class_names="cat"),
                  "damaged amnseg checkpoint (class_names is not a list"),
        "backbone": (lambda c: c.update(backbone={}),  # the defaults: a full-width ResNet
                     "269 weights of another shape, first base.backbone.conv1.weight"),
        "depth": (lambda c: c.update(backbone={**c["backbone"], "depth": "fifty"}),
                  "damaged amnseg checkpoint (its network cannot be built"),
        "scales0": (lambda c: c.update(msc_scales=[0.5, 0.0]),
                    "damaged amnseg checkpoint (msc_scales [0.5, 0.0] is not a list of numbers"),
        "scales": (lambda c: c.update(msc_scales="x"),
                   "damaged amnseg checkpoint (msc_scales 'x' is not a list of numbers > 0)"),
        "input": (lambda c: c.update(input="foo"),
                  "damaged amnseg checkpoint (input 'foo' is not one of caffe, imagenet)"),
        "nan": (lambda c: c["model"].update({first: c["model"][first] * float("nan")}),
                f"the weights hold NaN or infinite values (first in {first})"),
    }
    for name, (edit, words) in edits.items():
        edited = {**good, "model": dict(good["model"])}
        edit(edited)
        path = tmp_path / f"{name}.pt"
        save_checkpoint(path, edited)
        line = one_error_line(capsys, "predict", path, image, "--out", tmp_path / "out",
                              "--device", "cpu")
        assert f"{name}.pt: " in line and words in line, (name, line)


def test_training_state_of_another_stage_is_named(tmp_path):
    from amnseg.io import save_checkpoint
    from amnseg.training import TrainingState

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"label_enc.weight": torch.zeros(2)}, "epochs_done": 1})
    with pytest.raises(AmnsegError, match=r"last.pt: this training state does not fit the "
                       r"stage's network \(2 weights missing, first weight; 1 unknown weights, "
                       r"first label_enc.weight\); delete it to train the stage afresh"):
        TrainingState(path).restore(torch.nn.Linear(2, 2), None, None)


def test_training_state_without_or_with_a_damaged_optimiser_is_named(tmp_path):
    from amnseg.io import save_checkpoint
    from amnseg.training import TrainingState

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "epochs_done": 1})
    with pytest.raises(AmnsegError, match=r"last.pt: not a whole training state \(no "
                       r"optimizer\); delete it"):
        TrainingState(path).restore(model, optimizer, scheduler)
    other = torch.optim.SGD([*model.parameters(), torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": other.state_dict(),
                           "scheduler": scheduler.state_dict(), "epochs_done": 1})
    with pytest.raises(AmnsegError, match=r"last.pt: damaged training state \(its optimiser or "
                       r"schedule does not load: ValueError\); delete it"):
        TrainingState(path).restore(model, optimizer, scheduler)


def test_evaluated_split_with_some_masks_missing_is_named_before_any_stage(data, tmp_path,
                                                                          capsys):
    (data / "masks" / "img 03.png").unlink()
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run))
    assert "masks/img 03.png: mask not found; split 'train' has masks for 7 of its 8" in line
    assert not (run / "cam").exists()
    # Without any mask the split is not evaluated, and the run goes on.
    for path in (data / "masks").iterdir():
        path.unlink()
    status, _, err = amnseg(capsys, "run", "demo", *folder_args(data, run), "--to", "cam")
    assert status == 0, err


def test_hints_for_common_mix_ups(data, tmp_path, capsys):
    # A folder dataset read as VOC, a labels.csv header with other column names.
    line = one_error_line(capsys, "train-cam", "demo", *folder_args(data, tmp_path / "r"),
                          "data.kind=voc")
    assert "has labels.csv but no JPEGImages folder: a folder dataset, read with " \
           "data.kind=folder" in line
    rows = (data / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join(["name,tags", *rows[1:]]) + "\n")
    line = one_error_line(capsys, "train-cam", "demo", *folder_args(data, tmp_path / "r"))
    assert "labels.csv:1: unknown class 'tags'" in line and "stem,classes" in line
    # A folder given as a checkpoint; importing a file onto itself.
    line = one_error_line(capsys, "predict", tmp_path, data / "images", "--out",
                          tmp_path / "out")
    assert "is a folder; expected a checkpoint file" in line
    original = tmp_path / "res50_cam.pth"
    original.write_bytes(b"the authors' file")
    line = one_error_line(capsys, "import-checkpoint", "cam", original, original)
    assert "the destination is the file to import" in line
    assert original.read_bytes() == b"the authors' file"


def test_unreadable_training_state_says_how_to_start_afresh(tmp_path):
    from amnseg.training import TrainingState

    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(AmnsegError, match=r"last.pt: not a readable checkpoint .*; delete it "
                       r"to train the stage afresh"):
        TrainingState(tmp_path / "last.pt").restore(torch.nn.Linear(2, 2), None, None)


def test_eval_of_a_partial_map_folder_says_on_how_many_images(data, tmp_path, capsys):
    from amnseg.data import build_dataset
    from amnseg.io import ScoreMaps, save_score_maps
    from amnseg.ops.multiscale import strided_size

    config_args = folder_args(data, tmp_path / "run")
    from conftest import tiny_config

    dataset = build_dataset(tiny_config(data, tmp_path / "run").data, "train")
    rng = np.random.default_rng(0)
    maps = tmp_path / "cam" / "maps"
    for stem in dataset.stems[:3]:
        ids = np.flatnonzero(dataset.label(stem)) + 1
        height, width = dataset.image(stem).shape[:2]
        save_score_maps(maps / f"{stem}.npz", ScoreMaps(
            ids, rng.random((len(ids), *strided_size(height, width, 4))).astype(np.float32),
            rng.random((len(ids), height, width)).astype(np.float32)))
    status, out, err = amnseg(capsys, "eval", "demo", *config_args, "--maps", maps)
    assert status == 0, err
    assert f"(on the 3 of the 8 images that have maps in {maps})" in " ".join(out.split())


def test_diverged_training_stops_the_stage_and_nan_maps_are_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    line = one_error_line(capsys, "train-cam", "demo", *folder_args(data, run), "cam.lr=1e12",
                          "cam.epochs=2")
    assert "cam epoch " in line and "the training loss is nan: training diverged" in line
    assert not (run / "cam" / "cam.pt").exists()
    log = run / "cam" / "log.jsonl"
    assert not log.exists() or "NaN" not in log.read_text()  # every line stays valid JSON

    from amnseg.io import ScoreMaps, save_score_maps

    maps = tmp_path / "cam" / "maps"
    full = np.full((1, 32, 32), np.nan, np.float32)
    save_score_maps(maps / "img 00.npz", ScoreMaps(np.array([1]), full[:, ::4, ::4], full))
    line = one_error_line(capsys, "eval", "demo", *folder_args(data, run), "--maps", maps)
    assert "img 00.npz: the maps hold NaN or infinite values" in line


def test_voc_split_with_a_bom_or_an_id_twice(tmp_path):
    from amnseg.data.base import read_split_file

    split = tmp_path / "train.txt"
    split.write_bytes("\ufeffa\r\nb\r\n".encode())
    assert read_split_file(split) == ["a", "b"]
    split.write_text("a\nb\na\n")
    with pytest.raises(AmnsegError, match=r"train.txt:3: image 'a' is listed twice \(first on "
                       r"line 1\)"):
        read_split_file(split)


def test_voc_annotation_error_is_found_by_the_check(tmp_path, capsys):
    voc = write_voc_with_split(tmp_path, ["a"])
    (voc / "Annotations").mkdir()
    (voc / "Annotations" / "a.xml").write_text("<annotation><object><name>dragon</name>"
                                               "</object></annotation>")
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "voc12", f"data.root={voc}", "data.train_split=train",
                          "data.infer_split=train", "data.val_split=''", f"run_dir={run}",
                          *TINY)
    assert "a.xml" in line and "dragon" in line
    assert no_outputs(run) and not (run / "cam").exists()


def test_a_voc_val_image_without_its_mask_is_named_before_any_stage(tmp_path, capsys):
    voc = write_voc_with_split(tmp_path, ["a"])
    (voc / "SegmentationClass").mkdir()
    ids = [f"2007_{i:06d}" for i in range(60)]
    for stem in ids:
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(voc / "SegmentationClass" /
                                                           f"{stem}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(voc / "SegmentationClass" / "a.png")
    run = tmp_path / "run"
    args = ["run", "voc12", f"data.root={voc}", "data.train_split=train",
            "data.infer_split=train", "data.val_split=val", f"run_dir={run}", *TINY]
    for missing in (ids[3], ids[55]):  # among the first 50 and after them
        (voc / "SegmentationClass" / f"{missing}.png").rename(tmp_path / "aside.png")
        line = one_error_line(capsys, *args)
        assert (f"SegmentationClass/{missing}.png: mask not found; split 'val' has masks for 59 "
                "of its 60 images") in line
        assert not (run / "cam").exists()
        (tmp_path / "aside.png").rename(voc / "SegmentationClass" / f"{missing}.png")


def test_eval_names_are_plain_and_given_once(data, tmp_path, capsys):
    maps = tmp_path / "cam" / "maps"
    maps.mkdir(parents=True)
    args = ["demo", *folder_args(data, tmp_path / "run")]
    line = one_error_line(capsys, "eval", *args, "--maps", maps, "--name", "a/b")
    assert "--name a/b: 'a/b' is not a plain" in line
    line = one_error_line(capsys, "sweep", *args, "--maps", f"../x={maps}")
    assert "'../x' is not a plain" in line
    line = one_error_line(capsys, "sweep", *args, "--maps", f"CAM={maps}", "--maps",
                          f"CAM={maps}")
    assert "the name CAM is given twice" in line


def test_export_checks_its_source_and_destination(tmp_path, capsys):
    from amnseg.io import save_checkpoint

    state = tmp_path / "last.pt"
    save_checkpoint(state, {"model": {}, "epochs_done": 1})
    line = one_error_line(capsys, "export-checkpoint", state, tmp_path / "out.pth")
    assert "last.pt: not an amnseg cam, amn, irn or seg checkpoint (a training state" in line
    line = one_error_line(capsys, "export-checkpoint", state, state)
    assert "the destination is the checkpoint to export" in line


def test_status_of_a_hand_edited_manifest(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"stages": {"cam": {"status": "done", "seconds": "12", "metrics": "x"}, "amn": 3}}))
    status, out, err = amnseg(capsys, "status", tmp_path)
    assert status == 0, err
    assert "cam" in out and "amn" in out


@pytest.mark.parametrize("manifest, key", [
    ({"stages": {"cam": "done"}}, '"stages.cam" is not a JSON object'),
    ({"stages": {}, "checked": "yes"}, '"checked" is not a JSON object'),
    ({"stages": {}, "data": [1]}, '"data" is not a JSON object'),
])
def test_a_run_refuses_a_hand_edited_manifest(tmp_path, capsys, data, manifest, key):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(manifest))
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run))
    assert f"manifest.json: {key}; the file is damaged: restore it or delete it" in line
    assert sorted(path.name for path in run.iterdir()) == [".amnseg.lock", "config.json",
                                                            "manifest.json"]


def test_home_in_paths_is_expanded(monkeypatch, tmp_path):
    from amnseg.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config("demo", ["run_dir=~/runs/x", "data.root=~/data"])
    assert config.run_dir == str(tmp_path / "runs" / "x")
    assert config.data.root == str(tmp_path / "data")


def test_a_config_file_runs_in_a_folder_of_its_own_name(tmp_path):
    """A user's YAML without run_dir ran in runs/voc12 and replaced the VOC run's networks."""
    from amnseg.config import load_config

    mine = tmp_path / "my_experiment.yaml"
    mine.write_text("cam:\n  epochs: 1\n")
    assert load_config(mine).run_dir == "runs/my_experiment"
    assert load_config(mine, ["run_dir=elsewhere"]).run_dir == "elsewhere"
    mine.write_text("run_dir: runs/set_here\n")
    assert load_config(mine).run_dir == "runs/set_here"
    for name in ("voc12", "coco14", "demo", "voc12_published"):
        assert load_config(name).run_dir == f"runs/{name}"


def test_python_api_odd_arguments(tmp_path):
    from test_seg import save_tiny_seg_checkpoint

    from amnseg import Segmenter

    path = save_tiny_seg_checkpoint(tmp_path / "seg.pt")
    with pytest.raises(AmnsegError, match=r"crf='yes': expected True"):
        Segmenter.from_checkpoint(path, crf="yes")
    segmenter = Segmenter.from_checkpoint(path)
    premultiplied = Image.new("La", (12, 10))
    assert segmenter(premultiplied).shape == (10, 12)
    # an image file as its path, its bytes or an open file: the same labels
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (18, 22, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    expected = segmenter(tmp_path / "a.png")
    assert expected.shape == (18, 22)
    assert np.array_equal(segmenter((tmp_path / "a.png").read_bytes()), expected)
    with open(tmp_path / "a.png", "rb") as handle:
        assert np.array_equal(segmenter(handle), expected)
    for image, words in [(tmp_path / "absent.png", "absent.png: no such image file"),
                         (str(tmp_path), f"{tmp_path}: a folder, not an image file"),
                         (b"not an image", "image data: not an image format PIL can read"),
                         (None, "NoneType: not an image (expected a PIL image, a numpy array"),
                         (3.5, "float: not an image")]:
        with pytest.raises(AmnsegError, match=re.escape(words)):
            segmenter(image)
    for not_a_path in (None, 5):
        with pytest.raises(AmnsegError, match="expected the path of a checkpoint file"):
            Segmenter.from_checkpoint(not_a_path)
    # CRF parameters that would crash pydensecrf (a zero kernel width) or make no sense
    for change, words in [({"gaussian_sxy": 0.0}, "crf.gaussian_sxy=0.0: must be a number > 0"),
                          ({"bilateral_sxy": math.nan}, "crf.bilateral_sxy=nan: must be a"),
                          ({"iterations": "10"}, "crf.iterations='10': must be an integer"),
                          ({"iterations": 10**12}, "crf.iterations=1000000000000: must be at "
                           "most 1000"),
                          ({"gt_prob": 2.0}, "crf.gt_prob=2.0: must lie in (0, 1)")]:
        with pytest.raises(AmnsegError, match=re.escape(words)):
            Segmenter.from_checkpoint(path, crf=CrfConfig(**change))


def test_a_config_edited_in_python_is_checked_before_any_stage(tmp_path, data):
    from amnseg.config import load_config
    from amnseg.pipeline import run_pipeline

    run = tmp_path / "run"
    for section, name, value, words in [
            ("cam", "batch_size", 0, "cam.batch_size=0: must be a number >= 1"),
            ("cam", "lr", "0.1", "cam.lr='0.1': must be a number"),
            ("data", "root", None, "data.root=None: must be text"),
            ("seeds", "crf", None, "seeds.crf=None: must be a CrfConfig")]:
        config = load_config("demo", folder_args(data, run))
        setattr(getattr(config, section), name, value)
        with pytest.raises(AmnsegError, match=re.escape(words)):
            run_pipeline(config)
        assert not run.exists()
    with pytest.raises(AmnsegError, match="expected an amnseg Config .*, not dict"):
        run_pipeline({"run_dir": str(run)})
    # a path given as a Path is taken as its text
    config = load_config("demo", folder_args(data, run))
    config.data.root = Path(config.data.root)
    run_pipeline(config, stop="cam")
    assert config.data.root == str(data) and (run / "cam" / "cam.pt").is_file()


def test_overlay_folder_that_is_a_file_is_found_before_writing(tmp_path, capsys):
    from test_seg import save_tiny_seg_checkpoint

    path = save_tiny_seg_checkpoint(tmp_path / "seg.pt")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    out.mkdir()
    (out / "overlay").write_text("a file")
    line = one_error_line(capsys, "predict", path, image, "--out", out, "--overlay",
                          "--device", "cpu")
    assert "overlay: exists and is not a folder" in line
    assert sorted(p.name for p in out.iterdir()) == ["overlay"]


@pytest.mark.parametrize("option, kind", [
    ("seg.init", "file"), ("seg.masks", "folder"), ("amn.checkpoint", "file"),
    ("seg.checkpoint", "file"),
])
def test_missing_given_paths_are_named_before_any_stage(data, tmp_path, capsys, option, kind):
    run = tmp_path / "run"
    missing = tmp_path / "nowhere"
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run), f"{option}={missing}")
    assert f"{option}={missing}: {kind} not found" in line
    assert not (run / "cam").exists()


def test_ctrl_c_says_how_to_resume(data, tmp_path, capsys, monkeypatch):
    from amnseg import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_run_stages", interrupted)
    status, _, err = amnseg(capsys, "run", "demo", *folder_args(data, tmp_path / "run"))
    assert status == 130
    assert err.strip().splitlines()[-1] == ("amnseg: error: interrupted; the same command "
                                             "resumes where it stopped")


@pytest.mark.parametrize("option", ["seg.init", "amn.checkpoint", "irn.checkpoint"])
def test_given_files_that_cannot_serve_are_named_before_any_stage(data, tmp_path, capsys,
                                                                  option):
    run = tmp_path / "run"
    odd = tmp_path / "odd.pth"
    torch.save({"a": torch.zeros(3)}, odd)
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run), f"{option}={odd}")
    assert "odd.pth: " in line
    assert not (run / "cam").exists()


def test_an_amnseg_checkpoint_as_seg_init_is_named(data, tmp_path, capsys):
    from test_seg import save_tiny_seg_checkpoint

    path = save_tiny_seg_checkpoint(tmp_path / "seg.pt")
    line = one_error_line(capsys, "run", "demo", *folder_args(data, tmp_path / "run"),
                          f"seg.init={path}")
    assert "seg.pt: an amnseg seg checkpoint, not a DeepLab-v2 file" in line


@pytest.mark.parametrize("option, words", [
    ("cam.checkpoint=ODD", "odd.pth: expected an amnseg cam checkpoint"),
    ("cam.batch_size=9", "data (cam): 8 training images is fewer than one batch of 9"),
    ("cam.scales=[1.0,0.02]", "image is 32x32; both sides must be at least 50 pixels "
     "(cam.scales scales it by 0.02, which must leave a pixel)"),
    ("backbone.pretrained=MISSING", "missing.pth: ImageNet weights not found "
     "(backbone.pretrained;"),
])
def test_a_bad_option_on_a_finished_run_keeps_its_outputs(data, tmp_path, capsys, option,
                                                           words):
    """Options that would fail when the stage starts are found before its outputs, made with
    the old options, are cleared."""
    run = tmp_path / "run"
    status, _, err = amnseg(capsys, "run", "demo", *folder_args(data, run), "--to", "cam")
    assert status == 0, err
    before = {p: p.read_bytes() for p in (run / "cam").rglob("*.pt")}
    assert run / "cam" / "cam.pt" in before
    odd = tmp_path / "odd.pth"
    torch.save({"a": torch.zeros(3)}, odd)
    option = option.replace("ODD", str(odd)).replace("MISSING", str(tmp_path / "missing.pth"))
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run), "--to", "cam", option)
    assert words in line
    assert {p: p.read_bytes() for p in (run / "cam").rglob("*.pt")} == before
    assert json.loads((run / "manifest.json").read_text())["stages"]["cam"]["status"] == "done"


def test_weights_a_finished_stage_no_longer_needs_are_not_read_again(data, tmp_path, capsys):
    """The ImageNet weights are checked for the stages that will train, not for those that
    are up to date: a run whose weights file has gone since still skips them."""
    from amnseg.config import load_config
    from amnseg.models.resnet import build_backbone

    backbone = load_config("demo", folder_args(data, tmp_path / "x")).backbone
    weights = tmp_path / "weights.pth"
    torch.save(build_backbone(backbone).state_dict(), weights)
    args = ["run", "demo", *folder_args(data, tmp_path / "run"), "--to", "cam",
            f"backbone.pretrained={weights}"]
    status, _, err = amnseg(capsys, *args)
    assert status == 0, err
    weights.unlink()
    status, out, err = amnseg(capsys, *args)
    assert status == 0, err
    assert "[skip] cam: up to date" in out + err


@pytest.mark.parametrize("option, words", [
    ("seg.batch_size=9", "data (seg): 8 training images is fewer than one step of 9 x 1"),
    ("seg.backbone.pretrained=MISSING", "missing.pth: ImageNet weights not found "
     "(seg.backbone.pretrained;"),
    ("amn.rescale=[0.01,0.5]", "both sides must be at least 100 pixels (amn.rescale scales it "
     "by 0.01"),
])
def test_a_late_stages_bad_option_is_found_before_any_stage(data, tmp_path, capsys, option,
                                                             words):
    option = option.replace("MISSING", str(tmp_path / "missing.pth"))
    line = one_error_line(capsys, "run", "demo", *folder_args(data, tmp_path / "run"),
                          "seg.init=imagenet", "seg.accumulation=1", option)
    assert words in line
    assert no_outputs(tmp_path / "run")


def test_labels_that_name_no_class_at_all_are_refused(data, tmp_path, capsys):
    labels = data / "labels.csv"
    rows = labels.read_text().splitlines()
    labels.write_text("\n".join([rows[0], *[row.split(",")[0] + "," for row in rows[1:]]]) + "\n")
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, tmp_path / "run"))
    assert "labels.csv: no row names a class" in line


def test_error_lines_escape_newlines_and_control_characters():
    from amnseg.cli import one_line

    assert one_line(AmnsegError("in/a\nb.png: unreadable image")) == \
        "in/a\\nb.png: unreadable image"
    assert one_line(AmnsegError("class 'a\x00b' or 'café'")) == "class 'a\\x00b' or 'café'"
    wrapped = RuntimeError("Caught AmnsegError in DataLoader worker process 0.\nOriginal "
                           "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                           "amnseg.errors.AmnsegError: x.png: unreadable image\n")
    assert one_line(wrapped) == "x.png: unreadable image"


def test_a_split_whose_every_image_is_skipped_is_named_before_any_stage(data, tmp_path, capsys):
    for stem in (data / "splits" / "val.txt").read_text().split("\n"):
        if stem.strip():
            next((data / "images").glob(f"{stem.strip()}.*")).write_bytes(b"not an image")
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "voc12", *folder_args(data, run),
                          "--on-bad-image", "skip")
    assert "split 'val': all its" in line and "images are bad and skipped (why: " in line
    assert no_outputs(run)


@pytest.mark.parametrize("root", [".", "", ".."])
def test_demo_into_the_current_folder_is_refused_and_leaves_nothing(tmp_path, monkeypatch,
                                                                    root):
    from amnseg.data.demo import generate_demo

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(AmnsegError, match="cannot be the demo data folder"):
        generate_demo(root, num_train=2, num_val=1)
    assert list(tmp_path.iterdir()) == [work] and not list(work.iterdir())


@pytest.mark.parametrize("env, words", [
    ({"RANK": "0", "WORLD_SIZE": "1"}, "MASTER_PORT is not set"),
    ({"RANK": "x", "WORLD_SIZE": "1", "MASTER_PORT": "29500"}, "RANK='x': expected a whole"),
    ({"RANK": "0", "WORLD_SIZE": "abc", "MASTER_PORT": "29500"}, "WORLD_SIZE='abc'"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "port"}, "MASTER_PORT='port'"),
    ({"RANK": "1", "WORLD_SIZE": "1", "MASTER_PORT": "29500"},
     "RANK=1, WORLD_SIZE=1: a rank must lie in 0 .. WORLD_SIZE - 1"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29500", "LOCAL_WORLD_SIZE": "0"},
     "LOCAL_WORLD_SIZE=0"),
])
def test_launcher_variables_that_torchrun_would_not_set_are_one_line(monkeypatch, env, words):
    from amnseg import distributed

    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(AmnsegError, match=re.escape(words)):
        distributed.setup("cpu")
    assert not distributed.active()


def test_cores_per_process_ignores_a_local_world_size_torchrun_would_not_set(monkeypatch):
    import os

    from amnseg import distributed

    for value in ("0", "abc", "-2"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
        assert distributed.cores_per_process() == max(1, os.cpu_count() or 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.cores_per_process() == max(1, (os.cpu_count() or 1) // 2)
    # The machine's cores split between its processes, whole cores, at least one each.
    for cores, processes, each in ((16, 3, 5), (16, 1, 16), (2, 4, 1), (None, 2, 1)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        assert distributed.cores_per_process() == each, (cores, processes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("option", ["seeds.crf_device", "seg.crf_device"])
def test_crf_device_without_cuda_is_named_before_any_stage(data, tmp_path, capsys, option):
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run), f"{option}=cuda",
                          "seeds.overlap=false")
    assert f"{option}=cuda: CUDA is not available" in line
    assert not (run / "cam").exists()


def test_skipping_an_image_reruns_the_stages_that_used_it(data, tmp_path, capsys):
    big = data / "images" / "img 05.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(big)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(data / "masks" / "img 05.png")
    run = tmp_path / "run"
    status, _, err = amnseg(capsys, "run", "voc12", *folder_args(data, run), "--to", "cam")
    assert status == 0, err
    trained = (run / "cam" / "cam.pt").read_bytes()
    # A pixel limit that the 40x40 image exceeds, with the skip policy: the image is left out,
    # so the classifier trained with it is out of date.
    status, out, err = amnseg(capsys, "run", "voc12", *folder_args(data, run), "--to", "cam",
                              "data.max_pixels=1500", "--on-bad-image", "skip")
    assert status == 0, err
    assert "skipping 1 bad images" in out and "[skip] cam: up to date" not in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["cam"]["metrics"]["train_images"] == 7
    assert (run / "cam" / "cam.pt").read_bytes() != trained
    # The same options again: nothing to do.
    status, out, err = amnseg(capsys, "run", "voc12", *folder_args(data, run), "--to", "cam",
                              "data.max_pixels=1500", "--on-bad-image", "skip")
    assert status == 0 and "[skip] cam: up to date" in out, err


def test_a_run_folder_under_a_symlink_loop_is_one_line(tmp_path, capsys, data):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    line = one_error_line(capsys, "run", "demo", *folder_args(data, tmp_path / "loop" / "run"))
    assert "loop/run: too many levels of symbolic links" in line


def test_old_outputs_that_cannot_be_removed_are_named_with_their_folder(tmp_path, capsys, data,
                                                                      monkeypatch):
    import shutil

    run = tmp_path / "run"
    status, _, err = amnseg(capsys, "run", "demo", *folder_args(data, run), "--to", "cam_maps")
    assert status == 0, err

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", "img 00.npz")

    monkeypatch.setattr(shutil, "rmtree", refuse)
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run), "--to", "cam_maps",
                          "cam.scales=[1.0]")
    assert re.search(f"{re.escape(str(run))}/[a-z_/]+: the stage's old outputs could not be "
                     r"removed \(Operation not permitted: img 00.npz\)", line), line


def test_status_names_missing_outputs_and_interrupted_stages(tmp_path, capsys, data,
                                                            monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    run = tmp_path / "run"
    status, _, err = amnseg(capsys, "run", "demo", *folder_args(data, run), "--to", "cam_maps")
    assert status == 0, err
    (run / "cam" / "cam.pt").unlink()
    maps = sorted((run / "cam" / "maps").glob("*.npz"))
    for path in maps[:3]:
        path.unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["cam_maps"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid is no process's any more
    (run / ".amnseg.lock").write_text(f"{finished.pid}\n")
    status, out, err = amnseg(capsys, "status", run)
    assert status == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if line.count("│") > 2}
    assert "done (1 output files missing)" in rows["cam"]
    assert "running (interrupted: `amnseg run` resumes it)" in rows["cam_maps"]
    # a run in progress (this process holds the lock) is not called interrupted
    (run / ".amnseg.lock").write_text(f"{os.getpid()}\n")
    _, out, _ = amnseg(capsys, "status", run)
    assert "interrupted" not in out


def test_printed_paths_and_names_are_shown_as_they_are(tmp_path, capsys):
    """Brackets in a path or a manifest's name are the user's, not rich markup (which dropped
    "[bs16]" and stopped at "[/x]" with a traceback), and a path longer than the 80 columns of
    a log file stays on one line, whole."""
    from test_checkpoints import save, synthetic_reference

    source = save(tmp_path, synthetic_reference("irn"), "res50_irn.pth")
    destination = tmp_path / ("runs [bs16] [/x] " + "long" * 20) / "irn.pt"
    status, out, err = amnseg(capsys, "import-checkpoint", "irn", source, destination)
    assert status == 0, err
    assert f"imported irn checkpoint: {destination}\n" in out
    exported = destination.parent / "[bold]exported.pth"
    status, out, err = amnseg(capsys, "export-checkpoint", destination, exported)
    assert status == 0, err
    assert out == f"exported: {exported}\n"
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"stages": {"cam [/x]": {"status": "done", "seconds": 3}}}))
    status, out, err = amnseg(capsys, "status", tmp_path)
    assert status == 0, err
    assert "cam [/x]" in out


def test_checkpoint_commands_replace_no_file_without_overwrite(tmp_path, capsys):
    """A slip of the tab key must not replace a trained network or a dataset file."""
    from test_checkpoints import save, synthetic_reference

    from amnseg.io import load_checkpoint

    source = save(tmp_path, synthetic_reference("irn"), "res50_irn.pth")
    trained = tmp_path / "run" / "irn" / "irn.pt"
    trained.parent.mkdir(parents=True)
    trained.write_bytes(b"a trained network")
    line = one_error_line(capsys, "import-checkpoint", "irn", source, trained)
    assert line.endswith("irn/irn.pt: already exists; pass --overwrite to replace it, or "
                         "choose another destination"), line
    assert trained.read_bytes() == b"a trained network"
    status, _, err = amnseg(capsys, "import-checkpoint", "irn", source, trained, "--overwrite")
    assert status == 0, err
    assert load_checkpoint(trained)["stage"] == "irn"
    exported = tmp_path / "image.png"
    exported.write_bytes(b"a dataset image")
    line = one_error_line(capsys, "export-checkpoint", trained, exported)
    assert line.endswith("image.png: already exists; pass --overwrite to replace it, or "
                         "choose another destination"), line
    assert exported.read_bytes() == b"a dataset image"
    status, _, err = amnseg(capsys, "export-checkpoint", trained, exported, "--overwrite")
    assert status == 0, err
    reference = synthetic_reference("irn")
    exported_state = torch.load(exported, weights_only=True)
    assert exported_state.keys() <= reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in exported_state.items())
    line = one_error_line(capsys, "export-checkpoint", trained, tmp_path, "--overwrite")
    assert "is a folder; expected the path of a file to write" in line


@pytest.mark.parametrize("option", ["cam.batch_size=3", "amn.batch_size=5", "irn.batch_size=3",
                                    "seg.batch_size=3"])
def test_a_batch_the_processes_cannot_share_is_named_before_any_stage(data, tmp_path, capsys,
                                                                     monkeypatch, option):
    """Under torchrun a global batch must split evenly; found when a stage starts, it came
    after the stage had cleared its old outputs (a trained network), and named no option."""
    from amnseg import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "demo", *folder_args(data, run), "cam.batch_size=4",
                          "amn.batch_size=4", "irn.batch_size=4", "seg.batch_size=2",
                          "seg.accumulation=1", option)
    assert line.endswith(f"{option}: not divisible by the 2 processes; the global batch must "
                         "split evenly"), line
    assert not run.exists() or not (run / option.split(".")[0]).exists()


def test_a_class_list_or_config_that_is_a_folder_or_missing_says_so(tmp_path, capsys):
    source = tmp_path / "res50_cam.pth"
    source.write_bytes(b"")
    line = one_error_line(capsys, "import-checkpoint", "cam", source, tmp_path / "o.pt",
                          "--classes", tmp_path)
    assert line.endswith(f"--classes {tmp_path}: is a folder; expected voc, coco or a "
                         "classes.txt path"), line
    line = one_error_line(capsys, "import-checkpoint", "cam", source, tmp_path / "o.pt",
                          "--classes", tmp_path / "nothere.txt")
    assert line.endswith("nothere.txt: no such file; expected voc, coco or a classes.txt "
                         "path"), line
    (tmp_path / "dir.yaml").mkdir()
    line = one_error_line(capsys, "config", "show", tmp_path / "dir.yaml")
    assert line.endswith("dir.yaml: is a folder; expected a config file (.yaml) or the name "
                         "of a built-in config"), line
    line = one_error_line(capsys, "config", "show", "voc13")
    assert "voc13: no such config file (built-in configs: coco14, demo, voc12" in line


def test_single_process_commands_run_in_the_first_process_of_a_torchrun_job(data, tmp_path,
                                                                            capsys,
                                                                            monkeypatch):
    """Under torchrun the other processes of evaluation, report, status and the checkpoint
    commands end at once (they repeated the work and every line), and the first runs alone,
    joining no process group (it would wait for the others forever)."""
    from amnseg import distributed

    def joins(*args, **kwargs):
        raise AssertionError("joined a process group")

    monkeypatch.setattr(distributed.dist, "init_process_group", joins)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29777", "TORCHELASTIC_RUN_ID": "job"}.items():
        monkeypatch.setenv(name, value)
    missing = tmp_path / "missing"
    commands = [["status", missing], ["report", missing],
                ["eval", "demo", *folder_args(data, tmp_path / "run"), "--maps", missing],
                ["sweep", "demo", *folder_args(data, tmp_path / "run"), "--maps",
                 f"CAM={missing}"],
                ["eval-seg", "demo", *folder_args(data, tmp_path / "run")],
                ["import-checkpoint", "cam", missing, tmp_path / "o.pt"],
                ["export-checkpoint", missing, tmp_path / "o.pth"],
                ["generate-demo", tmp_path / "demo"]]
    for args in commands:
        assert amnseg(capsys, *args) == (0, "", ""), args
    assert sorted(tmp_path.iterdir()) == [data]
    # Without torchrun (a shell's leftover variables) the process says why it does nothing.
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert amnseg(capsys, "status", missing) == (
        0, "", "amnseg: RANK=1: this command runs in the process of RANK=0 alone; unset RANK, "
        "WORLD_SIZE and MASTER_ADDR to run it here\n")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("RANK", "0")
    for args in commands[:-1]:
        line = one_error_line(capsys, *args)
        assert "missing" in line or "no trained segmentation network" in line, line


def test_a_single_stage_command_never_runs_on_stale_upstream_outputs(data, tmp_path, capsys):
    """make-cam-seeds after a cam_maps option changed, train-amn after a seed option or the
    labels changed: the stage would run on outputs made otherwise and be recorded as made
    with this config (so that `amnseg run` never redid it). Refused before anything is
    cleared; the trained network stays."""
    run = tmp_path / "run"
    args = folder_args(data, run)
    status, _, err = amnseg(capsys, "run", "voc12", *args, "--to", "amn")
    assert status == 0, err
    seeds = {p.name: p.read_bytes() for p in (run / "seeds" / "cam").iterdir()}
    trained = (run / "amn" / "amn.pt").read_bytes()
    line = one_error_line(capsys, "make-cam-seeds", "voc12", *args, "cam.scales=[1.0]")
    assert "stage cam_maps is not done with this config (it did not run, or its options or " \
           "data changed since), and the stages asked for read its outputs; run it first " \
           "(amnseg run --to cam_maps, or without --from)" in line
    line = one_error_line(capsys, "train-amn", "voc12", *args, "seeds.cam_fg_threshold=0.4")
    assert "stage cam_seeds is not done with this config" in line
    rows = (data / "labels.csv").read_text().replace("img 03,square", "img 03,disc")
    (data / "labels.csv").write_text(rows)
    line = one_error_line(capsys, "train-amn", "voc12", *args)
    assert "stage cam is not done with this config" in line
    assert {p.name: p.read_bytes() for p in (run / "seeds" / "cam").iterdir()} == seeds
    assert (run / "amn" / "amn.pt").read_bytes() == trained


def test_seg_on_given_masks_needs_no_pseudo_mask_stage(data, tmp_path, capsys, monkeypatch):
    """With seg.masks a folder or gt, seg reads none of the stages before it: --from seg runs
    on an empty run folder, and a seed option's change does not retrain it."""
    monkeypatch.setenv("COLUMNS", "400")  # lines unwrapped
    masks = data / "masks"
    for value in (str(masks), "gt"):
        run = tmp_path / f"run_{Path(value).name}"
        args = [*folder_args(data, run), f"seg.masks={value}"]
        status, out, err = amnseg(capsys, "run", "voc12", *args, "--from", "seg")
        assert status == 0, err
        assert f"(on seg.masks={value}, not the pseudo masks)" in out
        assert (run / "seg" / "seg.pt").is_file() and not (run / "cam").exists()
        trained = (run / "seg" / "seg.pt").read_bytes()
        status, out, err = amnseg(capsys, "train-seg", "voc12", *args, "seeds.cam_fg_threshold=0.4")
        assert status == 0, err
        assert "[skip] seg: up to date" in out
        assert (run / "seg" / "seg.pt").read_bytes() == trained
    # The upper bound's own command on a config that turns it off.
    line = one_error_line(capsys, "train-seg-gt", "voc12", *folder_args(data, tmp_path / "gt"))
    assert line.endswith("train-seg-gt: stage seg_gt is off in this config (seg.upper_bound=true "
                         "turns it on)"), line
    assert not (tmp_path / "gt").exists()


def test_files_and_folders_named_by_options_count_as_inputs(data, tmp_path, capsys,
                                                           monkeypatch):
    """A masks folder made again, or a checkpoint replaced at the same path, is used: the
    stage that reads it runs again (it was "up to date" with the old contents)."""
    monkeypatch.setenv("COLUMNS", "400")  # lines unwrapped
    masks = tmp_path / "mymasks"
    shutil.copytree(data / "masks", masks)
    run = tmp_path / "run"
    args = [*folder_args(data, run), f"seg.masks={masks}"]
    status, out, err = amnseg(capsys, "train-seg", "voc12", *args)
    assert status == 0, err
    status, out, err = amnseg(capsys, "train-seg", "voc12", *args)
    assert "[skip] seg: up to date" in out
    mask = masks / "img 02.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)  # the user's masks change
    status, out, err = amnseg(capsys, "train-seg", "voc12", *args)
    assert status == 0, err
    assert "[run] seg: " in out and "its options or data changed since it ran" in out
    # A CAM checkpoint replaced at its path is copied in again, and the maps made again.
    first = tmp_path / "ref" / "cam" / "cam.pt"
    status, _, err = amnseg(capsys, "train-cam", "voc12", *folder_args(data, tmp_path / "ref"))
    assert status == 0, err
    given = tmp_path / "given.pt"
    shutil.copy(first, given)
    args = [*folder_args(data, tmp_path / "run2"), f"cam.checkpoint={given}"]
    status, out, err = amnseg(capsys, "run", "voc12", *args, "--to", "cam_maps")
    assert status == 0, err
    status, _, err = amnseg(capsys, "train-cam", "voc12",
                            *folder_args(data, tmp_path / "ref2"), "seed=1")
    assert status == 0, err
    shutil.copy(tmp_path / "ref2" / "cam" / "cam.pt", given)
    status, out, err = amnseg(capsys, "run", "voc12", *args, "--to", "cam_maps")
    assert status == 0, err
    assert "[run] cam: " in out and "[run] cam_maps: " in out
    assert f"(from cam.checkpoint={given}: nothing to train)" in out
    assert (tmp_path / "run2" / "cam" / "cam.pt").read_bytes() == given.read_bytes()


def test_config_values_and_api_arguments_of_the_wrong_kind_are_one_line(tmp_path, capsys, data):
    from amnseg.config import load_config
    from amnseg.pipeline import run_pipeline

    line = one_error_line(capsys, "config", "show", "voc12", "cam.scales={}")
    assert line.endswith("config voc12: cam.scales={}: Cannot merge incompatible container "
                         "types (a list option takes a list, e.g. [1, 0.5])"), line
    line = one_error_line(capsys, "config", "show", "voc12", "amp=on")
    assert line.endswith("amp='on': expected one of off, bf16"), line  # not YAML's 'True'
    for arguments, words in [
            (("voc12", "cam.epochs=2"), "overrides 'cam.epochs=2': expected a list of "
                                        "'key=value' texts"),
            (("voc12", [5]), "overrides [5]: expected a list of 'key=value' texts"),
            ((5,), "config 5: expected a config name or the path of a YAML file"),
            ((["voc12"],), "config ['voc12']: expected a config name or the path")]:
        with pytest.raises(AmnsegError, match=re.escape(words)):
            load_config(*arguments)
    config = load_config("voc12", folder_args(data, tmp_path / "run"))
    config.cam.epochz = 3  # a typo in Python adds an attribute the run would ignore
    with pytest.raises(AmnsegError, match=r"^cam.epochz: unknown option \(did you mean "
                       r"cam.epochs\?\)"):
        run_pipeline(config)
    del config.cam.epochz
    manifest = run_pipeline(config, stop="cam", progress=None)  # None: no stage lines
    assert manifest["stages"]["cam"]["status"] == "done"
    assert "[run]" not in capsys.readouterr().out


def test_eval_seg_files_a_network_trained_on_the_ground_truth_under_its_own_name(data, tmp_path,
                                                                                capsys):
    run = tmp_path / "run"
    args = [*folder_args(data, run), "seg.masks=gt", "seg.eval_crf=false"]
    status, _, err = amnseg(capsys, "train-seg", "voc12", *args)
    assert status == 0, err
    status, out, err = amnseg(capsys, "eval-seg", "voc12", *args, "--checkpoint",
                              run / "seg" / "seg.pt")
    assert status == 0, err
    assert "seg_gt: mIoU" in out
    assert json.loads((run / "eval" / "commands" / "seg_gt.json").read_text())["name"] == "seg_gt"
    assert not (run / "eval" / "commands" / "seg.json").exists()


def test_status_sees_data_changed_since_the_run(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")  # the table's cells unwrapped
    run = tmp_path / "run"
    status, _, err = amnseg(capsys, "run", "voc12", *folder_args(data, run), "--to", "cam_maps")
    assert status == 0, err
    status, out, _ = amnseg(capsys, "status", run)
    assert status == 0 and "out of date" not in out
    rows = (data / "labels.csv").read_text().replace("img 03,square", "img 03,disc")
    (data / "labels.csv").write_text(rows)
    status, out, _ = amnseg(capsys, "status", run)
    assert status == 0
    assert "its data changed" in out
    assert "out of date: cam, cam_maps (made with other options or data than the run's " \
           "config.json and its dataset now; `amnseg run` makes them again)" in " ".join(
               out.split())
    data.rename(tmp_path / "moved")
    status, out, _ = amnseg(capsys, "status", run)
    assert status == 0 and "data: dataset folder not found" in out


def test_empty_values_and_files_that_are_not_regular_files_are_named(capsys):
    line = one_error_line(capsys, "config", "show", "voc12", "run_dir=~")
    assert line.endswith("run_dir: empty or null (YAML reads an empty value and a lone ~ as "
                         "null); write the value (~/runs is fine)"), line
    line = one_error_line(capsys, "config", "show", "voc12", "data.root=")
    assert "data.root: empty or null" in line
    line = one_error_line(capsys, "predict", "/dev/null", "/dev/null", "--out", "/tmp/x")
    assert line.endswith("/dev/null: not a regular file (a device, a pipe?); expected a "
                         "checkpoint file"), line


def test_a_stage_recorded_before_files_were_signed_is_not_redone_for_that(data, tmp_path,
                                                                           capsys):
    """Runs made before the files that options name were signed keep their stages (hours of
    training with local ImageNet weights); a record of this version signs them."""
    from amnseg.config import load_config
    from amnseg.models.resnet import build_backbone

    backbone = load_config("demo", folder_args(data, tmp_path / "x")).backbone
    weights = tmp_path / "weights.pth"
    torch.save(build_backbone(backbone).state_dict(), weights)
    run = tmp_path / "run"
    args = ["run", "demo", *folder_args(data, run), "--to", "cam",
            f"backbone.pretrained={weights}"]
    status, _, err = amnseg(capsys, *args)
    assert status == 0, err
    from amnseg.pipeline import STAGES, _with_skipped, fingerprint, load_run_config

    manifest = json.loads((run / "manifest.json").read_text())
    record = manifest["stages"]["cam"]
    assert set(record["given"]) == {"backbone.pretrained"}
    # The record as an older version wrote it: no "given", a fingerprint without the file.
    config = load_run_config(run)
    old = fingerprint(STAGES[0], config, "", _with_skipped(config, manifest["data"]),
                      {"fingerprint": "older"})
    assert old != record["fingerprint"]
    del record["given"]
    record["fingerprint"] = old
    (run / "manifest.json").write_text(json.dumps(manifest))
    weights.write_bytes(weights.read_bytes() + b"\0")  # changed: unseen by an old record
    status, out, err = amnseg(capsys, *args)
    assert status == 0, err
    assert "[skip] cam: up to date" in out + err
