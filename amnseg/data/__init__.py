"""Datasets (VOC, COCO, the user's own folder, the built-in demo) and transforms."""

from __future__ import annotations

from typing import TYPE_CHECKING

from amnseg.data.base import SegDataset
from amnseg.errors import AmnsegError

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
    if kind == "voc":
        from amnseg.data.voc import VOCDataset

        return VOCDataset(data_config.root, split, data_config.aug_mask_dir)
    if kind == "coco":
        from amnseg.data.coco import COCODataset

        return COCODataset(data_config.root, split, data_config.semantic_dir)
    if kind == "folder":
        from amnseg.data.folder import FolderDataset

        return FolderDataset(data_config.root, split)
    raise AmnsegError(f"data.kind={kind!r}: unknown dataset kind, expected one of "
                      f"{', '.join(DATASET_KINDS)}")
