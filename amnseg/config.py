"""Typed configuration: dataclass defaults (= the reference VOC settings), YAML files, overrides.

A config is built from the dataclasses below, then a YAML file from ``configs/`` (or any path),
then ``key=value`` overrides from the command line, e.g. ``cam.epochs=3 data.root=/data/voc``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

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
    # Loader worker processes of every stage; also the processes that read and sweep the map
    # stages' evaluation (0 or 1: in the main process; the same results either way).
    num_workers: int = 2
    # What tells `amnseg run` that the data changed: stat (size + modification time of every
    # image and mask file, cheap) or content (their SHA-256, reads every byte).
    signature: str = "stat"
    # Images with more pixels are refused (their dense CRF would take minutes and many GB);
    # 0 = no limit. VOC and COCO images have at most ~0.3 MP.
    max_pixels: int = 4_000_000
    # A bad image or mask (unreadable, too large, mask of another size or with values that are
    # no class): "error" stops the run naming the file; "skip" leaves the image out and lists
    # it in the run's summary and report (skipped_images.json).
    on_bad_image: str = "error"
    # Read images as photo viewers show them: turned or mirrored as their EXIF orientation tag
    # says (phone photos; masks drawn in tools that apply the tag). Off: the stored pixels, as
    # the reference reads VOC and COCO.
    exif_orientation: bool = False


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
    dilations: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # of layer1..layer4
    stride_in_1x1: bool = False  # Caffe's block layout (DeepLab-v2's ResNet-101)
    stem_pool_ceil: bool = False  # Caffe's max-pool rounds up (DeepLab-v2's ResNet-101)
    # Apply each frozen BatchNorm inside the convolution before it (weight * scale, bias =
    # shift): the same network up to float rounding, with fewer passes over the activations
    # (faster on a GPU, benchmarks/RESULTS.md). Off: the reference's exact arithmetic.
    fold_norm: bool = False
    # Run each dilated 3x3 conv as an undilated conv over the image's d * d interleaved
    # sub-grids: the same sums in another order. Compiled, the seg stage ran 4.9 % faster with
    # it on an H100; eager, slower (benchmarks/RESULTS.md). Off: the reference's convolutions.
    space_to_batch: bool = False
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
    # Where the CRFs run: cpu = pydensecrf (the reference's C++) in ``workers`` processes;
    # cuda / cuda:N / auto = amnseg's PyTorch mean field (amnseg.ops.permutohedral, the same
    # algorithm: marginals equal to ~1e-6, at most 5e-4) on that GPU, the workers loading maps
    # and images.
    crf_device: str = "cpu"
    crf_batch_images: int = 8  # images per call of the PyTorch CRF (crf_device on a GPU)
    # Make each image's seeds as soon as the map stage has written its maps, in worker
    # processes beside it (amnseg run only; the same files): auto | true | false. auto = when
    # the maps are made on a GPU, whose map stage leaves the CPU cores mostly idle.
    overlap: str = "auto"


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


def deeplab_backbone() -> BackboneConfig:
    """DeepLab-v2's ResNet-101: output stride 8 by dilation, Caffe's layout, BatchNorm frozen
    (and its gamma/beta not optimised: see ``MSC.param_groups``)."""
    return BackboneConfig(depth=101, strides=[2, 2, 1, 1], dilations=[1, 1, 2, 4],
                          stride_in_1x1=True, stem_pool_ceil=True, norm="frozen",
                          freeze_stem=False, pretrained="hub")


def deeplab_crf() -> CrfConfig:
    """The test-time CRF of DeepLab-v2 (on the softmax; ``gt_prob`` is unused there)."""
    return CrfConfig(iterations=10, gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0,
                     bilateral_srgb=3.0, bilateral_compat=4.0)


@dataclass
class SegConfig:
    """Stage "seg": DeepLab-v2 trained on the pseudo masks, evaluated on data.val_split
    (METHOD.md section 6; kazuto1011/deeplab-pytorch's VOC recipe)."""

    backbone: BackboneConfig = field(default_factory=deeplab_backbone)
    # imagenet: the ImageNet file of seg.backbone.pretrained (hub: torchvision's ResNet-101; the
    # backbone then takes torchvision's block layout, which those weights were trained with),
    # random weights if that is null; a path: a DeepLab-v2
    # file (kazuto's layout, with or without "base.", e.g. the ImageNet- or COCO-init files);
    # cam / amn: the run's CAM classifier / AMN backbone (same depth and width; for data
    # without ImageNet weights, like the demo); null: random.
    init: str | None = "imagenet"
    masks: str = "pseudo"  # pseudo (the run's pseudo masks) | gt | a folder of <stem>.png
    iterations: int = 20000
    batch_size: int = 5
    accumulation: int = 2  # gradient accumulation: 5 x 2 = batch 10
    # One forward pass per step over all its batch_size x accumulation crops, each batch's loss
    # still averaged over its own labelled pixels: the recipe's gradients up to floating-point
    # order (BatchNorm has fixed statistics), in larger and faster GPU work (benchmarks/
    # RESULTS.md, "Segmentation stage"). Off by default: the reference runs two passes.
    fused_accumulation: bool = False
    lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    lr_decay_every: int = 10  # the poly factor is updated every this many iterations
    aspp_weight_lr_mult: float = 10.0
    aspp_bias_lr_mult: float = 20.0  # ASPP biases also have no weight decay
    crop_size: int = 321
    rescale: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    flip: bool = True
    msc_scales: list[float] = field(default_factory=lambda: [0.5, 0.75])  # besides 1.0
    eval_images: int = 100  # per-epoch val check: MSC, no CRF, this many images (0 = off)
    eval_flip: bool = False  # evaluation: also average the mirrored image's logits
    eval_crf: bool = True  # evaluation: report with and without the CRF
    crf: CrfConfig = field(default_factory=deeplab_crf)
    crf_workers: int = 0  # CRF worker processes; 0 = one per CPU core
    crf_device: str = "cpu"  # as seeds.crf_device, for the evaluation's and predict's CRF
    checkpoint: str | None = None  # a trained model (amnseg's or kazuto's file): no training
    # Also train the same network on the ground-truth masks (stage seg_gt): the fully supervised
    # upper bound the pseudo-mask network is measured against.
    upper_bound: bool = False


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


COMPILE_MODES = ("off", "default", "reduce-overhead")


@dataclass
class Config:
    run_dir: str = "runs/voc12"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: each rank's own GPU)
    # Under torchrun: synchronise the statistics of BatchNorm layers that train (backbone.norm:
    # batch, e.g. the demo) across ranks. Fixed-statistics BatchNorm (the reference) needs none.
    sync_batchnorm: bool = False
    # Map files (.npz) zip-compressed: ~25 % smaller, but writing one VOC-size file takes ~20x
    # longer (benchmarks/RESULTS.md). false stores the same values uncompressed.
    compress_maps: bool = True
    # amnseg/precision.py: bf16 autocast in every network's forward pass (off | bf16; CUDA
    # only) and NHWC weights and batches (any device). Off by default: results then are the
    # reference's.
    amp: str = "off"
    channels_last: bool = False
    # Training stages only (amnseg/training.py): torch.compile the network (off | default |
    # reduce-overhead, torch.compile's modes: inductor's fused kernels, and with
    # reduce-overhead also CUDA graphs, which replay a step's kernels without launching each;
    # the first step compiles for a minute or more; a C compiler is needed on the CPU) and let
    # cuDNN time its algorithms per input shape. Both change results up to floating-point
    # order, so both are off by default.
    compile_training: str = "off"
    cudnn_benchmark: bool = False
    # Images per forward pass in the CAM and AMN map stages and the boundary inference of the
    # masks stage (consecutive images of one size share one; the outputs do not depend on it on
    # the CPU). 1 = one image at a time.
    map_batch_images: int = 8
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    amn: AmnConfig = field(default_factory=AmnConfig)
    irn: IrnConfig = field(default_factory=IrnConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --- validation: every value checked once, at load time, with the key in the message ------


def _require(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise AmnsegError(f"{key}={value!r}: {requirement}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(section: Any, prefix: str, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(_number(value) and value >= minimum, f"{prefix}.{name}", value,
                 f"must be a number >= {minimum:g}")


def _positive(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(_number(value) and value > 0, f"{prefix}.{name}", value,
                 "must be a number > 0")


def _fraction(section: Any, prefix: str, *names: str, closed: bool = True) -> None:
    for name in names:
        value = getattr(section, name)
        inside = _number(value) and (0 <= value <= 1 if closed else 0 <= value < 1)
        _require(inside, f"{prefix}.{name}", value,
                 "must lie in [0, 1]" if closed else "must lie in [0, 1)")


def _positive_list(value: Any, key: str, length: int | None = None) -> None:
    ok = isinstance(value, list) and len(value) > 0 and all(
        _number(v) and v > 0 for v in value)
    if length is not None:
        ok = ok and len(value) == length
    _require(ok, key, value, f"must be a list of {length or 'one or more'} numbers > 0")


def _range(value: Any, key: str, strict: bool = True) -> None:
    """[low, high] with 0 < low <= high (0 <= low when not ``strict``)."""
    ok = isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)
    ok = ok and (value[0] > 0 if strict else value[0] >= 0) and value[0] <= value[1]
    _require(ok, key, value,
             f"must be [low, high] with {'0 <' if strict else '0 <='} low <= high")


def _choice(value: Any, key: str, choices: tuple[Any, ...]) -> None:
    _require(value in choices, key, value, f"expected one of {', '.join(map(str, choices))}")


def is_device(spec: Any) -> bool:
    """Whether ``spec`` names a device amnseg runs on: auto, cpu, cuda or cuda:N."""
    import torch  # here: reading a config needs no torch otherwise

    if spec == "auto":
        return True
    try:
        device = torch.device(str(spec))
    except RuntimeError:
        return False
    return device.type in ("cpu", "cuda")


def _processes(count: int, key: str, kind: str) -> None:
    most = max(64, 8 * (os.cpu_count() or 1))  # beyond it only memory and start-up grow
    _require(count <= most, key, count,
             f"at most {most} {kind} processes on this machine of {os.cpu_count()} cores")


def _holds(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the declared option type ``kind`` (int, float, bool, str, None,
    list[...] or a union of them); a float option takes an int, no number option a bool."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_holds(value, option) for option in typing.get_args(kind))
    if origin is list:
        return isinstance(value, list) and all(_holds(v, typing.get_args(kind)[0]) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is type(None):
        return value is None
    return kind is Any or isinstance(value, kind)


def _type_words(kind: Any) -> str:
    words = {int: "an integer", float: "a number", bool: "true or false", str: "text",
             type(None): "null"}
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_type_words(option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return f"a list of {_type_words(typing.get_args(kind)[0]).split(' ', 1)[-1]}s"
    return words.get(kind, getattr(kind, "__name__", str(kind)))


def _check_types(section: Any, prefix: str = "") -> None:
    """Every option holds a value of its declared type. OmegaConf converts the values of files
    and overrides; a Config built or edited in Python gets no conversion, so its mistakes are
    said here rather than as a TypeError in the middle of a stage. A path given as a Path
    for a text option is taken as its text."""
    declared = typing.get_type_hints(type(section))
    names = [option.name for option in dataclasses.fields(section)]
    for name in vars(section):  # a typo made in Python (config.cam.epochz = 3) adds a field
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise AmnsegError(f"{prefix}{name}: unknown option{hint}; `amnseg config show` "
                              "lists them all")
    for option in dataclasses.fields(section):
        key, kind = f"{prefix}{option.name}", declared[option.name]
        value = getattr(section, option.name)
        if dataclasses.is_dataclass(kind):
            _require(isinstance(value, kind), key, value, f"must be a {kind.__name__}")
            _check_types(value, f"{key}.")
            continue
        if isinstance(value, os.PathLike) and _holds("", kind):
            value = os.fspath(value)
            setattr(section, option.name, value)
        _require(_holds(value, kind), key, value, f"must be {_type_words(kind)}")


def validate_crf(crf: CrfConfig, prefix: str = "crf") -> CrfConfig:
    """A CRF's parameters (pydensecrf crashes the process on a zero kernel width)."""
    if not isinstance(crf, CrfConfig):
        raise AmnsegError(f"{prefix}={crf!r}: expected a CrfConfig")
    _check_types(crf, f"{prefix}.")
    _at_least(crf, prefix, 0, "iterations", "gaussian_compat", "bilateral_compat")
    _require(crf.iterations <= 1000, f"{prefix}.iterations", crf.iterations,
             "must be at most 1000 (mean field settles in about 10)")
    _positive(crf, prefix, "gaussian_sxy", "bilateral_sxy", "bilateral_srgb")
    _require(_number(crf.gt_prob) and 0 < crf.gt_prob < 1, f"{prefix}.gt_prob", crf.gt_prob,
             "must lie in (0, 1)")
    return crf


def validate(config: Config) -> Config:
    """Check every option's type and range; the first bad one is a one-line AmnsegError."""
    if not isinstance(config, Config):
        raise AmnsegError(f"expected an amnseg Config (amnseg.config.load_config makes one), "
                          f"not {type(config).__name__}")
    _check_types(config)
    _require(bool(str(config.run_dir).strip()), "run_dir", config.run_dir, "must not be empty")
    _choice(config.amp, "amp", ("off", "bf16"))
    _require(is_device(config.device), "device", config.device,
             "must be auto, cpu, cuda or cuda:N")
    _require(isinstance(config.seed, int) and 0 <= config.seed < 2**32, "seed", config.seed,
             "must be an integer in 0 .. 2^32 - 1")
    _require(isinstance(config.map_batch_images, int) and config.map_batch_images >= 1,
             "map_batch_images", config.map_batch_images, "must be an integer >= 1")
    _choice(config.compile_training, "compile_training", COMPILE_MODES)
    for key in ("compress_maps", "sync_batchnorm", "channels_last", "cudnn_benchmark"):
        _require(isinstance(getattr(config, key), bool), key, getattr(config, key),
                 "must be true or false")
    data = config.data
    _choice(data.kind, "data.kind", ("voc", "coco", "folder"))
    for name in ("train_split", "infer_split"):
        _require(bool(getattr(data, name)), f"data.{name}", getattr(data, name), "must be set")
    _at_least(data, "data", 0, "num_workers")
    _processes(data.num_workers, "data.num_workers", "loader")
    _require(data.signature in ("stat", "content"), "data.signature", data.signature,
             "expected stat or content")
    _at_least(data, "data", 0, "max_pixels")
    _choice(data.on_bad_image, "data.on_bad_image", ("error", "skip"))
    for prefix, backbone in (("backbone", config.backbone), ("seg.backbone", config.seg.backbone)):
        _choice(backbone.depth, f"{prefix}.depth", (18, 34, 50, 101))
        _positive(backbone, prefix, "width")
        _positive_list(backbone.strides, f"{prefix}.strides", 4)
        # The stem's stride 2 (with its max-pool, stride 4) is what the IRN boundary maps, the
        # stride-4 score maps and DeepLab's output stride are built on; each layer halves the
        # resolution or keeps it.
        _require(backbone.strides[0] == 2 and all(v in (1, 2) for v in backbone.strides[1:]),
                 f"{prefix}.strides", backbone.strides,
                 "must be [2, s2, s3, s4] with each s 1 or 2 (the stem's stride is 2)")
        _positive_list(backbone.dilations, f"{prefix}.dilations", 4)
        _choice(backbone.norm, f"{prefix}.norm", ("frozen", "batch"))
        _require(not backbone.fold_norm or backbone.norm == "frozen", f"{prefix}.fold_norm",
                 backbone.fold_norm, f"needs {prefix}.norm=frozen (BatchNorm that normalises "
                 "with batch statistics cannot be folded)")
    cam = config.cam
    _at_least(cam, "cam", 1, "epochs", "batch_size")
    _positive(cam, "cam", "lr", "head_lr_mult")
    _at_least(cam, "cam", 0, "weight_decay", "poly_power")
    _fraction(cam, "cam", "momentum", closed=False)
    _range(cam.resize_long, "cam.resize_long")
    _at_least(cam, "cam", 8, "crop_size")
    _positive_list(cam.scales, "cam.scales")
    _fraction(cam, "cam", "eval_threshold")
    seeds = config.seeds
    _fraction(seeds, "seeds", "cam_fg_threshold", "cam_bg_threshold", "amn_fg_threshold",
              "amn_bg_threshold")
    for source in ("cam", "amn"):
        fg, bg = (getattr(seeds, f"{source}_{kind}_threshold") for kind in ("fg", "bg"))
        _require(bg <= fg, f"seeds.{source}_bg_threshold", bg,
                 f"must not exceed seeds.{source}_fg_threshold={fg}")
    _at_least(seeds, "seeds", 0, "workers")
    _processes(seeds.workers, "seeds.workers", "CRF worker")
    _at_least(seeds, "seeds", 1, "crf_batch_images")
    _choice(seeds.overlap, "seeds.overlap", ("auto", "true", "false"))
    for key, spec in (("seeds.crf_device", seeds.crf_device),
                      ("seg.crf_device", config.seg.crf_device)):
        _require(is_device(spec), key, spec, "must be auto, cpu, cuda or cuda:N")
    # The seeds made beside the map stage run in forked processes, where CUDA cannot start.
    _require(seeds.overlap != "true" or str(seeds.crf_device) == "cpu", "seeds.overlap",
             seeds.overlap, f"seeds beside the maps need seeds.crf_device=cpu, not "
             f"{seeds.crf_device}")
    validate_crf(seeds.crf, "seeds.crf")
    validate_crf(config.seg.crf, "seg.crf")
    amn = config.amn
    _at_least(amn, "amn", 1, "epochs", "batch_size")
    _positive(amn, "amn", "backbone_lr", "head_lr")
    _at_least(amn, "amn", 0, "weight_decay", "eval_images")
    _fraction(amn, "amn", "label_smoothing", "dropout", closed=False)
    _at_least(amn, "amn", 8, "crop_size")
    _range(amn.rescale, "amn.rescale")
    _positive_list(amn.scales, "amn.scales")
    _fraction(amn, "amn", "eval_threshold")
    _choice(amn.backbone_init, "amn.backbone_init", ("imagenet", "cam"))
    irn = config.irn
    _at_least(irn, "irn", 1, "epochs", "batch_size")
    _at_least(irn, "irn", 2, "radius", "walk_radius")
    _positive(irn, "irn", "lr", "beta", "cam_power")
    _at_least(irn, "irn", 0, "weight_decay", "poly_power", "infer_pad_size", "exp_times")
    _require(irn.exp_times <= 16, "irn.exp_times", irn.exp_times, "must be at most 16")
    # Beyond these the work grows with no use: the walk's neighbourhood has ~walk_radius^2
    # cells per pixel (the reference: 5), and the reference pads to 512.
    _require(irn.walk_radius <= 32, "irn.walk_radius", irn.walk_radius, "must be at most 32")
    _require(irn.infer_pad_size <= 4096, "irn.infer_pad_size", irn.infer_pad_size,
             "must be at most 4096 (0: no padding)")
    _fraction(irn, "irn", "momentum", closed=False)
    _at_least(irn, "irn", 8, "crop_size")
    # Training pairs reach radius - 1 cells left, right and down from each source cell of the
    # stride-4 crop, so the crop must hold at least one source cell with all its pairs.
    _require(irn.crop_size // 4 >= 2 * irn.radius - 1, "irn.crop_size", irn.crop_size,
             f"must be at least {4 * (2 * irn.radius - 1)} for irn.radius={irn.radius} "
             "(pairs reach radius - 1 stride-4 cells on each side)")
    _range(irn.rescale, "irn.rescale")
    _choice(irn.backbone_init, "irn.backbone_init", ("imagenet", "cam"))
    _fraction(irn, "irn", "bg_threshold")
    seg = config.seg
    _at_least(seg, "seg", 1, "iterations", "batch_size", "accumulation", "lr_decay_every")
    _positive(seg, "seg", "lr", "aspp_weight_lr_mult", "aspp_bias_lr_mult")
    _at_least(seg, "seg", 0, "weight_decay", "poly_power", "eval_images", "crf_workers")
    _processes(seg.crf_workers, "seg.crf_workers", "CRF worker")
    _fraction(seg, "seg", "momentum", closed=False)
    _at_least(seg, "seg", 16, "crop_size")
    _positive_list(seg.rescale, "seg.rescale")
    _require(isinstance(seg.msc_scales, list) and all(_number(v) and v > 0 for v in
                                                      seg.msc_scales),
             "seg.msc_scales", seg.msc_scales, "must be a list of numbers > 0")
    _require(seg.crop_size * min([1.0, *seg.msc_scales]) >= 1, "seg.msc_scales",
             seg.msc_scales, f"must leave a pixel of the seg.crop_size={seg.crop_size} crops")
    _require(bool(seg.masks), "seg.masks", seg.masks, "expected pseudo, gt or a folder")
    _require(isinstance(seg.fused_accumulation, bool), "seg.fused_accumulation",
             seg.fused_accumulation, "must be true or false")
    _require(not seg.fused_accumulation or seg.backbone.norm == "frozen",
             "seg.fused_accumulation", seg.fused_accumulation,
             "needs seg.backbone.norm=frozen (BatchNorm that trains would see another batch)")
    ev = config.eval
    _positive(ev, "eval", "sweep_step")
    _fraction(ev, "eval", "sweep_start", "sweep_stop")
    _require(ev.sweep_start <= ev.sweep_stop, "eval.sweep_start", ev.sweep_start,
             f"must not exceed eval.sweep_stop={ev.sweep_stop}")
    _require((ev.sweep_stop - ev.sweep_start) / ev.sweep_step <= 10000, "eval.sweep_step",
             ev.sweep_step, "gives more than 10000 thresholds")
    _range(ev.robust_range, "eval.robust_range", strict=False)
    _require(ev.robust_range[1] <= 1, "eval.robust_range", ev.robust_range,
             "must lie in [0, 1] (it is a range of thresholds)")
    return config


def image_scales(config: Config) -> list[tuple[str, float]]:
    """(option, the smallest factor it scales a whole image by) of the options that shrink
    images: the multi-scale maps, the training rescales and DeepLab's MSC pyramid."""
    return [("cam.scales", min(config.cam.scales)), ("amn.scales", min(config.amn.scales)),
            ("amn.rescale", config.amn.rescale[0]), ("irn.rescale", config.irn.rescale[0]),
            ("seg.rescale", min(config.seg.rescale)),
            ("seg.msc_scales", min([1.0, *config.seg.msc_scales]))]


def resolve_config_path(name_or_path: str | Path) -> Path:
    """``voc12`` -> ``configs/voc12.yaml``; an existing path is taken as it is."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise AmnsegError(f"{name_or_path}: is a folder; expected a config file (.yaml) or "
                          "the name of a built-in config")
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise AmnsegError(f"{name_or_path}: no such config file (built-in configs: {known})")


def _unresolvable_option(merged: Any, prefix: str = "") -> str | None:
    """The first option of ``merged`` whose value cannot be resolved (an interpolation to a
    missing key or to a value of the wrong type), or None. OmegaConf's errors for these do not
    always say which option they are about."""
    for name in merged:
        key = f"{prefix}{name}"
        try:
            value = merged[name]
        except OmegaConfBaseException:
            return key
        if isinstance(value, DictConfig):
            found = _unresolvable_option(value, f"{key}.")
            if found:
                return found
    return None


def _option_error(exc: OmegaConfBaseException, merged: Any = None) -> str:
    """OmegaConf's message, led by the option it is about (and, for an unknown option, the
    closest known one)."""
    message = str(exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    if not key and isinstance(merged, DictConfig):
        key = _unresolvable_option(merged)
    section = re.match(r"Merge error: \w+ is not a subclass of (\w+)Config", message)
    if section:
        return (f"{section.group(1).lower()} is a section of options, not a value: set its "
                "options one by one (`amnseg config show` lists them)")
    if not key:
        return "an override needs an option name before '='" if "Key ''" in message else message
    if "Incompatible value 'None'" in message:
        return (f"{key}: empty or null (YAML reads an empty value and a lone ~ as null); "
                "write the value (~/runs is fine)")
    if "is not a ListConfig" in message:
        return f"{key}: expected a list, e.g. [1, 2]"
    if "is not Optional" in message:
        return f"{key}: is a section of options and cannot be null"
    if isinstance(exc, ConfigKeyError):
        section, _, name = str(key).rpartition(".")
        node: Any = Config()
        for part in filter(None, section.split(".")):
            node = getattr(node, part, None)
        known = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {section + '.' if section else ''}{close[0]}?)" if close else ""
        return f"{key}: unknown option{hint}; `amnseg config show` lists them all"
    return f"{key}: {message}"


def _mismatched_option(name_or_path: str | Path | None, overrides: list[str] | None) -> str:
    """The first override (or else the config file) that does not merge with the defaults."""
    for override in overrides or []:
        try:
            OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist([override]))
        except (TypeError, ValueError, OmegaConfBaseException):
            return override
    return str(name_or_path)


def load_config(
    name_or_path: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides."""
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise AmnsegError(f"config {name_or_path!r}: expected a config name or the path of a "
                          "YAML file")
    if isinstance(overrides, (str, bytes)) or not all(
            isinstance(override, str) for override in overrides or []):
        raise AmnsegError(f"overrides {overrides!r}: expected a list of 'key=value' texts")
    merged: Any = OmegaConf.structured(Config)
    what = f"config {name_or_path or '(defaults)'}"
    try:
        if name_or_path is not None:
            # A config's runs go to runs/<its name> unless it says otherwise: two configs
            # sharing runs/voc12 would replace each other's outputs.
            merged.run_dir = f"runs/{Path(name_or_path).stem}"
            merged = OmegaConf.merge(merged, _read_config_file(resolve_config_path(name_or_path)))
        if overrides:
            merged = OmegaConf.merge(merged, _parse_overrides(list(overrides)))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise AmnsegError(f"{what}: {_option_error(exc, merged)}") from None
    except (TypeError, ValueError) as exc:
        # OmegaConf lets some mismatches through as plain errors: a mapping for a list option.
        raise AmnsegError(f"{what}: {_mismatched_option(name_or_path, overrides)}: "
                          f"{str(exc).strip().splitlines()[0]} (a list option takes a list, "
                          "e.g. [1, 0.5])") from None
    assert isinstance(config, Config)
    return validate(_home_expanded(_words_from_booleans(config)))


def _home_expanded(section: Any) -> Any:
    """Every path option written with ``~`` (``~/runs``, ``~user/data``) expanded, as a shell
    would: without it, ``run_dir: ~/runs`` would make a folder named ``~``."""
    for option in dataclasses.fields(section):
        value = getattr(section, option.name)
        if dataclasses.is_dataclass(value):
            _home_expanded(value)
        elif isinstance(value, str) and value.startswith("~"):
            setattr(section, option.name, os.path.expanduser(value))
    return section


def _words_from_booleans(config: Config) -> Config:
    """YAML reads ``off``/``on``/``no``/``yes`` as booleans, which reach the options whose
    values are words as "False"/"True": give those options back the words they take."""
    config.amp = {"False": "off", "True": "on"}.get(config.amp, config.amp)
    config.compile_training = {"False": "off", "True": "default"}.get(
        config.compile_training, config.compile_training)
    config.seeds.overlap = {"False": "false", "True": "true"}.get(config.seeds.overlap,
                                                                   config.seeds.overlap)
    return config


def _read_config_file(path: Path) -> Any:
    """A config file's options (a YAML mapping); a bad file is one AmnsegError line."""
    try:
        # OmegaConf reads a bare word as {word: None}: the mapping is checked on the YAML.
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise AmnsegError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AmnsegError(f"{path}: unreadable config file ({exc})") from None
    if not isinstance(loaded, DictConfig) or not isinstance(raw, dict | None):
        raise AmnsegError(f"{path}: expected a mapping of options (key: value) at the top level")
    return loaded


def _parse_overrides(overrides: list[str]) -> Any:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise AmnsegError(f"override {bad[0]!r}: expected key=value")
    for override in overrides:
        try:
            override.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes of another encoding in a command-line word
            raise AmnsegError(
                f"override {override!r}: not UTF-8 text (character {exc.start + 1}); options "
                "are UTF-8: rename the file or folder it names") from None
    try:
        return OmegaConf.from_dotlist(overrides)
    except yaml.YAMLError:
        pass
    for override in overrides:  # name the one whose value is not YAML
        try:
            OmegaConf.from_dotlist([override])
        except yaml.YAMLError as exc:
            raise AmnsegError(
                f"override {override!r}: the value is not valid YAML "
                f"({' '.join(str(exc).splitlines()[0].split())})") from None
    raise AssertionError("unreachable: the overrides parsed one by one")


def config_from_dict(values: dict[str, Any], where: str | Path = "config") -> Config:
    """Rebuild a Config from its dict form (e.g. a run folder's config.json, ``where``)."""
    merged: Any = None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(values))
        config = OmegaConf.to_object(merged)
        assert isinstance(config, Config)
        return validate(config)
    except OmegaConfBaseException as exc:
        raise AmnsegError(f"{where}: {_option_error(exc, merged)}") from None
    except AmnsegError as error:
        raise AmnsegError(f"{where}: {error}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_hash(config: Any) -> str:
    """A short stable hash of a (sub-)config, for telling runs apart."""
    payload = json.dumps(config_to_dict(config), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]
