"""Dataset readers (VOC, COCO, folder) on tiny fixture trees written by the tests themselves."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amnseg.config import DataConfig
from amnseg.data import build_dataset
from amnseg.data.coco import COCODataset
from amnseg.data.folder import FolderDataset
from amnseg.data.voc import VOC_CLASSES, VOCDataset, voc_palette
from amnseg.errors import AmnsegError

W, H = 20, 16  # every fixture image is 20 wide, 16 high


def save_image(path: Path, seed: int = 0, size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def save_index_png(path: Path, mask: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette is not None:
        image = image.convert("P")
        image.putpalette(palette)
        image.putdata(mask.ravel().tolist())  # convert("P") may remap: put the indices back
    image.save(path)


def single_line(exc: pytest.ExceptionInfo[AmnsegError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------- VOC

VOC_A, VOC_B, VOC_C = "2007_000032", "2008_000002", "2009_000123"


def voc_mask_a() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[2:8, 3:10] = 1  # aeroplane
    mask[9:14, 12:18] = 15  # person
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 255  # ignore border
    return mask


def write_voc(tmp_path: Path, with_train_aug: bool = True) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for i, stem in enumerate((VOC_A, VOC_B, VOC_C)):
        save_image(root / "JPEGImages" / f"{stem}.jpg", seed=i)
    # A: a VOC palette mask. B: only an SBD (grayscale) mask. C: only an XML annotation.
    save_index_png(root / "SegmentationClass" / f"{VOC_A}.png", voc_mask_a(), voc_palette())
    aug = np.zeros((H, W), np.uint8)
    aug[4:12, 4:12] = 12  # dog
    save_index_png(root / "SegmentationClassAug" / f"{VOC_B}.png", aug)
    (root / "Annotations").mkdir()
    (root / "Annotations" / f"{VOC_C}.xml").write_text(
        "<annotation><filename>x.jpg</filename>"
        "<object><name>cat</name><difficult>0</difficult></object>"
        "<object><name> person </name><part><name>head</name></part></object>"
        "</annotation>"
    )
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text(f"{VOC_A}\n{VOC_C}\n")
    (sets / "val.txt").write_text(f"{VOC_A}\n")
    if with_train_aug:
        (sets / "train_aug.txt").write_text(f"{VOC_A}\n{VOC_B}\n\n")
    return root


def test_voc_palette_is_the_standard_colormap() -> None:
    palette = voc_palette()
    assert len(palette) == 768 and all(isinstance(v, int) and 0 <= v <= 255 for v in palette)
    colour = [tuple(palette[3 * i : 3 * i + 3]) for i in range(256)]
    assert colour[0] == (0, 0, 0)
    assert colour[1] == (128, 0, 0)
    assert colour[2] == (0, 128, 0)
    assert colour[15] == (192, 128, 128)  # person
    assert colour[255] == (224, 224, 192)  # the ignore border colour
    assert len(set(colour)) == 256


def test_voc_palette_mask_reads_indices_and_keeps_ignore(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    with Image.open(root / "SegmentationClass" / f"{VOC_A}.png") as png:
        assert png.mode == "P"
    dataset = VOCDataset(root, "val")
    assert dataset.stems == [VOC_A] and dataset.class_names == list(VOC_CLASSES)
    sample = dataset[0]
    assert sample.image.shape == (H, W, 3) and sample.image.dtype == np.uint8
    assert sample.mask is not None and sample.mask.dtype == np.uint8
    np.testing.assert_array_equal(sample.mask, voc_mask_a())
    assert set(np.unique(sample.mask).tolist()) == {0, 1, 15, 255}
    expected = np.zeros(20, np.float32)
    expected[[0, 14]] = 1
    np.testing.assert_array_equal(sample.label, expected)
    assert dataset.has_masks


def test_voc_train_aug_uses_sbd_mask(tmp_path: Path) -> None:
    dataset = VOCDataset(write_voc(tmp_path), "train_aug")
    assert dataset.stems == [VOC_A, VOC_B]
    assert all(isinstance(s, str) for s in dataset.stems)
    assert dataset.mask_path(VOC_B) == dataset.root / "SegmentationClassAug" / f"{VOC_B}.png"
    sample = dataset[dataset.index_of(VOC_B)]
    assert set(np.unique(sample.mask).tolist()) == {0, 12}
    assert np.flatnonzero(sample.label).tolist() == [VOC_CLASSES.index("dog")]
    assert dataset.has_masks


def test_voc_labels_from_xml_without_mask(tmp_path: Path) -> None:
    dataset = VOCDataset(write_voc(tmp_path), "train")
    assert dataset.mask_path(VOC_C) is None and dataset.mask(VOC_C) is None
    label = dataset.label(VOC_C)
    assert label.dtype == np.float32
    assert sorted(np.flatnonzero(label).tolist()) == [
        VOC_CLASSES.index("cat"), VOC_CLASSES.index("person")
    ]
    assert set(label.tolist()) == {0.0, 1.0}  # multi-hot, as the mask-based labels
    assert dataset[1].mask is None
    # A split with masks that lacks one: the mask is named where the split's others are.
    assert dataset.has_masks
    assert dataset.missing_masks() == [dataset.root / "SegmentationClass" / f"{VOC_C}.png"]
    assert VOCDataset(dataset.root, "val").missing_masks() == []


def test_voc_aug_mask_dir_option(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    (root / "SegmentationClassAug").rename(root / "SBD")
    assert VOCDataset(root, "train_aug").mask_path(VOC_B) is None
    assert VOCDataset(root, "train_aug", aug_mask_dir="SBD").mask_path(VOC_B) is not None
    with pytest.raises(AmnsegError, match=r"VOC2012/SDB: mask folder not found "
                                          r"\(data.aug_mask_dir=SDB\)"):
        VOCDataset(root, "train_aug", aug_mask_dir="SDB")


def test_voc_errors(tmp_path: Path) -> None:
    root = write_voc(tmp_path, with_train_aug=False)
    with pytest.raises(AmnsegError) as exc:
        VOCDataset(root, "train_aug")
    message = single_line(exc)
    assert str(root / "ImageSets" / "Segmentation" / "train_aug.txt") in message
    with pytest.raises(AmnsegError) as exc:
        VOCDataset(root, "trainval")
    assert "trainval.txt" in single_line(exc)
    with pytest.raises(AmnsegError) as exc:
        VOCDataset(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in single_line(exc)

    xml = root / "Annotations" / f"{VOC_C}.xml"
    xml.write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(AmnsegError) as exc:
        VOCDataset(root, "train").label(VOC_C)
    message = single_line(exc)
    assert str(xml) in message and "unicorn" in message
    xml.unlink()
    with pytest.raises(AmnsegError) as exc:
        VOCDataset(root, "train").label(VOC_C)
    assert str(xml) in single_line(exc)


# --------------------------------------------------------------------------------------- COCO

COCO_IMG, COCO_EMPTY = "COCO_train2014_000000000010", "COCO_train2014_000000000011"


def uncompressed_rle(region: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as crowd annotations use): column-major runs, zeros first."""
    flat = region.ravel(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"counts": counts, "size": list(region.shape)}


