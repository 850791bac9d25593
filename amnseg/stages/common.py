"""What the stage modules share: the images a run processes, the start of an inference stage,
and reading the seeds that AMN and IRN train on. (Model building lives in
``amnseg.checkpoints``, paths in ``amnseg.layout``.)"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from amnseg import distributed
from amnseg.checkpoints import load_model
from amnseg.data import run_splits
from amnseg.data.base import SegDataset, read_index_png
from amnseg.errors import AmnsegError
from amnseg.io import BackgroundWriter, ScoreMaps, output_file, save_score_maps
from amnseg.ops.multiscale import network_batch, rescaled_images
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
    (:func:`network_batch`), which moves an eighth of the bytes of float32 batches.
    ``extra(stem, (H, W))``, when given, reads a tuple of tensors that a stage also needs of
    each image (the AMN maps' CAM seeds), in the workers too. Items: (stem, uint8 (h_s, w_s, 3)
    per scale, label, (H, W), extra's result or None); the loader joins a group's items into
    one :class:`ImageGroup`."""

    def __init__(self, dataset: SegDataset, stems: list[str], scales: list[float], flip: bool,
                 extra: Callable[[str, tuple[int, int]], tuple[torch.Tensor, ...]] | None = None):
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

    def loader(self, num_workers: int, groups: list[list[str]], pin_memory: bool = False
               ) -> torch.utils.data.DataLoader:
        """One :class:`ImageGroup` per group of ``groups`` (of this dataset's stems, images of
        one size), in order, prepared by one worker; ``pin_memory`` for asynchronous copies to
        a GPU."""
        index = {stem: position for position, stem in enumerate(self.stems)}
        batches = [[index[stem] for stem in group] for group in groups]
        return torch.utils.data.DataLoader(self, batch_sampler=batches, collate_fn=join_group,
                                           num_workers=num_workers, pin_memory=pin_memory)


class ImageGroup(NamedTuple):
    """N images of one size that go through the network together, as the loader hands them
    over (a NamedTuple, so that the loader pins its tensors)."""

    stems: list[str]
    scaled: list[torch.Tensor]  # per scale: uint8 (N, h_s, w_s, 3)
    labels: torch.Tensor  # (N, C)
    size: tuple[int, int]  # (H, W)
    extra: tuple[torch.Tensor, ...] | None  # each of ``extra``'s tensors stacked: (N, ...)


def join_group(items: list[tuple[str, list[torch.Tensor], torch.Tensor, tuple[int, int], Any]]
               ) -> ImageGroup:
    """:class:`MultiscaleInputs`' items of one group -> their :class:`ImageGroup`, in a loader
    worker: one stacked tensor per scale, so that the device gets one copy and one set of
    normalising kernels per scale and group, not per image."""
    stems, scaled, labels, sizes, extras = zip(*items, strict=True)
    for stem, size in zip(stems, sizes, strict=True):
        if tuple(size) != tuple(sizes[0]):  # groups are cut by the files' headers
            raise AmnsegError(
                f"{stem}: image is {size[1]}x{size[0]}, {stems[0]} is {sizes[0][1]}x"
                f"{sizes[0][0]}, and their headers gave one size when the stage began: was "
                "an image replaced while the stage ran?")
    extra = None
    if extras[0] is not None:
        extra = tuple(torch.stack(part) for part in zip(*extras, strict=True))
    return ImageGroup(list(stems), [torch.stack(images) for images in zip(*scaled, strict=True)],
                      torch.stack(labels), tuple(sizes[0]), extra)


# One group's network outputs: (the group, per scale its rows' outputs (2N or N, ...), for
# each image whether it is to do).
GroupOutputs = tuple[ImageGroup, list[torch.Tensor], list[bool]]


@torch.no_grad()
def multiscale_outputs(
    job: InferenceJob,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scales: list[float],
    flip: bool,
    num_workers: int,
    desc: str,
    extra: Callable[[str, tuple[int, int]], tuple[torch.Tensor, ...]] | None = None,
) -> Iterator[GroupOutputs]:
    """The outputs of every group the job has to do: its images' multi-scale (+ flip) inputs
    (and ``extra``'s reads, see :class:`MultiscaleInputs`) prepared in loader workers, then
    one ``forward(rows, labels)`` per scale on all the group's rows (:func:`network_batch`'s
    order: each image, then its mirror; labels: each row's image label). A row's output does
    not depend on the other rows on the CPU (tests/test_models.py), so the outputs equal
    those of one image at a time."""
    inputs = MultiscaleInputs(job.dataset, [s for group in job.groups for s in group], scales,
                              flip, extra)
    todo = set(job.todo)
    with progress_bar(total=len(todo), desc=desc) as bar:
        for group in inputs.loader(num_workers, job.groups, job.device.type == "cuda"):
            labels = group.labels.to(job.device, non_blocking=True)
            row_labels = labels.repeat_interleave(2, dim=0) if flip else labels
            outputs = [forward(network_batch(images, flip, job.device), row_labels)
                       for images in group.scaled]
            wanted = [stem in todo for stem in group.stems]  # the others: done by an earlier run
            yield group, outputs, wanted
            bar.update(sum(wanted))


