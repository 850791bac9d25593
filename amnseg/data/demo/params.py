"""What a demo dataset is: its classes (``MARKS``), its parameters and the samples it holds.

``DemoParams`` is everything the generated data depends on; ``DemoSample`` and ``DemoObject``
are what ``render_sample`` returns; ``split_stems`` names the images of a split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from amnseg.errors import AmnsegError

# Bump when the drawing changes, so that an existing demo made by older code is regenerated.
DEMO_VERSION = 2

# Class name, glyph, glyph colour. Colours are at full brightness/saturation (or white) while
# bodies stay below 85 % brightness and above 45 % saturation, so a glyph never melts into its
# body; the near-black outline separates them further.
MARKS: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("red_disk", "disk", (255, 40, 40)),
    ("yellow_ring", "ring", (255, 225, 0)),
    ("white_cross", "cross", (250, 250, 250)),
    ("blue_square", "square", (40, 90, 255)),
    ("green_triangle", "triangle", (40, 235, 40)),
    ("magenta_bars", "bars", (255, 40, 255)),
    ("cyan_diamond", "diamond", (40, 235, 235)),
    ("orange_hourglass", "hourglass", (255, 140, 0)),
)

SPLITS = ("train", "val")


@dataclass(frozen=True)
class DemoParams:
    """Everything the generated data depends on (stored in ``demo.json``)."""

    seed: int = 0
    num_train: int = 800
    num_val: int = 200
    size: int = 96  # 96 px keeps the whole demo within 10 minutes on 2 CPU cores
    num_classes: int = len(MARKS)
    max_objects: int = 3
    body_range: tuple[float, float] = (0.22, 0.90)  # body's long axis / image side
    mark_range: tuple[float, float] = (0.03, 0.10)  # area of one mark / body area
    marks_per_object: tuple[int, int] = (1, 4)  # how many marks an object gets (min, max)
    ignore_border: int = 1  # width of the 255 band on object contours; 0 = none
    version: int = DEMO_VERSION

    def validate(self) -> None:
        if not 1 <= self.num_classes <= len(MARKS):
            raise AmnsegError(f"demo num_classes={self.num_classes}: expected 1..{len(MARKS)}")
        if self.size < 32:
            raise AmnsegError(f"demo size={self.size}: expected at least 32 pixels")
        if self.num_train < 1 or self.num_val < 0:
            raise AmnsegError(
                f"demo num_train={self.num_train}, num_val={self.num_val}: "
                "expected at least one training image"
            )
        if self.max_objects < 1:
            raise AmnsegError(f"demo max_objects={self.max_objects}: expected at least 1")
        low, high = self.body_range
        if not 0.05 <= low <= high <= 1.5:
            raise AmnsegError(f"demo body_range={self.body_range}: expected 0.05 <= low <= high")
        low, high = self.mark_range
        if not 0.0 < low <= high < 0.5:
            raise AmnsegError(f"demo mark_range={self.mark_range}: expected 0 < low <= high < 0.5")
        low, high = self.marks_per_object
        if not 1 <= low <= high:
            raise AmnsegError(
                f"demo marks_per_object={self.marks_per_object}: expected 1 <= low <= high"
            )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["body_range"] = list(self.body_range)
        data["mark_range"] = list(self.mark_range)
        data["marks_per_object"] = list(self.marks_per_object)
        return data

    @property
    def class_names(self) -> list[str]:
        return [name for name, _, _ in MARKS[: self.num_classes]]


@dataclass
class DemoObject:
    """One drawn object. ``body`` is the object's visible region (mark included) in the final
    image, ``mark`` its glyph + outline pixels (always all visible), ``glyph`` the glyph only."""

    class_index: int  # 1..C, as in the mask
    body: np.ndarray  # (H, W) bool
    mark: np.ndarray  # (H, W) bool
    glyph: np.ndarray  # (H, W) bool
    body_area: int  # in-image body pixels before occlusion by later objects


@dataclass
class DemoSample:
    """One rendered image with its mask (255 borders included) and its objects."""

    stem: str
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8
    objects: list[DemoObject] = field(default_factory=list)

    @property
    def classes(self) -> list[int]:
        """Sorted class indices (1..C) present in the image."""
        return sorted({obj.class_index for obj in self.objects})


def all_stems(params: DemoParams) -> list[str]:
    """The stems of every image, train first, then val."""
    return split_stems("train", params.num_train) + split_stems("val", params.num_val)


def split_stems(split: str, count: int) -> list[str]:
    """``<split>_0000``, ``<split>_0001``, ...: zero-padded to at least four digits."""
    width = max(4, len(str(max(count - 1, 0))))
    return [f"{split}_{i:0{width}d}" for i in range(count)]
