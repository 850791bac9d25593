"""Stage "irn": learn class boundaries from AMN seeds, then random-walk the AMN maps into the
final pseudo masks (METHOD.md section 5).

``train_irn``: config + AMN seeds -> ``<run_dir>/irn/irn.pt`` (resumes per epoch).
``make_masks``: config + checkpoint + AMN maps -> ``<run_dir>/irn/masks/<stem>.png`` (VOC
palette PNGs, resuming per image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from amnseg.checkpoints import backbone_from_checkpoint, load_model_checkpoint, save_model
from amnseg.config import Config
from amnseg.data import build_dataset
from amnseg.data.base import Sample
from amnseg.data.transforms import SegmentationTrainTransform, normalize, rescale
from amnseg.data.voc import voc_palette
from amnseg.errors import AmnsegError
from amnseg.io import load_score_maps, save_label_png
from amnseg.losses import irn_affinity_loss
from amnseg.models.irn import BoundaryNet
from amnseg.ops.affinity import affinity_labels, pair_region, path_affinities
from amnseg.ops.multiscale import merge_flip, strided_size
from amnseg.ops.random_walk import random_walk
from amnseg.stages import checkpoint_path, stage_dir
from amnseg.stages.amn import read_seed
from amnseg.stages.cam import initial_backbone
from amnseg.training import (
    AugmentedSet,
    fit,
    poly_lr_lambda,
    resolve_device,
    start_stage,
)
from amnseg.training import steps_per_epoch as count_steps


def masks_dir(config: Config) -> Path:
    return stage_dir(config, "irn") / "masks"


def train_irn(config: Config, amn_seeds_dir: Path) -> Path:
    """Train the boundary branch on pair labels from the AMN seeds; write ``irn.pt``."""
    out_dir, device, dataset = start_stage(config, "irn", config.data.infer_split)
    irn_cfg = config.irn
    backbone = initial_backbone(config, config.irn.backbone_init, "irn", dataset.num_classes)
    model = BoundaryNet(backbone).to(device)
    optimizer = torch.optim.SGD(
        [
            {
                "params": model.trainable_parameters(),
                "lr": irn_cfg.lr,
                "weight_decay": irn_cfg.weight_decay,
            }
        ],
        lr=irn_cfg.lr,
        momentum=irn_cfg.momentum,
    )
    steps = count_steps(len(dataset), irn_cfg.batch_size, f"{config.data.root} (irn)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(steps * irn_cfg.epochs, irn_cfg.poly_power)
    )
    transform = SegmentationTrainTransform(
        tuple(irn_cfg.rescale), irn_cfg.crop_size, irn_cfg.flip
    )

    def make_item(sample: Sample, rng: np.random.Generator):
        seed = read_seed(amn_seeds_dir, sample.stem, sample.image.shape[:2])
        image, seed_crop = transform(sample.image, seed, rng)
        # Pair labels live at stride 4: the crop's seed shrunk x0.25 (PIL nearest).
        small = rescale(seed_crop.numpy().astype(np.uint8), 0.25, Image.NEAREST)
        bg_pos, fg_pos, neg = affinity_labels(small, irn_cfg.radius)
        return image, torch.from_numpy(bg_pos), torch.from_numpy(fg_pos), torch.from_numpy(neg)

    def compute_loss(model: BoundaryNet, images, bg_pos, fg_pos, neg) -> torch.Tensor:
        boundary = torch.sigmoid(model(images))[:, 0]
        rows, cols = pair_region(*boundary.shape[-2:], irn_cfg.radius)
        affinity = path_affinities(boundary, irn_cfg.radius)[..., rows, cols]
        return irn_affinity_loss(affinity, bg_pos, fg_pos, neg)

    fit(
        "irn",
        config,
        model,
        optimizer,
        scheduler,
        AugmentedSet(dataset, make_item, config.seed),
        compute_loss,
        device,
    )
    path = checkpoint_path(config, "irn")
    return save_model(path, "irn", model, dataset.class_names, config.backbone)


def load_irn_model(path: Path, class_names: list[str]) -> BoundaryNet:
    checkpoint = load_model_checkpoint(path, "irn", class_names)
    model = BoundaryNet(backbone_from_checkpoint(checkpoint))
    model.load_state_dict(checkpoint["model"])
    return model


@torch.no_grad()
def infer_boundary(
    model: BoundaryNet, image: np.ndarray, pad_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boundary probabilities (h4, w4) of an image: sigmoid of the mean of the image's and the
    mirrored image's logits. Like the reference, the normalised image is zero-padded at the
    bottom/right to ``pad_size`` (never cropped; 0 = no padding)."""
    height, width = image.shape[:2]
    chw = torch.from_numpy(normalize(image))
    batch = torch.stack([chw, chw.flip(-1)])
    pad_h, pad_w = max(pad_size - height, 0), max(pad_size - width, 0)
    batch = F.pad(batch, (0, pad_w, 0, pad_h))
    rows, cols = strided_size(height, width, 4)
    logits = model(batch.to(device))[:, 0, :rows, :cols]
    return torch.sigmoid(merge_flip(logits[:, None])[0] / 2)


