"""MS COCO 2014 from the instance annotation JSON (pycocotools), METHOD.md section 0.

Layout: ``root/<split folder>/`` images (``train2014``, ``val2014``; the split names ``train``
and ``val`` map to them, any other name is taken as the folder name) and
``root/annotations/instances_<split folder>.json``.

- Classes: category ids (1..90, with gaps) map to classes 1..80 in ascending id order; the
  names are the JSON's category names.
- Images: every image of the JSON, sorted by file name, keyed by the file name's stem; images
  without annotations are kept (empty label, all-background mask).
- Labels: (80,) multi-hot of the categories of the image's annotations, crowd annotations
  included (a crowd of people still means "person" is in the image).
- Masks (when no ``semantic_dir``): painted from the instances, larger areas first (ties by
  annotation id) so that a smaller object lying on a larger one stays visible. Crowd regions
  become 255 (ignored) wherever no non-crowd instance covers them: their pixels are a mix of
  the class and background, so scoring them either way would be wrong.
- With ``semantic_dir``, masks are read from ``<semantic_dir>/<stem>.png`` instead.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from amnseg.data.base import (
    IGNORE_INDEX,
    SegDataset,
    check_class_count,
    check_mask_values,
    check_stem,
    read_index_png,
    require_dir,
)
from amnseg.errors import AmnsegError

# The 80 COCO categories in ascending category-id order (class 1 = person, ..., 80 = toothbrush).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
SPLIT_FOLDERS = {"train": "train2014", "val": "val2014"}


class COCODataset(SegDataset):
    """COCO images of one split with labels and masks from the instance annotations."""

    def __init__(
        self, root: str | Path, split: str, semantic_dir: str | Path | None = None
    ) -> None:
        from pycocotools.coco import COCO  # imported here: only COCO users pay for it

        self.root = require_dir(Path(root), "COCO")
        self.split = split
        folder = SPLIT_FOLDERS.get(split, split)
        self.image_dir = require_dir(self.root / folder, f"COCO {folder} image")
        self.annotation_file = self.root / "annotations" / f"instances_{folder}.json"
        if not self.annotation_file.is_file():
            raise AmnsegError(f"{self.annotation_file}: COCO annotation file not found")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(self.annotation_file))
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            # JSONDecodeError is a ValueError; COCO asserts the top level is an object.
            reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise AmnsegError(
                f"{self.annotation_file}: not a COCO instance annotation file ({reason})"
            ) from None
        self._check_fields()
        categories = sorted(self.coco.getCatIds())
        self.category_to_class = {cat: i + 1 for i, cat in enumerate(categories)}
        self.class_names = [str(self.coco.cats[cat]["name"]) for cat in categories]
        images = sorted(self.coco.imgs.values(), key=lambda info: info["file_name"])
        self._info: dict[str, dict[str, Any]] = {}
        for info in images:
            name = check_stem(str(info.get("file_name", "")),
                              f"{self.annotation_file} (image id {info.get('id')})")
            stem = Path(name).stem
            if stem in self._info:
                raise AmnsegError(
                    f"{self.annotation_file}: two images share the name '{stem}' "
                    f"(ids {self._info[stem]['id']} and {info['id']})"
                )
            self._info[stem] = info
        self.stems = list(self._info)
        if not self.coco.anns:
            raise AmnsegError(f"{self.annotation_file}: no annotations (the image labels and "
                              "masks come from them)")
        self.semantic_dir = Path(semantic_dir) if semantic_dir else None
        if self.semantic_dir is not None:
            require_dir(self.semantic_dir, "COCO semantic mask")

    def _check_fields(self) -> None:
        """The fields amnseg reads, checked once (pycocotools assumes them): a file edited by
        hand or exported by another tool gets one line naming what is wrong."""
        where = self.annotation_file
        if not self.coco.cats:
            raise AmnsegError(f"{where}: no categories (a COCO file lists its classes there)")
        names: dict[str, Any] = {}
        for cat_id, category in self.coco.cats.items():
            name = category.get("name")
            if not isinstance(name, str) or not name.strip():
                raise AmnsegError(f"{where}: category id {cat_id} has no name")
            if name in names:
                raise AmnsegError(f"{where}: categories {names[name]} and {cat_id} are both "
                                  f"named '{name}'")
            names[name] = cat_id
        check_class_count(len(names), where)
        for info in self.coco.imgs.values():
            if not isinstance(info.get("file_name"), str):  # an empty one: check_stem
                raise AmnsegError(f"{where}: image id {info.get('id')} has no file_name")
            size = (info.get("height"), info.get("width"))
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
                raise AmnsegError(f"{where}: image id {info.get('id')} "
                                  f"({info.get('file_name')}) has no valid height and width")
        for annotation in self.coco.anns.values():
            image = self.coco.imgs.get(annotation.get("image_id"), {})
            problem = (_segmentation_problem(annotation.get("segmentation"),
                                             (image.get("height"), image.get("width")))
                       or _field_problem(annotation))
            if problem:
                raise AmnsegError(f"{where}: annotation {annotation.get('id')}: {problem}")

    def declared_size(self, stem: str) -> tuple[int, int]:
        info = self._info[stem]
        return info["height"], info["width"]

    def image_path(self, stem: str) -> Path:
        return self.image_dir / self._info[stem]["file_name"]

    def _annotations(self, stem: str) -> list[dict[str, Any]]:
        return self.coco.imgToAnns.get(self._info[stem]["id"], [])

    def label(self, stem: str) -> np.ndarray:
        """(80,) float32 multi-hot, from the annotations (crowd ones included)."""
        label = np.zeros(len(self.class_names), dtype=np.float32)
        for annotation in self._annotations(stem):
            label[self._class_of(annotation) - 1] = 1.0
        return label

    def _class_of(self, annotation: dict[str, Any]) -> int:
        cls = self.category_to_class.get(annotation["category_id"])
        if cls is None:
            raise AmnsegError(
                f"{self.annotation_file}: annotation {annotation.get('id')} has category id "
                f"{annotation['category_id']}, which is not in the file's categories"
            )
        return cls

    def mask_path(self, stem: str) -> Path | None:
        return self.semantic_dir / f"{stem}.png" if self.semantic_dir else None

    def mask_source(self, stem: str) -> str:
        if self.semantic_dir is not None:
            return str(self.semantic_dir / f"{stem}.png")
        return f"{self.annotation_file} (image {self._info[stem]['file_name']})"

    @property
    def has_masks(self) -> bool:
        return bool(self.stems)  # always: built from the annotations when not given

    def shared_files(self) -> list[Path]:
        return [self.annotation_file]

    def mask(self, stem: str) -> np.ndarray:
        """(H, W) uint8: 0 background, 1..80 classes, 255 crowd (see the module docstring)."""
        if self.semantic_dir is not None:
            path = self.semantic_dir / f"{stem}.png"
            return check_mask_values(read_index_png(path), self.num_classes, str(path))
        info = self._info[stem]
        mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        crowd = np.zeros(mask.shape, dtype=bool)
        ordered = sorted(self._annotations(stem), key=lambda a: (-a.get("area", 0), a["id"]))
        for annotation in ordered:
            with warnings.catch_warnings():
                # pycocotools' decoder trips a numpy 2 DeprecationWarning on every call.
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    region = self.coco.annToMask(annotation).astype(bool)
                except (ValueError, TypeError) as exc:  # a compressed RLE that does not decode
                    raise AmnsegError(f"{self.annotation_file}: annotation "
                                      f"{annotation.get('id')}: its segmentation does not "
                                      f"decode ({exc})") from None
            if region.shape != mask.shape:  # an RLE whose "size" disagrees with the image
                raise AmnsegError(
                    f"{self.annotation_file}: annotation {annotation.get('id')} is "
                    f"{region.shape[1]}x{region.shape[0]}, its image {info['file_name']} is "
                    f"{mask.shape[1]}x{mask.shape[0]}"
                )
            if annotation.get("iscrowd", 0):
                crowd |= region
            else:
                mask[region] = self._class_of(annotation)
        mask[crowd & (mask == 0)] = IGNORE_INDEX
        return mask


def _segmentation_problem(segmentation: Any, image_size: tuple[Any, Any]) -> str | None:
    """What is wrong with an annotation's ``segmentation`` (polygons: lists of at least 3
    x, y pairs; or an RLE: ``counts`` and ``size``, an uncompressed one's run lengths adding
    up to its size), None when nothing is."""
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            return "an RLE segmentation needs counts and size"
        size, counts = segmentation["size"], segmentation["counts"]
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
            return "an RLE's size must be [height, width]"
        if image_size[0] is not None and tuple(size) != tuple(image_size):
            return f"an RLE of size {size[0]}x{size[1]} for an image of {image_size[0]}x" \
                   f"{image_size[1]} (height x width)"
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in counts):
                return "an RLE's counts must be run lengths (non-negative integers)"
            if sum(counts) != size[0] * size[1]:
                return f"an RLE's run lengths add up to {sum(counts)}, not to its " \
                       f"{size[0]}x{size[1]} pixels"
        elif not isinstance(counts, str):
            return "an RLE's counts must be run lengths or a compressed string"
        return None
    if not isinstance(segmentation, list) or not segmentation:
        return "no segmentation (polygons or an RLE)"
    for polygon in segmentation:
        if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                or not all(isinstance(v, (int, float)) for v in polygon)):
            return "a polygon must list at least 3 x, y pairs of numbers"
    return None


def _field_problem(annotation: dict[str, Any]) -> str | None:
    """What is wrong with the fields besides the segmentation that amnseg reads."""
    if "category_id" not in annotation:
        return "no category_id"
    area = annotation.get("area", 0)
    if not isinstance(area, (int, float)) or isinstance(area, bool):
        return f"area {area!r} is not a number"
    if annotation.get("iscrowd", 0) not in (0, 1):  # True and False are 1 and 0
        return f"iscrowd {annotation['iscrowd']!r} is not 0 or 1"
    return None
