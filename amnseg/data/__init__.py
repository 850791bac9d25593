"""Datasets (VOC, COCO, the user's own folder, the built-in demo) and transforms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from amnseg.data.base import SegDataset
from amnseg.errors import AmnsegError
from amnseg.io import load_json
from amnseg.layout import skipped_images_path

if TYPE_CHECKING:
    from amnseg.config import DataConfig

DATASET_KINDS = ("voc", "coco", "folder")


def build_dataset(data_config: DataConfig, split: str) -> SegDataset:
    """The dataset of ``data_config.kind`` for ``split``.

    ``voc``: PASCAL VOC 2012, ``coco``: MS COCO 2014, ``folder``: the user's own data in the
    folder format (also what the built-in demo writes). Imports are lazy so that, e.g., VOC
    users never import pycocotools.
    """
    kind = data_config.kind
    dataset: SegDataset
    if kind == "voc":
        from amnseg.data.voc import VOCDataset

        dataset = VOCDataset(data_config.root, split, data_config.aug_mask_dir)
    elif kind == "coco":
        from amnseg.data.coco import COCODataset

        dataset = COCODataset(data_config.root, split, data_config.semantic_dir)
    elif kind == "folder":
        from amnseg.data.folder import FolderDataset

        dataset = FolderDataset(data_config.root, split)
    else:
        raise AmnsegError(f"data.kind={kind!r}: unknown dataset kind, expected one of "
                          f"{', '.join(DATASET_KINDS)}")
    dataset.exif_orientation = data_config.exif_orientation
    return dataset


class SplitUnion(SegDataset):
    """The images of several splits of one dataset, each once: the first split's images in its
    order, then those of the next split that are not in it yet, and so on."""

    def __init__(self, parts: list[SegDataset]) -> None:
        self.class_names = list(parts[0].class_names)
        for part in parts[1:]:
            if list(part.class_names) != self.class_names:
                raise AmnsegError(
                    f"{getattr(part, 'root', '')}: split {getattr(part, 'split', '?')!r} has "
                    "other classes than the first split"
                )
        self.root = getattr(parts[0], "root", None)
        self.exif_orientation = parts[0].exif_orientation
        self.split = "+".join(str(getattr(part, "split", "?")) for part in parts)
        self._parts = parts
        self._owner: dict[str, SegDataset] = {}
        self.stems = []
        for part in parts:
            for stem in part.stems:
                if stem not in self._owner:
                    self._owner[stem] = part
                    self.stems.append(stem)

    def image_path(self, stem: str) -> Path:
        return self._owner[stem].image_path(stem)

    def image(self, stem: str) -> np.ndarray:
        return self._owner[stem].image(stem)

    def label(self, stem: str) -> np.ndarray:
        return self._owner[stem].label(stem)

    def mask_path(self, stem: str) -> Path | None:
        return self._owner[stem].mask_path(stem)

    def mask_source(self, stem: str) -> str:
        return self._owner[stem].mask_source(stem)

    def mask(self, stem: str) -> np.ndarray | None:
        return self._owner[stem].mask(stem)

    @property
    def has_masks(self) -> bool:
        return any(part.has_masks for part in self._parts)

    def missing_masks(self) -> list[Path]:
        return [path for part in self._parts for path in part.missing_masks()]

    def source_files(self, stem: str) -> list[Path]:
        return self._owner[stem].source_files(stem)

    def shared_files(self) -> list[Path]:
        return [path for part in self._parts for path in part.shared_files()]


def build_splits(data_config: DataConfig, splits: list[str]) -> SegDataset:
    """The images of ``splits`` (each image once, in split order) as one dataset."""
    unique = list(dict.fromkeys(splits))
    if len(unique) == 1:
        return build_dataset(data_config, unique[0])
    return SplitUnion([build_dataset(data_config, split) for split in unique])


def skipped_images(config: Any) -> dict[str, str]:
    """{stem: why} of the images the run in ``config.run_dir`` leaves out (none by default)."""
    path = skipped_images_path(config)
    if not path.is_file():
        return {}
    skipped = load_json(path, dict)
    if not all(isinstance(why, str) for why in skipped.values()):
        raise AmnsegError(f"{path}: expected image names and the reason each is skipped; "
                          "delete it to check the images again")
    return skipped


def run_dataset(config: Any, split: str) -> SegDataset:
    """The dataset of ``split`` as a run sees it: without the images it skips."""
    return build_dataset(config.data, split).without(skipped_images(config))


def run_splits(config: Any, splits: list[str]) -> SegDataset:
    """The images of ``splits`` (each once) as a run sees them: without the images it skips."""
    return build_splits(config.data, splits).without(skipped_images(config))
