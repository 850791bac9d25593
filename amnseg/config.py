"""Typed configuration: dataclass defaults (= the reference VOC settings), YAML files, overrides.

A config is built from the dataclasses below, then a YAML file from ``configs/`` (or any path),
then ``key=value`` overrides from the command line, e.g. ``cam.epochs=3 data.root=/data/voc``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from amnseg.errors import AmnsegError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    """Where the images, image-level labels and (optional) ground-truth masks are."""

    kind: str = "voc"  # voc | coco | folder
    root: str = "data/VOCdevkit/VOC2012"
    # As in the reference: CAM, AMN and IRN train on train_split, and maps, seeds and pseudo
    # masks are made for every image of train_split and infer_split (the networks' training
    # seeds, and the segmentation stage's masks); evaluation uses infer_split.
    train_split: str = "train_aug"
    infer_split: str = "train"
    val_split: str = "val"
    aug_mask_dir: str = "SegmentationClassAug"  # VOC: SBD masks for train_aug
    semantic_dir: str | None = None  # COCO: folder of precomputed semantic PNGs (optional)
    num_workers: int = 2


@dataclass
class BackboneConfig:
    """ResNet backbone. ``width`` scales every channel count (1.0 = torchvision's ResNet)."""

    depth: int = 50
    width: float = 1.0
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 1])
    # frozen: BatchNorm normalises with its running statistics, which never change, while its
    # affine gamma/beta train like any weight (the reference); batch: ordinary BatchNorm.
    norm: str = "frozen"
    freeze_stem: bool = True  # conv1 and bn1 never train in the reference
    # ImageNet weights (torchvision layout): a file path, "hub" (torchvision's reference file
    # from the torch hub cache, downloaded and hash-checked on first use), a URL, or null
    # (random init).
    pretrained: str | None = None


@dataclass
class CamConfig:
    """Stage 'cam': classifier training and multi-scale CAM inference (METHOD.md section 2)."""

    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    # The reference hands its weight decay to SGD's momentum slot: momentum 1e-4, i.e. none.
    momentum: float = 1e-4
    poly_power: float = 0.9
    resize_long: list[int] = field(default_factory=lambda: [320, 640])
    crop_size: int = 512
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    flip: bool = True
    eval_threshold: float = 0.15
    # A trained classifier (amnseg's or the authors' res50_cam.pth): `amnseg run` then skips
    # training and uses it.
    checkpoint: str | None = None


@dataclass
class CrfConfig:
    """Dense CRF kernels (pydensecrf's ``addPairwiseGaussian`` / ``addPairwiseBilateral``).

    Defaults: the seed CRF of METHOD.md section 3 (unary from hard labels with ``gt_prob``).
    """

    iterations: int = 10
    gt_prob: float = 0.7  # confidence of the hard label in "unary from labels"
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0


@dataclass
class SeedsConfig:
    """Stage "seeds": two thresholds + dense CRF (METHOD.md section 3)."""

    cam_fg_threshold: float = 0.30  # seeds from CAMs, to train AMN
    cam_bg_threshold: float = 0.05
    amn_fg_threshold: float = 0.45  # seeds from AMN maps, to train IRN
    amn_bg_threshold: float = 0.15
    crf: CrfConfig = field(default_factory=CrfConfig)
    workers: int = 0  # CRF worker processes; 0 = one per CPU core


@dataclass
class AmnConfig:
    """Stage "amn": the activation manipulation network (METHOD.md section 4)."""

    epochs: int = 5
    batch_size: int = 16
    backbone_lr: float = 5e-6
    head_lr: float = 1e-4  # label encoder and ASPP
    weight_decay: float = 1e-4
    label_smoothing: float = 0.4
    dropout: float = 0.1
    crop_size: int = 512
    rescale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    flip: bool = True
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    eval_threshold: float = 0.25
    eval_images: int = 200  # per-epoch check: single-scale maps of this many images (0 = off)
    backbone_init: str = "imagenet"  # or "cam": start from the CAM classifier's backbone
    checkpoint: str | None = None  # a trained AMN (amnseg's or res50_amn.pth): no training


@dataclass
class IrnConfig:
    """Stage "irn": boundary network and random walk (METHOD.md section 5)."""

    radius: int = 10  # pair radius of the training labels, at stride 4
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 1e-4  # the same positional-argument quirk as the CAM stage
    poly_power: float = 0.9
    crop_size: int = 512
    rescale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    flip: bool = True
    # Backbone weights: "imagenet" (reference: backbone.pretrained) or "cam" (the trained CAM
    # classifier's backbone; for data far from ImageNet, e.g. the demo).
    backbone_init: str = "imagenet"
    infer_pad_size: int = 512  # images are zero-padded to this size for boundary inference
    walk_radius: int = 5
    beta: float = 10.0
    exp_times: int = 8
    cam_power: float = 1.3
    bg_threshold: float = 0.25
    checkpoint: str | None = None  # a trained IRN (amnseg's or res50_irn.pth): no training


@dataclass
class EvalConfig:
    """Threshold sweeps: thresholds = start, start + step, ... <= stop."""

    sweep_start: float = 0.0
    sweep_stop: float = 0.95
    sweep_step: float = 0.05
    robust_range: list[float] = field(default_factory=lambda: [0.10, 0.60])

    def thresholds(self) -> list[float]:
        count = int(round((self.sweep_stop - self.sweep_start) / self.sweep_step)) + 1
        return [round(self.sweep_start + i * self.sweep_step, 6) for i in range(count)]


@dataclass
class Config:
    run_dir: str = "runs/voc12"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    amn: AmnConfig = field(default_factory=AmnConfig)
    irn: IrnConfig = field(default_factory=IrnConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """``voc12`` -> ``configs/voc12.yaml``; an existing path is taken as it is."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise AmnsegError(f"{name_or_path}: no such config file (built-in configs: {known})")


def load_config(
    name_or_path: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides."""
    merged = OmegaConf.structured(Config)
    try:
        if name_or_path is not None:
            path = resolve_config_path(name_or_path)
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise AmnsegError(f"override {bad[0]!r}: expected key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        message = str(exc).strip().splitlines()[0]
        raise AmnsegError(f"config {name_or_path or '(defaults)'}: {message}") from None
    assert isinstance(config, Config)
    return config


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from its dict form (e.g. a run folder's config.json)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(values))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, Config)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_hash(config: Any) -> str:
    """A short stable hash of a (sub-)config, for telling runs apart."""
    payload = json.dumps(config_to_dict(config), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]