# A group's maps before they leave the device: each image's class ids (K_i,), then the
# stride-4 maps (sum K_i, h4, w4) and image-size maps (sum K_i, H, W) of all its images'
# classes, image after image.
GroupMaps = tuple[list[np.ndarray], torch.Tensor, torch.Tensor]

# The most values (2**26: 256 MB in float32) of image-size maps of all channels that a map
# stage makes at once: a group's images are finished in parts of at most that many. VOC's
# 21 channels at 500x375 fit 17 images (a default group of 8 is one part); COCO's 81 at
# 640x480 fit 2, where a whole group of 8 took 2 GB more memory (benchmarks/RESULTS.md).
IMAGE_SIZE_VALUES = 2**26


def group_parts(group: ImageGroup, outputs: list[torch.Tensor], values: int
                ) -> Iterator[tuple[ImageGroup, list[torch.Tensor]]]:
    """``group`` and its per-scale ``outputs`` (rows of each image in turn) in parts of
    consecutive images whose image-size maps of all the outputs' channels hold at most
    ``values`` values (one image at least); the whole group when it fits."""
    images = len(group.stems)
    per_image = outputs[0].shape[1] * group.size[0] * group.size[1]
    step = max(1, values // per_image)
    if step >= images:
        yield group, outputs
        return
    for start in range(0, images, step):
        part = slice(start, start + step)
        extra = None if group.extra is None else tuple(tensor[part] for tensor in group.extra)
        rows = [scale[start * (len(scale) // images):(start + step) * (len(scale) // images)]
                for scale in outputs]
        yield ImageGroup(group.stems[part], [scaled[part] for scaled in group.scaled],
                         group.labels[part], group.size, extra), rows


def finish_group(group: ImageGroup, outputs: list[torch.Tensor],
                 finish: Callable[[ImageGroup, list[torch.Tensor]], GroupMaps], values: int
                 ) -> GroupMaps:
    """``finish(group, outputs)`` done on :func:`group_parts` of at most ``values`` image-size
    values, joined."""
    parts = [finish(*part) for part in group_parts(group, outputs, values)]
    if len(parts) == 1:
        return parts[0]
    return ([ids for class_ids, _, _ in parts for ids in class_ids],
            torch.cat([strided for _, strided, _ in parts]),
            torch.cat([full for _, _, full in parts]))


def score_maps_from(
    outputs: Iterator[GroupOutputs],
    device: torch.device,
    finish: Callable[[ImageGroup, list[torch.Tensor]], GroupMaps],
    values: int = IMAGE_SIZE_VALUES,
) -> Iterator[tuple[str, ScoreMaps]]:
    """(stem, score maps) of every image to do of ``outputs`` (:func:`multiscale_outputs` on
    ``device``), ``finish(group, scale_outputs)`` making a group's maps on the device (in
    parts of at most ``values`` image-size values, see :func:`group_parts`). From a GPU the
    maps come back asynchronously, a group late: by then the next group's forward is queued,
    so the GPU works on it while the caller handles these maps on the CPU (each copy was
    waited for, not the work queued after it)."""
    waiting: deque[tuple[ImageGroup, list[bool], GroupMaps, torch.cuda.Event | None]] = deque()

    def ready(group: ImageGroup, wanted: list[bool], maps: GroupMaps,
              copied: torch.cuda.Event | None) -> Iterator[tuple[str, ScoreMaps]]:
        class_ids, strided, full = maps
        if copied is not None:
            copied.synchronize()
        counts = [len(ids) for ids in class_ids]
        for stem, is_todo, ids, image_strided, image_full in zip(
                group.stems, wanted, class_ids, strided.cpu().split(counts),
                full.cpu().split(counts), strict=True):
            if is_todo:
                yield stem, ScoreMaps(ids, image_strided.numpy(), image_full.numpy())

    for group, scale_outputs, wanted in outputs:
        class_ids, strided, full = finish_group(group, scale_outputs, finish, values)
        copied = None
        if device.type == "cuda":  # into pinned memory, behind the work queued so far
            strided, full = strided.to("cpu", non_blocking=True), full.to("cpu", non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(device))  # the maps' device's stream
        waiting.append((group, wanted, (class_ids, strided, full), copied))
        if len(waiting) > 1:
            yield from ready(*waiting.popleft())
    while waiting:
        yield from ready(*waiting.popleft())


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
