"""Stage "seg": a DeepLab-v2 segmentation network trained on the pseudo masks, and its
evaluation (METHOD.md section 6: kazuto1011/deeplab-pytorch's VOC recipe).

``train_seg``: config + masks of ``data.train_split`` -> ``<run_dir>/<stage>/<stage>.pt``
(``seg``: on the run's pseudo masks or what ``seg.masks`` names; ``seg_gt``: on the ground
truth, the fully supervised upper bound), resuming per epoch.
``evaluate_seg``: checkpoint + ``data.val_split`` -> ``<run_dir>/eval/<stage>.json``: mIoU and
per-class IoU without and with the dense CRF.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amnseg import distributed
from amnseg.checkpoints import (
    load_model,
    load_model_checkpoint,
    new_model,
    read_deeplab_state,
    save_once,
)
from amnseg.config import BackboneConfig, Config, CrfConfig, SegConfig
from amnseg.data import build_dataset, run_dataset
from amnseg.data.base import (
    IGNORE_INDEX,
    Sample,
    SegDataset,
    check_mask_values,
    read_index_png,
)
from amnseg.data.transforms import DeepLabTrainTransform, deeplab_input, resize_labels
from amnseg.errors import AmnsegError
from amnseg.io import save_json
from amnseg.layout import checkpoint_path, eval_dir, masks_dir
from amnseg.metrics import confusion_matrix, iou_from_confusion, miou
from amnseg.models.deeplab import MSC
from amnseg.models.resnet import build_backbone, resnet_from_config
from amnseg.ops.crf import crf_refine_probabilities
from amnseg.precision import with_precision
from amnseg.progress import progress_bar
from amnseg.training import (
    AugmentedSet,
    Schedule,
    crf_device_of,
    fit,
    resolve_device,
    start_stage,
)
from amnseg.workers import in_order

# --- the network and where it starts from ---------------------------------------------------


# ``seg.init`` values that name no file (anything else is a DeepLab-v2 file's path).
SEG_INIT_WORDS = (None, "", "none", "imagenet", "cam", "amn")


def imagenet_backbone_config(seg_cfg: SegConfig) -> BackboneConfig:
    """``seg.backbone`` for ``seg.init=imagenet``: torchvision's ImageNet weights were trained
    with the stride on the 3x3 conv."""
    return dataclasses.replace(seg_cfg.backbone, stride_in_1x1=False)


def initial_seg_model(
    config: Config, num_classes: int
) -> tuple[MSC, BackboneConfig, str]:
    """The untrained MSC(DeepLab-v2) of ``seg``, initialised as ``seg.init`` says; returns
    (model, the backbone config it was built with, a description of the init). Its input
    normalisation follows the init: ``caffe`` for DeepLab-v2 files (Caffe-converted weights),
    ``imagenet`` for torchvision's weights and the package's own backbones."""
    seg_cfg = config.seg
    init = seg_cfg.init
    caffe_file = init not in SEG_INIT_WORDS
    options = {"msc_scales": list(seg_cfg.msc_scales),
               "input_kind": "caffe" if caffe_file else "imagenet"}
    if init in (None, "", "none"):
        backbone_cfg = dataclasses.replace(seg_cfg.backbone, pretrained=None)
        model = new_model("seg", build_backbone(backbone_cfg), num_classes, **options)
        return model, backbone_cfg, "none (random weights)"
    if init == "imagenet":
        backbone_cfg = imagenet_backbone_config(seg_cfg)
        backbone = build_backbone(backbone_cfg, key="seg.backbone.pretrained")
        model = new_model("seg", backbone, num_classes, **options)
        where = backbone_cfg.pretrained
        return model, backbone_cfg, f"ImageNet ({where})" if where else "none (random weights)"
    backbone_cfg = dataclasses.replace(seg_cfg.backbone, pretrained=None)
    model = new_model("seg", resnet_from_config(backbone_cfg), num_classes, **options)
    if init in ("cam", "amn"):
        trained = load_model(checkpoint_path(config, init), init, _class_names(config))
        model.base.backbone.load_state_dict(trained.backbone.state_dict())
        return model, backbone_cfg, f"the run's {init.upper()} backbone"
    state, has_head = read_deeplab_state(Path(init), backbone_cfg, num_classes + 1)
    model.load_state_dict(state, strict=False)
    head = "with its ASPP head" if has_head else "backbone only"
    return model, backbone_cfg, f"DeepLab-v2 file {init} ({head})"


def check_init_file(config: Config) -> None:
    """``seg.init``'s DeepLab-v2 file read and checked against ``seg.backbone`` (before any
    stage runs)."""
    read_deeplab_state(Path(config.seg.init),
                       dataclasses.replace(config.seg.backbone, pretrained=None), None)


def _class_names(config: Config) -> list[str]:
    return build_dataset(config.data, config.data.train_split).class_names


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """The recipe never optimises BatchNorm (statistics fixed by ``norm: frozen``, gamma/beta
    outside the optimiser): no gradients for them either."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.requires_grad_(False)
            module.bias.requires_grad_(False)


