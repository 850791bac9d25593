"""Stage "amn": train the activation manipulation network on CAM seeds, write AMN maps.

``train_amn``: config + CAM seeds -> ``<run_dir>/amn/amn.pt`` (resumes per epoch).
``make_amn_maps``: config + checkpoint + CAM seeds -> ``<run_dir>/amn/maps/<stem>.npz`` in the
same format as CAM maps (foreground classes only), resuming per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from amnseg.checkpoints import backbone_from_checkpoint, load_model_checkpoint, save_model
from amnseg.config import Config
from amnseg.data import build_dataset
from amnseg.data.base import Sample, SegDataset, read_index_png
from amnseg.data.transforms import SegmentationTrainTransform
from amnseg.errors import AmnsegError
from amnseg.io import ScoreMaps, save_score_maps
from amnseg.losses import amn_loss
from amnseg.models.amn import AMN
from amnseg.ops.multiscale import merge_flip, multiscale_inputs, strided_size
from amnseg.stages import checkpoint_path, stage_dir
from amnseg.stages.cam import initial_backbone
from amnseg.training import (
    AugmentedSet,
    fit,
    resolve_device,
    start_stage,
    steps_per_epoch,
)


def maps_dir(config: Config) -> Path:
    return stage_dir(config, "amn") / "maps"


def read_seed(seeds_dir: Path, stem: str, size: tuple[int, int]) -> np.ndarray:
    path = seeds_dir / f"{stem}.png"
    if not path.is_file():
        raise AmnsegError(f"{path}: seed not found; run the seed stage first")
    seed = read_index_png(path)
    if seed.shape != tuple(size):
        raise AmnsegError(
            f"{path}: seed is {seed.shape[1]}x{seed.shape[0]}, the image is {size[1]}x{size[0]}"
        )
    return seed


def train_amn(config: Config, cam_seeds_dir: Path) -> Path:
    """Train AMN on the images of ``data.infer_split`` with their CAM seeds; write ``amn.pt``."""
    out_dir, device, dataset = start_stage(config, "amn", config.data.infer_split)
    amn_cfg = config.amn
    backbone = initial_backbone(config, amn_cfg.backbone_init, "amn", dataset.num_classes)
    model = AMN(backbone, dataset.num_classes, amn_cfg.dropout).to(device)
    backbone_params, new_params = model.param_groups()
    optimizer = torch.optim.Adam(
        [
            {"params": backbone_params, "lr": amn_cfg.backbone_lr},
            {"params": new_params, "lr": amn_cfg.head_lr},
        ],
        weight_decay=amn_cfg.weight_decay,
    )
    steps_per_epoch(len(dataset), amn_cfg.batch_size, f"{config.data.root} (amn)")  # >= 1 batch
    # Constant learning rate; a scheduler object keeps the resume logic the same for all stages.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    transform = SegmentationTrainTransform(
        tuple(amn_cfg.rescale), amn_cfg.crop_size, amn_cfg.flip
    )

    def make_item(sample: Sample, rng: np.random.Generator):
        seed = read_seed(cam_seeds_dir, sample.stem, sample.image.shape[:2])
        image, seed_crop = transform(sample.image, seed, rng)
        return image, torch.from_numpy(sample.label), seed_crop

    def compute_loss(model: AMN, images, labels, seeds) -> torch.Tensor:
        logits = model(images, labels)
        seeds_small = F.interpolate(seeds[:, None].float(), logits.shape[-2:], mode="nearest")
        return amn_loss(logits, seeds_small[:, 0].long(), amn_cfg.label_smoothing)

    def after_epoch() -> dict[str, float]:
        if not (amn_cfg.eval_images and dataset.has_masks):
            return {}
        return {"val_miou": quick_amn_miou(model, dataset, cam_seeds_dir, config, device)}

    fit(
        "amn",
        config,
        model,
        optimizer,
        scheduler,
        AugmentedSet(dataset, make_item, config.seed),
        compute_loss,
        device,
        after_epoch=after_epoch,
    )
    path = checkpoint_path(config, "amn")
    return save_model(path, "amn", model, dataset.class_names, config.backbone)


@torch.no_grad()
def amn_logits(
    model: AMN,
    inputs: Sequence[torch.Tensor],
    label: torch.Tensor,
    image_size: tuple[int, int],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale + flip AMN logits: (C + 1, h4, w4) at stride 4 and (C + 1, H, W).

    Each scale's image/mirror pair is averaged (mirror flipped back), resized bilinearly to the
    stride-4 size and to the image size, and the scales are averaged.
    """
    small = strided_size(*image_size, 4)
    strided_sum: torch.Tensor | float = 0.0
    full_sum: torch.Tensor | float = 0.0
    label = label.to(device)
    for batch in inputs:
        batch = batch.to(device)
        logits = model(batch, label[None].expand(len(batch), -1))
        merged = (merge_flip(logits) / len(batch))[None]
        strided_sum = strided_sum + F.interpolate(
            merged, small, mode="bilinear", align_corners=False
        )[0]
        full_sum = full_sum + F.interpolate(
            merged, image_size, mode="bilinear", align_corners=False
        )[0]
    assert isinstance(strided_sum, torch.Tensor) and isinstance(full_sum, torch.Tensor)
    return strided_sum / len(inputs), full_sum / len(inputs)


