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
- The file is checked when it is opened (ids, image sizes, categories, every segmentation's
  coordinates and run lengths): pycocotools trusts it, and crashes, drops entries or paints
  random masks where it is wrong; a wrong file is one line naming it and the problem.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
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
from amnseg.io import file_sha256

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

        self.root = require_dir(Path(root), "COCO")
        self.split = split
        folder = SPLIT_FOLDERS.get(split, split)
        self.image_dir = require_dir(self.root / folder, f"COCO {folder} image")
        self.annotation_file = self.root / "annotations" / f"instances_{folder}.json"
        if not self.annotation_file.is_file():
            raise AmnsegError(f"{self.annotation_file}: COCO annotation file not found")
        opened = _open_annotations(self.annotation_file)
        self.coco = opened.coco
        self.category_to_class = opened.category_to_class
        self.class_names = list(opened.class_names)
        self._info = opened.info
        self.stems = list(opened.info)
        self.semantic_dir = Path(semantic_dir) if semantic_dir else None
        if self.semantic_dir is not None:
            require_dir(self.semantic_dir, "COCO semantic mask")

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
            label[self.category_to_class[annotation["category_id"]] - 1] = 1.0
        return label

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
            # Every segmentation decodes to the image's size: _check_fields saw to that.
            with warnings.catch_warnings():
                # pycocotools' decoder trips a numpy 2 DeprecationWarning on every call.
                warnings.simplefilter("ignore", DeprecationWarning)
                region = self.coco.annToMask(annotation).astype(bool)
            if annotation.get("iscrowd", 0):
                crowd |= region
            else:
                mask[region] = self.category_to_class[annotation["category_id"]]
        mask[crowd & (mask == 0)] = IGNORE_INDEX
        return mask


@dataclass(frozen=True)
class _Annotations:
    """What a dataset reads from its annotation file (shared: never modified)."""

    coco: Any  # pycocotools.coco.COCO
    category_to_class: dict[int, int]
    class_names: tuple[str, ...]
    info: dict[str, dict[str, Any]]  # image entries by file-name stem, sorted by file name


# The annotation files opened in this process, by content (SHA-256: 0.6 s for train2014's
# file, which takes tens of seconds to parse and check; a run opens each split dozens of times,
# in every stage and check). Two are kept: a run's train and val files.
_OPENED: OrderedDict[str, _Annotations] = OrderedDict()
_OPENED_MAX = 2


def _open_annotations(annotation_file: Path) -> _Annotations:
    """The annotation file parsed (pycocotools) and checked; from ``_OPENED`` when seen."""
    from pycocotools.coco import COCO  # imported here: only COCO users pay for it

    try:
        key = file_sha256(annotation_file)
    except OSError as exc:
        raise AmnsegError(f"{annotation_file}: unreadable ({exc.strerror or exc})") from None
    if key in _OPENED:
        _OPENED.move_to_end(key)
        return _OPENED[key]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(annotation_file))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        # JSONDecodeError is a ValueError; COCO asserts the top level is an object.
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise AmnsegError(
            f"{annotation_file}: not a COCO instance annotation file ({reason})"
        ) from None
    _check_fields(annotation_file, coco.dataset)
    categories = sorted(coco.getCatIds())
    info: dict[str, dict[str, Any]] = {}
    for entry in sorted(coco.imgs.values(), key=lambda entry: entry["file_name"]):
        name = check_stem(str(entry.get("file_name", "")),
                          f"{annotation_file} (image id {entry.get('id')})")
        stem = Path(name).stem
        if stem in info:
            raise AmnsegError(
                f"{annotation_file}: two images share the name '{stem}' "
                f"(ids {info[stem]['id']} and {entry['id']})"
            )
        info[stem] = entry
    if not coco.anns:
        raise AmnsegError(f"{annotation_file}: no annotations (the image labels and "
                          "masks come from them)")
    opened = _Annotations(coco, {cat: i + 1 for i, cat in enumerate(categories)},
                          tuple(str(coco.cats[cat]["name"]) for cat in categories), info)
    _OPENED[key] = opened
    while len(_OPENED) > _OPENED_MAX:
        _OPENED.popitem(last=False)
    return opened


