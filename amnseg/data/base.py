"""The one dataset interface every source (VOC, COCO, folder, demo) implements.

A dataset is a list of image stems (file names without extension, kept as strings) with, for
each stem, an RGB image, a multi-hot image-level label over the C foreground classes, and
optionally a ground-truth mask (uint8: 0 background, 1..C classes, 255 ignored).
"""

from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from amnseg.errors import AmnsegError

IGNORE_INDEX = 255
# Masks, seeds and pseudo masks are uint8: 0 the background, 255 ignored, the classes between.
MAX_CLASSES = IGNORE_INDEX - 1


def check_class_count(count: int, where: object) -> None:
    """A class list longer than the uint8 label maps hold is a one-line error naming it."""
    if count > MAX_CLASSES:
        raise AmnsegError(f"{where}: {count} classes; at most {MAX_CLASSES} fit amnseg's uint8 "
                          f"masks (0 is the background, {IGNORE_INDEX} ignored pixels)")


@dataclass
class Sample:
    stem: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (C,) float32 multi-hot over foreground classes
    mask: np.ndarray | None  # (H, W) uint8, 0 = bg, 1..C, 255 = ignore; None without GT


class SegDataset(ABC):
    """Base class. Subclasses set ``class_names`` (foreground only) and ``stems`` and implement
    ``image_path``, ``label`` and (when ground truth exists) ``mask``."""

    class_names: list[str]
    stems: list[str]
    # Images are read turned as their EXIF orientation tag says (data.exif_orientation).
    exif_orientation: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index)

    def sample(self, index: int, with_mask: bool = True) -> Sample:
        """Image, label and (``with_mask``, when there is ground truth) mask of one image.
        Training reads ``with_mask=False``: the weakly supervised stages learn from image labels
        and seeds, and decoding a mask they never use would cost loader time."""
        stem = self.stems[index]
        image = self.image(stem)
        mask = self.mask(stem) if with_mask else None
        if mask is not None and mask.shape != image.shape[:2]:
            raise AmnsegError(self.size_mismatch(stem, mask.shape, image.shape[:2]))
        return Sample(stem=stem, image=image, label=self.label(stem), mask=mask)

    def size_mismatch(self, stem: str, mask_size: tuple[int, ...],
                      image_size: tuple[int, ...]) -> str:
        """The error for a mask of (H, W) ``mask_size`` on an image of ``image_size``."""
        hint = ""
        if tuple(mask_size) == tuple(image_size)[::-1] and not self.exif_orientation:
            # Photos turned by an EXIF tag show rotated; their stored pixels (what is read by
            # default, as the reference reads them) are not.
            hint = (" (turned a quarter: the image may carry an EXIF rotation; "
                    "data.exif_orientation=true reads images as viewers show them)")
        return (f"{self.mask_source(stem)}: mask size {mask_size[1]}x{mask_size[0]} differs "
                f"from image size {image_size[1]}x{image_size[0]}{hint}")

    @abstractmethod
    def image_path(self, stem: str) -> Path:
        """Path of the image file of ``stem``."""

    def image(self, stem: str) -> np.ndarray:
        return read_rgb(self.image_path(stem), self.exif_orientation)

    def image_size(self, stem: str) -> tuple[int, int]:
        """(H, W) of ``stem``'s image, from its file header (no decoding)."""
        return read_size(self.image_path(stem), self.exif_orientation)

    @abstractmethod
    def label(self, stem: str) -> np.ndarray:
        """(C,) float32 multi-hot image-level label of ``stem``."""

    def mask_path(self, stem: str) -> Path | None:
        return None

    def mask_source(self, stem: str) -> str:
        """What an error about the mask of ``stem`` names: its file, or (for masks built from
        annotations, e.g. COCO) whatever they come from."""
        return str(self.mask_path(stem) or self.image_path(stem))

    def mask(self, stem: str) -> np.ndarray | None:
        path = self.mask_path(stem)
        return None if path is None else check_mask_values(read_index_png(path), self.num_classes,
                                                           str(path))

    def without(self, stems: Collection[str]) -> SegDataset:
        """The same dataset minus ``stems`` (e.g. images a run skips)."""
        excluded = set(stems)
        if not excluded & set(self.stems):
            return self
        reduced = copy.copy(self)
        reduced.stems = [s for s in self.stems if s not in excluded]
        reduced.__dict__.pop("_index", None)
        return reduced

    @property
    def has_masks(self) -> bool:
        """Whether the split has masks: any of its images has one (a test split has none; the
        images of a split with masks that lack one are ``missing_masks``, which the run's data
        check names before any stage)."""
        return any(self.mask_path(stem) is not None for stem in self.stems)

    def declared_size(self, stem: str) -> tuple[int, int] | None:
        """The (H, W) the dataset's annotations give the image, if they give one (COCO's);
        the run's check compares it with the image file."""
        return None

    def missing_masks(self) -> list[Path]:
        """The mask files a dataset with masks lacks (only a folder dataset can have masks for
        some of its images)."""
        return []

    def source_files(self, stem: str) -> list[Path]:
        """The files that define sample ``stem`` (image, mask, annotation): what a run's data
        signature covers."""
        mask = self.mask_path(stem)
        return [self.image_path(stem)] + ([mask] if mask is not None else [])

    def shared_files(self) -> list[Path]:
        """Files that define every sample at once (class list, label table, split list)."""
        return []

    def index_of(self, stem: str) -> int:
        if not hasattr(self, "_index"):
            self._index = {s: i for i, s in enumerate(self.stems)}
        return self._index[stem]


WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def rgb_array(image: Image.Image, source: str = "image") -> np.ndarray:
    """Any PIL image as (H, W, 3) uint8 RGB: grayscale, palette, RGBA (alpha dropped), CMYK,
    YCbCr, ... through PIL's conversions; 16-bit grayscale scaled to 8 bits (x / 257), where
    PIL's own conversion would clip it to white. ``source`` names it in errors."""
    if image.mode in WIDE_INTEGER_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise AmnsegError(f"{source}: 32-bit image values outside 0..65535 (not a photo?)")
        gray = np.round(values / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        raise AmnsegError(f"{source}: floating-point images are not supported (mode F)")
    if image.mode == "La":  # premultiplied alpha, which PIL converts only through LA
        image = image.convert("LA")
    try:
        return np.array(image.convert("RGB"), dtype=np.uint8)
    except ValueError as exc:
        raise AmnsegError(f"{source}: image mode {image.mode} cannot be read as RGB ({exc})"
                          ) from None


@contextmanager
def opened_image(path: Path) -> Iterator[Image.Image]:
    """The image file at ``path``, open; a missing or unreadable file (also one that fails
    inside the ``with`` block, e.g. truncated data found while decoding) is a one-line
    AmnsegError naming it and the problem."""
    if not path.is_file():
        raise AmnsegError(f"{path}: image listed in the dataset but not found")
    try:
        with _open(path) as image:
            yield image
    except UnidentifiedImageError:
        raise AmnsegError(f"{path}: unreadable image (not an image format PIL can read)"
                          ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise AmnsegError(f"{path}: unreadable image ({_reason(exc)})") from None


@contextmanager
def _quiet_pil() -> Iterator[None]:
    """Without PIL's warnings about images of 89-179 megapixels (the run checks sizes itself,
    ``data.max_pixels``, with one line naming the file; PIL still refuses larger ones with a
    DecompressionBombError, which the callers report the same way) and about damaged EXIF
    blocks (common in camera files; they name neither the image nor a remedy, and PIL reads
    what it can, as viewers do)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL\.TiffImagePlugin")
        yield


def _open(path: Path) -> Image.Image:
    """``Image.open``, quiet as ``_quiet_pil`` says."""
    with _quiet_pil():
        return Image.open(path)


def _reason(exc: BaseException) -> str:
    """An exception as ``Name: first line of its message`` (or its name alone)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}{': ' + reason if reason else ''}"


EXIF_ORIENTATION = 0x0112  # the EXIF tag: 1 as stored, 2-8 mirrored and/or turned
QUARTER_TURNS = (5, 6, 7, 8)  # the orientations that swap width and height


def read_rgb(path: Path, exif_orientation: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or a one-line AmnsegError naming the file. ``exif_orientation``:
    turned and mirrored as the file's EXIF orientation tag says (as viewers show it)."""
    with opened_image(path) as image:
        if exif_orientation:
            with _quiet_pil():
                image = ImageOps.exif_transpose(image)
        return rgb_array(image, str(path))


def oriented_size(image: Image.Image, exif_orientation: bool = False) -> tuple[int, int]:
    """(H, W) of an open image, from its header; with ``exif_orientation``, as viewers show it
    (width and height swap for a quarter turn)."""
    if exif_orientation:
        with _quiet_pil():
            orientation = image.getexif().get(EXIF_ORIENTATION)
        if orientation in QUARTER_TURNS:
            return image.width, image.height
    return image.height, image.width


def read_size(path: Path, exif_orientation: bool = False) -> tuple[int, int]:
    """(H, W) of an image file from its header (turned as ``read_rgb`` turns it), or a
    one-line AmnsegError naming the file."""
    with opened_image(path) as image:
        return oriented_size(image, exif_orientation)


def read_index_png(path: Path) -> np.ndarray:
    """A label PNG as its indices: palette ("P") images give palette indices, never colours.
    16-bit index images are accepted when every value fits in 0..255; 1-bit ones (the binary
    masks of a one-class dataset) as 0 and 1."""
    if not path.is_file():
        raise AmnsegError(f"{path}: mask not found")
    try:
        with _open(path) as image:
            if image.mode not in ("P", "L", "1", *WIDE_INTEGER_MODES):
                raise AmnsegError(
                    f"{path}: mask must be an index PNG (mode P or L), found mode {image.mode}"
                )
            values = np.asarray(image)  # mode 1: booleans
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        raise AmnsegError(f"{path}: unreadable mask ({_reason(exc)})") from None
    if values.dtype != np.uint8 and (values.min(initial=0) < 0 or values.max(initial=0) > 255):
        raise AmnsegError(
            f"{path}: mask value {int(values.max())} does not fit a class index (0..255)"
        )
    return values.astype(np.uint8)


def check_mask_values(mask: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """``mask`` if every value is a class index (0..C) or 255 (ignored), else a one-line error
    naming ``source``."""
    values = np.unique(mask)
    bad = values[(values > num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise AmnsegError(
            f"{source}: mask value {int(bad[0])} is not a class (0..{num_classes}) or 255"
        )
    return mask


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot (C,) label of the foreground classes present in a mask."""
    label = np.zeros(num_classes, dtype=np.float32)
    present = np.unique(mask)
    present = present[(present >= 1) & (present <= num_classes)]
    label[present - 1] = 1.0
    return label


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise AmnsegError(f"{path}: {what} folder not found")
    return path


def check_stem(stem: str, where: str) -> str:
    """``stem`` if it is a plain file name (it names image and output files), else a one-line
    error naming ``where`` it came from: no folder separators, no "." or "..", no control
    characters."""
    if any(ord(ch) < 32 for ch in stem):
        raise AmnsegError(f"{where}: {stem!r} is not a plain image name (it holds a control "
                          "character)")
    if not stem or stem in (".", "..") or "/" in stem or "\\" in stem:
        raise AmnsegError(f"{where}: {stem!r} is not a plain image name (no folders allowed)")
    return stem


def read_split_file(path: Path) -> list[str]:
    """The image ids of a split list (first word of each non-empty line), each checked."""
    if not path.is_file():
        raise AmnsegError(f"{path}: split list not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is no part of an id
    except (UnicodeDecodeError, OSError) as exc:
        raise AmnsegError(f"{path}: unreadable split list ({exc.__class__.__name__})") from None
    stems: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        stem = check_stem(line.split()[0], f"{path}:{number}")
        if stem in first_line:
            # Listed twice, an image would weigh twice in training and in the mIoU.
            raise AmnsegError(f"{path}:{number}: image '{stem}' is listed twice (first on line "
                              f"{first_line[stem]})")
        first_line[stem] = number
        stems.append(stem)
    if not stems:
        raise AmnsegError(f"{path}: the split lists no image")
    return stems
