"""What the stage modules share: the images a run processes, the start of an inference stage,
and reading the seeds that AMN and IRN train on. (Model building lives in
``amnseg.checkpoints``, paths in ``amnseg.layout``.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from amnseg import distributed
from amnseg.checkpoints import load_model
from amnseg.data import run_splits
from amnseg.data.base import SegDataset, read_index_png
from amnseg.errors import AmnsegError
from amnseg.io import output_file
from amnseg.ops.multiscale import multiscale_inputs
from amnseg.precision import with_precision
from amnseg.training import resolve_device


def processed_images(config: Any) -> SegDataset:
    """The images the map, seed and mask stages process: every image of ``data.train_split``
    (the networks train on their seeds; the segmentation stage on their masks), then those of
    ``data.infer_split`` that are not among them (the images that are evaluated)."""
    return run_splits(config, [config.data.train_split, config.data.infer_split])


@dataclass
class InferenceJob:
    """An inference stage, ready to run: the model in eval mode on its device, the dataset and
    the stems whose output file does not exist yet (a rerun resumes where it stopped), this
    rank's share of them under torchrun."""

    model: nn.Module
    device: torch.device
    dataset: SegDataset
    todo: list[str]


def start_inference(
    config: Any, stage: str, checkpoint: Path, out_dir: Path, suffix: str
) -> InferenceJob:
    """Create ``out_dir`` and load the ``stage`` network of ``checkpoint`` for the run's images;
    the stems that already have ``<out_dir>/<stem><suffix>`` are done."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    dataset = processed_images(config)
    model = load_model(checkpoint, stage, dataset.class_names).to(device).eval()
    model = with_precision(model, config, device)
    todo = [s for s in dataset.stems if not output_file(out_dir, s, suffix).is_file()]
    # Under torchrun each rank takes its share; an image's output depends on it alone.
    return InferenceJob(model, device, dataset, distributed.shard(todo))


class MultiscaleInputs(torch.utils.data.Dataset):
    """Loader-side preparation of each image's multi-scale (+ flip) batches, so that decoding
    and resizing overlap the network's work. Items: (stem, batches, label, (H, W))."""

    def __init__(self, dataset: SegDataset, stems: list[str], scales: list[float], flip: bool):
        self.dataset, self.stems, self.scales, self.flip = dataset, stems, scales, flip

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> tuple[str, list[torch.Tensor], torch.Tensor, tuple]:
        stem = self.stems[index]
        image = self.dataset.image(stem)
        batches = multiscale_inputs(image, self.scales, self.flip)
        return stem, batches, torch.from_numpy(self.dataset.label(stem)), image.shape[:2]

    def loader(self, num_workers: int) -> torch.utils.data.DataLoader:
        """One image per step, in order."""
        return torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers)


def read_seed(seeds_dir: Path, stem: str, size: tuple[int, int]) -> np.ndarray:
    """The (H, W) uint8 seed of ``stem``, checked against the image size."""
    path = seeds_dir / f"{stem}.png"
    if not path.is_file():
        raise AmnsegError(f"{path}: seed not found; run the seed stage first")
    seed = read_index_png(path)
    if seed.shape != tuple(size):
        raise AmnsegError(
            f"{path}: seed is {seed.shape[1]}x{seed.shape[0]}, the image is {size[1]}x{size[0]}"
        )
    return seed
