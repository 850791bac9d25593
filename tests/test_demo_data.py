"""The built-in demo data generator (amnseg.data.demo): layout, determinism, content, atomicity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amnseg.data.base import IGNORE_INDEX, labels_from_mask
from amnseg.data.demo import MARKS, DemoParams, ensure_demo, generate_demo, render_sample
from amnseg.data.demo import files as demo_files
from amnseg.errors import AmnsegError

TINY = {"num_train": 12, "num_val": 6, "size": 64}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def read_labels(root: Path) -> dict[str, list[str]]:
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["stem", "classes"]
    return {stem: [c for c in classes.split(";") if c] for stem, classes in rows[1:]}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "demo", seed=3, **TINY)


def test_folder_layout(tiny_demo: Path) -> None:
    root = tiny_demo
    names = (root / "classes.txt").read_text().splitlines()
    assert names == [name for name, _, _ in MARKS]
    train = (root / "splits" / "train.txt").read_text().split()
    val = (root / "splits" / "val.txt").read_text().split()
    assert len(train) == 12 and len(val) == 6 and not set(train) & set(val)
    labels = read_labels(root)
    assert sorted(labels) == sorted(train + val)
    for stem in train + val:
        with Image.open(root / "images" / f"{stem}.png") as image:
            assert image.mode == "RGB" and image.size == (64, 64)
        with Image.open(root / "masks" / f"{stem}.png") as mask:
            assert mask.mode == "L" and mask.size == (64, 64)
            values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= set(range(len(names) + 1)) | {IGNORE_INDEX}
        assert 1 <= len(labels[stem]) <= 3 and set(labels[stem]) <= set(names)
    stored = json.loads((root / "demo.json").read_text())
    assert stored == DemoParams(seed=3, **TINY).to_json()
    assert sorted(p.name for p in root.iterdir()) == [
        "classes.txt",
        "demo.json",
        "images",
        "labels.csv",
        "masks",
        "splits",
    ]
    # Nothing temporary is left beside the demo.
    assert [p.name for p in root.parent.iterdir()] == ["demo"]


def test_deterministic_from_seed(tiny_demo: Path, tmp_path: Path) -> None:
    again = generate_demo(tmp_path / "same", seed=3, **TINY)
    assert tree_bytes(again) == tree_bytes(tiny_demo)
    other = generate_demo(tmp_path / "other", seed=4, **TINY)
    first, second = tree_bytes(tiny_demo), tree_bytes(other)
    assert first.keys() == second.keys()
    assert first["images/train_0000.png"] != second["images/train_0000.png"]
    assert first["labels.csv"] != second["labels.csv"]


def test_files_match_rendered_samples(tiny_demo: Path) -> None:
    params = DemoParams(seed=3, **TINY)
    for split, count in (("train", 12), ("val", 6)):
        for index in range(count):
            sample = render_sample(params, split, index)
            image = np.asarray(Image.open(tiny_demo / "images" / f"{sample.stem}.png"))
            mask = np.asarray(Image.open(tiny_demo / "masks" / f"{sample.stem}.png"))
            np.testing.assert_array_equal(image, sample.image)
            np.testing.assert_array_equal(mask, sample.mask)


def test_labels_agree_with_masks(tiny_demo: Path) -> None:
    names = (tiny_demo / "classes.txt").read_text().splitlines()
    for stem, classes in read_labels(tiny_demo).items():
        mask = np.asarray(Image.open(tiny_demo / "masks" / f"{stem}.png"))
        from_mask = labels_from_mask(mask, len(names))
        assert [names[i] for i in np.nonzero(from_mask)[0]] == classes
        assert (mask == IGNORE_INDEX).any()  # 1-px ignore contour around objects


def test_every_labelled_class_shows_its_mark() -> None:
    params = DemoParams(seed=5, **TINY)
    for index in range(12):
        sample = render_sample(params, "train", index)
        labelled = set(sample.classes)
        marked = set()
        for obj in sample.objects:
            color = np.asarray(MARKS[obj.class_index - 1][2], dtype=np.int16)
            glyph_pixels = sample.image[obj.glyph].astype(np.int16)
            assert obj.glyph.sum() >= 10
            # The whole glyph is visible, in its class colour (up to the pixel noise) ...
            assert np.abs(glyph_pixels - color).max() <= 15
            # ... inside its own object's region of the mask, never on an ignore border.
            assert (sample.mask[obj.mark] == obj.class_index).all()
            assert obj.body[obj.mark].all()
            marked.add(obj.class_index)
        assert marked == labelled and labelled


def test_masks_cover_whole_bodies() -> None:
    fractions = []
    for size, count in ((64, 12), (128, 12)):
        params = DemoParams(seed=7, num_train=count, num_val=0, size=size)
        for index in range(count):
            sample = render_sample(params, "train", index)
            for obj in sample.objects:
                body = obj.body & (sample.mask != IGNORE_INDEX)
                assert (sample.mask[body] == obj.class_index).all()
                # Mark pixels (all of an object's marks) are a small part of its body.
                fraction = obj.mark.sum() / obj.body.sum()
                assert fraction < 0.35
                fractions.append(fraction)
    assert np.median(fractions) < 0.16
    # Body pixels are the mask's foreground: nothing labelled outside objects.
    sample = render_sample(DemoParams(seed=7, **TINY), "val", 0)
    union = np.any([obj.body for obj in sample.objects], axis=0)
    assert ((sample.mask > 0) == union).all()


def test_object_sizes_vary_widely() -> None:
    params = DemoParams(seed=0, num_train=60, num_val=0, size=128)
    sides = [
        np.sqrt(obj.body_area) / 128
        for index in range(60)
        for obj in render_sample(params, "train", index).objects
    ]
    assert min(sides) < 0.25 and max(sides) > 0.5


def test_skips_complete_demo(tiny_demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a complete demo must not be regenerated")

    monkeypatch.setattr(demo_files, "_write_demo", fail)
    assert ensure_demo(tiny_demo, seed=3, **TINY) == tiny_demo
    assert generate_demo(str(tiny_demo), seed=3, **TINY) == tiny_demo


def test_regenerates_on_other_params_or_missing_files(tmp_path: Path) -> None:
    root = generate_demo(tmp_path / "demo", seed=1, **TINY)
    generate_demo(root, seed=2, **TINY)
    assert json.loads((root / "demo.json").read_text())["seed"] == 2
    (root / "masks" / "val_0003.png").unlink()
    ensure_demo(root, seed=2, **TINY)
    assert (root / "masks" / "val_0003.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_interrupted_generation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_render = render_sample

    def flaky(params: DemoParams, split: str, index: int):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # like a Ctrl-C midway
        return real_render(params, split, index)

    monkeypatch.setattr(demo_files, "render_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(tmp_path / "demo", seed=0, **TINY)
    assert list(tmp_path.iterdir()) == []

    # An existing demo survives a failed regeneration untouched.
    monkeypatch.setattr(demo_files, "render_sample", real_render)
    root = generate_demo(tmp_path / "demo", seed=0, **TINY)
    before = tree_bytes(root)
    calls["n"] = 0
    monkeypatch.setattr(demo_files, "render_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(root, seed=1, **TINY)
    assert tree_bytes(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_stale_partial_folders_are_cleaned(tmp_path: Path) -> None:
    # A folder left by a killed generation (its process id no longer exists).
    stale = tmp_path / ".demo.partial-999999999-abc"
    (stale / "images").mkdir(parents=True)
    generate_demo(tmp_path / "demo", seed=0, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_refuses_to_overwrite_other_data(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("user data")
    with pytest.raises(AmnsegError, match="refusing"):
        generate_demo(root, seed=0, **TINY)
    assert (root / "precious.txt").read_text() == "user data"
    # An older demo with other files in it (a run folder kept there) is not replaced.
    demo = generate_demo(tmp_path / "demo", seed=0, **TINY)
    (demo / "myrun" / "seg").mkdir(parents=True)
    (demo / "myrun" / "seg" / "seg.pt").write_text("a trained network")
    (demo / "notes.txt").write_text("mine")
    before = tree_bytes(demo)
    with pytest.raises(AmnsegError, match=r"demo: holds other files besides an older demo "
                       r"\(myrun, notes.txt\); move them, or choose another folder"):
        generate_demo(demo, seed=1, **TINY)
    assert tree_bytes(demo) == before
    # An empty folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_demo(empty, seed=0, **TINY) / "demo.json").is_file()


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(AmnsegError, match="num_classes"):
        generate_demo(tmp_path / "d", num_classes=9, **TINY)
    with pytest.raises(AmnsegError, match="size"):
        generate_demo(tmp_path / "d", num_train=2, num_val=1, size=8)
    assert not (tmp_path / "d").exists()


def test_folder_dataset_reads_demo(tiny_demo: Path) -> None:
    folder = pytest.importorskip("amnseg.data.folder")
    names = (tiny_demo / "classes.txt").read_text().splitlines()
    labels = read_labels(tiny_demo)
    for split, count in (("train", 12), ("val", 6)):
        dataset = folder.FolderDataset(tiny_demo, split)
        assert len(dataset) == count
        assert dataset.class_names == names
        for index in range(count):
            sample = dataset[index]
            expected = np.zeros(len(names), np.float32)
            expected[[names.index(c) for c in labels[sample.stem]]] = 1
            np.testing.assert_array_equal(sample.label, expected)
            assert sample.image.shape == (64, 64, 3)
            assert sample.mask is not None
            np.testing.assert_array_equal(
                sample.mask, np.asarray(Image.open(tiny_demo / "masks" / f"{sample.stem}.png"))
            )
