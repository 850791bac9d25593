"""Image transforms of the reference pipeline, on uint8 (H, W, 3) numpy images.

Rescaling uses PIL bicubic like the reference; normalisation is ImageNet's mean/std; random
crops place the image at a random offset inside a fixed-size canvas filled with a pad value.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# DeepLab-v2's inputs (METHOD.md section 6): "caffe" for the recipe's Caffe-converted weights,
# "imagenet" for torchvision's weights and the package's own backbones.
DEEPLAB_MEAN_BGR = (104.008, 116.669, 122.675)
INPUT_KINDS = ("caffe", "imagenet")


def input_mean_rgb(kind: str) -> tuple[float, float, float]:
    """The colour (RGB, 0-255) that the input normalisation of ``kind`` maps to zero."""
    if kind == "caffe":
        blue, green, red = DEEPLAB_MEAN_BGR
        return red, green, blue
    red, green, blue = (float(v) * 255 for v in IMAGENET_MEAN)
    return red, green, blue


def normalize_input(rgb: torch.Tensor, kind: str) -> torch.Tensor:
    """(3, H, W) float RGB in 0-255 -> the network's input of ``kind`` (see the docstring)."""
    if kind == "caffe":
        return rgb.flip(0) - torch.tensor(DEEPLAB_MEAN_BGR, dtype=rgb.dtype)[:, None, None]
    if kind == "imagenet":  # the same arithmetic as ``normalize``
        mean = torch.from_numpy(IMAGENET_MEAN).to(rgb.dtype)[:, None, None]
        std = torch.from_numpy(IMAGENET_STD).to(rgb.dtype)[:, None, None]
        return (rgb / 255.0 - mean) / std
    raise ValueError(f"input kind {kind!r}: expected one of {', '.join(INPUT_KINDS)}")


def deeplab_input(image: np.ndarray, kind: str = "caffe") -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 input of ``kind``."""
    rgb = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    return normalize_input(rgb, kind)


def normalize(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, (x / 255 - mean) / std."""
    scaled = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(scaled.transpose(2, 0, 1))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return int(round(height * scale)), int(round(width * scale))


