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


def network_batches(
    images: Sequence[torch.Tensor], flip: bool = True, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """uint8 (h, w, 3) images -> normalised batches (2 or 1, 3, h, w) on ``device``, with their
    mirrors: the values of ``normalize`` on every device. Its float32 (x / 255 - mean) / std
    divides by tensors: CUDA turns a division by a Python number into a multiplication by its
    reciprocal, which can differ in the last bit."""
    full_scale, mean, std = _normalisation(torch.device(device))
    batches = []
    for image in images:
        rgb = image.to(device, non_blocking=True).permute(2, 0, 1).float()
        chw = ((rgb / full_scale - mean) / std).contiguous()
        batches.append(torch.stack([chw, chw.flip(-1)]) if flip else chw[None])
    return batches


def queued_copy(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU ``tensor`` on ``device``. On a GPU the copy is queued behind the work already there
    and the caller runs on: from pageable memory CUDA may first wait for that work (it stages
    the bytes through pinned memory), which would stall the map stages' CPU side once per
    image, so the tensor is pinned first. Elsewhere a plain copy."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def merge_flip(maps: torch.Tensor) -> torch.Tensor:
    """(2, C, h, w) image + mirrored maps -> (C, h, w) sum (mirror flipped back); (1, ...) as is."""
    return maps[0] + maps[1].flip(-1) if maps.shape[0] == 2 else maps[0]


@torch.no_grad()
def multiscale_cam(
    cam_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    image_size: tuple[int, int],
    output_stride: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-scale activation maps at stride 4 and at image size.

    ``cam_fn`` maps images (B, 3, h, w) to maps (B, C, h / s, w / s). Returns
    (strided (C, (H-1)//4+1, (W-1)//4+1), full (C, H, W)), not normalised, on ``device``.
    """
    scale_maps = [cam_fn(batch.to(device, non_blocking=True)) for batch in inputs]
    return merge_cam_scales(scale_maps, image_size, output_stride)


def merge_cam_scales(
    scale_maps: Sequence[torch.Tensor], image_size: tuple[int, int], output_stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`multiscale_cam` from the network's outputs: ``scale_maps[s]`` (2 or 1, C, h, w)
    are one image's maps at scale s (with its mirror's)."""
    height, width = image_size
    small = strided_size(height, width, 4)
    up = strided_up_size(height, width, output_stride)
    strided_sum: torch.Tensor | None = None
    full_sum: torch.Tensor | None = None
    for maps in scale_maps:
        maps = merge_flip(maps)[None]
        strided = F.interpolate(maps, small, mode="bilinear", align_corners=False)[0]
        full = F.interpolate(maps, up, mode="bilinear", align_corners=False)[0, :, :height, :width]
        strided_sum = strided if strided_sum is None else strided_sum + strided
        full_sum = full if full_sum is None else full_sum + full
    assert strided_sum is not None and full_sum is not None, "at least one scale is needed"
    return strided_sum, full_sum


@torch.no_grad()
def grouped_forward(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Sequence[Sequence[torch.Tensor]],
    device: torch.device | str = "cpu",
) -> list[list[torch.Tensor]]:
    """One forward pass per scale for a group of images of one size.

    ``inputs[i][s]``: image i's batch at scale s (its rows: the image and its mirror). For each
    scale, the rows of all images run as one batch through ``forward(batch, owners)``
    (``owners`` (rows,): the image index of each row); returns ``outputs[i][s]``, image i's
    rows of the result. On the CPU each row's output does not depend on the other rows
    (tests/test_models.py), so the maps equal those of one image at a time.
    """
    outputs: list[list[torch.Tensor]] = [[] for _ in inputs]
    for scale in range(len(inputs[0])):
        batches = [image_inputs[scale] for image_inputs in inputs]
        rows = [len(batch) for batch in batches]
        owners = torch.repeat_interleave(torch.arange(len(batches)), torch.tensor(rows))
        # Copied one by one, then joined on the device: from pinned memory the copies are
        # asynchronous (a joined copy on the CPU would not be pinned).
        rows_in = torch.cat([batch.to(device, non_blocking=True) for batch in batches])
        result = forward(rows_in, owners.to(device, non_blocking=True))
        for image_outputs, part in zip(outputs, result.split(rows), strict=True):
            image_outputs.append(part)
    return outputs


def max_normalize(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(K, h, w) -> each channel divided by its own maximum + eps."""
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + eps)
