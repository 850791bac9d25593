"""Stage "irn": learn class boundaries from AMN seeds, then random-walk the AMN maps into the
final pseudo masks (METHOD.md section 5).

``train_irn``: config + AMN seeds -> ``<run_dir>/irn/irn.pt``, trained on ``data.train_split``
(resumes per epoch).
``make_masks``: config + checkpoint + AMN maps -> ``<run_dir>/irn/masks/<stem>.png`` (VOC
palette PNGs) for every image of the run, resuming per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from amnseg import distributed
from amnseg.checkpoints import initial_backbone, save_model
from amnseg.config import Config, IrnConfig
from amnseg.data.base import Sample
from amnseg.data.transforms import SegmentationTrainTransform, rescale
from amnseg.data.voc import voc_palette
from amnseg.errors import AmnsegError
from amnseg.io import load_score_maps, output_file, save_label_png
from amnseg.layout import checkpoint_path, maps_dir, masks_dir
from amnseg.losses import irn_affinity_loss
from amnseg.models.irn import BoundaryNet
from amnseg.ops.affinity import affinity_labels, pair_region, path_affinities
from amnseg.ops.multiscale import merge_flip, multiscale_inputs, queued_copy, strided_size
from amnseg.ops.random_walk import random_walk
from amnseg.stages.common import multiscale_outputs, read_seed, start_inference
from amnseg.training import (
    AugmentedSet,
    Schedule,
    fit,
    poly_sgd,
    start_stage,
    steps_per_epoch,
)


def irn_optimizer(
    model: BoundaryNet, irn_cfg: IrnConfig, total_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """The reference's PolyOptimizer over the boundary layers only (the backbone is frozen):
    SGD at ``lr`` with ``weight_decay``, the same weight-decay-as-momentum quirk as the CAM
    stage (``momentum`` 1e-4), poly decay over ``total_steps``."""
    groups = [{"params": model.trainable_parameters(), "lr": irn_cfg.lr,
               "weight_decay": irn_cfg.weight_decay}]
    return poly_sgd(groups, irn_cfg.momentum, total_steps, irn_cfg.poly_power)


class IrnTrainingItems:
    """(sample, rng) -> (image crop (3, S, S), bg-positive, fg-positive, negative pair labels
    (D, h', w') uint8): image and AMN seed augmented together, the seed crop shrunk x0.25 with
    PIL NEAREST (as the reference's label_scale) before the pairs within ``radius`` are
    labelled. The labels are 0/1, sent from the loader workers as uint8: as float32 they were
    24 MB per 512 crop, 0.8 GB per batch of 32 through shared and pinned memory; the loss
    takes them to float32 on the device."""

    def __init__(self, amn_seeds_dir: Path, irn_cfg: IrnConfig):
        self.seeds_dir = amn_seeds_dir
        self.radius = irn_cfg.radius
        self.transform = SegmentationTrainTransform(
            tuple(irn_cfg.rescale), irn_cfg.crop_size, irn_cfg.flip
        )

    def __call__(self, sample: Sample, rng: np.random.Generator):
        seed = read_seed(self.seeds_dir, sample.stem, sample.image.shape[:2])
        image, seed_crop = self.transform(sample.image, seed, rng)
        small = rescale(seed_crop.numpy().astype(np.uint8), 0.25, Image.NEAREST)
        bg_pos, fg_pos, neg = affinity_labels(small, self.radius, np.uint8)
        return image, torch.from_numpy(bg_pos), torch.from_numpy(fg_pos), torch.from_numpy(neg)


def irn_training_loss(
    model: BoundaryNet, images: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor,
    neg: torch.Tensor, radius: int,
) -> torch.Tensor:
    """The IRN loss of a batch: boundary = sigmoid(model(images)) (B, h, w); the affinity of
    each pair of ``pair_region`` x ``search_directions(radius)`` is 1 - the max boundary on its
    path; pair labels (B, D, h', w') of 0/1 as from ``affinity_labels`` (any dtype: they are
    taken to float32, the reference's)."""
    bg_pos, fg_pos, neg = bg_pos.float(), fg_pos.float(), neg.float()
    boundary = torch.sigmoid(model(images))[:, 0]
    rows, cols = pair_region(*boundary.shape[-2:], radius)
    affinity = path_affinities(boundary, radius)[..., rows, cols]
    return irn_affinity_loss(affinity, bg_pos, fg_pos, neg)


def train_irn(config: Config, amn_seeds_dir: Path) -> Path:
    """Train the boundary branch on pair labels from the AMN seeds of ``data.train_split``;
    write ``irn.pt``."""
    _, device, dataset = start_stage(config, "irn", config.data.train_split)
    irn_cfg = config.irn
    backbone = initial_backbone(
        config.backbone, irn_cfg.backbone_init, "irn", checkpoint_path(config, "cam"),
        dataset.class_names,
    )
    model = BoundaryNet(backbone).to(device)
    steps = steps_per_epoch(len(dataset), irn_cfg.batch_size, f"{config.data.root} (irn)")
    optimizer, scheduler = irn_optimizer(model, irn_cfg, steps * irn_cfg.epochs)
    make_item = IrnTrainingItems(amn_seeds_dir, irn_cfg)
    train_set = AugmentedSet(dataset, make_item, config.seed)
    fit("irn", config, model, optimizer, scheduler, train_set,
        partial(irn_training_loss, radius=irn_cfg.radius), device,
        Schedule(irn_cfg.epochs, irn_cfg.batch_size))
    return save_model(
        checkpoint_path(config, "irn"), "irn", model, dataset.class_names, config.backbone
    )


def pad_bottom_right(images: torch.Tensor, pad_size: int) -> torch.Tensor:
    """Normalised images (B, 3, H, W) zero-padded at the bottom/right to ``pad_size`` as the
    reference does before boundary inference (never cropped; 0 = no padding)."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, max(pad_size - width, 0), 0, max(pad_size - height, 0)))


def boundary_from_logits(logits: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Logits (2, 1, h', w') of an image and its mirror (padding included) -> boundary
    probabilities (h4, w4): sigmoid of the mean of the two, cropped to the image's stride-4
    size before the mirror is flipped back."""
    rows, cols = strided_size(*image_size, 4)
    return torch.sigmoid(merge_flip(logits[:, :, :rows, :cols])[0, 0] / 2)


@torch.no_grad()
def infer_boundary(
    model: BoundaryNet, image: np.ndarray, pad_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boundary probabilities (h4, w4) of one image: the image and its mirror, padded by
    ``pad_bottom_right``, through the net; ``boundary_from_logits``. (The masks stage runs
    groups of images per forward pass.)"""
    (batch,) = multiscale_inputs(image, [1.0], flip=True)
    logits = model(pad_bottom_right(batch.to(device), pad_size))
    return boundary_from_logits(logits, image.shape[:2])


def walk_scores(
    walked: torch.Tensor, image_size: tuple[int, int], bg_threshold: float
) -> torch.Tensor:
    """Random-walk output (K, h4, w4) -> (K + 1, H, W) scores whose argmax is the mask.

    Upsampled x4 (bilinear), cropped to the image, divided by the global max, background
    channel ``bg_threshold`` prepended.
    """
    height, width = image_size
    up = F.interpolate(walked[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    up = up[:, :height, :width]
    peak = up.max() if up.numel() else 0
    if peak > 0:  # all-zero maps would divide 0 by 0; they mean "background everywhere"
        up = up / peak
    return F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_threshold)


def masks_from_walk(
    walked: torch.Tensor, class_ids: np.ndarray, image_size: tuple[int, int], bg_threshold: float
) -> np.ndarray:
    """Random-walk output (K, h4, w4) -> (H, W) uint8 class ids (argmax of ``walk_scores``)."""
    if walked.shape[0] == 0:
        return np.zeros(image_size, dtype=np.uint8)
    scores = walk_scores(walked, image_size, bg_threshold)
    keys = np.concatenate([[0], class_ids]).astype(np.uint8)
    return keys[scores.argmax(dim=0).cpu().numpy()]


def walk_inputs(strided_maps: torch.Tensor, boundary: torch.Tensor, irn_cfg: IrnConfig):
    """What the walk of METHOD.md section 5 starts from: maps ** cam_power * (1 - boundary)."""
    return strided_maps.clamp(min=0).pow(irn_cfg.cam_power) * (1 - boundary)


def walk(
    strided_maps: torch.Tensor, boundary: torch.Tensor, irn_cfg: IrnConfig
) -> torch.Tensor:
    """The random walk of METHOD.md section 5 on (K, h4, w4) AMN maps: x = maps ** cam_power *
    (1 - boundary), propagated by the transition matrix of ``boundary`` (h4, w4)."""
    return random_walk(
        walk_inputs(strided_maps, boundary, irn_cfg), boundary, irn_cfg.walk_radius,
        irn_cfg.beta, irn_cfg.exp_times,
    )


def gpu_walk_kernel(device: torch.device) -> Callable[..., list[torch.Tensor]] | None:
    """The batched walk for ``device``: on CUDA the C++ kernel where NVRTC compiles it, else
    the Triton kernel where Triton is installed; None on other devices (one image at a time)."""
    if device.type != "cuda":
        return None
    from amnseg.ops import random_walk_cuda

    if random_walk_cuda.available(device):
        return random_walk_cuda.random_walk_batch
    try:
        from amnseg.ops.random_walk_triton import random_walk_batch
    except ImportError:
        return None
    return random_walk_batch


def walk_many(
    maps: list[torch.Tensor], boundaries: list[torch.Tensor], irn_cfg: IrnConfig
) -> list[torch.Tensor]:
    """:func:`walk` of each (maps, boundary) pair: one batched kernel on a GPU
    (:func:`gpu_walk_kernel`), else one after the other."""
    kernel = gpu_walk_kernel(boundaries[0].device) if maps else None
    if kernel is not None:
        starts = [walk_inputs(m, b, irn_cfg) for m, b in zip(maps, boundaries, strict=True)]
        return kernel(starts, boundaries, irn_cfg.walk_radius, irn_cfg.beta, irn_cfg.exp_times)
    return [walk(m, b, irn_cfg) for m, b in zip(maps, boundaries, strict=True)]


def check_boundary_size(strided_maps: np.ndarray, boundary: torch.Tensor) -> None:
    """Raise when the boundary map is not the size of the image's stride-4 maps."""
    if strided_maps.shape[1:] != tuple(boundary.shape):
        raise AmnsegError(
            f"stride-4 maps are {strided_maps.shape[2]}x{strided_maps.shape[1]}, the boundary "
            f"map is {boundary.shape[1]}x{boundary.shape[0]}"
        )


def pseudo_mask(
    model: BoundaryNet, image: np.ndarray, strided_maps: np.ndarray, class_ids: np.ndarray,
    config: Config, device: torch.device | str = "cpu",
) -> np.ndarray:
    """The final pseudo mask (H, W) uint8 of one image from its AMN maps at stride 4."""
    irn_cfg = config.irn
    boundary = infer_boundary(model, image, irn_cfg.infer_pad_size, device)
    check_boundary_size(strided_maps, boundary)
    walked = walk(torch.from_numpy(strided_maps).to(device), boundary, irn_cfg)
    return masks_from_walk(walked, class_ids, image.shape[:2], irn_cfg.bg_threshold)


# Images walked at once by the GPU kernel: enough (image, tile) programs to keep the GPU busy
# (fewer images per call were slower: benchmarks/RESULTS.md), ~0.4 GB of float64 affinities at
# VOC sizes.
GPU_WALK_BATCH = 128


@dataclass
class PendingWalk:
    """One image's walk inputs, waiting for a batch of walks: its stride-4 AMN maps (K, h4, w4)
    and boundary map (h4, w4) on the device, its class ids and its size (H, W)."""

    stem: str
    maps: torch.Tensor
    boundary: torch.Tensor
    class_ids: np.ndarray
    size: tuple[int, int]


def make_masks(
    config: Config, amn_maps_dir: Path | None = None, checkpoint: Path | None = None
) -> Path:
    """Write the pseudo mask of every image of the run (resumes per image). Boundaries are
    inferred for up to ``map_batch_images`` images of one size per forward pass (images decoded
    in loader workers); on a CUDA device the walks of GPU_WALK_BATCH images run as one kernel
    (:func:`gpu_walk_kernel`)."""
    amn_maps_dir = amn_maps_dir or maps_dir(config, "amn")
    out_dir = masks_dir(config)
    job = start_inference(config, "irn", checkpoint or checkpoint_path(config, "irn"), out_dir,
                          ".png", group=config.map_batch_images)
    palette = voc_palette()
    walk_batch = GPU_WALK_BATCH if gpu_walk_kernel(job.device) else 1
    pending: list[PendingWalk] = []

    def walk_pending() -> None:
        walked = walk_many([p.maps for p in pending], [p.boundary for p in pending], config.irn)
        for item, image_walk in zip(pending, walked, strict=True):
            mask = masks_from_walk(image_walk, item.class_ids, item.size, config.irn.bg_threshold)
            save_label_png(output_file(out_dir, item.stem, ".png"), mask, palette)
        pending.clear()

    pad_size = config.irn.infer_pad_size
    for group, (logits,), wanted in multiscale_outputs(
        job, lambda images, labels: job.model(pad_bottom_right(images, pad_size)), [1.0], True,
        config.data.num_workers, "pseudo masks",
    ):
        image_logits = logits.unflatten(0, (len(group.stems), 2))  # each image and its mirror
        for stem, is_todo, pair in zip(group.stems, wanted, image_logits, strict=True):
            if not is_todo:
                continue
            maps_file = amn_maps_dir / f"{stem}.npz"
            score_maps = load_score_maps(maps_file, job.dataset.num_classes)
            boundary = boundary_from_logits(pair, group.size)
            try:
                check_boundary_size(score_maps.strided, boundary)
            except AmnsegError as error:
                raise AmnsegError(f"{maps_file}: {error}") from None
            maps_on_device = queued_copy(torch.from_numpy(score_maps.strided), job.device)
            pending.append(PendingWalk(stem, maps_on_device, boundary, score_maps.class_ids,
                                       group.size))
            if len(pending) == walk_batch:
                walk_pending()
    if pending:
        walk_pending()
    distributed.barrier()  # every rank's share is written
    return out_dir