def seg_optimizer(
    model: MSC, seg_cfg: SegConfig
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with momentum: backbone conv weights at ``lr`` (weight decay), ASPP weights at
    ``lr * 10`` (weight decay), ASPP biases at ``lr * 20`` (no weight decay); poly decay whose
    factor (1 - k / iterations) ** power is updated every ``lr_decay_every`` iterations."""
    convs, aspp_weights, aspp_biases = model.param_groups()
    lr, decay = seg_cfg.lr, seg_cfg.weight_decay
    optimizer = torch.optim.SGD(
        [
            {"params": convs, "lr": lr, "weight_decay": decay},
            {"params": aspp_weights, "lr": lr * seg_cfg.aspp_weight_lr_mult,
             "weight_decay": decay},
            {"params": aspp_biases, "lr": lr * seg_cfg.aspp_bias_lr_mult, "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=seg_cfg.momentum,
    )
    every, total, power = seg_cfg.lr_decay_every, seg_cfg.iterations, seg_cfg.poly_power

    def factor(step: int) -> float:
        return (1.0 - min(step // every * every, total) / total) ** power

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def msc_loss(outputs: list[torch.Tensor], *targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies (255 ignored) of every MSC output: ``outputs`` = [scale 1,
    each other scale, fused max], ``targets`` = the labels at the first ones' sizes (the fused
    logits have the scale-1 size)."""
    pairs = [*zip(outputs[:-1], targets, strict=True), (outputs[-1], targets[0])]
    return sum(cross_entropy(logits, target) for logits, target in pairs)


def msc_loss_in_parts(outputs: list[torch.Tensor], targets: tuple[torch.Tensor, ...],
                      parts: int) -> torch.Tensor:
    """The mean of :func:`msc_loss` over ``parts`` consecutive equal slices of the batch: from
    one forward pass over ``parts`` accumulated batches, the loss whose gradient is the sum of
    their gradients, each batch averaged over its own labelled pixels as when it runs alone."""
    size = outputs[0].shape[0] // parts
    slices = [slice(k * size, (k + 1) * size) for k in range(parts)]
    return sum(msc_loss([output[part] for output in outputs], *(t[part] for t in targets))
               for part in slices) / parts


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the non-ignored pixels of the global batch (all ranks'
    under torchrun, like one process with the whole batch)."""
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = distributed.global_count((target != IGNORE_INDEX).sum()).to(total.dtype)
    return total * distributed.loss_scale() / count.clamp(min=1)


# --- training -----------------------------------------------------------------------------


def mask_source(config: Config, masks: str, dataset: SegDataset, check_all: bool = False
                ) -> Callable[[str, tuple[int, int]], np.ndarray]:
    """(stem, image size) -> the (H, W) uint8 label map the network learns from: the run's
    pseudo masks (``pseudo``), the dataset's ground truth (``gt``), or ``<folder>/<stem>.png``.
    A folder must hold every training image's mask (checked now, not hours into training);
    each mask read is checked for its size and its values, with its file named. With
    ``check_all``, every mask of a folder of the user's (not the run's pseudo masks) is read
    and checked now, before the stage clears the network it made before."""
    if masks == "gt":
        def ground_truth(stem: str, size: tuple[int, int]) -> np.ndarray:
            mask = dataset.mask(stem)  # checked by the dataset
            if mask is None:
                raise AmnsegError(f"{dataset.mask_source(stem)}: no ground-truth mask for {stem}")
            return mask

        return ground_truth
    folder = masks_dir(config) if masks == "pseudo" else Path(masks)
    if not folder.is_dir():
        raise AmnsegError(f"{folder}: mask folder not found (seg.masks={masks})")
    missing = [stem for stem in dataset.stems if not (folder / f"{stem}.png").is_file()]
    if missing:
        raise AmnsegError(f"{folder / (missing[0] + '.png')}: mask not found ({len(missing)} of "
                          f"the {len(dataset)} training images have none; seg.masks={masks})")

    def from_folder(stem: str, size: tuple[int, int]) -> np.ndarray:
        path = folder / f"{stem}.png"
        mask = read_index_png(path)
        if mask.shape != tuple(size):
            raise AmnsegError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, the image is "
                              f"{size[1]}x{size[0]}")
        return check_mask_values(mask, dataset.num_classes, str(path))

    if check_all and masks != "pseudo":
        labelled = False
        for stem in progress_bar(dataset.stems, desc="checking masks", unit="mask"):
            labelled |= bool((from_folder(stem, dataset.image_size(stem)) != IGNORE_INDEX).any())
        if not labelled:
            raise AmnsegError(f"{folder}: every pixel of every mask is 255 (ignored): the "
                              f"network would learn nothing (seg.masks={masks})")
    return from_folder


class SegTrainingItems:
    """(sample, rng) -> (image crop (3, S, S), labels at each logit size of the MSC pyramid):
    the recipe's augmentation, then the label crop resized with PIL NEAREST to every size."""

    def __init__(self, masks: Callable[[str, tuple[int, int]], np.ndarray], seg_cfg: SegConfig,
                 logit_sizes: list[tuple[int, int]], input_kind: str):
        self.masks = masks
        self.transform = DeepLabTrainTransform(
            seg_cfg.rescale, seg_cfg.crop_size, input_kind, seg_cfg.flip
        )
        self.logit_sizes = logit_sizes

    def __call__(self, sample: Sample, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        labels = self.masks(sample.stem, sample.image.shape[:2])
        image, label_crop = self.transform(sample.image, labels, rng)
        targets = [torch.from_numpy(resize_labels(label_crop, size).astype(np.int64))
                   for size in self.logit_sizes]
        return (image, *targets)


def pyramid_sizes(model: MSC, crop_size: int) -> list[tuple[int, int]]:
    """The logit sizes of the MSC pyramid for a crop (scale 1 first), from a dry run."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probe = torch.zeros(1, 3, crop_size, crop_size, device=next(model.parameters()).device)
        logits, others = model.pyramid(probe)
    model.train(was_training)
    return [tuple(t.shape[-2:]) for t in (logits, *others)]


def seg_steps_per_epoch(num_images: int, seg_cfg: SegConfig, what: str) -> int:
    """Whole optimisation steps (``batch_size`` x ``accumulation`` images) in an epoch of
    ``num_images``; none is a one-line error about ``what``."""
    steps = num_images // (seg_cfg.batch_size * seg_cfg.accumulation)
    if steps == 0:
        raise AmnsegError(f"{what}: {num_images} training images is fewer than one step of "
                          f"{seg_cfg.batch_size} x {seg_cfg.accumulation}")
    return steps


def train_seg(config: Config, stage: str = "seg", masks: str | None = None) -> Path:
    """Train DeepLab-v2 on the images of ``data.train_split`` with the masks of ``masks``
    (default ``seg.masks``); write ``<run_dir>/<stage>/<stage>.pt``."""
    seg_cfg = config.seg
    _, device, dataset = start_stage(config, stage, config.data.train_split)
    model, backbone_cfg, init = initial_seg_model(config, dataset.num_classes)
    freeze_batchnorm(model)
    model.to(device)
    optimizer, scheduler = seg_optimizer(model, seg_cfg)
    items = SegTrainingItems(mask_source(config, masks or seg_cfg.masks, dataset), seg_cfg,
                             pyramid_sizes(model, seg_cfg.crop_size), model.input_kind)
    steps = seg_steps_per_epoch(len(dataset), seg_cfg, f"{config.data.root} ({stage})")
    epochs = math.ceil(seg_cfg.iterations / steps)
    if seg_cfg.fused_accumulation:
        # Each rank's share of every accumulated batch must be a whole slice of its big batch.
        distributed.per_rank_batch(seg_cfg.batch_size, "seg.batch_size")
        schedule = Schedule(epochs, seg_cfg.batch_size * seg_cfg.accumulation, 1,
                            seg_cfg.iterations)
        parts = seg_cfg.accumulation
    else:
        schedule = Schedule(epochs, seg_cfg.batch_size, seg_cfg.accumulation, seg_cfg.iterations)
        parts = 1
    val_set = _val_dataset(config)

    def after_epoch() -> dict[str, float]:
        if not seg_cfg.eval_images or val_set is None:
            return {}
        stems = val_set.stems[: seg_cfg.eval_images]
        confusion = sum(
            confusion_matrix(predict_labels(model, val_set.image(s), device), _gt(val_set, s),
                             val_set.num_classes + 1)
            for s in stems
        )
        model.train()
        return {"val_miou": float(miou(confusion))}

    fit(stage, config, model, optimizer, scheduler, AugmentedSet(dataset, items, config.seed),
        lambda net, images, *targets: msc_loss_in_parts(net(images), targets, parts),
        device, schedule, after_epoch=after_epoch)
    checkpoint = {
        "format": "amnseg",
        "stage": "seg",
        "class_names": list(dataset.class_names),
        "backbone": dataclasses.asdict(dataclasses.replace(backbone_cfg, pretrained=None)),
        "model": model.state_dict(),
        "msc_scales": list(seg_cfg.msc_scales),
        "input": model.input_kind,
        "init": init,
        "masks": masks or seg_cfg.masks,
    }
    return save_once(checkpoint_path(config, stage), checkpoint)


# --- inference and evaluation --------------------------------------------------------------


@torch.no_grad()
def predict_probabilities(
    model: MSC, image: np.ndarray, device: torch.device | str = "cpu", flip: bool = False
) -> torch.Tensor:
    """(C + 1, H, W) softmax of the MSC-fused logits of an RGB uint8 image at its own size
    (logits resized bilinearly to the image); with ``flip``, the mean of the image's and the
    mirrored image's logits."""
    model.eval()
    batch = deeplab_input(image, model.input_kind)[None].to(device)
    logits = model(batch)
    if flip:
        logits = (logits + model(batch.flip(-1)).flip(-1)) / 2
    logits = F.interpolate(logits, image.shape[:2], mode="bilinear", align_corners=False)
    return torch.softmax(logits, dim=1)[0]


def predict_labels(
    model: MSC, image: np.ndarray, device: torch.device | str = "cpu", flip: bool = False,
    crf: CrfConfig | None = None, crf_device: torch.device | None = None,
) -> np.ndarray:
    """(H, W) class indices (0 = background); refined by the dense CRF when ``crf`` is given
    (pydensecrf, or the PyTorch mean field on ``crf_device``)."""
    probs = predict_probabilities(model, image, device, flip).cpu().numpy()
    if crf is not None:
        probs = crf_refine_probabilities(image, probs, crf, crf_device)
    return probs.argmax(axis=0).astype(np.uint8)


def _val_dataset(config: Config) -> SegDataset | None:
    if not config.data.val_split:
        return None
    dataset = run_dataset(config, config.data.val_split)
    return dataset if dataset.has_masks else None


def _gt(dataset: SegDataset, stem: str) -> np.ndarray:
    mask = dataset.mask(stem)
    if mask is None:
        raise AmnsegError(f"{dataset.mask_source(stem)}: no ground-truth mask for {stem}")
    return mask


def _crf_confusion(job: tuple[np.ndarray, np.ndarray, np.ndarray, CrfConfig, int,
                              torch.device | None]) -> np.ndarray:
    image, probs, gt, params, count, crf_device = job
    labels = crf_refine_probabilities(image, probs, params, crf_device).argmax(axis=0)
    return confusion_matrix(labels, gt, count)


def evaluate_seg(config: Config, stage: str = "seg", checkpoint: Path | None = None,
                 out_dir: Path | None = None) -> dict:
    """mIoU and per-class IoU of the ``stage`` network on ``data.val_split`` (MSC, optional
    flip), without and with the CRF; written to ``<out_dir>/<stage>.json`` (default: the run's
    eval folder)."""
    seg_cfg = config.seg
    if not config.data.val_split:
        raise AmnsegError("data.val_split is not set: name the split to evaluate the "
                          "segmentation network on (e.g. data.val_split=val)")
    dataset = _val_dataset(config)
    if dataset is None:
        raise AmnsegError(
            f"{config.data.root}: split {config.data.val_split!r} has no ground-truth masks "
            "to evaluate the segmentation network on"
        )
    path = checkpoint or checkpoint_path(config, stage)
    saved = load_model_checkpoint(path, "seg", dataset.class_names)
    device = resolve_device(config.device)
    model = load_model(path, "seg", dataset.class_names).to(device).eval()
    model = with_precision(model, config, device)
    count = dataset.num_classes + 1
    plain = np.zeros((count, count), dtype=np.int64)
    crf_device = crf_device_of(seg_cfg.crf_device, "seg.crf_device")

    def jobs() -> Iterator:
        nonlocal plain
        for stem in progress_bar(dataset.stems, desc=f"eval {stage}", unit="img"):
            image, gt = dataset.image(stem), _gt(dataset, stem)
            probs = predict_probabilities(model, image, device, seg_cfg.eval_flip).cpu().numpy()
            plain += confusion_matrix(probs.argmax(axis=0), gt, count)
            if seg_cfg.eval_crf:
                yield image, probs, gt, seg_cfg.crf, count, crf_device

    # pydensecrf's CRFs in worker processes; the PyTorch ones in this process, on their device.
    workers = (seg_cfg.crf_workers or distributed.cores_per_process()) if crf_device is None else 1
    refined = np.zeros((count, count), dtype=np.int64)
    for confusion in in_order(_crf_confusion, jobs(), workers if seg_cfg.eval_crf else 1):
        refined += confusion
    names = ["background", *dataset.class_names]

    def scores(confusion: np.ndarray) -> dict[str, Any]:
        per_class = iou_from_confusion(confusion)
        return {"miou": float(miou(confusion)),
                "per_class_iou": {n: (None if math.isnan(v) else float(v))
                                  for n, v in zip(names, per_class, strict=True)}}

    result: dict[str, Any] = {
        "name": stage,
        "checkpoint": str(path),
        "init": saved.get("init"),
        "trained_on": saved.get("masks"),
        "split": config.data.val_split,
        "images": len(dataset),
        "flip": seg_cfg.eval_flip,
        "no_crf": scores(plain),
        "crf": scores(refined) if seg_cfg.eval_crf else None,
    }
    save_json((out_dir or eval_dir(config)) / f"{stage}.json", result)
    return result
