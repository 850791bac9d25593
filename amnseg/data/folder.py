"""Users' own data in a plain folder (also the format of the built-in demo).

    root/images/<stem>.<jpg|jpeg|png|bmp|webp>   any file names
    root/classes.txt       one foreground class name per line (class i + 1 is line i)
    root/labels.csv        ``stem,classes`` rows; classes joined by ``;`` (may be empty);
                           an optional header row ``stem,classes``
    root/masks/<stem>.png  optional index PNGs (0 background, 1..C, 255 ignore) for evaluation
    root/splits/<split>.txt  optional stem lists; without a splits/ folder every split is
                             all images of labels.csv
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from amnseg.data.base import SegDataset, require_dir
from amnseg.errors import AmnsegError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class FolderDataset(SegDataset):
    def __init__(self, root: str | Path, split: str):
        self.root = require_dir(Path(root), "dataset")
        image_dir = require_dir(self.root / "images", "images")
        self.class_names = self._read_classes(self.root / "classes.txt")
        self._labels = self._read_labels(self.root / "labels.csv")
        self._images = self._index_images(image_dir)
        self.stems = self._read_split(split)
        for stem in self.stems:
            if stem not in self._images:
                raise AmnsegError(
                    f"{image_dir}: no image file for '{stem}' (listed in labels.csv)"
                )
        self._mask_dir = self.root / "masks" if (self.root / "masks").is_dir() else None

    @staticmethod
    def _read_classes(path: Path) -> list[str]:
        if not path.is_file():
            raise AmnsegError(f"{path}: class list not found")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise AmnsegError(f"{path}: no class names")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise AmnsegError(f"{path}: class '{duplicates[0]}' is listed twice")
        return names

    def _read_labels(self, path: Path) -> dict[str, np.ndarray]:
        if not path.is_file():
            raise AmnsegError(f"{path}: labels.csv not found")
        index = {name: i for i, name in enumerate(self.class_names)}
        labels: dict[str, np.ndarray] = {}
        with open(path, newline="") as f:
            for line_number, row in enumerate(csv.reader(f), start=1):
                is_header = line_number == 1 and [c.strip() for c in row] == ["stem", "classes"]
                if not row or is_header:
                    continue
                stem = row[0].strip()
                names = [n.strip() for n in (row[1] if len(row) > 1 else "").split(";")]
                label = np.zeros(len(self.class_names), dtype=np.float32)
                for name in filter(None, names):
                    if name not in index:
                        raise AmnsegError(
                            f"{path}:{line_number}: unknown class '{name}' (not in classes.txt)"
                        )
                    label[index[name]] = 1.0
                if stem in labels:
                    raise AmnsegError(f"{path}:{line_number}: image '{stem}' is listed twice")
                labels[stem] = label
        return labels

    @staticmethod
    def _index_images(image_dir: Path) -> dict[str, Path]:
        images: dict[str, Path] = {}
        for path in sorted(image_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.stem in images:
                raise AmnsegError(
                    f"{image_dir}: two images share the name '{path.stem}' "
                    f"({images[path.stem].name}, {path.name})"
                )
            images[path.stem] = path
        return images

    def _read_split(self, split: str) -> list[str]:
        split_dir = self.root / "splits"
        if not split_dir.is_dir():
            return list(self._labels)
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            raise AmnsegError(f"{path}: split list not found")
        stems = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for stem in stems:
            if stem not in self._labels:
                raise AmnsegError(f"{path}: image '{stem}' has no row in labels.csv")
        return stems

    def image_path(self, stem: str) -> Path:
        return self._images[stem]

    def label(self, stem: str) -> np.ndarray:
        return self._labels[stem].copy()

    def mask_path(self, stem: str) -> Path | None:
        return None if self._mask_dir is None else self._mask_dir / f"{stem}.png"