def box(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_coco(tmp_path: Path, width: int = W) -> Path:
    root = tmp_path / "coco"
    for i, stem in enumerate((COCO_IMG, COCO_EMPTY)):
        save_image(root / "train2014" / f"{stem}.jpg", seed=i)
    crowd = np.zeros((H, width), bool)  # an RLE's size is the JSON's image size
    crowd[0:6, 14:20] = True  # a crowd in the top-right corner ...
    crowd[8:10, 12:16] = True  # ... and a bit overlapping the person
    data = {
        "images": [
            {"id": 11, "file_name": f"{COCO_EMPTY}.jpg", "width": width, "height": H},
            {"id": 10, "file_name": f"{COCO_IMG}.jpg", "width": width, "height": H},
        ],
        # Non-contiguous ids, listed out of order.
        "categories": [
            {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
        # The small car comes first in the file: painting in file order would bury it.
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "iscrowd": 0, "area": 16.0,
             "segmentation": box(8, 5, 12, 9), "bbox": [8, 5, 4, 4]},
            {"id": 2, "image_id": 10, "category_id": 1, "iscrowd": 0, "area": 120.0,
             "segmentation": box(2, 2, 14, 12), "bbox": [2, 2, 12, 10]},
            {"id": 3, "image_id": 10, "category_id": 90, "iscrowd": 1,
             "area": float(crowd.sum()), "segmentation": uncompressed_rle(crowd),
             "bbox": [12, 0, 8, 10]},
        ],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(data))
    return root


def test_coco_classes_labels_and_masks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = COCODataset(write_coco(tmp_path), "train")
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are silenced
    assert dataset.class_names == ["person", "car", "toothbrush"]  # by ascending id 1, 3, 90
    assert dataset.category_to_class == {1: 1, 3: 2, 90: 3}
    assert dataset.stems == [COCO_IMG, COCO_EMPTY]
    assert dataset.has_masks

    sample = dataset[dataset.index_of(COCO_IMG)]
    assert sample.image.shape == (H, W, 3)
    np.testing.assert_array_equal(sample.label, [1, 1, 1])  # the crowd's class counts too
    mask = sample.mask
    assert mask is not None and mask.shape == (H, W) and mask.dtype == np.uint8
    assert mask[4, 4] == 1  # person
    assert mask[7, 10] == 2  # the smaller car stays on top of the person
    assert mask[2, 17] == 255  # crowd alone: ignored
    assert mask[9, 13] == 1  # crowd under a non-crowd instance: the instance wins
    assert mask[14, 1] == 0
    assert set(np.unique(mask).tolist()) == {0, 1, 2, 255}

    empty = dataset[dataset.index_of(COCO_EMPTY)]
    np.testing.assert_array_equal(empty.label, np.zeros(3, np.float32))
    assert empty.mask is not None and empty.mask.shape == (H, W) and not empty.mask.any()


def test_coco_exact_folder_name_and_semantic_dir(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    semantic = tmp_path / "semantic"
    given = np.full((H, W), 2, np.uint8)
    save_index_png(semantic / f"{COCO_IMG}.png", given)
    dataset = COCODataset(root, "train2014", semantic_dir=str(semantic))
    sample = dataset[dataset.index_of(COCO_IMG)]
    np.testing.assert_array_equal(sample.mask, given)
    np.testing.assert_array_equal(sample.label, [1, 1, 1])  # still from the annotations


def test_coco_errors(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    with pytest.raises(AmnsegError) as exc:
        COCODataset(root, "val")  # no val2014 folder
    assert str(root / "val2014") in single_line(exc)
    (root / "val2014").mkdir()
    with pytest.raises(AmnsegError) as exc:
        COCODataset(root, "val")
    assert str(root / "annotations" / "instances_val2014.json") in single_line(exc)
    (root / "annotations" / "instances_val2014.json").write_text("{not json")
    with pytest.raises(AmnsegError) as exc:
        COCODataset(root, "val")
    assert "instances_val2014.json" in single_line(exc)


def test_coco_mask_size_mismatch_names_the_annotation_file(tmp_path: Path) -> None:
    dataset = COCODataset(write_coco(tmp_path, width=W + 4), "train")
    with pytest.raises(AmnsegError) as exc:
        dataset[0]
    message = single_line(exc)
    assert "instances_train2014.json" in message and "24x16" in message and "20x16" in message


# ------------------------------------------------------------------------------------- folder

FOLDER_CLASSES = ["cat", "dog"]


def write_folder(tmp_path: Path, with_masks: bool = True) -> Path:
    root = tmp_path / "mydata"
    save_image(root / "images" / "my photo-01.JPG", seed=1)
    save_image(root / "images" / "007.png", seed=2)
    save_image(root / "images" / "a,b.jpeg", seed=3)
    save_image(root / "images" / "nothing here.bmp", seed=4)
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "classes.txt").write_text("cat\n\n  dog \n\n")
    (root / "labels.csv").write_text(
        "stem,classes\n"
        "my photo-01,cat\n"
        "007,dog\n"
        '"a,b",cat; dog\n'
        "nothing here,\n"
    )
    if with_masks:
        mask = np.zeros((H, W), np.uint8)
        mask[3:9, 3:9] = 1
        mask[10:12, 10:12] = 255
        save_index_png(root / "masks" / "my photo-01.png", mask)
    return root


def test_folder_reads_odd_names_and_labels(tmp_path: Path) -> None:
    dataset = FolderDataset(write_folder(tmp_path), "train")
    assert dataset.class_names == FOLDER_CLASSES
    assert dataset.stems == ["my photo-01", "007", "a,b", "nothing here"]  # labels.csv order
    labels = {s: np.flatnonzero(dataset.label(s)).tolist() for s in dataset.stems}
    assert labels == {"my photo-01": [0], "007": [1], "a,b": [0, 1], "nothing here": []}
    assert dataset.image_path("my photo-01").name == "my photo-01.JPG"
    assert dataset.label("nothing here").dtype == np.float32

    sample = dataset[0]
    assert sample.image.shape == (H, W, 3)
    assert sample.mask is not None and set(np.unique(sample.mask).tolist()) == {0, 1, 255}
    assert dataset[1].mask is None  # masks may cover only some images
    assert dataset.has_masks


def test_folder_splits(tmp_path: Path) -> None:
    root = write_folder(tmp_path, with_masks=False)
    assert not FolderDataset(root, "anything").has_masks
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("007\n\nnothing here\n")
    assert FolderDataset(root, "val").stems == ["007", "nothing here"]
    with pytest.raises(AmnsegError) as exc:
        FolderDataset(root, "train")  # splits/ exists, splits/train.txt does not
    assert str(root / "splits" / "train.txt") in single_line(exc)
    (root / "splits" / "val.txt").write_text("007\nghost\n")
    with pytest.raises(AmnsegError) as exc:
        FolderDataset(root, "val")
    message = single_line(exc)
    assert str(root / "splits" / "val.txt") in message and "ghost" in message


def test_build_dataset_dispatch(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    dataset = build_dataset(DataConfig(kind="folder", root=str(root)), "train")
    assert isinstance(dataset, FolderDataset) and len(dataset) == 4
    voc = build_dataset(DataConfig(kind="voc", root=str(write_voc(tmp_path))), "val")
    assert isinstance(voc, VOCDataset)
    with pytest.raises(AmnsegError) as exc:
        build_dataset(DataConfig(kind="cityscapes", root=str(root)), "train")
    message = single_line(exc)
    assert "cityscapes" in message and all(k in message for k in ("voc", "coco", "folder"))


@pytest.mark.parametrize(
    ("breakage", "named", "words"),
    [
        (lambda r: (r / "images" / "007.png").rename(r / "elsewhere.png"),
         "labels.csv:3", ["007"]),
        (lambda r: (r / "labels.csv").write_text("stem,classes\n007,dog\nmy photo-01,cat;bird\n"),
         "labels.csv:3", ["bird"]),
        (lambda r: (r / "labels.csv").write_text("007,dog\n007,cat\n"), "labels.csv:2", ["twice"]),
        (lambda r: (r / "labels.csv").write_text("007,dog,cat\n"), "labels.csv:1", ["columns"]),
        (lambda r: (r / "classes.txt").write_text("cat\ndog\ncat\n"), "classes.txt:3", ["cat"]),
        (lambda r: (r / "classes.txt").unlink(), "classes.txt", []),
        (lambda r: (r / "labels.csv").unlink(), "labels.csv", []),
        (lambda r: save_image(r / "images" / "007.jpg"), "images", ["007"]),
    ],
    ids=["image-missing", "unknown-class", "duplicate-row", "extra-column", "duplicate-class",
         "no-classes", "no-labels", "two-images-one-stem"],
)
def test_folder_errors(tmp_path: Path, breakage, named: str, words: list[str]) -> None:
    root = write_folder(tmp_path)
    breakage(root)
    with pytest.raises(AmnsegError) as exc:
        FolderDataset(root, "train")
    message = single_line(exc)
    assert named in message, message
    assert all(word in message for word in words), message


def test_folder_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(AmnsegError) as exc:
        FolderDataset(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in single_line(exc)
    root = write_folder(tmp_path)
    (root / "images").rename(root / "pictures")
    with pytest.raises(AmnsegError) as exc:
        FolderDataset(root, "train")
    assert str(root / "images") in single_line(exc)


def test_folder_masks_in_any_case_of_png_and_only_png(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 3:9] = 2
    save_index_png(root / "masks" / "007.PNG", mask)
    dataset = FolderDataset(root, "train")
    assert dataset.mask_path("007") == root / "masks" / "007.PNG"
    np.testing.assert_array_equal(dataset.mask("007"), mask)
    (root / "masks" / "notes.txt").write_text("masks drawn by hand")  # not a mask: left alone
    assert FolderDataset(root, "train").mask_path("007") is not None
    Image.fromarray(mask).save(root / "masks" / "a,b.jpg")
    with pytest.raises(AmnsegError) as exc:
        FolderDataset(root, "train")
    assert "masks/a,b.jpg: masks must be PNG index images" in single_line(exc)


@pytest.mark.parametrize("folder", ["masks", "splits"])
def test_folder_masks_or_splits_that_are_files_are_named(tmp_path: Path, folder: str) -> None:
    root = write_folder(tmp_path, with_masks=False)
    (root / folder).write_text("not a folder")
    with pytest.raises(AmnsegError) as exc:
        FolderDataset(root, "train")
    assert f"{folder}: is a file; {folder}/ is a folder" in single_line(exc)


def test_folder_mask_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    save_index_png(root / "masks" / "my photo-01.png", np.zeros((10, 10), np.uint8))
    dataset = FolderDataset(root, "train")
    with pytest.raises(AmnsegError) as exc:
        dataset[0]
    message = single_line(exc)
    assert str(root / "masks" / "my photo-01.png") in message and "10x10" in message
    assert "EXIF" not in message
    save_index_png(root / "masks" / "my photo-01.png", np.zeros((W, H), np.uint8))
    with pytest.raises(AmnsegError) as exc:
        FolderDataset(root, "train")[0]
    assert "turned a quarter: the image may carry an EXIF rotation" in single_line(exc)


def test_training_samples_never_read_ground_truth_masks(tiny_dataset, monkeypatch):
    """The training loaders (AugmentedSet) see images and labels only: the masks are never
    read (a weakly supervised stage must not touch them, and decoding them costs time)."""
    from conftest import tiny_config

    from amnseg.data import build_dataset
    from amnseg.training import AugmentedSet

    dataset = build_dataset(tiny_config(tiny_dataset, tiny_dataset / "run").data, "train")
    full = dataset[3]
    assert full.mask is not None

    def no_masks(stem):
        raise AssertionError(f"mask of {stem} read")

    monkeypatch.setattr(dataset, "mask", no_masks)
    training = AugmentedSet(dataset, lambda sample, rng: sample, seed=0)
    seen = training[3]
    assert seen.mask is None and seen.stem == full.stem
    np.testing.assert_array_equal(seen.image, full.image)
    np.testing.assert_array_equal(seen.label, full.label)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["images"][0].pop("height"),
     f"image id 11 ({COCO_EMPTY}.jpg) has no valid height"),
    (lambda d: d["images"][1].update(width="20"), f"image id 10 ({COCO_IMG}.jpg) has no valid"),
    (lambda d: d["annotations"][0].pop("segmentation"), "annotation 1: no segmentation"),
    (lambda d: d["annotations"][1].update(segmentation=[[1, 2]]),
     "annotation 2: a polygon must list at least 3 x, y pairs"),
    (lambda d: d["annotations"][2].update(segmentation={"counts": [1]}),
     "annotation 3: an RLE segmentation needs counts and size"),
    (lambda d: d.update(categories=[], annotations=[]), "no categories"),
    (lambda d: d.update(annotations=[]), "no annotations (the image labels and masks"),
    (lambda d: d["images"][1].pop("file_name"), "image id 10 has no file_name"),
    (lambda d: d["images"][1].update(file_name=5), "image id 10 has no file_name"),
    (lambda d: d["categories"][1].pop("name"), "category id 1 has no name"),
    (lambda d: d["categories"][2].update(name="person"),
     "categories 1 and 3 are both named 'person'"),
    (lambda d: d["annotations"][0].update(area="big"), "annotation 1: area 'big' is not a"),
    (lambda d: d["annotations"][0].update(iscrowd="no"), "annotation 1: iscrowd 'no' is not"),
    (lambda d: d["annotations"][0].pop("category_id"), "annotation file ('category_id')"),
    (lambda d: d["annotations"][2]["segmentation"].update(counts=[1, 2, 3]),
     "annotation 3: an RLE's run lengths add up to 6, not to its 16x20 pixels"),
    (lambda d: d["annotations"][2]["segmentation"].update(counts=[-1, 321]),
     "annotation 3: an RLE's counts must be run lengths"),
    (lambda d: d["annotations"][2]["segmentation"].update(size=[16, 21]),
     "annotation 3: an RLE of size 16x21 for an image of 16x20"),
    (lambda d: d["annotations"][2]["segmentation"].update(size="16x20"),
     "annotation 3: an RLE's size must be [height, width]"),
    # LVIS-sized category lists do not fit the uint8 masks.
    (lambda d: d["categories"].extend({"id": 1000 + i, "name": f"extra {i}"}
                                      for i in range(255 - len(d["categories"]))),
     "255 classes; at most 254 fit amnseg's uint8 masks (0 is the background, 255 ignored"),
])
def test_coco_fields_that_pycocotools_assumes_are_checked_at_load(tmp_path, edit, words):
    root = write_coco(tmp_path)
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(AmnsegError) as exc:
        COCODataset(root, "train")
    message = single_line(exc)
    assert "instances_train2014.json: " in message and words in message


def test_coco_rle_whose_first_pixel_is_inside_starts_with_an_empty_run(tmp_path):
    """COCO's run lengths start with background: a region at the first pixel gives a leading
    0, which is valid (only negative runs are not)."""
    root = write_coco(tmp_path)
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    corner = np.zeros((H, W), bool)
    corner[0:3, 0:2] = True
    data["annotations"][2]["segmentation"] = uncompressed_rle(corner)
    assert data["annotations"][2]["segmentation"]["counts"][0] == 0
    path.write_text(json.dumps(data))
    mask = COCODataset(root, "train").mask(COCO_IMG)
    assert (mask[0:3, 0:2] == 255).all()  # a crowd: ignored


def test_coco_compressed_rle_that_does_not_decode_is_named(tmp_path):
    root = write_coco(tmp_path)
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"][2]["segmentation"] = {"counts": "zzzz!!", "size": [H, W]}
    path.write_text(json.dumps(data))
    with pytest.raises(AmnsegError) as exc:  # when the file is opened, before any stage
        COCODataset(root, "train")
    assert "instances_train2014.json: annotation 3: its segmentation does not decode" in \
        single_line(exc)


def test_coco_size_that_disagrees_with_the_image_file_is_found_by_the_check(tmp_path):
    from amnseg.data.check import check_dataset

    dataset = COCODataset(write_coco(tmp_path, width=W + 4), "train")
    with pytest.raises(AmnsegError) as exc:
        check_dataset(dataset, max_pixels=0)
    message = single_line(exc)
    assert "instances_train2014.json (image " in message
    assert f"the annotations give the image {W + 4}x{H} pixels" in message
    assert f"is {W}x{H}" in message


def _save_with_orientation(path: Path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif)  # PNG: lossless, with an eXIf chunk


# The stored pixels as a viewer shows them, for each EXIF orientation (the EXIF standard's
# table): 2 mirrored, 3 turned half, 4 upside down, 5 transposed, 6 turned a quarter
# clockwise, 7 transposed across the other diagonal, 8 turned a quarter anticlockwise.
SHOWN = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(SHOWN))
def test_exif_orientation_reads_images_as_viewers_show_them(tmp_path: Path, orientation: int
                                                            ) -> None:
    from amnseg.data.base import read_rgb, read_size

    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    _save_with_orientation(path, stored, orientation)
    shown = SHOWN[orientation](stored)
    np.testing.assert_array_equal(read_rgb(path), stored)  # default: the stored pixels
    assert read_size(path) == (6, 10)
    np.testing.assert_array_equal(read_rgb(path, exif_orientation=True), shown)
    assert read_size(path, exif_orientation=True) == shown.shape[:2]