def amn_scores(logits: torch.Tensor, class_ids: np.ndarray, cam_seed: torch.Tensor) -> torch.Tensor:
    """AMN logits -> foreground score maps of the image's classes (METHOD.md section 4).

    ``logits`` (C + 1, h, w); ``class_ids`` (K,) ids 1..C; ``cam_seed`` (h, w) the CAM seed at
    the same size. Softmax over all C + 1 channels, keep [background] + the image's classes;
    where the CAM seed is not background, each kept channel is replaced by its min-max
    normalised value (min and max over the whole map). Returns the (K, h, w) foreground part.
    """
    probs = torch.softmax(logits, dim=0)
    keys = torch.as_tensor(np.concatenate([[0], class_ids]), dtype=torch.long)
    kept = probs[keys.to(probs.device)]
    low = kept.amin(dim=(1, 2), keepdim=True)
    high = kept.amax(dim=(1, 2), keepdim=True)
    normalized = (kept - low) / (high - low + 1e-5)
    not_background = (cam_seed != 0).to(kept.device)
    kept = torch.where(not_background[None], normalized, kept)
    return kept[1:]


class _AmnInputs(torch.utils.data.Dataset):
    """Loader-side preparation: multi-scale batches, label and CAM seed of each image."""

    def __init__(self, dataset: SegDataset, stems, scales, cam_seeds_dir: Path):
        self.dataset, self.stems, self.scales = dataset, stems, scales
        self.seeds_dir = cam_seeds_dir

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int):
        stem = self.stems[index]
        image = self.dataset.image(stem)
        seed = read_seed(self.seeds_dir, stem, image.shape[:2])
        label = torch.from_numpy(self.dataset.label(stem))
        return stem, multiscale_inputs(image, self.scales), label, seed


def amn_maps_for_image(model, batches, label, seed: np.ndarray, device) -> ScoreMaps:
    """ScoreMaps (foreground classes) of one image from its prepared inputs."""
    size = seed.shape
    strided_logits, full_logits = amn_logits(model, batches, label, size, device)
    class_ids = np.flatnonzero(np.asarray(label)) + 1
    seed_tensor = torch.as_tensor(seed)
    return ScoreMaps(
        class_ids=class_ids,
        # The stride-4 map samples every 4th pixel: ((H - 1) // 4 + 1) rows, like the map.
        strided=amn_scores(strided_logits, class_ids, seed_tensor[::4, ::4]).cpu().numpy(),
        full=amn_scores(full_logits, class_ids, seed_tensor).cpu().numpy(),
    )


def load_amn_model(path: Path, class_names: list[str]) -> AMN:
    checkpoint = load_model_checkpoint(path, "amn", class_names)
    model = AMN(backbone_from_checkpoint(checkpoint), len(class_names))
    model.load_state_dict(checkpoint["model"])
    return model


def make_amn_maps(config: Config, cam_seeds_dir: Path, checkpoint: Path | None = None) -> Path:
    """Write AMN maps of every image of ``data.infer_split`` (eval mode: deterministic)."""
    out_dir = maps_dir(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    dataset = build_dataset(config.data, config.data.infer_split)
    model = load_amn_model(checkpoint or checkpoint_path(config, "amn"), dataset.class_names)
    model.to(device).eval()
    todo = [s for s in dataset.stems if not (out_dir / f"{s}.npz").is_file()]
    loader = torch.utils.data.DataLoader(
        _AmnInputs(dataset, todo, list(config.amn.scales), cam_seeds_dir),
        batch_size=None,
        num_workers=config.data.num_workers,
    )
    for stem, batches, label, seed in tqdm(loader, desc="amn maps", total=len(todo)):
        maps = amn_maps_for_image(model, batches, label, np.asarray(seed), device)
        save_score_maps(out_dir / f"{stem}.npz", maps)
    return out_dir


@torch.no_grad()
def quick_amn_miou(
    model: AMN, dataset: SegDataset, cam_seeds_dir: Path, config: Config, device
) -> float:
    """mIoU of single-scale AMN maps of the first ``amn.eval_images`` images (a training check)."""
    from amnseg.metrics import confusion_matrix, miou, scores_to_labels

    was_training = model.training
    model.eval()
    stems = dataset.stems[: config.amn.eval_images]
    inputs = _AmnInputs(dataset, stems, [1.0], cam_seeds_dir)
    confusion = 0
    for index in range(len(inputs)):
        stem, batches, label, seed = inputs[index]
        maps = amn_maps_for_image(model, batches, label, seed, device)
        prediction = scores_to_labels(maps.full, maps.class_ids, config.amn.eval_threshold)
        confusion = confusion + confusion_matrix(
            prediction, dataset.mask(stem), dataset.num_classes + 1
        )
    model.train(was_training)
    return float(miou(confusion))
