"""The check a run makes of its images before any stage reads them: a bad file found after
hours of training, or a traceback on image 57,312, is what it prevents.

Every image's header is read (its size must be known, at least ``MIN_SIDE`` on each side and
at most ``max_pixels``); with ``decode`` the whole image is decoded too (finds truncated files;
slower). Every mask file is read: its size must be the image's and its values classes or 255.
An image without a mask file has its label read (VOC's XML annotation), which must parse.
"""

from __future__ import annotations

import math

from amnseg.data.base import SegDataset, opened_image, oriented_size
from amnseg.errors import AmnsegError
from amnseg.progress import progress_bar

MIN_SIDE = 8  # pixels: smaller images vanish at the networks' strides and the 0.5 map scale
_WHY_MIN_SIDE = "the networks see it at stride 8-16, and at half size for multi-scale maps"


def min_side(scales: list[tuple[str, float]]) -> tuple[int, str]:
    """(the smallest side an image may have, why) when the options ``scales`` ((option,
    smallest scale it applies to a whole image)) shrink images: a side must keep at least one
    pixel at every scale, and ``MIN_SIDE`` pixels in any case."""
    side, why = MIN_SIDE, _WHY_MIN_SIDE
    for option, scale in scales:
        needed = math.ceil(1 / scale - 1e-9)
        if needed > side:
            side, why = needed, f"{option} scales it by {scale:g}, which must leave a pixel"
    return side, why


def check_pixels(path: object, height: int, width: int, max_pixels: int, limit: str,
                 remedy: str) -> None:
    """A one-line AmnsegError naming ``path`` when the image is above ``max_pixels`` (0: no
    limit), which the option ``limit`` sets; ``remedy`` says what to do."""
    if max_pixels and width * height > max_pixels:
        raise AmnsegError(
            f"{path}: image is {width}x{height} ({width * height / 1e6:.1f} MP), above {limit} "
            f"(the CRF of such an image takes minutes and many GB; {remedy})")


def check_sample(dataset: SegDataset, stem: str, max_pixels: int, decode: bool,
                 smallest: tuple[int, str] = (MIN_SIDE, _WHY_MIN_SIDE)) -> None:
    """Raise a one-line AmnsegError naming the file if sample ``stem`` cannot be used;
    ``smallest``: the smallest side allowed and why (``min_side``)."""
    path = dataset.image_path(stem)
    with opened_image(path) as image:
        height, width = oriented_size(image, dataset.exif_orientation)
        if decode:
            image.load()
    side, why = smallest
    if min(width, height) < side:
        raise AmnsegError(
            f"{path}: image is {width}x{height}; both sides must be at least {side} pixels "
            f"({why})"
        )
    check_pixels(path, height, width, max_pixels, f"data.max_pixels={max_pixels}",
                 "downscale it or raise data.max_pixels")
    declared = dataset.declared_size(stem)
    if declared is not None and tuple(declared) != (height, width):
        raise AmnsegError(
            f"{dataset.mask_source(stem)}: the annotations give the image {declared[1]}x"
            f"{declared[0]} pixels, its file {path} is {width}x{height}")
    if dataset.mask_path(stem) is None:
        dataset.label(stem)  # from an annotation file (VOC's XML): a bad one is named now
        return
    mask = dataset.mask(stem)  # reads and checks the values
    if mask is not None and mask.shape != (height, width):
        raise AmnsegError(dataset.size_mismatch(stem, mask.shape, (height, width)))


def check_dataset(
    dataset: SegDataset, max_pixels: int, decode: bool = False, stop_at_first: bool = True,
    smallest: tuple[int, str] = (MIN_SIDE, _WHY_MIN_SIDE),
) -> dict[str, str]:
    """{stem: problem} of the unusable samples; with ``stop_at_first`` the first problem is
    raised instead. ``smallest`` as in ``check_sample``."""
    problems: dict[str, str] = {}
    for stem in progress_bar(dataset.stems, desc="checking images", unit="img", leave=False,
                     disable=len(dataset.stems) < 500):
        try:
            check_sample(dataset, stem, max_pixels, decode, smallest)
        except AmnsegError as error:
            if stop_at_first:
                raise
            problems[stem] = str(error)
    return problems
