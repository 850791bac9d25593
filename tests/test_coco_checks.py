"""The COCO annotation file is checked when it is opened: each defect is one line naming the
file and the entry, before pycocotools can crash, drop entries or paint random masks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_data import COCO_EMPTY, COCO_IMG, H, W, single_line, uncompressed_rle, write_coco

from amnseg.data.coco import COCODataset, _decode_rle_string
from amnseg.errors import AmnsegError

NAN = float("nan")


def edited_coco(tmp_path: Path, edit: Callable[[dict], object]) -> Path:
    """The tiny COCO root of test_data (images 10 and 11, categories 90, 1, 3, annotations
    1 and 2 polygons on image 10, 3 an uncompressed crowd RLE), its JSON changed by ``edit``."""
    root = write_coco(tmp_path)
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # NaN and Infinity are written as JSON's extension
    return root


def refusal(root: Path) -> str:
    with pytest.raises(AmnsegError) as exc:
        COCODataset(root, "train")
    return single_line(exc)


def compressed_rle(counts: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["annotations"][2]["segmentation"] = {"counts": counts, "size": [H, W]}
    return edit


def polygon(*coordinates: float) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["annotations"][0]["segmentation"] = [[1, 1, 5, 1, 5, 5, 1, 5], list(coordinates)]
    return edit


def also(extra: dict, listed: str) -> Callable[[dict], None]:
    """Appends ``extra`` to the list ``listed``."""
    def edit(data: dict) -> None:
        data[listed].append(extra)
    return edit


def set_field(listed: str, index: int, **fields: object) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data[listed][index].update(fields)
    return edit


FAR = f"is far outside its {W}x{H} image"
UNDECODABLE = "its segmentation does not decode (counts is not a COCO compressed RLE)"

CASES = [
    # 1. Polygon coordinates that crash pycocotools (or exhaust the memory).
    (polygon(0, 0, NAN, 0, 10, 10), "annotation 1: a polygon's x coordinate nan is not a "
                                    "finite number"),
    (polygon(NAN, 0, 4, 0, 10, 10), "annotation 1: a polygon's x coordinate nan is not a "
                                    "finite number"),  # first: min and max return it
    (polygon(0, 0, 4, float("inf"), 10, 10), "annotation 1: a polygon's y coordinate inf is "
                                             "not a finite number"),
    (polygon(0, 0, 1e12, 0, 1e12, 1e12), f"annotation 1: a polygon's x coordinate "
                                         f"1000000000000.0 {FAR}"),
    (polygon(0, 0, 4, -1e9, 10, 10), f"annotation 1: a polygon's y coordinate "
                                     f"-1000000000.0 {FAR}"),
    (polygon(0, 0, 4, 0, 10, 10**400), f"annotation 1: a polygon's y coordinate {10**400} "
                                       f"{FAR}"),  # beyond a float
    (polygon(0, 0, 4, 0, -201, 10), f"annotation 1: a polygon's x coordinate -201 {FAR}"),
    (polygon(0, 0, "4", 0, 10, 10), "annotation 1: a polygon's x coordinate '4' is not a "
                                    "number"),
    (polygon(0, 0, 4, None, 10, 10), "annotation 1: a polygon's y coordinate None is not a "
                                     "number"),
    # 2. Compressed RLE: too few pixels (pycocotools leaves the rest of the mask unwritten),
    # not a string its encoder writes, or sized for another image.
    (compressed_rle(""), f"annotation 3: an RLE's run lengths add up to 0, not to its "
                         f"{H}x{W} pixels"),
    (compressed_rle("0;"), f"annotation 3: an RLE's run lengths add up to 11, not to its "
                           f"{H}x{W} pixels"),
    (compressed_rle("zzzz!!"), f"annotation 3: {UNDECODABLE}"),  # characters out of range
    (compressed_rle("0`"), f"annotation 3: {UNDECODABLE}"),  # cut inside a value
    (compressed_rle("P" * 6 + "0"), f"annotation 3: {UNDECODABLE}"),  # past a C int
    (set_field("annotations", 2, segmentation={"counts": "0" + "0" * 10, "size": [H, W + 1]}),
     f"annotation 3: an RLE of size {H}x{W + 1} for an image of {H}x{W} (height x width)"),
    # 3. Duplicate category ids (pycocotools' dict keeps the last: a phantom class).
    (also({"id": 1, "name": "zebra"}, "categories"), "category id 1 is listed twice"),
    # 4. Duplicate image and annotation ids.
    (also({"id": 10, "file_name": "x.jpg", "width": W, "height": H}, "images"),
     "image id 10 is listed twice"),
    (set_field("annotations", 1, id=1), "annotation id 1 is listed twice"),
    # 5. Ids that are no integers (they are sorted, and ordered by).
    (set_field("categories", 1, id="2"), "category id '2' is not an integer"),
    (set_field("categories", 1, id=None), "category id None is not an integer"),
    (set_field("categories", 1, id=1.0), "category id 1.0 is not an integer"),
    (set_field("categories", 1, id=True), "category id True is not an integer"),
    (set_field("annotations", 1, id="x"), "annotation id 'x' is not an integer"),
    (set_field("images", 0, id="11"), "image id '11' is not an integer"),
    # 13. Annotations that point to no image, or to no category; files without images.
    (set_field("annotations", 0, image_id="10"), "annotation 1: image_id '10' is not an "
                                                 "integer"),
    (set_field("annotations", 0, image_id=999), "annotation 1: image_id 999 matches no image"),
    (set_field("annotations", 0, category_id=77), "annotation 1: category_id 77 is not in the "
                                                  "file's categories"),
    (set_field("annotations", 0, category_id="3"), "annotation 1: category_id '3' is not an "
                                                   "integer"),
    (lambda data: data.pop("images"), "lists no images"),
    (lambda data: data.update(images=[]), "lists no images"),
    # A NaN area would make the painting order of the instances arbitrary.
    (set_field("annotations", 0, area=NAN), "annotation 1: area nan is not a finite number"),
]


@pytest.mark.parametrize("edit, problem", CASES)
def test_a_bad_coco_file_is_refused_in_one_line_when_opened(tmp_path, edit, problem):
    root = edited_coco(tmp_path, edit)
    path = root / "annotations" / "instances_train2014.json"
    assert refusal(root) == f"{path}: {problem}"


def test_a_valid_file_opens_with_its_labels_and_masks(tmp_path):
    """Polygons (one reaching outside the image, as real ones do), an uncompressed and a
    compressed crowd RLE, and an image without annotations."""
    from pycocotools import mask as coco_mask

    square = np.zeros((H, W), np.uint8)
    square[12:16, 0:4] = 1
    packed = coco_mask.encode(np.asfortranarray(square))["counts"].decode()

    def edit(data: dict) -> None:
        data["annotations"][0]["segmentation"].append([-3, -3, 3, -3, 3, 3, -3, 3])
        data["annotations"].append(
            {"id": 4, "image_id": 10, "category_id": 90, "iscrowd": 1, "area": 16.0,
             "segmentation": {"counts": packed, "size": [H, W]}, "bbox": [0, 12, 4, 4]})

    dataset = COCODataset(edited_coco(tmp_path, edit), "train")
    assert dataset.class_names == ["person", "car", "toothbrush"]
    assert dataset.stems == [COCO_IMG, COCO_EMPTY]
    np.testing.assert_array_equal(dataset.label(COCO_IMG), [1, 1, 1])
    np.testing.assert_array_equal(dataset.label(COCO_EMPTY), [0, 0, 0])
    mask = dataset.mask(COCO_IMG)
    assert mask[4, 4] == 1 and mask[7, 10] == 2 and mask[2, 17] == 255  # as in test_data
    assert mask[0, 0] == mask[1, 1] == 2  # the polygon reaching outside the image
    assert (mask[12:16, 0:4] == 255).all() and mask[11, 0] == 0  # the compressed crowd
    assert not dataset.mask(COCO_EMPTY).any()


def test_the_compressed_rle_decoder_reads_what_pycocotools_writes():
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(0)
    for size in [(1, 1), (3, 5), (H, W), (300, 200)]:
        for fill in (0.0, 0.02, 0.5, 1.0):
            region = rng.random(size) < fill
            packed = coco_mask.encode(np.asfortranarray(region.astype(np.uint8)))["counts"]
            assert _decode_rle_string(packed.decode()) == \
                uncompressed_rle(region)["counts"], (size, fill)


def test_a_val_file_with_other_categories_is_named_before_any_stage(tmp_path, capsys):
    import shutil

    from test_bad_inputs import TINY, one_error_line

    root = write_coco(tmp_path)
    shutil.copytree(root / "train2014", root / "val2014")
    data = json.loads((root / "annotations" / "instances_train2014.json").read_text())
    data["categories"][2]["name"] = "truck"  # id 3: class 2 in id order (1, 3, 90)
    val_file = root / "annotations" / "instances_val2014.json"
    val_file.write_text(json.dumps(data))
    run = tmp_path / "run"
    line = one_error_line(capsys, "run", "coco14", f"data.root={root}", f"run_dir={run}",
                          "data.train_split=train", "data.infer_split=train",
                          "data.val_split=val", *TINY)
    assert (f"{val_file}: split 'val' has other classes than the training split "
            f"({root / 'annotations' / 'instances_train2014.json'}): 3 against 3, class 2 is "
            "'truck' against 'car'") in line
    assert not (run / "cam").exists()


def test_checks_at_their_limits():
    from amnseg.data.coco import _coordinates_problem, _images_problem

    # coordinates reach ten times the image's larger side either way, no further
    reach = 10 * max(H, W)
    assert _coordinates_problem([reach, 0, -reach, 0, 0, reach], (H, W)) is None
    for beyond in (reach + 0.5, -reach - 0.5):
        assert "far outside" in _coordinates_problem([0, 0, beyond, 0, 0, 1], (H, W))
    # (the value by value search for the bad one, too)
    assert "x coordinate nan is not a finite" in _coordinates_problem(
        [-reach, reach, NAN, 0, 0, 0], (H, W))
    # one pixel is a size, zero is none
    image = {"id": 1, "file_name": "a.jpg", "height": 1, "width": 1}
    assert _images_problem([image]) is None
    assert "no valid height and width" in _images_problem([{**image, "height": 0}])
    # six 5-bit groups fit pycocotools' int (2^25 = "PPPPP1"), a seventh does not; a character
    # past the 64 an encoder writes is no RLE
    assert _decode_rle_string("PPPPP1") == [2**25]
    assert _decode_rle_string("PPPPPP1") is None
    assert _decode_rle_string("p") is None


def test_annotations_without_area_are_painted_after_those_with_one(tmp_path):
    def edit(data: dict) -> None:
        data["annotations"][0]["area"] = 0.5  # the car, inside the person
        del data["annotations"][1]["area"]  # the person: area 0, the smallest

    root = edited_coco(tmp_path, edit)
    mask = COCODataset(root, "train").mask(COCO_IMG)
    # Larger areas are painted first: the person, without one, comes last and covers the car.
    assert (mask[5:9, 8:12] == 1).all()


def test_an_annotation_file_is_parsed_once_per_content(tmp_path: Path, monkeypatch) -> None:
    """A run opens each split dozens of times; train2014's file takes tens of seconds to parse
    and check. It is parsed again only when its content changed (a same-size edit included),
    and the two last files are kept."""
    from collections import OrderedDict

    import pycocotools.coco

    import amnseg.data.coco as coco_module

    parsed = []
    real = pycocotools.coco.COCO

    def counting(path: str) -> object:
        parsed.append(path)
        return real(path)

    monkeypatch.setattr(pycocotools.coco, "COCO", counting)
    monkeypatch.setattr(coco_module, "_OPENED", OrderedDict())
    root = write_coco(tmp_path)
    first, second = COCODataset(root, "train"), COCODataset(root, "train")
    assert len(parsed) == 1
    assert second.stems == first.stems and second.stems is not first.stems
    assert second.class_names == ["person", "car", "toothbrush"]
    path = root / "annotations" / "instances_train2014.json"
    size = path.stat().st_size
    path.write_text(path.read_text().replace('"car"', '"bus"'))
    assert path.stat().st_size == size
    assert COCODataset(root, "train").class_names == ["person", "bus", "toothbrush"]
    assert len(parsed) == 2
    other = edited_coco(tmp_path / "other", set_field("categories", 0, name="brush"))
    assert COCODataset(other, "train").class_names == ["person", "car", "brush"]
    assert COCODataset(root, "train").class_names == ["person", "bus", "toothbrush"]
    assert len(parsed) == 3  # the "bus" file was kept
    path.write_text(path.read_text().replace('"bus"', '"car"'))
    assert COCODataset(root, "train").class_names == ["person", "car", "toothbrush"]
    assert len(parsed) == 4  # the first file was dropped for the third
    # A file that cannot be read is named (as root reads any file, the error is raised here).

    def unreadable(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(coco_module, "file_sha256", unreadable)
    with pytest.raises(AmnsegError, match=r"instances_train2014.json: unreadable \(Permission "
                       r"denied\)$"):
        COCODataset(root, "train")