def rescale(image: np.ndarray, scale: float, resample: int = Image.BICUBIC) -> np.ndarray:
    """Resize by ``scale`` to (round(H * s), round(W * s)); PIL bicubic by default."""
    height, width = scaled_size(image.shape[0], image.shape[1], scale)
    if (height, width) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 label map resized to ``size`` = (h, w) with PIL's NEAREST, as the reference does
    for its AMN targets and stride-4 seeds (and DeepLab's recipe for its labels): output pixel
    i takes input pixel floor((i + 0.5) * H / h) (PIL's float arithmetic may round down where
    that product is a whole number), the centre of its cell: 16i + 8 for a 16x reduction,
    4i + 2 for 4x, where ``torch``'s ``nearest`` would take floor(i * H / h)."""
    height, width = size
    if (height, width) == labels.shape[:2]:
        return labels
    return np.array(Image.fromarray(labels).resize((width, height), Image.NEAREST))


def random_resize_long(
    image: np.ndarray, low: int, high: int, rng: np.random.Generator
) -> np.ndarray:
    """Rescale so that the long side is a random integer in [low, high] (bicubic)."""
    target = int(rng.integers(low, high + 1))
    return rescale(image, target / max(image.shape[:2]))


def random_crop_box(
    height: int, width: int, crop: int, rng: np.random.Generator
) -> tuple[slice, slice, slice, slice]:
    """Where a random ``crop`` x ``crop`` window meets the image.

    Returns (canvas rows, canvas cols, image rows, image cols). A side longer than ``crop`` is
    cut at a random offset; a shorter one is placed at a random offset inside the canvas.
    """

    def one_axis(size: int) -> tuple[slice, slice]:
        extent = min(size, crop)
        if size > crop:
            start = int(rng.integers(0, size - crop + 1))
            return slice(0, extent), slice(start, start + extent)
        start = int(rng.integers(0, crop - size + 1))
        return slice(start, start + extent), slice(0, extent)

    canvas_rows, image_rows = one_axis(height)
    canvas_cols, image_cols = one_axis(width)
    return canvas_rows, canvas_cols, image_rows, image_cols


def paste_crop(
    array: np.ndarray, box: tuple[slice, slice, slice, slice], crop: int, pad_value: float
) -> np.ndarray:
    """Cut ``array`` ((C, H, W) or (H, W)) with a box from :func:`random_crop_box`."""
    canvas_rows, canvas_cols, image_rows, image_cols = box
    shape = (*array.shape[:-2], crop, crop)
    canvas = np.full(shape, pad_value, dtype=array.dtype)
    canvas[..., canvas_rows, canvas_cols] = array[..., image_rows, image_cols]
    return canvas


class ClassificationTrainTransform:
    """CAM training augmentation: resize long side, flip, normalise, random crop (pad 0).

    Maps (uint8 image (H, W, 3), rng) -> float32 tensor (3, crop, crop).
    """

    def __init__(self, resize_long: tuple[int, int], crop_size: int, flip: bool = True):
        self.resize_long = resize_long
        self.crop_size = crop_size
        self.flip = flip

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        image = random_resize_long(image, self.resize_long[0], self.resize_long[1], rng)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        chw = normalize(image)
        box = random_crop_box(chw.shape[1], chw.shape[2], self.crop_size, rng)
        return torch.from_numpy(paste_crop(chw, box, self.crop_size, 0.0))


class SegmentationTrainTransform:
    """Augmentation of (image, per-pixel labels) pairs for the AMN/IRN-style stages.

    Random rescale by a factor in ``rescale`` (image bicubic, labels nearest), flip, normalise,
    random crop with the image padded by 0 and the labels by 255 (ignored).
    Maps (uint8 image (H, W, 3), uint8 labels (H, W), rng) -> (float32 (3, crop, crop),
    int64 (crop, crop)).
    """

    def __init__(self, rescale: tuple[float, float], crop_size: int, flip: bool = True):
        self.rescale = rescale
        self.crop_size = crop_size
        self.flip = flip

    def __call__(
        self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.rescale[0] + rng.random() * (self.rescale[1] - self.rescale[0])
        image = rescale(image, scale)
        labels = rescale(labels, scale, Image.NEAREST)
        if self.flip and rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        chw = normalize(image)
        box = random_crop_box(chw.shape[1], chw.shape[2], self.crop_size, rng)
        image_crop = paste_crop(chw, box, self.crop_size, 0.0)
        label_crop = paste_crop(np.ascontiguousarray(labels), box, self.crop_size, 255)
        return torch.from_numpy(image_crop), torch.from_numpy(label_crop.astype(np.int64))


class DeepLabTrainTransform:
    """The DeepLab-v2 recipe's augmentation of (image, label map) pairs (METHOD.md section 6).

    A scale drawn from ``scales``; the image (float) resized bilinearly (align_corners False,
    like OpenCV's linear resize) to (int(H s), int(W s)), the labels with PIL NEAREST; both
    padded at the bottom/right to at least ``crop_size`` (the image with the colour its input
    normalisation maps to zero, the labels with 255), a random ``crop_size`` window, a random
    horizontal flip, and the input normalisation of ``input_kind`` (``caffe``: BGR minus the
    mean, as the recipe; ``imagenet``: see ``amnseg.models.deeplab``). Maps (uint8 RGB
    (H, W, 3), uint8 labels (H, W), rng) -> (float32 (3, crop, crop), uint8 (crop, crop)).
    """

    def __init__(self, scales: list[float], crop_size: int, input_kind: str = "caffe",
                 flip: bool = True):
        self.scales = list(scales)
        self.crop_size = crop_size
        self.input_kind = input_kind
        self.pad = torch.tensor(input_mean_rgb(input_kind), dtype=torch.float32)[:, None, None]
        self.flip = flip

    def __call__(
        self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, np.ndarray]:
        scale = float(self.scales[int(rng.integers(len(self.scales)))])
        height, width = int(image.shape[0] * scale), int(image.shape[1] * scale)
        rgb = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        rgb = torch.nn.functional.interpolate(
            rgb[None].float(), (height, width), mode="bilinear", align_corners=False
        )[0]
        labels = resize_labels(labels, (height, width)) if scale != 1 else labels
        crop = self.crop_size
        canvas_h, canvas_w = max(height, crop), max(width, crop)
        canvas = self.pad.expand(3, canvas_h, canvas_w).clone()
        canvas[:, :height, :width] = rgb
        label_canvas = np.full((canvas_h, canvas_w), 255, dtype=np.uint8)
        label_canvas[:height, :width] = labels
        top = int(rng.integers(0, canvas_h - crop + 1))
        left = int(rng.integers(0, canvas_w - crop + 1))
        image_crop = canvas[:, top:top + crop, left:left + crop]
        label_crop = label_canvas[top:top + crop, left:left + crop]
        if self.flip and rng.random() < 0.5:
            image_crop, label_crop = image_crop.flip(-1), label_crop[:, ::-1]
        return (normalize_input(image_crop, self.input_kind).contiguous(),
                np.ascontiguousarray(label_crop))
