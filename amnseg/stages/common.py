"""What the stage modules share: the images a run processes, the start of an inference stage,
and reading the seeds that AMN and IRN train on. (Model building lives in
``amnseg.checkpoints``, paths in ``amnseg.layout``.)"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
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
from amnseg.io import BackgroundWriter, ScoreMaps, output_file, save_score_maps
from amnseg.ops.multiscale import grouped_forward, network_batches, rescaled_images
from amnseg.precision import with_precision
from amnseg.progress import progress_bar
from amnseg.training import resolve_device


def processed_images(config: Any) -> SegDataset:
    """The images the map, seed and mask stages process: every image of ``data.train_split``
    (the networks train on their seeds; the segmentation stage on their masks), then those of
    ``data.infer_split`` that are not among them (the images that are evaluated)."""
    return run_splits(config, [config.data.train_split, config.data.infer_split])


@dataclass
class InferenceJob:
    """An inference stage, ready to run: the model in eval mode on its device, the dataset, the
    stems whose output file does not exist yet (``todo``: a rerun resumes where it stopped),
    this rank's share of them under torchrun, and ``groups`` of images that run through the
    network together (one image each unless asked for). A group is recomputed whole when any
    of its images is to do, so that every image is computed in the same batch as in an
    uninterrupted run; only the images to do are written."""

    model: nn.Module
    device: torch.device
    dataset: SegDataset
    groups: list[list[str]]
    todo: list[str]


def size_groups(dataset: SegDataset, stems: list[str], most: int) -> list[list[str]]:
    """``stems`` in order, cut into runs of at most ``most`` consecutive images of one size
    (file headers are read, not the images)."""
    groups: list[list[str]] = []
    last_size = None
    for stem in stems:
        size = dataset.image_size(stem) if most > 1 else None
        if groups and size == last_size and len(groups[-1]) < most:
            groups[-1].append(stem)
        else:
            groups.append([stem])
        last_size = size
    return groups


def start_inference(
    config: Any, stage: str, checkpoint: Path, out_dir: Path, suffix: str, group: int
) -> InferenceJob:
    """Create ``out_dir`` and load the ``stage`` network of ``checkpoint`` for the run's images;
    the stems that already have ``<out_dir>/<stem><suffix>`` are done. ``group``: images per
    group (consecutive images of one size, see ``size_groups``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    dataset = processed_images(config)
    model = load_model(checkpoint, stage, dataset.class_names).to(device).eval()
    model = with_precision(model, config, device)
    # Under torchrun each rank takes its share of rank 0's plan (made before anyone writes):
    # the same groups whatever the number of ranks.
    plan = distributed.shard(distributed.run_on_main(_plan, dataset, out_dir, suffix, group))
    return InferenceJob(model, device, dataset, [g for g, _ in plan],
                        [stem for _, missing in plan for stem in missing])


def _plan(dataset: SegDataset, out_dir: Path, suffix: str, group: int
          ) -> list[tuple[list[str], list[str]]]:
    """(group, its stems without an output file) for every group with such a stem. Groups are
    cut from all images, so they do not depend on what a killed run left."""
    plan = []
    for stems in size_groups(dataset, list(dataset.stems), group):
        missing = [s for s in stems if not output_file(out_dir, s, suffix).is_file()]
        if missing:
            plan.append((stems, missing))
    return plan


class MultiscaleInputs(torch.utils.data.Dataset):
    """Loader-side preparation of each image at every scale (decoding and PIL resizing overlap
    the network's work), as uint8: normalising and mirroring are left to the device
    (:func:`network_batches`), which moves an eighth of the bytes of float32 batches.
    ``extra(stem, (H, W))``, when given, reads what else a stage needs of each image (the AMN
    maps' CAM seeds), in the workers too. Items: (stem, uint8 (h_s, w_s, 3) per scale, label,
    (H, W), extra's result or None)."""

    def __init__(self, dataset: SegDataset, stems: list[str], scales: list[float], flip: bool,
                 extra: Callable[[str, tuple[int, int]], Any] | None = None):
        self.dataset, self.stems, self.scales, self.flip = dataset, stems, scales, flip
        self.extra = extra

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int
                    ) -> tuple[str, list[torch.Tensor], torch.Tensor, tuple[int, int], Any]:
        stem = self.stems[index]
        image = self.dataset.image(stem)
        scaled = rescaled_images(image, self.scales)
        size = image.shape[:2]
        extra = None if self.extra is None else self.extra(stem, size)
        return stem, scaled, torch.from_numpy(self.dataset.label(stem)), size, extra

    def batches(self, scaled: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """One item's uint8 images -> its network batches on ``device``."""
        return network_batches(scaled, self.flip, device)

    def loader(self, num_workers: int, groups: list[list[str]], pin_memory: bool = False
               ) -> torch.utils.data.DataLoader:
        """One group of ``groups`` (of this dataset's stems) per step, in order: a list of
        items, prepared by one worker; ``pin_memory`` for asynchronous copies to a GPU."""
        index = {stem: position for position, stem in enumerate(self.stems)}
        batches = [[index[stem] for stem in group] for group in groups]
        return torch.utils.data.DataLoader(self, batch_sampler=batches, collate_fn=list,
                                           num_workers=num_workers, pin_memory=pin_memory)


# One image's network outputs: (stem, per-scale outputs, label, (H, W), what
# ``MultiscaleInputs``' ``extra`` read for it or None).
ImageOutputs = tuple[str, list[torch.Tensor], torch.Tensor, tuple[int, int], Any]


def multiscale_outputs(
    job: InferenceJob,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scales: list[float],
    flip: bool,
    num_workers: int,
    desc: str,
    extra: Callable[[str, tuple[int, int]], Any] | None = None,
) -> Iterator[ImageOutputs]:
    """The outputs of every image the job has to do, its multi-scale (+ flip) inputs (and
    ``extra``'s reads, see :class:`MultiscaleInputs`) prepared in loader workers and run
    through ``forward(images, labels)`` a whole group at a time (labels: each row's image
    label)."""
    inputs = MultiscaleInputs(job.dataset, [s for group in job.groups for s in group], scales,
                              flip, extra)
    todo = set(job.todo)
    with progress_bar(total=len(todo), desc=desc) as bar:
        for items in inputs.loader(num_workers, job.groups, job.device.type == "cuda"):
            labels = torch.stack([label.to(job.device, non_blocking=True)
                                  for _, _, label, _, _ in items])

            def rows_forward(rows, owners, labels=labels):
                return forward(rows, labels[owners])

            outputs = grouped_forward(
                rows_forward, [inputs.batches(scaled, job.device) for _, scaled, _, _, _ in items],
                job.device)
            for (stem, _, label, size, read), scale_outputs in zip(items, outputs, strict=True):
                if stem in todo:  # the others were done by an earlier run
                    yield stem, scale_outputs, label, tuple(size), read
                    bar.update()


# An image's maps before they leave the device: (class ids (K,), stride-4 maps (K, h4, w4),
# image-size maps (K, H, W)).
MapTensors = tuple[np.ndarray, torch.Tensor, torch.Tensor]


def score_maps_from(
    outputs: Iterator[ImageOutputs],
    device: torch.device,
    finish: Callable[[str, list[torch.Tensor], torch.Tensor, tuple[int, int], Any], MapTensors],
    lookahead: int,
) -> Iterator[tuple[str, ScoreMaps]]:
    """(stem, score maps) of every image of ``outputs`` (:func:`multiscale_outputs` on
    ``device``), ``finish(stem, scale_outputs, label, size, extra)`` making each image's maps on
    the device. From a GPU the maps come back asynchronously and are handed out ``lookahead`` images
    late (a group's worth): by then the next group's forward is queued, so the GPU works on it
    while the caller handles these maps on the CPU (each copy was waited for, not the work
    queued after it)."""
    waiting: deque[tuple[str, MapTensors, torch.cuda.Event | None]] = deque()

    def ready(entry: tuple[str, MapTensors, torch.cuda.Event | None]) -> tuple[str, ScoreMaps]:
        stem, (class_ids, strided, full), copied = entry
        if copied is not None:
            copied.synchronize()
        return stem, ScoreMaps(class_ids, strided.cpu().numpy(), full.cpu().numpy())

    for stem, scale_outputs, label, size, extra in outputs:
        class_ids, strided, full = finish(stem, scale_outputs, label, size, extra)
        copied = None
        if device.type == "cuda":  # into pinned memory, behind the work queued so far
            strided, full = strided.to("cpu", non_blocking=True), full.to("cpu", non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(device))  # the maps' device's stream
        waiting.append((stem, (class_ids, strided, full), copied))
        if len(waiting) > lookahead:
            yield ready(waiting.popleft())
    while waiting:
        yield ready(waiting.popleft())


def write_score_maps(config: Any, out_dir: Path, maps: Iterable[tuple[str, ScoreMaps]],
                     on_saved: Callable[[str], None] | None = None) -> None:
    """Save every (stem, score maps) of ``maps`` as ``<out_dir>/<stem>.npz``, on as many writer
    threads as loader workers (up to 8; none, in the caller, without workers). ``on_saved(stem)``
    runs once the file is in place, on the thread that wrote it."""

    def save(stem: str, image_maps: ScoreMaps) -> None:
        save_score_maps(output_file(out_dir, stem, ".npz"), image_maps, config.compress_maps)
        if on_saved is not None:
            on_saved(stem)

    with BackgroundWriter(min(config.data.num_workers, 8)) as writer:
        for stem, image_maps in maps:
            writer.submit(save, stem, image_maps)


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