def test_damaged_exif_blocks_are_read_quietly_as_stored(tmp_path: Path) -> None:
    import struct
    import warnings

    from amnseg.data.base import read_rgb, read_size

    # An orientation entry whose 1000 values lie beyond the end of the block: PIL warns
    # (in lines naming neither the file nor a remedy) and skips it.
    exif = (b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00"
            + struct.pack("<HHII", 0x0112, 3, 1000, 0x100) + b"\x00" * 4)
    stored = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / "camera.png"
    Image.fromarray(stored).save(path, exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for turned in (False, True):
            assert read_size(path, turned) == (30, 40)
            np.testing.assert_array_equal(read_rgb(path, turned), stored)


def test_folder_dataset_with_exif_orientation_matches_masks_drawn_on_the_shown_photo(
        tmp_path: Path) -> None:
    """A phone photo stored sideways with orientation 6 and its mask drawn as it shows: the
    default reads the stored pixels and names the option; with it, image and mask agree."""
    from amnseg.config import load_config
    from amnseg.data import build_splits
    from amnseg.data.check import check_dataset
    from amnseg.pipeline import STAGES, stage_options

    root = write_folder(tmp_path)
    stored = np.random.default_rng(9).integers(0, 256, (W, H, 3), dtype=np.uint8)  # sideways
    (root / "images" / "my photo-01.JPG").unlink()
    _save_with_orientation(root / "images" / "my photo-01.png", stored, 6)
    dataset = FolderDataset(root, "train")
    with pytest.raises(AmnsegError) as exc:
        check_dataset(dataset, max_pixels=0)
    message = single_line(exc)
    assert f"mask size {W}x{H} differs from image size {H}x{W}" in message
    assert "data.exif_orientation=true reads images as viewers show them" in message
    with pytest.raises(AmnsegError, match="data.exif_orientation=true"):
        dataset[0]
    config = DataConfig(kind="folder", root=str(root), train_split="train",
                        exif_orientation=True)
    turned = build_dataset(config, "train")
    assert turned.exif_orientation and not dataset.exif_orientation
    check_dataset(turned, max_pixels=0)
    sample = turned[0]
    np.testing.assert_array_equal(sample.image, np.rot90(stored, -1))
    assert sample.mask.shape == (H, W) and turned.image_size("my photo-01") == (H, W)
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / "a.txt").write_text("007\n")
    (root / "splits" / "b.txt").write_text("my photo-01\n")
    union = build_splits(config, ["a", "b"])
    assert union.exif_orientation and union.image_size("my photo-01") == (H, W)
    # The option is part of every stage's fingerprint when set, and absent at its default
    # (the fingerprints of run folders made before it existed stay as they were).
    defaults = load_config(None, [])
    turned_config = load_config(None, ["data.exif_orientation=true"])
    cam = STAGES[0]
    assert "data.exif_orientation" not in stage_options(cam, defaults)
    assert stage_options(cam, turned_config)["data.exif_orientation"] is True


