"""Stage "amn": train the activation manipulation network on CAM seeds, write AMN maps.

``train_amn``: config + CAM seeds -> ``<run_dir>/amn/amn.pt``, trained on ``data.train_split``
(resumes per epoch).
``make_amn_maps``: config + checkpoint + CAM seeds -> ``<run_dir>/amn/maps/<stem>.npz`` for every
image of the run, in the format of CAM maps (foreground classes only), resuming per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amnseg import distributed
from amnseg.checkpoints import initial_backbone, save_model
from amnseg.config import AmnConfig, Config
from amnseg.data import run_dataset
from amnseg.data.base import Sample, SegDataset
from amnseg.data.transforms import SegmentationTrainTransform, resize_labels
from amnseg.io import ScoreMaps
from amnseg.layout import checkpoint_path, maps_dir
from amnseg.losses import amn_loss
from amnseg.metrics import confusion_matrix, miou, scores_to_labels
from amnseg.models.amn import AMN
from amnseg.ops.multiscale import merge_flip, multiscale_inputs, queued_copy, strided_size
from amnseg.stages.common import (
    GroupMaps,
    ImageGroup,
    multiscale_outputs,
    read_seed,
    score_maps_from,
    start_inference,
    write_score_maps,
)
from amnseg.training import AugmentedSet, Schedule, fit, start_stage, steps_per_epoch


def amn_optimizer(
    model: AMN, amn_cfg: AmnConfig
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam at a constant learning rate: every trainable backbone parameter (BatchNorm
    gamma/beta included; conv1/bn1 excluded) at ``backbone_lr``, the label encoder and the ASPP
    head at ``head_lr``; L2 weight decay ``weight_decay`` on both."""
    backbone_params, new_params = model.param_groups()
    optimizer = torch.optim.Adam(
        [
            {"params": backbone_params, "lr": amn_cfg.backbone_lr},
            {"params": new_params, "lr": amn_cfg.head_lr},
        ],
        weight_decay=amn_cfg.weight_decay,
    )
    # A constant schedule keeps the resume logic the same for all stages.
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class AmnTrainingItems:
    """(sample, rng) -> (image crop (3, S, S), label (C,), target (h, w) int64): the sample's
    image and CAM seed augmented together (rescale, flip, random crop S with the seed padded
    by 255), the seed shrunk to the logit size (h, w) with PIL NEAREST as in the reference."""

    def __init__(self, cam_seeds_dir: Path, amn_cfg: AmnConfig, output_stride: int):
        self.seeds_dir = cam_seeds_dir
        self.transform = SegmentationTrainTransform(
            tuple(amn_cfg.rescale), amn_cfg.crop_size, amn_cfg.flip
        )
        self.logit_size = strided_size(amn_cfg.crop_size, amn_cfg.crop_size, output_stride)

    def __call__(self, sample: Sample, rng: np.random.Generator):
        seed = read_seed(self.seeds_dir, sample.stem, sample.image.shape[:2])
        image, seed_crop = self.transform(sample.image, seed, rng)
        target = resize_labels(seed_crop.numpy().astype(np.uint8), self.logit_size)
        return image, torch.from_numpy(sample.label), torch.from_numpy(target.astype(np.int64))


def train_amn(config: Config, cam_seeds_dir: Path) -> Path:
    """Train AMN on the images of ``data.train_split`` with their CAM seeds; write ``amn.pt``."""
    _, device, dataset = start_stage(config, "amn", config.data.train_split)
    amn_cfg = config.amn
    backbone = initial_backbone(
        config.backbone, amn_cfg.backbone_init, "amn", checkpoint_path(config, "cam"),
        dataset.class_names,
    )
    model = AMN(backbone, dataset.num_classes, amn_cfg.dropout).to(device)
    steps_per_epoch(len(dataset), amn_cfg.batch_size, f"{config.data.root} (amn)")  # >= 1 batch
    optimizer, scheduler = amn_optimizer(model, amn_cfg)
    make_item = AmnTrainingItems(cam_seeds_dir, amn_cfg, backbone.output_stride)

    def compute_loss(model: AMN, images, labels, targets) -> torch.Tensor:
        return amn_loss(model(images, labels), targets, amn_cfg.label_smoothing)

    check_set = run_dataset(config, config.data.infer_split)

    def after_epoch() -> dict[str, float]:
        if not (amn_cfg.eval_images and check_set.has_masks):
            return {}
        return {"val_miou": quick_amn_miou(model, check_set, cam_seeds_dir, config, device)}

    train_set = AugmentedSet(dataset, make_item, config.seed)
    fit("amn", config, model, optimizer, scheduler, train_set, compute_loss, device,
        Schedule(amn_cfg.epochs, amn_cfg.batch_size), after_epoch=after_epoch)
    return save_model(
        checkpoint_path(config, "amn"), "amn", model, dataset.class_names, config.backbone
    )


