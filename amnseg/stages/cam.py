"""Stage "cam": train the multi-label classifier, then write multi-scale CAMs (METHOD.md 2).

``train_cam``: config -> ``<run_dir>/cam/cam.pt`` (resumes per epoch from ``last.pt``).
``make_cams``: config + checkpoint -> ``<run_dir>/cam/maps/<stem>.npz`` for every image of the
run (``processed_images``), resuming per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amnseg import distributed
from amnseg.checkpoints import save_model
from amnseg.config import CamConfig, Config
from amnseg.data.base import Sample
from amnseg.data.transforms import ClassificationTrainTransform
from amnseg.io import ScoreMaps
from amnseg.layout import checkpoint_path, maps_dir
from amnseg.models import CAMNet, build_backbone
from amnseg.ops.multiscale import max_normalize, merge_cam_scales, multiscale_cam, queued_copy
from amnseg.stages.common import (
    GroupMaps,
    ImageGroup,
    multiscale_outputs,
    score_maps_from,
    start_inference,
    write_score_maps,
)
from amnseg.training import (
    AugmentedSet,
    Schedule,
    fit,
    poly_sgd,
    start_stage,
    steps_per_epoch,
)


def cam_optimizer(
    model: CAMNet, cam_cfg: CamConfig, total_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """The reference's PolyOptimizer: SGD over every trainable backbone parameter (BatchNorm
    gamma/beta included; conv1/bn1 excluded) at ``lr`` and the classifier at ``lr *
    head_lr_mult``, both with ``weight_decay``; poly decay over ``total_steps``. The reference
    passes its weight decay where SGD expects momentum, hence ``momentum`` 1e-4 by default."""
    backbone_params, head_params = model.param_groups()
    return poly_sgd(
        [
            {"params": backbone_params, "lr": cam_cfg.lr, "weight_decay": cam_cfg.weight_decay},
            {
                "params": head_params,
                "lr": cam_cfg.lr * cam_cfg.head_lr_mult,
                "weight_decay": cam_cfg.weight_decay,
            },
        ],
        cam_cfg.momentum, total_steps, cam_cfg.poly_power,
    )


def cam_loss(model: CAMNet, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss of the classifier's logits."""
    return F.multilabel_soft_margin_loss(model(images), labels)


def train_cam(config: Config) -> Path:
    """Train the CAM classifier on ``data.train_split`` as the reference does; write ``cam.pt``."""
    _, device, dataset = start_stage(config, "cam", config.data.train_split)
    cam_cfg = config.cam
    model = CAMNet(build_backbone(config.backbone), dataset.num_classes).to(device)
    steps = steps_per_epoch(len(dataset), cam_cfg.batch_size, f"{config.data.root} (cam)")
    optimizer, scheduler = cam_optimizer(model, cam_cfg, steps * cam_cfg.epochs)
    transform = ClassificationTrainTransform(
        tuple(cam_cfg.resize_long), cam_cfg.crop_size, cam_cfg.flip
    )

    def make_item(sample: Sample, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return transform(sample.image, rng), torch.from_numpy(sample.label)

    train_set = AugmentedSet(dataset, make_item, config.seed)
    fit("cam", config, model, optimizer, scheduler, train_set, cam_loss, device,
        Schedule(cam_cfg.epochs, cam_cfg.batch_size))
    return save_model(
        checkpoint_path(config, "cam"), "cam", model, dataset.class_names, config.backbone
    )


def cam_score_maps(
    model: CAMNet, batches: list[torch.Tensor], label: np.ndarray, size: tuple[int, int],
    device: torch.device | str = "cpu",
) -> ScoreMaps:
    """Normalised multi-scale CAMs of one image's classes from its prepared batches: each
    channel of a GT class divided by its own max + 1e-5, at stride 4 and at image size."""
    strided, full = multiscale_cam(
        model.cam, batches, tuple(size), model.backbone.output_stride, device
    )
    (class_ids,), strided_maps, full_maps = class_score_tensors(strided[None], full[None],
                                                                [label])
    return ScoreMaps(class_ids, strided_maps.cpu().numpy(), full_maps.cpu().numpy())


def class_score_tensors(strided: torch.Tensor, full: torch.Tensor, labels: Sequence[Any]
                        ) -> GroupMaps:
    """The summed multi-scale CAMs of N images, (N, C, h, w) at stride 4 and (N, C, H, W), ->
    the maps of each image's classes (``labels``: N multi-hot rows), each divided by its own
    max + 1e-5, on the maps' device: :data:`GroupMaps`."""
    class_ids = [np.flatnonzero(np.asarray(label)) + 1 for label in labels]
    channels = strided.shape[1]
    rows = np.concatenate([image * channels + ids - 1 for image, ids in enumerate(class_ids)])
    keep = queued_copy(torch.from_numpy(rows), strided.device)
    return (class_ids, max_normalize(strided.flatten(0, 1)[keep]),
            max_normalize(full.flatten(0, 1)[keep]))


def make_cams(config: Config, checkpoint: Path | None = None,
              on_saved: Callable[[str], None] | None = None) -> Path:
    """Write normalised multi-scale CAMs of every image of the run; existing files are kept.
    Up to ``map_batch_images`` images of one size share each forward pass. ``on_saved(stem)``
    is called once each file is written (see :func:`write_score_maps`)."""
    out_dir = maps_dir(config, "cam")
    job = start_inference(config, "cam", checkpoint or checkpoint_path(config, "cam"), out_dir,
                          ".npz", group=config.map_batch_images)
    output_stride = job.model.backbone.output_stride

    def finish(group: ImageGroup, scale_maps: list[torch.Tensor]) -> GroupMaps:
        merged = merge_cam_scales(scale_maps, len(group.stems), group.size, output_stride)
        return class_score_tensors(*merged, group.labels)

    outputs = multiscale_outputs(
        job, lambda images, labels: job.model.cam(images), list(config.cam.scales),
        config.cam.flip, config.data.num_workers, "cam maps",
    )
    write_score_maps(config, out_dir,
                     score_maps_from(outputs, job.device, finish),
                     on_saved)
    distributed.barrier()  # every rank's share is written
    return out_dir