def test_header_size_is_as_stored_by_default_and_32_bit_values_up_to_65535(tmp_path):
    from amnseg.data.base import oriented_size, rgb_array

    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter
    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(tmp_path / "turned.png", exif=exif)
    with Image.open(tmp_path / "turned.png") as image:
        assert oriented_size(image) == (6, 10)
        assert oriented_size(image, exif_orientation=True) == (10, 6)
    wide = Image.fromarray(np.array([[0, 257, 65535]], np.int32), mode="I")
    np.testing.assert_array_equal(rgb_array(wide)[..., 0], [[0, 1, 255]])
    with pytest.raises(AmnsegError, match="x.png: 32-bit image values outside 0..65535"):
        rgb_array(Image.fromarray(np.array([[0, 65536]], np.int32), mode="I"), "x.png")


def test_mask_values_at_their_limits(tmp_path: Path) -> None:
    from amnseg.data.base import check_stem, labels_from_mask, read_index_png

    # the last class of a mask is in its label; 0 and 255 are not classes
    label = labels_from_mask(np.array([[0, 3], [255, 3]], np.uint8), 3)
    np.testing.assert_array_equal(label, [0, 0, 1])
    # a 16-bit mask fits class indices up to 255, not beyond
    for top, fits in ((255, True), (256, False)):
        Image.fromarray(np.array([[0, top]], np.uint16)).save(tmp_path / "m.png")
        if fits:
            assert read_index_png(tmp_path / "m.png").max() == 255
        else:
            with pytest.raises(AmnsegError, match="mask value 256 does not fit a class index"):
                read_index_png(tmp_path / "m.png")
    # a space is a plain character of a name (VOC-like names rarely, photos often have one)
    assert check_stem("img 00", "here") == "img 00"
    with pytest.raises(AmnsegError, match="holds a control character"):
        check_stem("img\x1f00", "here")


