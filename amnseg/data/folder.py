"""Users' own data in a plain folder (also the format of the built-in demo).

    root/images/<stem>.<jpg|jpeg|png|bmp|webp>   any file names (suffix case does not matter)
    root/classes.txt         one foreground class name per line (class i + 1 is line i);
                             blank lines are ignored
    root/labels.csv          one ``stem,classes`` row per image; classes joined by ``;`` (may
                             be empty: no object); an optional header row ``stem,classes``;
                             quote a stem that holds a comma
    root/masks/<stem>.png    optional index PNGs (0 background, 1..C, 255 ignore) for evaluation
    root/splits/<split>.txt  optional stem lists, one per line

Splits: ``splits/<split>.txt`` when it exists; without a ``splits/`` folder every split is all
images of labels.csv (in file order); a ``splits/`` folder without the asked file is an error.
Stems are strings throughout (``007`` stays ``007``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from amnseg.data.base import SegDataset, check_class_count, require_dir
from amnseg.errors import AmnsegError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class FolderDataset(SegDataset):
    """A dataset in the folder format above; labels are (C,) multi-hot over classes.txt."""

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = require_dir(Path(root), "dataset")
        self.split = split
        self.image_dir = require_dir(self.root / "images", "images")
        self.class_names = read_class_names(self.root / "classes.txt")
        labels_file = self.root / "labels.csv"
        self._labels, rows = _read_labels(labels_file, self.class_names)
        self._images = _index_images(self.image_dir)
        for stem, line in rows.items():
            if stem not in self._images:
                raise AmnsegError(f"{labels_file}:{line}: image '{stem}' not found in "
                                  f"{self.image_dir} ({_why_not_found(self.image_dir, stem)})")
        self.stems = self._read_split(split, labels_file)
        mask_dir = self.root / "masks"
        if mask_dir.exists() and not mask_dir.is_dir():
            raise AmnsegError(f"{mask_dir}: is a file; masks/ is a folder of <stem>.png masks")
        self._mask_dir = mask_dir if mask_dir.is_dir() else None
        self._masks = _index_masks(mask_dir, set(self._labels)) if self._mask_dir else {}

    def _read_split(self, split: str, labels_file: Path) -> list[str]:
        split_dir = self.root / "splits"
        if split_dir.exists() and not split_dir.is_dir():
            raise AmnsegError(f"{split_dir}: is a file; splits/ is a folder of <split>.txt lists")
        if not split_dir.is_dir():
            return list(self._labels)
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in split_dir.glob("*.txt"))) or "none"
            raise AmnsegError(f"{path}: split list not found (splits here: {known})")
        stems: list[str] = []
        seen: set[str] = set()
        # Whole stripped lines, not the first word: stems may contain spaces.
        for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
            stem = line.strip()
            if not stem:
                continue
            if stem not in self._labels:
                raise AmnsegError(
                    f"{path}:{line_number}: image '{stem}' has no row in {labels_file}"
                )
            if stem in seen:
                raise AmnsegError(f"{path}:{line_number}: image '{stem}' is listed twice")
            seen.add(stem)
            stems.append(stem)
        if not stems:
            raise AmnsegError(f"{path}: the split lists no image")
        return stems

    def image_path(self, stem: str) -> Path:
        return self._images[stem]

    def label(self, stem: str) -> np.ndarray:
        """(C,) float32 multi-hot."""
        return self._labels[stem].copy()

    def mask_path(self, stem: str) -> Path | None:
        """``masks/<stem>.png`` when that file exists (masks may cover only some images)."""
        return self._masks.get(stem)

    def missing_masks(self) -> list[Path]:
        if self._mask_dir is None or not self.has_masks:
            return []
        return [self._mask_dir / f"{stem}.png" for stem in self.stems
                if self.mask_path(stem) is None]

    def shared_files(self) -> list[Path]:
        split = self.root / "splits" / f"{self.split}.txt"
        return [self.root / "classes.txt", self.root / "labels.csv"] + (
            [split] if split.is_file() else [])


def _read_text(path: Path) -> str:
    # utf-8-sig: spreadsheet programs often save a byte-order mark at the start.
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AmnsegError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_class_names(path: Path) -> list[str]:
    """Foreground class names in order (class index = position + 1)."""
    if not path.is_file():
        raise AmnsegError(f"{path}: class list not found (one class name per line)")
    names: list[str] = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise AmnsegError(f"{path}:{line_number}: class '{name}' is listed twice")
        if ";" in name:
            # labels.csv joins classes with ';', so such a name could never be referenced.
            raise AmnsegError(f"{path}:{line_number}: class name '{name}' contains ';'")
        if name.lower() == "background":
            raise AmnsegError(f"{path}:{line_number}: '{name}' listed as a class; list only the "
                              "foreground classes (class 0, value 0 in the masks, is the "
                              "background already)")
        names.append(name)
    if not names:
        raise AmnsegError(f"{path}: no class names")
    check_class_count(len(names), path)
    return names


def _read_labels(
    path: Path, class_names: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(stem -> (C,) multi-hot, stem -> line number in the file), in file order."""
    if not path.is_file():
        raise AmnsegError(f"{path}: labels.csv not found (rows of stem,classes)")
    index = {name: i for i, name in enumerate(class_names)}
    labels: dict[str, np.ndarray] = {}
    lines: dict[str, int] = {}
    first = True
    # Lines keep their endings so that a quoted field may span lines.
    reader = csv.reader(_read_text(path).splitlines(keepends=True))
    end = 0
    for row in reader:
        line_number, end = end + 1, reader.line_num  # a quoted field may span lines
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if end > line_number and any("\n" in cell for cell in cells):
            raise AmnsegError(f"{path}:{line_number}: a quoted field runs on to line {end} "
                              "(a stray '\"'?)")
        if len(cells) == 1 and ("\t" in cells[0] or ";" in cells[0]):
            separator = "a tab" if "\t" in cells[0] else "';'"
            raise AmnsegError(f"{path}:{line_number}: one column, with {separator} in it: "
                              "columns are separated by commas (stem,classes), several "
                              "classes by ';'")
        if first and [c.lower() for c in cells] == ["stem", "classes"]:
            first = False
            continue
        first = False
        if len(cells) > 2 and any(cells[2:]):
            raise AmnsegError(
                f"{path}:{line_number}: expected 2 columns (stem,classes), found {len(cells)}; "
                "join several classes with ';'"
            )
        stem = cells[0]
        if not stem:
            raise AmnsegError(f"{path}:{line_number}: empty image stem")
        if stem in labels:
            raise AmnsegError(
                f"{path}:{line_number}: image '{stem}' is listed twice (first on line "
                f"{lines[stem]})"
            )
        label = np.zeros(len(class_names), dtype=np.float32)
        classes = cells[1] if len(cells) > 1 else ""
        for name in filter(None, (n.strip() for n in classes.split(";"))):
            if name not in index:
                header = (" (a header row must read stem,classes)" if line_number == 1
                          else "")
                same = [known for known in class_names if known.lower() == name.lower()]
                if same:
                    header += f" (did you mean '{same[0]}'? class names are case-sensitive)"
                raise AmnsegError(
                    f"{path}:{line_number}: unknown class '{name}' (not in classes.txt){header}"
                )
            label[index[name]] = 1.0
        labels[stem] = label
        lines[stem] = line_number
    if not labels:
        raise AmnsegError(f"{path}: no image rows")
    if not any(label.any() for label in labels.values()):
        raise AmnsegError(f"{path}: no row names a class (image-level labels are what the "
                          "method learns from)")
    return labels, lines


