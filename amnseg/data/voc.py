"""PASCAL VOC 2012 (with the SBD-augmented ``train_aug`` split), METHOD.md section 0.

Layout: ``root = .../VOCdevkit/VOC2012`` with ``JPEGImages/``, ``SegmentationClass/`` (palette
PNGs, read as indices, 255 = ignored object borders), ``Annotations/*.xml``,
``ImageSets/Segmentation/<split>.txt`` and, for ``train_aug``, the SBD masks in
``SegmentationClassAug/`` (grayscale index PNGs) plus ``ImageSets/Segmentation/train_aug.txt``.

Images are keyed by their stem string (``2007_000032``), never by an integer parse of it.
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
_CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}


def voc_palette() -> list[int]:
    """The standard VOC colour map as a flat ``[r0, g0, b0, r1, ...]`` list of 768 ints.

    Bits 0, 1, 2 of an index go to R, G, B respectively, bits 3, 4, 5 to the next lower bit of
    R, G, B, and so on, starting from bit 7 of each channel: index 1 -> (128, 0, 0),
    index 255 -> (224, 224, 192).
    """
    palette: list[int] = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [red, green, blue]
    return palette


DEFAULT_AUG_MASK_DIR = "SegmentationClassAug"


class VOCDataset(SegDataset):
    """VOC 2012 images of one split.

    Masks: ``SegmentationClass/<stem>.png`` when it exists, else ``<aug_mask_dir>/<stem>.png``
    (relative to ``root`` unless absolute), else none. Labels: (20,) multi-hot from the mask's
    values when there is a mask, else from the object names of ``Annotations/<stem>.xml``.
    """

    def __init__(
        self, root: str | Path, split: str, aug_mask_dir: str = DEFAULT_AUG_MASK_DIR
    ) -> None:
        self.root = require_dir(Path(root), "VOC2012")
        self.split = split
        self.class_names = list(VOC_CLASSES)
        if not (self.root / "JPEGImages").is_dir() and (self.root / "labels.csv").is_file():
            raise AmnsegError(f"{self.root}: has labels.csv but no JPEGImages folder: a folder "
                              "dataset, read with data.kind=folder")
        self.image_dir = require_dir(self.root / "JPEGImages", "JPEGImages")
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if split == "train_aug" and not split_file.is_file():
            # The one list VOC itself does not ship: say where it is expected.
            raise AmnsegError(
                f"{split_file}: split list not found (train_aug.txt, the 10,582 SBD-augmented "
                "training images, is looked for in ImageSets/Segmentation/)"
            )
        self.stems = read_split_file(split_file)
        # Path("/abs") on the right of "/" wins, so an absolute aug_mask_dir works as it is.
        self.mask_dirs = [self.root / "SegmentationClass", self.root / aug_mask_dir]
        if aug_mask_dir != DEFAULT_AUG_MASK_DIR and not self.mask_dirs[1].is_dir():
            # Without SBD's default folder labels come from the XML files; a folder named on
            # purpose and not found is a mistake, not a choice.
            raise AmnsegError(f"{self.mask_dirs[1]}: mask folder not found "
                              f"(data.aug_mask_dir={aug_mask_dir})")
        self._labels: dict[str, np.ndarray] = {}  # a mask is read once for its label

    def image_path(self, stem: str) -> Path:
        return self.image_dir / f"{stem}.jpg"

    def mask_path(self, stem: str) -> Path | None:
        for folder in self.mask_dirs:
            path = folder / f"{stem}.png"
            if path.is_file():
                return path
        return None

    def missing_masks(self) -> list[Path]:
        found = next((path for path in map(self.mask_path, self.stems) if path is not None), None)
        if found is None:
            return []
        # Named in the folder where this split's masks are (the first one found says which).
        return [found.parent / f"{stem}.png" for stem in self.stems
                if self.mask_path(stem) is None]

    def source_files(self, stem: str) -> list[Path]:
        mask = self.mask_path(stem)
        return [self.image_path(stem), mask or self.root / "Annotations" / f"{stem}.xml"]

    def shared_files(self) -> list[Path]:
        return [self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"]

    def label(self, stem: str) -> np.ndarray:
        """(20,) float32 multi-hot."""
        if stem not in self._labels:
            path = self.mask_path(stem)
            if path is not None:
                self._labels[stem] = labels_from_mask(read_index_png(path), len(VOC_CLASSES))
            else:
                self._labels[stem] = self._label_from_xml(self.root / "Annotations" / f"{stem}.xml")
        return self._labels[stem].copy()

    @staticmethod
    def _label_from_xml(path: Path) -> np.ndarray:
        if not path.is_file():
            raise AmnsegError(f"{path}: no mask and no annotation for this image")
        try:
            tree = ElementTree.parse(path)
        except ElementTree.ParseError as exc:
            raise AmnsegError(f"{path}: unreadable annotation ({exc})") from None
        label = np.zeros(len(VOC_CLASSES), dtype=np.float32)
        # Only top-level <object> names: person objects hold <part><name>head</name></part>.
        for node in tree.getroot().findall("object"):
            name = (node.findtext("name") or "").strip()
            if name not in _CLASS_INDEX:
                raise AmnsegError(f"{path}: unknown class '{name}' (not a VOC class)")
            label[_CLASS_INDEX[name]] = 1.0
        return label
