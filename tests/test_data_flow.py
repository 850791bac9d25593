"""The reference's data flow on a tiny VOC-layout tree: CAM, AMN and IRN train on train_aug;
maps, seeds and pseudo masks are made for every train_aug image (plus any train image outside
it); evaluation uses train only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pipeline import FAST

from amnseg.config import load_config
from amnseg.data.voc import voc_palette
from amnseg.pipeline import run_pipeline

SIZE = 32
TRAIN_AUG = [f"2008_{i:06d}" for i in range(10)]
TRAIN = [TRAIN_AUG[1], TRAIN_AUG[4], TRAIN_AUG[7], "2011_000001"]  # the last is not in train_aug
VAL = ["2012_000001", "2012_000002"]


def write_voc_tree(root: Path) -> Path:
    """JPEG images with one or two coloured boxes; VOC palette masks for the train images,
    SBD-style grayscale masks for the rest of train_aug."""
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
                   "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for index, stem in enumerate(dict.fromkeys(TRAIN_AUG + TRAIN + VAL)):
        image = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        classes = [(1, (220, 40, 40)), (12, (40, 40, 220))][: 1 + index % 2]
        for cls, colour in classes:
            top, left = rng.integers(2, SIZE - 14, 2)
            image[top:top + 12, left:left + 12] = colour
            mask[top:top + 12, left:left + 12] = cls
        Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        if stem in TRAIN or stem in VAL:
            png = Image.fromarray(mask, mode="L").convert("P")
            png.putpalette(voc_palette())
            png.save(root / "SegmentationClass" / f"{stem}.png")
        else:
            Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{stem}.png")
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train_aug.txt").write_text("\n".join(TRAIN_AUG) + "\n")
    (sets / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(VAL) + "\n")
    return root


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    data = write_voc_tree(root / "VOCdevkit" / "VOC2012")
    config = load_config("voc12", [
        f"run_dir={root / 'run'}", "device=cpu", f"data.root={data}", "data.num_workers=0",
        "backbone.depth=18", "backbone.width=0.125", "backbone.strides=[2,2,1,1]",
        "backbone.pretrained=null", "backbone.norm=batch", "cam.batch_size=4",
        "cam.resize_long=[24,40]",
        "cam.crop_size=32", *FAST,
    ])
    manifest = run_pipeline(config, progress=lambda line: None)
    return Path(config.run_dir), manifest


def stems_in(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def test_networks_train_on_train_aug(voc_run):
    run, manifest = voc_run
    for stage in ("cam", "amn", "irn", "seg"):
        metrics = manifest["stages"][stage]["metrics"]
        assert (metrics["train_split"], metrics["train_images"]) == ("train_aug", len(TRAIN_AUG))
        epochs = [json.loads(line) for line in (run / stage / "log.jsonl").read_text().split("\n")
                  if line]
        assert epochs and all(e["split"] == "train_aug" and e["train_images"] == len(TRAIN_AUG)
                              for e in epochs), stage


def test_maps_seeds_and_masks_cover_every_training_image(voc_run):
    run, manifest = voc_run
    everything = sorted(set(TRAIN_AUG) | set(TRAIN))
    assert len(everything) == 11
    for folder, suffix in (("cam/maps", ".npz"), ("seeds/cam", ".png"), ("amn/maps", ".npz"),
                           ("seeds/amn", ".png"), ("irn/masks", ".png")):
        assert stems_in(run / folder, suffix) == everything, folder
    for stage in ("cam_maps", "amn_maps", "masks"):
        assert manifest["stages"][stage]["metrics"]["images"] == 11


def test_evaluation_uses_the_infer_split_only(voc_run):
    run, manifest = voc_run
    for name in ("cam_sweep", "amn_sweep", "cam_seeds", "amn_seeds", "pseudo_masks"):
        result = json.loads((run / "eval" / f"{name}.json").read_text())
        assert result["images"] == len(TRAIN), name
    per_image = json.loads((run / "eval" / "pseudo_masks.json").read_text())["per_image_miou"]
    assert set(per_image) <= set(TRAIN)
    # The segmentation network is evaluated on val.
    seg = json.loads((run / "eval" / "seg.json").read_text())
    assert seg["split"] == "val" and seg["images"] == len(VAL) and seg["trained_on"] == "pseudo"
    # The AMN sweep's reported threshold is AMN's own (0.25), CAM's is 0.15.
    assert json.loads((run / "eval" / "amn_sweep.json").read_text())["threshold"] == 0.25
    assert json.loads((run / "eval" / "cam_sweep.json").read_text())["threshold"] == 0.15