def _check_fields(where: Path, data: dict[str, Any]) -> None:
    """The fields amnseg reads, checked once (pycocotools assumes them): a file edited by
    hand or exported by another tool gets one line naming what is wrong. The lists are
    read as written, not through pycocotools' dicts, which keep only the last entry of a
    repeated id. Plain loops, no mask decoding: opening train2014 stays quick."""
    categories, images = data.get("categories"), data.get("images")
    problem = _categories_problem(categories) or _images_problem(images)
    if problem:
        raise AmnsegError(f"{where}: {problem}")
    check_class_count(len(categories), where)
    category_ids = {category["id"] for category in categories}
    sizes = {info["id"]: (info["height"], info["width"]) for info in images}
    annotations = data.get("annotations") or []  # none: refused once the images are read
    problem = _id_problem(annotations, "annotation")
    if problem:
        raise AmnsegError(f"{where}: {problem}")
    for annotation in annotations:
        problem = _annotation_problem(annotation, sizes, category_ids)
        if problem:
            raise AmnsegError(f"{where}: annotation {annotation['id']}: {problem}")


def _is_int(value: Any) -> bool:
    """A JSON integer (bool is an int subclass in Python, but true is no id)."""
    return type(value) is int


def _id_problem(entries: list[dict[str, Any]], kind: str) -> str | None:
    """Ids must be integers (pycocotools sorts them, and amnseg orders annotations by them)
    and unique (pycocotools keys its dicts by id: a repeated one silently drops an entry)."""
    seen: set[int] = set()
    for entry in entries:  # pycocotools' index has checked that every entry has an "id"
        value = entry["id"]
        if not _is_int(value):
            return f"{kind} id {value!r} is not an integer"
        if value in seen:
            return f"{kind} id {value} is listed twice"
        seen.add(value)
    return None


def _categories_problem(categories: Any) -> str | None:
    """What is wrong with the ``categories`` list (integer ids, each once, distinct names)."""
    if not isinstance(categories, list) or not categories:
        return "no categories (a COCO file lists its classes there)"
    problem = _id_problem(categories, "category")
    if problem:
        return problem
    names: dict[str, int] = {}
    for category in categories:
        cat_id, name = category["id"], category.get("name")
        if not isinstance(name, str) or not name.strip():
            return f"category id {cat_id} has no name"
        if name in names:
            return f"categories {names[name]} and {cat_id} are both named '{name}'"
        names[name] = cat_id
    return None


def _images_problem(images: Any) -> str | None:
    """What is wrong with the ``images`` list (integer ids, each once, a file name, a size)."""
    if not isinstance(images, list) or not images:
        return "lists no images"
    problem = _id_problem(images, "image")
    if problem:
        return problem
    for info in images:
        if not isinstance(info.get("file_name"), str):  # an empty one: check_stem
            return f"image id {info['id']} has no file_name"
        if not all(_is_int(v) and v > 0 for v in (info.get("height"), info.get("width"))):
            return f"image id {info['id']} ({info['file_name']}) has no valid height and width"
    return None


def _annotation_problem(
    annotation: dict[str, Any], sizes: dict[int, tuple[int, int]], category_ids: set[int]
) -> str | None:
    """What is wrong with one annotation, given the (height, width) of each image id and the
    category ids: pycocotools silently drops an annotation whose image_id matches no image
    (the image then looks empty), and amnseg's labels need a known category."""
    # pycocotools' index has checked that both fields are there (with categories listed).
    image_id, category_id = annotation["image_id"], annotation["category_id"]
    if not _is_int(image_id):
        return f"image_id {image_id!r} is not an integer"
    if image_id not in sizes:
        return f"image_id {image_id} matches no image"
    if not _is_int(category_id):
        return f"category_id {category_id!r} is not an integer"
    if category_id not in category_ids:
        return f"category_id {category_id} is not in the file's categories"
    return _segmentation_problem(annotation.get("segmentation"), sizes[image_id]) \
        or _field_problem(annotation)


def _segmentation_problem(segmentation: Any, image_size: tuple[int, int]) -> str | None:
    """What is wrong with an annotation's ``segmentation`` on its (height, width) image:
    polygons must be lists of at least 3 x, y pairs, near the image; an RLE needs ``counts``
    (run lengths, or COCO's compressed string of them) adding up to its ``size``, the
    image's. pycocotools checks none of this: it crashes, or paints from memory it never
    filled."""
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, image_size)
    if not isinstance(segmentation, list) or not segmentation:
        return "no segmentation (polygons or an RLE)"
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            return "a polygon must list at least 3 x, y pairs of numbers"
        problem = _coordinates_problem(polygon, image_size)
        if problem:
            return problem
    return None


