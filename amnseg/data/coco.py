"""MS COCO 2014 from the instance annotation JSON (pycocotools), METHOD.md section 0.

Layout: ``root/<split folder>/`` images (``train2014``, ``val2014``; the split names ``train``
and ``val`` map to them) and ``root/annotations/instances_<split folder>.json``. Category ids
(1..90, with gaps) map to classes 1..80 in ascending id order. Semantic masks are painted from
the instances, larger instances first so that smaller objects lying on them stay visible;
crowd regions are marked 255 (ignored). Images without annotations are kept (empty label, all
background). With ``semantic_dir`` the masks are read from ``<semantic_dir>/<stem>.png``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from amnseg.data.base import SegDataset, read_index_png, require_dir
from amnseg.errors import AmnsegError

SPLIT_FOLDERS = {"train": "train2014", "val": "val2014"}


class COCODataset(SegDataset):
    def __init__(self, root: str | Path, split: str, semantic_dir: str | None = None):
        from pycocotools.coco import COCO

        self.root = require_dir(Path(root), "COCO")
        folder = SPLIT_FOLDERS.get(split, split)
        self.image_dir = require_dir(self.root / folder, f"COCO {folder} image")
        annotation = self.root / "annotations" / f"instances_{folder}.json"
        if not annotation.is_file():
            raise AmnsegError(f"{annotation}: COCO annotation file not found")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(annotation))
        except (ValueError, KeyError) as exc:
            raise AmnsegError(f"{annotation}: not a COCO instance file ({exc})") from None
        categories = sorted(self.coco.getCatIds())
        self.category_to_class = {cat: i + 1 for i, cat in enumerate(categories)}
        self.class_names = [self.coco.loadCats(cat)[0]["name"] for cat in categories]
        images = sorted(self.coco.imgs.values(), key=lambda info: info["file_name"])
        self.stems = [Path(info["file_name"]).stem for info in images]
        self._info = {Path(info["file_name"]).stem: info for info in images}
        self.semantic_dir = Path(semantic_dir) if semantic_dir else None

    def image_path(self, stem: str) -> Path:
        return self.image_dir / self._info[stem]["file_name"]

    def _annotations(self, stem: str) -> list[dict]:
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=self._info[stem]["id"]))

    def label(self, stem: str) -> np.ndarray:
        label = np.zeros(len(self.class_names), dtype=np.float32)
        for annotation in self._annotations(stem):
            if not annotation.get("iscrowd", 0):
                label[self.category_to_class[annotation["category_id"]] - 1] = 1.0
        return label

    def mask_path(self, stem: str) -> Path | None:
        return self.semantic_dir / f"{stem}.png" if self.semantic_dir else None

    @property
    def has_masks(self) -> bool:
        return bool(self.stems)

    def mask(self, stem: str) -> np.ndarray:
        if self.semantic_dir is not None:
            return read_index_png(self.semantic_dir / f"{stem}.png")
        info = self._info[stem]
        mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        annotations = sorted(self._annotations(stem), key=lambda a: -a.get("area", 0))
        crowd = np.zeros_like(mask, dtype=bool)
        for annotation in annotations:
            region = self.coco.annToMask(annotation).astype(bool)
            if annotation.get("iscrowd", 0):
                crowd |= region
            else:
                mask[region] = self.category_to_class[annotation["category_id"]]
        mask[crowd & (mask == 0)] = 255
        return mask