def test_coco_label_of_an_image_with_some_of_the_classes(tmp_path: Path) -> None:
    root = write_coco(tmp_path)
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"] = [data["annotations"][0]]  # the car alone: class 2 of (1, 3, 90)
    del data["annotations"][0]["iscrowd"]  # optional: an instance unless it says crowd
    path.write_text(json.dumps(data))
    dataset = COCODataset(root, "train")
    np.testing.assert_array_equal(dataset.label(COCO_IMG), [0, 1, 0])
    assert set(np.unique(dataset.mask(COCO_IMG)).tolist()) == {0, 2}


def test_folder_split_errors_name_their_line(tmp_path: Path) -> None:
    from conftest import write_tiny_folder_dataset

    root = write_tiny_folder_dataset(tmp_path / "data", count=4)
    split = root / "splits" / "mine.txt"
    split.write_text("img 00\n\nnope\n")
    with pytest.raises(AmnsegError, match=r"mine.txt:3: image 'nope' has no row in"):
        FolderDataset(root, "mine")
    split.write_text("img 00\nimg 01\nimg 00\n")
    with pytest.raises(AmnsegError, match=r"mine.txt:3: image 'img 00' is listed twice"):
        FolderDataset(root, "mine")


def test_only_the_first_row_of_labels_csv_is_a_header(tmp_path: Path) -> None:
    from conftest import write_tiny_folder_dataset

    root = write_tiny_folder_dataset(tmp_path / "data", count=4)
    rows = (root / "labels.csv").read_text().splitlines()
    assert rows[0] == "stem,classes"
    (root / "labels.csv").write_text("\n".join([*rows, "stem,classes"]) + "\n")
    with pytest.raises(AmnsegError, match=r"labels.csv:6: unknown class 'classes'"):
        FolderDataset(root, "train")
    # without the header, the first row is an image's
    (root / "labels.csv").write_text("\n".join([*rows[1:], "stem,classes"]) + "\n")
    with pytest.raises(AmnsegError, match=r"labels.csv:5: unknown class 'classes'"):
        FolderDataset(root, "train")


