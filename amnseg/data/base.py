"""The one dataset interface every source (VOC, COCO, folder, demo) implements.

A dataset is a list of image stems (file names without extension, kept as strings) with, for
each stem, an RGB image, a multi-hot image-level label over the C foreground classes, and
optionally a ground-truth mask (uint8: 0 background, 1..C classes, 255 ignored).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from amnseg.errors import AmnsegError

IGNORE_INDEX = 255


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> Sample:
        stem = self.stems[index]
        image = self.image(stem)
        mask = self.mask(stem)
        if mask is not None and mask.shape != image.shape[:2]:
            raise AmnsegError(
                f"{self.mask_source(stem)}: mask size {mask.shape[1]}x{mask.shape[0]} "
                f"differs from image size {image.shape[1]}x{image.shape[0]}"
            )
        return Sample(stem=stem, image=image, label=self.label(stem), mask=mask)

    @abstractmethod
    def image_path(self, stem: str) -> Path:
        """Path of the image file of ``stem``."""

    def image(self, stem: str) -> np.ndarray:
        return read_rgb(self.image_path(stem))

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
        return None if path is None else read_index_png(path)

    @property
    def has_masks(self) -> bool:
        return bool(self.stems) and self.mask_path(self.stems[0]) is not None

    def index_of(self, stem: str) -> int:
        if not hasattr(self, "_index"):
            self._index = {s: i for i, s in enumerate(self.stems)}
        return self._index[stem]


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or a one-line AmnsegError naming the file."""
    if not path.is_file():
        raise AmnsegError(f"{path}: image listed in the dataset but not found")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise AmnsegError(f"{path}: unreadable image ({exc.__class__.__name__})") from None


def read_index_png(path: Path) -> np.ndarray:
    """A label PNG as its indices: palette ("P") images give palette indices, never colours."""
    if not path.is_file():
        raise AmnsegError(f"{path}: mask not found")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I;16", "I"):
                raise AmnsegError(
                    f"{path}: mask must be an index PNG (mode P or L), found mode {image.mode}"
                )
            return np.array(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise AmnsegError(f"{path}: unreadable mask ({exc.__class__.__name__})") from None


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


def read_split_file(path: Path) -> list[str]:
    if not path.is_file():
        raise AmnsegError(f"{path}: split list not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