def _index_masks(mask_dir: Path, stems: set[str]) -> dict[str, Path]:
    """stem -> mask file (``.png`` in any case), from one scan of ``mask_dir``; a mask of a
    listed image in another format is an error (masks are lossless index images)."""
    masks: dict[str, Path] = {}
    for path in sorted(mask_dir.iterdir()):
        if path.stem not in stems or not path.is_file():
            continue
        if path.suffix.lower() != ".png":
            if path.suffix.lower() in IMAGE_SUFFIXES:
                raise AmnsegError(f"{path}: masks must be PNG index images (a lossy or "
                                  "colour format changes class numbers)")
            continue
        if path.stem in masks:
            raise AmnsegError(f"{mask_dir}: two masks for '{path.stem}' ({masks[path.stem].name}"
                              f", {path.name})")
        masks[path.stem] = path
    return masks


def _why_not_found(image_dir: Path, stem: str) -> str:
    """What is there instead of image ``stem``: a hint for the common mix-ups."""
    candidates = [image_dir / f"{stem}{suffix}" for suffix in IMAGE_SUFFIXES]
    present = [p for p in candidates if p.exists() or p.is_symlink()]
    if present:
        return f"{present[0].name} is there but is not a readable file"
    if Path(stem).suffix.lower() in IMAGE_SUFFIXES:
        return (f"labels.csv names images by their stem, without the extension: "
                f"'{Path(stem).stem}'")
    return f"looked for {stem} with suffix {'/'.join(IMAGE_SUFFIXES)}"


def _index_images(image_dir: Path) -> dict[str, Path]:
    """stem -> image file, from one scan of ``image_dir``."""
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in images:
            raise AmnsegError(
                f"{image_dir}: two images share the name '{path.stem}' "
                f"({images[path.stem].name}, {path.name})"
            )
        images[path.stem] = path
    return images