@torch.no_grad()
def amn_logits(
    model: AMN,
    inputs: Sequence[torch.Tensor],
    label: torch.Tensor,
    image_size: tuple[int, int],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale + flip AMN logits of one image: (C + 1, h4, w4) at stride 4 and (C + 1, H,
    W). Each scale's image/mirror pair is averaged (mirror flipped back), resized bilinearly
    to the stride-4 size and to the image size, and the scales are averaged."""
    label = label.to(device)
    scale_logits = [model(batch.to(device), label[None].expand(len(batch), -1))
                    for batch in inputs]
    strided, full = merge_amn_scales(scale_logits, 1, image_size)
    return strided[0], full[0]


def merge_amn_scales(
    scale_logits: Sequence[torch.Tensor], images: int, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`amn_logits` of a group of ``images`` images of one size from the network's
    outputs: ``scale_logits[s]`` (2N or N, C + 1, h, w) are the rows of
    :func:`~amnseg.ops.multiscale.network_batch` at scale s. Returns (N, C + 1, h4, w4) and
    (N, C + 1, H, W)."""
    small = strided_size(*image_size, 4)
    strided_sum: torch.Tensor | float = 0.0
    full_sum: torch.Tensor | float = 0.0
    for logits in scale_logits:
        merged = merge_flip(logits, images) / (len(logits) // images)
        strided_sum = strided_sum + F.interpolate(
            merged, small, mode="bilinear", align_corners=False
        )
        full_sum = full_sum + F.interpolate(
            merged, image_size, mode="bilinear", align_corners=False
        )
    assert isinstance(strided_sum, torch.Tensor) and isinstance(full_sum, torch.Tensor)
    return strided_sum / len(scale_logits), full_sum / len(scale_logits)


def amn_scores(logits: torch.Tensor, class_ids: Sequence[np.ndarray], cam_seeds: torch.Tensor
               ) -> torch.Tensor:
    """AMN logits of N images -> the foreground score maps of each image's classes (METHOD.md
    section 4).

    ``logits`` (N, C + 1, h, w); ``class_ids[i]`` (K_i,) image i's ids 1..C; ``cam_seeds``
    (N, h, w) their CAM seeds at the same size. Softmax over all C + 1 channels, keep the
    image's classes; where the CAM seed is not background, each kept channel is replaced by
    its min-max normalised value (min and max over the whole map). Returns (sum K_i, h, w),
    image after image. (The reference normalises the background channel too and then drops
    it: each channel is normalised on its own, so it is left out from the start.)
    """
    # One softmax per image: over a whole group, its vector and scalar paths fall on other
    # elements, which changes a few tiny probabilities in the last bit (and the seeds and
    # everything after them, through the CRF). Per image, the maps are those of one image at
    # a time, bit for bit.
    probs = torch.stack([torch.softmax(image_logits, dim=0) for image_logits in logits])
    channels = logits.shape[1]
    # Each kept row's place among the N * (C + 1) channels, and its image: one copy.
    rows = np.concatenate([image * channels + ids for image, ids in enumerate(class_ids)])
    owners = np.repeat(np.arange(len(class_ids)), [len(ids) for ids in class_ids])
    rows_and_owners = queued_copy(torch.from_numpy(np.stack([rows, owners])), probs.device)
    kept = probs.flatten(0, 1)[rows_and_owners[0]]
    low = kept.amin(dim=(1, 2), keepdim=True)
    high = kept.amax(dim=(1, 2), keepdim=True)
    normalized = (kept - low) / (high - low + 1e-5)
    not_background = queued_copy(cam_seeds, kept.device)[rows_and_owners[1]] != 0
    return torch.where(not_background, normalized, kept)


def amn_maps_for_image(model, batches, label, seed: np.ndarray, device) -> ScoreMaps:
    """ScoreMaps (foreground classes) of one image from its prepared inputs and CAM seed."""
    strided_logits, full_logits = amn_logits(model, batches, label, seed.shape, device)
    strided_seed, full_seed = cam_seed_sizes(seed)
    (class_ids,), strided, full = amn_score_tensors(
        strided_logits[None], full_logits[None], label[None], (strided_seed[None], full_seed[None]))
    return ScoreMaps(class_ids, strided.cpu().numpy(), full.cpu().numpy())


def cam_seed_sizes(seed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """An (H, W) CAM seed as the AMN maps mask with it: (at stride 4, shrunk by PIL NEAREST
    like the reference; as it is)."""
    strided = resize_labels(seed, strided_size(*seed.shape, 4))
    return torch.as_tensor(strided), torch.as_tensor(seed)


def read_cam_seed_sizes(seeds_dir: Path, stem: str, size: tuple[int, int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cam_seed_sizes` of ``stem``'s seed in ``seeds_dir`` (checked against the image
    size): what the AMN map stage's loader workers read."""
    return cam_seed_sizes(read_seed(seeds_dir, stem, size))


def amn_score_tensors(strided_logits: torch.Tensor, full_logits: torch.Tensor,
                      labels: Sequence[Any], seeds: tuple[torch.Tensor, torch.Tensor]
                      ) -> GroupMaps:
    """The AMN maps of N images on the logits' device from their merged logits
    (:func:`merge_amn_scales`), ``labels`` (N multi-hot rows) and CAM seeds (stacked
    :func:`cam_seed_sizes`: (N, h4, w4), (N, H, W)): :data:`GroupMaps`."""
    class_ids = [np.flatnonzero(np.asarray(label)) + 1 for label in labels]
    strided_seeds, full_seeds = seeds
    return (class_ids, amn_scores(strided_logits, class_ids, strided_seeds),
            amn_scores(full_logits, class_ids, full_seeds))


def make_amn_maps(config: Config, cam_seeds_dir: Path, checkpoint: Path | None = None,
                  on_saved: Callable[[str], None] | None = None) -> Path:
    """Write AMN maps of every image of the run (eval mode: deterministic). Up to
    ``map_batch_images`` images of one size share each forward pass. ``on_saved(stem)`` is
    called once each file is written (see :func:`write_score_maps`)."""
    out_dir = maps_dir(config, "amn")
    job = start_inference(config, "amn", checkpoint or checkpoint_path(config, "amn"), out_dir,
                          ".npz", group=config.map_batch_images)

    def finish(group: ImageGroup, scale_logits: list[torch.Tensor]) -> GroupMaps:
        merged = merge_amn_scales(scale_logits, len(group.stems), group.size)
        return amn_score_tensors(*merged, group.labels, group.extra)

    # The seeds are read (PNG decoding, the stride-4 shrink) in the loader workers: in this
    # process they took a few ms per image from the thread that feeds the GPU.
    outputs = multiscale_outputs(job, job.model, list(config.amn.scales), True,
                                 config.data.num_workers, "amn maps",
                                 partial(read_cam_seed_sizes, cam_seeds_dir))
    write_score_maps(config, out_dir,
                     score_maps_from(outputs, job.device, finish),
                     on_saved)
    distributed.barrier()  # every rank's share is written
    return out_dir


@torch.no_grad()
def quick_amn_miou(
    model: AMN, dataset: SegDataset, cam_seeds_dir: Path, config: Config, device
) -> float:
    """mIoU of single-scale AMN maps of the first ``amn.eval_images`` images of ``dataset`` at
    ``amn.eval_threshold`` (a training check)."""
    was_training = model.training
    model.eval()
    confusion = 0
    for stem in dataset.stems[: config.amn.eval_images]:
        image = dataset.image(stem)
        seed = read_seed(cam_seeds_dir, stem, image.shape[:2])
        label = torch.from_numpy(dataset.label(stem))
        maps = amn_maps_for_image(model, multiscale_inputs(image, [1.0]), label, seed, device)
        prediction = scores_to_labels(maps.full, maps.class_ids, config.amn.eval_threshold)
        confusion = confusion + confusion_matrix(
            prediction, dataset.mask(stem), dataset.num_classes + 1
        )
    model.train(was_training)
    return float(miou(confusion))