def _coordinates_problem(polygon: list[Any], image_size: tuple[int, int]) -> str | None:
    """A polygon's coordinates must be finite numbers within ten times the image's larger side
    either way: pycocotools scales them into C ints and walks every pixel of every edge, so
    NaN, infinity or 1e9 segfaults it or exhausts the memory."""
    height, width = image_size
    reach = 10 * max(height, width)  # one bound for x and y: one pass of min and max
    try:
        # sum, min and max each loop in C (COCO has tens of millions of coordinates). sum
        # fails on what is not a number (a string, null, a list) and is NaN or infinite
        # where a value is; NaN compares false, so min and max alone could step over one.
        if math.isfinite(sum(polygon)) and -reach <= min(polygon) and max(polygon) <= reach:
            return None
    except (TypeError, OverflowError):  # OverflowError: an integer too large for a float
        pass
    for index, value in enumerate(polygon):  # the slow way, to name the first bad value
        axis = "xy"[index % 2]
        if not isinstance(value, (int, float)):
            return f"a polygon's {axis} coordinate {value!r} is not a number"
        if isinstance(value, float) and not math.isfinite(value):
            return f"a polygon's {axis} coordinate {value!r} is not a finite number"
        if not -reach <= value <= reach:
            return f"a polygon's {axis} coordinate {value!r} is far outside its " \
                   f"{width}x{height} image"
    return None  # not reached: a failed fast test has a bad value


def _rle_problem(rle: dict[str, Any], image_size: tuple[int, int]) -> str | None:
    """What is wrong with an RLE segmentation (see :func:`_segmentation_problem`)."""
    if "counts" not in rle or "size" not in rle:
        return "an RLE segmentation needs counts and size"
    size, counts = rle["size"], rle["counts"]
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size):
        return "an RLE's size must be [height, width]"
    if tuple(size) != image_size:
        return f"an RLE of size {size[0]}x{size[1]} for an image of {image_size[0]}x" \
               f"{image_size[1]} (height x width)"
    if isinstance(counts, str):
        runs = _decode_rle_string(counts)
        if runs is None:
            return "its segmentation does not decode (counts is not a COCO compressed RLE)"
    elif isinstance(counts, list):
        # set and min loop in C: a crowd's counts run to thousands of values.
        if set(map(type, counts)) - {int} or min(counts, default=0) < 0:
            return "an RLE's counts must be run lengths (non-negative integers)"
        runs = counts
    else:
        return "an RLE's counts must be run lengths or a compressed string"
    # Fewer pixels leave part of the decoded mask unwritten (random), more overrun it.
    if sum(runs) != size[0] * size[1]:
        return f"an RLE's run lengths add up to {sum(runs)}, not to its " \
               f"{size[0]}x{size[1]} pixels"
    return None


def _decode_rle_string(counts: str) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string, as pycocotools' ``rleFrString`` reads
    them, or None where the string is not one that its encoder could have written.

    Each value is written in 5-bit groups, least significant first, each group as the
    character ``48 + group`` with 0x20 added when more groups follow; bit 0x10 of the last
    group is the sign. From the fourth value on, the value stored is the difference to the
    value two before it. pycocotools checks none of it (a character out of range, a string
    cut inside a value, a negative run), so it is checked here.
    """
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        group = ord(char) - 48
        # More than 6 groups would shift past the C int pycocotools decodes into.
        if not 0 <= group < 64 or shift > 25:
            return None
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:  # more groups of this value follow
            continue
        if group & 0x10:  # negative: sign-extend
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value = shift = 0
    return runs if shift == 0 else None


def _field_problem(annotation: dict[str, Any]) -> str | None:
    """What is wrong with the fields besides the ids and the segmentation that amnseg reads."""
    area = annotation.get("area", 0)
    # The area orders the painting of the masks: NaN would make that order arbitrary.
    if (not isinstance(area, (int, float)) or isinstance(area, bool)
            or isinstance(area, float) and not math.isfinite(area)):
        return f"area {area!r} is not a finite number"
    if annotation.get("iscrowd", 0) not in (0, 1):  # True and False are 1 and 0
        return f"iscrowd {annotation['iscrowd']!r} is not 0 or 1"
    return None
