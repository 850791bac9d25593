"""Multi-scale + flip inference of class activation maps (METHOD.md section 2).

The image is rescaled (PIL bicubic) to every scale; each scale runs as one batch of two (the
image and its mirror), the mirrored map is flipped back and added. Maps of all scales are
resized bilinearly to the stride-4 size and to the backbone's "up size" (the feature size times
the output stride), cropped to the image and summed. Scales of different sizes cannot share a
batch: padding them to one size would change the features near the border.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from amnseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, rescale


def strided_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """Size of a map at ``stride``: ((H - 1) // s + 1, (W - 1) // s + 1)."""
    return (height - 1) // stride + 1, (width - 1) // stride + 1


def strided_up_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """The stride-``s`` size times ``s``: the smallest multiple of ``s`` covering the image."""
    rows, cols = strided_size(height, width, stride)
    return rows * stride, cols * stride


def multiscale_inputs(
    image: np.ndarray, scales: Sequence[float], flip: bool = True
) -> list[torch.Tensor]:
    """uint8 (H, W, 3) -> one normalised batch per scale, (2 or 1, 3, h_s, w_s)."""
    return network_batches(rescaled_images(image, scales), flip)


def rescaled_images(image: np.ndarray, scales: Sequence[float]) -> list[torch.Tensor]:
    """uint8 (H, W, 3) -> the image at each scale (PIL bicubic), uint8 (h_s, w_s, 3): the part
    of :func:`multiscale_inputs` for loader workers, an eighth of its bytes (uint8, no mirror)."""
    return [torch.from_numpy(np.array(rescale(image, scale))) for scale in scales]  # writable


@cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255, the ImageNet mean and std (3, 1, 1) on ``device``, copied there once: a copy from
    pageable memory per image would wait for the GPU's queued work."""
    return (torch.tensor(255.0, device=device),
            torch.from_numpy(IMAGENET_MEAN).to(device)[:, None, None],
            torch.from_numpy(IMAGENET_STD).to(device)[:, None, None])


def network_batch(
    images: torch.Tensor, flip: bool = True, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 (N, h, w, 3) images of one size -> their normalised rows on ``device``: (2N, 3, h,
    w) with each image followed by its mirror, or (N, 3, h, w) without ``flip``. The values of
    ``normalize`` on every device: its float32 (x / 255 - mean) / std divides by tensors, since
    CUDA turns a division by a Python number into a multiplication by its reciprocal, which can
    differ in the last bit. One call per group of images: each operation here is a kernel
    launch on a GPU, paid once per group, not once per image."""
    full_scale, mean, std = _normalisation(torch.device(device))
    rgb = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    chw = ((rgb / full_scale - mean) / std).contiguous()
    return torch.stack([chw, chw.flip(-1)], dim=1).flatten(0, 1) if flip else chw


def network_batches(
    images: Sequence[torch.Tensor], flip: bool = True, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """One image's uint8 (h, w, 3) scales -> its :func:`network_batch` per scale, (2 or 1, 3,
    h, w) on ``device``."""
    return [network_batch(image[None], flip, device) for image in images]


def queued_copy(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU ``tensor`` on ``device``. On a GPU the copy is queued behind the work already there
    and the caller runs on: from pageable memory CUDA may first wait for that work (it stages
    the bytes through pinned memory), which would stall the map stages' CPU side once per
    image, so the tensor is pinned first. Elsewhere a plain copy."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def merge_flip(rows: torch.Tensor, images: int = 1) -> torch.Tensor:
    """Outputs (2N, C, h, w) of N images, each followed by its mirror -> (N, C, h, w) sums,
    the mirrors flipped back; (N, C, h, w) outputs without mirrors as they are."""
    if rows.shape[0] == images:
        return rows
    pairs = rows.unflatten(0, (images, 2))
    return pairs[:, 0] + pairs[:, 1].flip(-1)


@torch.no_grad()
def multiscale_cam(
    cam_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    image_size: tuple[int, int],
    output_stride: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of one image's per-scale activation maps at stride 4 and at image size.

    ``cam_fn`` maps images (B, 3, h, w) to maps (B, C, h / s, w / s); ``inputs`` are the
    image's batches of :func:`network_batches`. Returns (strided (C, (H-1)//4+1, (W-1)//4+1),
    full (C, H, W)), not normalised, on ``device``.
    """
    scale_maps = [cam_fn(batch.to(device, non_blocking=True)) for batch in inputs]
    strided, full = merge_cam_scales(scale_maps, 1, image_size, output_stride)
    return strided[0], full[0]


def merge_cam_scales(
    scale_maps: Sequence[torch.Tensor], images: int, image_size: tuple[int, int],
    output_stride: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`multiscale_cam` of a group of ``images`` images of one size from the network's
    outputs: ``scale_maps[s]`` (2N or N, C, h, w) are the rows of :func:`network_batch` at
    scale s. Returns (N, C, h4, w4) and (N, C, H, W)."""
    height, width = image_size
    small = strided_size(height, width, 4)
    up = strided_up_size(height, width, output_stride)
    strided_sum: torch.Tensor | None = None
    full_sum: torch.Tensor | None = None
    for maps in scale_maps:
        maps = merge_flip(maps, images)
        strided = F.interpolate(maps, small, mode="bilinear", align_corners=False)
        full = F.interpolate(maps, up, mode="bilinear", align_corners=False)[:, :, :height, :width]
        strided_sum = strided if strided_sum is None else strided_sum + strided
        full_sum = full if full_sum is None else full_sum + full
    assert strided_sum is not None and full_sum is not None, "at least one scale is needed"
    return strided_sum, full_sum


def max_normalize(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(K, h, w) -> each channel divided by its own maximum + eps."""
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + eps)
