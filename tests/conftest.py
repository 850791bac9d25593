"""Shared fixtures: a tiny dataset in the folder format and tiny configs."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amnseg.config import Config, load_config
from amnseg.ops.random_walk import random_walk

CLASSES = ["square", "disc"]


def write_tiny_folder_dataset(root: Path, count: int = 8, size: int = 32, seed: int = 0) -> Path:
    """``count`` images with one or two coloured shapes and their masks, folder format."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rows = ["stem,classes"]
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        present = [c for c in (1, 2) if rng.random() < 0.7] or [1 + i % 2]
        for cls in present:
            cy, cx = rng.integers(8, size - 8, 2)
            if cls == 1:
                region = (abs(yy - cy) < 6) & (abs(xx - cx) < 6)
            else:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
            image[region] = (220, 60, 60) if cls == 1 else (60, 60, 220)
            mask[region] = cls
        stem = f"img {i:02d}"
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        rows.append(f"{stem},{';'.join(CLASSES[c - 1] for c in sorted(set(mask.ravel()) - {0}))}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    stems = [f"img {i:02d}" for i in range(count)]
    (root / "splits" / "train.txt").write_text("\n".join(stems) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(stems[: count // 2]) + "\n")
    return root


def tiny_config(data_root: Path, run_dir: Path, *overrides: str) -> Config:
    """A config with a tiny network and images, for tests on CPU in seconds."""
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "device=cpu",
            "data.kind=folder",
            f"data.root={data_root}",
            "data.train_split=train",
            "data.infer_split=train",
            "data.val_split=val",
            "data.num_workers=0",
            "backbone.depth=18",
            "backbone.width=0.125",
            "backbone.strides=[2,2,1,1]",
            "backbone.pretrained=null",
            "cam.epochs=2",
            "cam.batch_size=4",
            "cam.resize_long=[24,40]",
            "cam.crop_size=32",
            *overrides,
        ],
    )


def write_random_seeds(config: Config, folder: Path, seed: int = 0) -> list[str]:
    """Seed PNGs (0 / 1 / 2 / 255 at random) for every image of the config's train split, as a
    seed stage would write them; returns the stems."""
    from amnseg.data import build_dataset
    from amnseg.io import save_label_png

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dataset = build_dataset(config.data, config.data.train_split)
    for stem in dataset.stems:
        height, width = dataset.image(stem).shape[:2]
        labels = rng.choice([0, 1, 2, 255], (height, width)).astype(np.uint8)
        save_label_png(folder / f"{stem}.png", labels)
    return list(dataset.stems)


def training_log(config: Config, stage: str) -> list[dict]:
    """The records of ``<run_dir>/<stage>/log.jsonl``."""
    path = Path(config.run_dir) / stage / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_tiny_folder_dataset(tmp_path / "data")


# One thread everywhere (module-scoped fixtures included): results that tests compare bit for
# bit must come from the same arithmetic order, and 2-core CI machines are not oversubscribed.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@cache
def voc_size_case() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(maps, boundaries, their float64 CPU walks) of six VOC-size stride-4 images on the CPU,
    landscape and portrait, 2 to 5 classes (5: two chunks of the CUDA kernel's 4 lanes)."""
    generator = torch.Generator().manual_seed(1)
    maps, boundaries = [], []
    for index, classes in enumerate((3, 5, 3, 2, 3, 3)):
        height, width = (94, 125) if index % 2 == 0 else (125, 94)
        maps.append(torch.rand((classes, height, width), generator=generator))
        boundaries.append(torch.rand((height, width), generator=generator) ** 4)
    expected = [random_walk(m.double(), b.double()) for m, b in zip(maps, boundaries, strict=True)]
    return maps, boundaries, expected


def assert_walks_match(walked: list[torch.Tensor]) -> None:
    """``walked`` (the kernel's walks of :func:`voc_size_case`) equal the float64 CPU walks
    within 1e-6 relative, their argmax on >= 99.99 % of the pixels."""
    for w, expected in zip(walked, voc_size_case()[2], strict=True):
        error = (w.double().cpu() - expected).abs().max() / expected.abs().max()
        assert error < 1e-6, error
        agree = (w.cpu().argmax(0) == expected.argmax(0)).float().mean()
        assert agree >= 0.9999, agree
