"""PASCAL VOC 2012 (with the SBD-augmented ``train_aug`` split), METHOD.md section 0.

Layout: ``root = .../VOCdevkit/VOC2012`` with ``JPEGImages/``, ``SegmentationClass/`` (palette
PNGs, read as indices), ``Annotations/*.xml``, ``ImageSets/Segmentation/<split>.txt`` and, for
``train_aug``, the SBD masks in ``SegmentationClassAug/`` (grayscale index PNGs).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from amnseg.data.base import (
    SegDataset,
    labels_from_mask,
    read_index_png,
    read_split_file,
    require_dir,
)
from amnseg.errors import AmnsegError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def voc_palette() -> list[int]:
    """The standard VOC colour map (256 entries, flat RGB list): the bits of each index are
    spread over the high bits of R, G and B."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [red, green, blue]
    return palette


class VOCDataset(SegDataset):
    def __init__(self, root: str | Path, split: str, aug_mask_dir: str = "SegmentationClassAug"):
        self.root = require_dir(Path(root), "VOC2012")
        self.class_names = list(VOC_CLASSES)
        self.image_dir = require_dir(self.root / "JPEGImages", "JPEGImages")
        self.stems = read_split_file(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")
        self.mask_dirs = [self.root / "SegmentationClass", self.root / aug_mask_dir]

    def image_path(self, stem: str) -> Path:
        return self.image_dir / f"{stem}.jpg"

    def mask_path(self, stem: str) -> Path | None:
        for folder in self.mask_dirs:
            path = folder / f"{stem}.png"
            if path.is_file():
                return path
        return None

    @property
    def has_masks(self) -> bool:
        return bool(self.stems) and all(self.mask_path(s) is not None for s in self.stems[:50])

    def label(self, stem: str) -> np.ndarray:
        path = self.mask_path(stem)
        if path is not None:
            return labels_from_mask(read_index_png(path), len(VOC_CLASSES))
        return self._label_from_xml(self.root / "Annotations" / f"{stem}.xml")

    def _label_from_xml(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise AmnsegError(f"{path}: no mask and no annotation for this image")
        try:
            tree = ElementTree.parse(path)
        except ElementTree.ParseError as exc:
            raise AmnsegError(f"{path}: unreadable annotation ({exc})") from None
        label = np.zeros(len(VOC_CLASSES), dtype=np.float32)
        for node in tree.getroot().iter("object"):
            name = (node.findtext("name") or "").strip()
            if name not in VOC_CLASSES:
                raise AmnsegError(f"{path}: unknown class '{name}'")
            label[VOC_CLASSES.index(name)] = 1.0
        return label
