"""Operators the map stages dispatch per image, inside and outside the network forwards.

On a GPU every operator is at least one kernel launch, and the map stages' work besides the
forwards (normalising and mirroring the inputs, merging scales and mirrors, the scores,
copies) is many small operators per image: with bf16 forwards of a few milliseconds, their
launches can cost as much as the forwards ("Whole pipeline, cuda, amp bf16" in RESULTS.md).
This counts them on the CPU, where the count is exact and needs no GPU: ``make_cams`` and
``make_amn_maps`` run on a small synthetic folder dataset with the reference ResNet-50 (a
quarter of its width, random weights: the operators are the same) and one loader worker
(decoding happens in that worker, as on a GPU machine, and is not counted), and every ATen
operator dispatched in this process is counted as inside a forward or outside. Each stage
runs on the first ``--images`` images and, in a new run folder, on twice as many: the
difference over the extra images is the cost per image, without the fixed costs of a run
(loading the network). (On a GPU the copies back to the host add two operators per group.)

    python -m benchmarks.bench_map_ops [--images 8] [--size 32]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from amnseg.checkpoints import save_model
from amnseg.config import load_config
from amnseg.data import build_dataset
from amnseg.layout import checkpoint_path
from amnseg.models import CAMNet, build_backbone
from amnseg.models.amn import AMN
from amnseg.stages import amn as amn_stage
from amnseg.stages import cam as cam_stage
from benchmarks.common import write_section

CLASSES = [f"class{index}" for index in range(20)]


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched while active, apart for those inside a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.outside = 0
        self.in_forward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_forward:
            self.inside += 1
        else:
            self.outside += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self.in_forward = True
        try:
            yield
        finally:
            self.in_forward = False


class CountedModel:
    """A stage's network whose calls (``model(...)``, ``model.cam(...)``) count as forwards."""

    def __init__(self, model: Any, count: OperatorCount):
        self.model, self.count = model, count

    def __call__(self, *args: Any) -> torch.Tensor:
        with self.count.forward():
            return self.model(*args)

    def cam(self, *args: Any) -> torch.Tensor:
        with self.count.forward():
            return self.model.cam(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def make_folder_dataset(root: Path, images: int, size: int) -> None:
    """``images`` random images of one size (size x 4/3 size), two classes each, folder
    format, with CAM seeds of their classes in ``root/seeds``."""
    rng = np.random.default_rng(0)
    for folder in ("images", "splits", "seeds"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rows, stems = ["stem,classes"], []
    height, width = size, size * 4 // 3
    for index in range(images):
        stem = f"image{index:03d}"
        stems.append(stem)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{stem}.png")
        classes = sorted(rng.choice(20, 2, replace=False) + 1)
        rows.append(f"{stem},{';'.join(CLASSES[c - 1] for c in classes)}")
        seed = rng.choice([0, *classes], size=(height, width)).astype(np.uint8)
        Image.fromarray(seed).save(root / "seeds" / f"{stem}.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "splits" / "train.txt").write_text("\n".join(stems) + "\n")
    (root / "splits" / "half.txt").write_text("\n".join(stems[: images // 2]) + "\n")


def count_stage(config: Any, stage: str, seeds: Path) -> tuple[int, int]:
    """(operators inside the forwards, outside them) of one map stage's run."""
    count = OperatorCount()
    module = cam_stage if stage == "cam" else amn_stage
    start = module.start_inference

    def counted_start(*args: Any, **kwargs: Any) -> Any:
        job = start(*args, **kwargs)
        job.model = CountedModel(job.model, count)
        return job

    with mock.patch.object(module, "start_inference", counted_start), count:
        if stage == "cam":
            cam_stage.make_cams(config)
        else:
            amn_stage.make_amn_maps(config, seeds)
    return count.inside, count.outside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images of the first run")
    parser.add_argument("--size", type=int, default=32, help="image height (width: 4/3 of it)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="amnseg-map-ops-") as work:
        data = Path(work) / "data"
        make_folder_dataset(data, 2 * args.images, args.size)
        for group in (1, 8):
            counts = {}
            for split in ("half", "train"):
                config = load_config("voc12", [
                    "data.kind=folder", f"data.root={data}", f"data.train_split={split}",
                    f"data.infer_split={split}", "data.num_workers=1", "device=cpu",
                    f"run_dir={work}/run-{group}-{split}", "backbone.pretrained=null",
                    "backbone.width=0.25", f"map_batch_images={group}", "compress_maps=false"])
                names = build_dataset(config.data, split).class_names
                save_model(checkpoint_path(config, "cam"), "cam",
                           CAMNet(build_backbone(config.backbone), 20), names, config.backbone)
                save_model(checkpoint_path(config, "amn"), "amn",
                           AMN(build_backbone(config.backbone), 20), names, config.backbone)
                for stage in ("cam", "amn"):
                    counts[stage, split] = count_stage(config, stage, data / "seeds")
            for stage in ("cam", "amn"):
                inside, outside = (
                    (whole - half) / args.images
                    for whole, half in zip(counts[stage, "train"], counts[stage, "half"],
                                           strict=True))
                rows.append(f"| {stage}_maps | {group} | {inside:.1f} | {outside:.1f} "
                            f"| {outside / inside:.2f} |")
                print(rows[-1], flush=True)
    body = (
        f"Images of {args.size}x{args.size * 4 // 3}, `voc12` settings (ResNet-50 at a quarter "
        "of its width, 4 scales + flip), random weights, 1 loader worker; ATen operators "
        f"dispatched in the stage's process per image: a run of {2 * args.images} images less "
        f"one of {args.images}, over the {args.images} extra images.\n\n"
        "| stage | images per forward | in the forwards | outside them | outside / in |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows)
    )
    write_section("Map stages: operators per image", body)


if __name__ == "__main__":
    main()
