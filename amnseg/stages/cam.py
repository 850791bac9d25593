"""Stage "cam": train the multi-label classifier, then write multi-scale CAMs (METHOD.md 2).

``train_cam``: config -> ``<run_dir>/cam/cam.pt`` (resumes per epoch from ``last.pt``).
``make_cams``: config + checkpoint -> ``<run_dir>/cam/maps/<stem>.npz`` (resumes per image).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from amnseg.config import BackboneConfig, Config, config_to_dict
from amnseg.data import build_dataset
from amnseg.data.base import Sample
from amnseg.data.transforms import ClassificationTrainTransform
from amnseg.errors import AmnsegError
from amnseg.io import ScoreMaps, load_checkpoint, save_checkpoint, save_json, save_score_maps
from amnseg.models import CAMNet, build_backbone
from amnseg.models.resnet import ResNet
from amnseg.ops.multiscale import max_normalize, multiscale_cam, multiscale_inputs
from amnseg.training import (
    AugmentedSet,
    TrainingState,
    epoch_loader,
    log_metrics,
    poly_lr_lambda,
    resolve_device,
    seed_everything,
    steps_per_epoch,
)


def stage_dir(config: Config) -> Path:
    return Path(config.run_dir) / "cam"


def default_checkpoint(config: Config) -> Path:
    return stage_dir(config) / "cam.pt"


def maps_dir(config: Config) -> Path:
    return stage_dir(config) / "maps"


def train_cam(config: Config) -> Path:
    """Train the CAM classifier as the reference does and write ``cam.pt``."""
    out_dir = stage_dir(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "config.json", config_to_dict(config))
    final_path = default_checkpoint(config)
    cam_cfg = config.cam
    seed_everything(config.seed)
    device = resolve_device(config.device)

    dataset = build_dataset(config.data, config.data.train_split)
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
    state = TrainingState(out_dir / "last.pt")
    first_epoch = state.restore(model, optimizer, scheduler)

    transform = ClassificationTrainTransform(tuple(cam_cfg.resize_long), cam_cfg.crop_size)

    def make_item(sample: Sample, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return transform(sample.image, rng), torch.from_numpy(sample.label)

    train_set = AugmentedSet(dataset, make_item, config.seed)
    model.train()
    for epoch in range(first_epoch, cam_cfg.epochs):
        loader = epoch_loader(
            train_set, epoch, cam_cfg.batch_size, config.data.num_workers, config.seed
        )
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(loader, desc=f"cam epoch {epoch + 1}/{cam_cfg.epochs}", leave=False)
        for images, labels in bar:
            images, labels = images.to(device), labels.to(device)
            loss = F.multilabel_soft_margin_loss(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(images)
            seen += len(images)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        elapsed = time.perf_counter() - started
        record = {
            "stage": "cam",
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / elapsed if elapsed > 0 else None,
            "seconds": elapsed,
        }
        log_metrics(out_dir / "log.jsonl", record)
        tqdm.write(
            f"cam epoch {epoch + 1}/{cam_cfg.epochs}: loss {record['loss']:.4f}, "
            f"{record['images_per_s']:.1f} img/s"
        )
        state.save(model, optimizer, scheduler, epoch + 1)

    save_checkpoint(final_path, cam_checkpoint(model, dataset.class_names, config.backbone))
    return final_path


def cam_checkpoint(model: CAMNet, class_names: list[str], backbone: BackboneConfig) -> dict:
    """An amnseg checkpoint: weights plus what is needed to rebuild the model."""
    backbone_dict = dataclasses.asdict(backbone)
    backbone_dict["pretrained"] = None  # the weights are in the checkpoint now
    return {
        "format": "amnseg",
        "stage": "cam",
        "class_names": list(class_names),
        "backbone": backbone_dict,
        "model": model.state_dict(),
    }


def load_cam_model(path: Path, class_names: list[str]) -> CAMNet:
    """Rebuild a CAMNet from an amnseg checkpoint, checking it fits the dataset's classes."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("format") != "amnseg" or checkpoint.get("stage") != "cam":
        raise AmnsegError(f"{path}: not an amnseg CAM checkpoint")
    saved = checkpoint["class_names"]
    if len(saved) != len(class_names):
        raise AmnsegError(
            f"{path}: checkpoint is for {len(saved)} classes, the dataset has {len(class_names)}"
        )
    model = CAMNet(ResNet(**_resnet_kwargs(checkpoint["backbone"])), len(saved))
    model.load_state_dict(checkpoint["model"])
    return model


def _resnet_kwargs(backbone: dict) -> dict:
    return {k: backbone[k] for k in ("depth", "width", "strides", "norm", "freeze_conv1")}


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
    model = load_cam_model(checkpoint or default_checkpoint(config), dataset.class_names)
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