def masks_from_walk(
    walked: torch.Tensor, class_ids: np.ndarray, image_size: tuple[int, int], bg_threshold: float
) -> np.ndarray:
    """Random-walk output (K, h4, w4) -> (H, W) uint8 class ids.

    Upsampled x4 (bilinear), cropped, divided by the global max, background channel
    ``bg_threshold`` prepended, argmax, mapped to class ids.
    """
    height, width = image_size
    if walked.shape[0] == 0:
        return np.zeros(image_size, dtype=np.uint8)
    up = F.interpolate(walked[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    up = up[:, :height, :width]
    peak = up.max()
    if peak > 0:  # all-zero maps would divide 0 by 0; they mean "background everywhere"
        up = up / peak
    scores = F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_threshold)
    keys = np.concatenate([[0], class_ids]).astype(np.uint8)
    return keys[scores.argmax(dim=0).cpu().numpy()]


def pseudo_mask(
    model: BoundaryNet, image: np.ndarray, strided_maps: np.ndarray, class_ids: np.ndarray,
    config: Config, device: torch.device | str = "cpu",
) -> np.ndarray:
    """The final pseudo mask (H, W) uint8 of one image from its AMN maps at stride 4."""
    irn_cfg = config.irn
    boundary = infer_boundary(model, image, irn_cfg.infer_pad_size, device)
    if strided_maps.shape[1:] != tuple(boundary.shape):
        raise AmnsegError(
            f"stride-4 maps are {strided_maps.shape[2]}x{strided_maps.shape[1]}, the boundary "
            f"map is {boundary.shape[1]}x{boundary.shape[0]}"
        )
    maps = torch.from_numpy(strided_maps).to(device).clamp(min=0).pow(irn_cfg.cam_power)
    walked = random_walk(
        maps * (1 - boundary), boundary, irn_cfg.walk_radius, irn_cfg.beta, irn_cfg.exp_times
    )
    return masks_from_walk(walked, class_ids, image.shape[:2], irn_cfg.bg_threshold)


def make_masks(config: Config, amn_maps_dir: Path, checkpoint: Path | None = None) -> Path:
    """Write the pseudo mask of every image of ``data.infer_split`` (resumes per image)."""
    out_dir = masks_dir(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    dataset = build_dataset(config.data, config.data.infer_split)
    model = load_irn_model(checkpoint or checkpoint_path(config, "irn"), dataset.class_names)
    model.to(device).eval()
    palette = voc_palette()
    todo = [s for s in dataset.stems if not (out_dir / f"{s}.png").is_file()]
    for stem in tqdm(todo, desc="pseudo masks"):
        maps = load_score_maps(amn_maps_dir / f"{stem}.npz")
        try:
            mask = pseudo_mask(
                model, dataset.image(stem), maps.strided, maps.class_ids, config, device
            )
        except AmnsegError as error:
            raise AmnsegError(f"{amn_maps_dir / (stem + '.npz')}: {error}") from None
        save_label_png(out_dir / f"{stem}.png", mask, palette)
    return out_dir
