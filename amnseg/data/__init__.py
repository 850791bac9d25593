"""Datasets (VOC, COCO, the user's own folder, the built-in demo) and transforms."""

from __future__ import annotations

from amnseg.data.base import SegDataset
from amnseg.errors import AmnsegError

DATASET_KINDS = ("voc", "coco", "folder")


def build_dataset(data_config, split: str) -> SegDataset:
    """The dataset of ``data_config.kind`` (voc | coco | folder) for ``split``."""
    kind = data_config.kind
    if kind == "voc":
        from amnseg.data.voc import VOCDataset

        return VOCDataset(data_config.root, split, data_config.aug_mask_dir)
    if kind == "coco":
        from amnseg.data.coco import COCODataset

        return COCODataset(data_config.root, split, data_config.semantic_dir)
    if kind == "folder":
        from amnseg.data.folder import FolderDataset

        return FolderDataset(data_config.root, split)
    raise AmnsegError(f"data.kind={kind!r}: expected one of {', '.join(DATASET_KINDS)}")
