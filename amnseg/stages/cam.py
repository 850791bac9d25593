"""Stage "cam": train the multi-label classifier, then write multi-scale CAMs (METHOD.md 2).

``train_cam``: config -> ``<run_dir>/cam/cam.pt`` (resumes per epoch from ``last.pt``).
``make_cams``: config + checkpoint -> ``<run_dir>/cam/maps/<stem>.npz`` (resumes per image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from amnseg.checkpoints import backbone_from_checkpoint, load_model_checkpoint, save_model
from amnseg.config import Config
from amnseg.data import build_dataset
from amnseg.data.base import Sample
from amnseg.data.transforms import ClassificationTrainTransform
from amnseg.errors import AmnsegError
from amnseg.io import ScoreMaps, save_score_maps
from amnseg.models import CAMNet, build_backbone
from amnseg.models.resnet import ResNet
from amnseg.ops.multiscale import max_normalize, multiscale_cam, multiscale_inputs
from amnseg.stages import checkpoint_path, stage_dir
from amnseg.training import (
    AugmentedSet,
    fit,
    poly_lr_lambda,
    resolve_device,
    start_stage,
    steps_per_epoch,
)


def maps_dir(config: Config) -> Path:
    return stage_dir(config, "cam") / "maps"


def train_cam(config: Config) -> Path:
    """Train the CAM classifier as the reference does and write ``cam.pt``."""
    out_dir, device, dataset = start_stage(config, "cam", config.data.train_split)
    final_path = checkpoint_path(config, "cam")
    cam_cfg = config.cam

    model = CAMNet(build_backbone(config.backbone), dataset.num_classes).to(device)
    backbone_params, head_params = model.param_groups()
    optimizer = torch.optim.SGD(
        [
            {"params": backbone_params, "lr": cam_cfg.lr, "weight_decay": cam_cfg.weight_decay},
            {
                "params": head_params,
                "lr": cam_cfg.lr * cam_cfg.head_lr_mult,
                "weight_decay": cam_cfg.weight_decay,
            },
        ],
        lr=cam_cfg.lr,
        momentum=cam_cfg.momentum,
    )
    steps = steps_per_epoch(len(dataset), cam_cfg.batch_size, f"{config.data.root} (cam)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(steps * cam_cfg.epochs, cam_cfg.poly_power)
    )
    transform = ClassificationTrainTransform(tuple(cam_cfg.resize_long), cam_cfg.crop_size)

    def make_item(sample: Sample, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return transform(sample.image, rng), torch.from_numpy(sample.label)

    def compute_loss(model: CAMNet, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.multilabel_soft_margin_loss(model(images), labels)

    fit(
        "cam",
        config,
        model,
        optimizer,
        scheduler,
        AugmentedSet(dataset, make_item, config.seed),
        compute_loss,
        device,
    )
    return save_model(final_path, "cam", model, dataset.class_names, config.backbone)


def initial_backbone(config: Config, source: str, stage: str, num_classes: int) -> ResNet:
    """The backbone a later stage starts from: ``imagenet`` (the reference: ``backbone.*``,
    i.e. ImageNet weights when ``backbone.pretrained`` is set) or ``cam`` (the trained CAM
    classifier's backbone; for data far from ImageNet or without ImageNet weights)."""
    if source == "imagenet":
        return build_backbone(config.backbone)
    if source == "cam":
        return load_cam_model(checkpoint_path(config, "cam"), [""] * num_classes).backbone
    raise AmnsegError(f"{stage}.backbone_init={source!r}: expected imagenet or cam")


def load_cam_model(path: Path, class_names: list[str]) -> CAMNet:
    """Rebuild a CAMNet from an amnseg checkpoint, checking it fits the dataset's classes."""
    checkpoint = load_model_checkpoint(path, "cam", class_names)
    model = CAMNet(backbone_from_checkpoint(checkpoint), len(class_names))
    model.load_state_dict(checkpoint["model"])
    return model


class _InferenceInputs(torch.utils.data.Dataset):
    """Loader-side preparation of the multi-scale batches of each image still to be done."""

    def __init__(self, dataset, stems: list[str], scales: list[float], flip: bool):
        self.dataset, self.stems, self.scales, self.flip = dataset, stems, scales, flip

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int):
        stem = self.stems[index]
        image = self.dataset.image(stem)
        inputs = multiscale_inputs(image, self.scales, self.flip)
        return stem, inputs, self.dataset.label(stem), image.shape[:2]


def make_cams(config: Config, checkpoint: Path | None = None) -> Path:
    """Write normalised multi-scale CAMs of every image of ``data.infer_split``.

    Images whose ``.npz`` already exists are skipped, so an interrupted run resumes.
    """
    out_dir = maps_dir(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    dataset = build_dataset(config.data, config.data.infer_split)
    model = load_cam_model(checkpoint or checkpoint_path(config, "cam"), dataset.class_names)
    model.to(device).eval()
    todo = [s for s in dataset.stems if not (out_dir / f"{s}.npz").is_file()]
    inputs = _InferenceInputs(dataset, todo, list(config.cam.scales), config.cam.flip)
    loader = torch.utils.data.DataLoader(
        inputs, batch_size=None, num_workers=config.data.num_workers
    )
    stride = model.backbone.output_stride
    for stem, batches, label, size in tqdm(loader, desc="cam maps", total=len(todo)):
        strided, full = multiscale_cam(model.cam, batches, tuple(size), stride, device)
        class_ids = np.flatnonzero(np.asarray(label)) + 1
        keep = torch.as_tensor(class_ids - 1, device=strided.device)
        save_score_maps(
            out_dir / f"{stem}.npz",
            ScoreMaps(
                class_ids=class_ids,
                strided=max_normalize(strided[keep]).cpu().numpy(),
                full=max_normalize(full[keep]).cpu().numpy(),
            ),
        )
    return out_dir