def test_voc_missing_split_lists_are_named(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    with pytest.raises(AmnsegError, match=r"train_aug.txt: split list not found \(train_aug.txt, "
                                          r"the 10,582 SBD-augmented training images"):
        VOCDataset(root, "train_aug")
    with pytest.raises(AmnsegError) as exc:
        VOCDataset(root, "nope")
    assert "nope.txt" in str(exc.value) and "SBD" not in str(exc.value)


@pytest.mark.parametrize("side", [7, 8])
def test_image_size_limits_hold_at_their_ends(tmp_path, side):
    """An image exactly at a limit is used, one pixel past it is refused: the smallest side
    (MIN_SIDE = 8, or what a scale needs to keep a pixel) and the most pixels."""
    from amnseg.data.check import MIN_SIDE, check_dataset, check_pixels, min_side

    assert MIN_SIDE == 8
    (tmp_path / "images").mkdir()
    Image.new("RGB", (side, side)).save(tmp_path / "images" / "a.png")
    (tmp_path / "classes.txt").write_text("cat\n")
    (tmp_path / "labels.csv").write_text("stem,classes\na,cat\n")
    dataset = FolderDataset(tmp_path, "all")
    if side < MIN_SIDE:
        with pytest.raises(AmnsegError, match=f"is {side}x{side}; both sides must be at least 8"):
            check_dataset(dataset, max_pixels=0)
    else:
        check_dataset(dataset, max_pixels=side * side)
        with pytest.raises(AmnsegError, match=f"is {side}x{side} .* above data.max_pixels=63"):
            check_dataset(dataset, max_pixels=side * side - 1)
    check_pixels("image.png", 3, 5, 15, "--max-pixels 15", "")
    with pytest.raises(AmnsegError, match="image.png: image is 5x3"):
        check_pixels("image.png", 3, 5, 14, "--max-pixels 14", "")
    # A scale that needs exactly MIN_SIDE pixels keeps MIN_SIDE's reason; one that needs more
    # names itself.
    assert min_side([("cam.scales", 0.5)]) == min_side([("cam.scales", 0.125)]) == min_side([])
    assert min_side([("cam.scales", 0.1)]) == (
        10, "cam.scales scales it by 0.1, which must leave a pixel")


def test_image_scales_are_each_options_smallest_factor():
    """What the smallest-side check is given: each option that shrinks a whole image, with the
    smallest factor it applies (a range's low end; 1.0 counts for DeepLab's MSC pyramid)."""
    from amnseg.config import image_scales, load_config

    config = load_config(None, ["cam.scales=[1.0,0.7,2.0]", "amn.scales=[0.6,1.0]",
                                "amn.rescale=[0.4,1.6]", "irn.rescale=[0.3,1.7]",
                                "seg.rescale=[1.2,0.9,1.5]", "seg.msc_scales=[1.5,2.0]"])
    assert image_scales(config) == [("cam.scales", 0.7), ("amn.scales", 0.6),
                                    ("amn.rescale", 0.4), ("irn.rescale", 0.3),
                                    ("seg.rescale", 0.9), ("seg.msc_scales", 1.0)]
    assert image_scales(load_config(None, ["seg.msc_scales=[0.25]"]))[-1] == (
        "seg.msc_scales", 0.25)


def test_data_signature_kinds_see_what_they_promise(tmp_path):
    """``stat``: a file touched (same bytes, new time) changes the signature; ``content``: it
    does not, but a byte changed behind the same size and time does."""
    import os

    from conftest import write_tiny_folder_dataset

    from amnseg.data.signature import data_signature, file_token

    dataset = FolderDataset(write_tiny_folder_dataset(tmp_path / "data", count=3), "train")
    image = dataset.image_path(dataset.stems[1])
    before = {kind: data_signature(dataset, kind) for kind in ("stat", "content")}
    assert before["stat"] != before["content"]
    assert file_token(image, "content") == hashlib.sha256(image.read_bytes()).hexdigest()
    info = image.stat()
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    touched = {kind: data_signature(dataset, kind) for kind in ("stat", "content")}
    assert touched["stat"] != before["stat"] and touched["content"] == before["content"]
    data = bytearray(image.read_bytes())
    data[-5] ^= 0xFF  # a byte of the PNG's end marker: the same size, other content
    image.write_bytes(bytes(data))
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    edited = {kind: data_signature(dataset, kind) for kind in ("stat", "content")}
    assert edited["stat"] == touched["stat"] and edited["content"] != touched["content"]
    assert file_token(tmp_path / "gone.png", "content") == "missing"


def test_split_union_takes_each_image_once_from_its_first_split(tmp_path):
    from conftest import write_tiny_folder_dataset

    from amnseg.data import SplitUnion

    root = write_tiny_folder_dataset(tmp_path / "data", count=6)
    # Another copy with other pictures and labels under the same names: each image of the
    # union must come from its own part.
    second = write_tiny_folder_dataset(tmp_path / "data2", count=6, seed=1)
    (second / "splits" / "late.txt").write_text("img 04\nimg 01\nimg 05\n")
    val, late = FolderDataset(root, "val"), FolderDataset(second, "late")
    assert not np.array_equal(val.image("img 01"), late.image("img 01"))
    union = SplitUnion([val, late])
    assert union.stems == ["img 00", "img 01", "img 02", "img 04", "img 05"]
    assert union.class_names == val.class_names and union.root == root
    assert union.split == "val+late"
    for stem in union.stems:
        owner = val if stem in val.stems else late
        np.testing.assert_array_equal(union.image(stem), owner.image(stem))
        np.testing.assert_array_equal(union.label(stem), owner.label(stem))
        assert union.image_path(stem) == owner.image_path(stem)
    other = tmp_path / "other"
    write_tiny_folder_dataset(other, count=2)
    with open(other / "classes.txt", "a") as classes:  # one class more
        classes.write("triangle\n")
    for split, parts in (("train", [val, FolderDataset(other, "train")]),
                         ("val", [val, late, FolderDataset(other, "val")])):
        with pytest.raises(AmnsegError,
                           match=rf"^{re.escape(str(other))}: split '{split}' has other classes"):
            SplitUnion(parts)
    exif = FolderDataset(second, "late")
    exif.exif_orientation = not val.exif_orientation
    assert SplitUnion([val, exif]).exif_orientation == val.exif_orientation
