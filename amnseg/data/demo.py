"""The built-in demo dataset: synthetic images that reproduce the threshold problem of CAMs.

Every object is a *body* carrying a few small *marks*:

- The body (ellipse, wobbly blob or rounded polygon; long axis 22-90 % of the image side,
  log-uniform; aspect and rotation random) has a look that is shared by all classes: one
  saturated colour of any hue with a gentle brightness gradient and weak noise. Nothing about
  the body tells its class.
- A mark is a small glyph (3-10 % of the body's area each) whose form *and* colour identify
  the class (a red disk, a yellow ring, ...), drawn with a 1-px near-black outline so that it
  stands out on any body colour. An object has 1-4 marks of its class, spread over the body
  like the discriminative parts of a real object (all marks together: median ~11 %, 90th
  percentile ~18 % of the body). Marks are always fully visible: later objects, which may
  overlap earlier ones, never cover them.
- The ground-truth mask is the whole body (marks included).

So image labels are solvable from the marks alone and a classifier's CAM fires on the marks,
while the target is the body: how far a CAM must be thresholded to cover its body depends on
the body's size and on how many marks it has and how large they are, which vary widely from
object to object. A single global threshold is then wrong for many images and per-image optimal
thresholds spread, which is the phenomenon "Threshold Matters in WSSS" (CVPR 2022) is about.
(With a single mark per object and output stride 8, CAMs were too peaky: the best global
threshold sat at the bottom of the range, ~0.05. Several marks and a wider range of body sizes
moved it to ~0.10 and spread the per-image optimum; see ``marks_per_object``, ``body_range``.)

Eight classes, not fewer: AMN is trained with label smoothing eps = 0.4 spread over the C other
channels, so on confident background its softmax for a foreground class settles near eps / C
(VOC, C = 20: 0.02). With six classes that floor was 0.067 and a quarter of the background
pixels scored above 0.10, the bottom of the robust threshold range; eight classes (0.05) bring
the demo closer to the method's regime (the generator allows at most ``len(MARKS)`` = 8).

The background is textured (low-frequency shading, desaturated clutter shapes, pixel noise) but
always low in saturation, so bodies are separable from it by colour and a dense CRF with a
narrow colour kernel (srgb 5) can follow body edges, while body interiors are smooth enough
(noise std 2) for its bilateral kernel to spread a label across them.

The data is written in the "folder" format, the same format users' own data uses::

    root/images/<stem>.png     RGB
    root/masks/<stem>.png      index PNG: 0 background, 1..C classes, 255 on the 1-px inner
                               contour of every object (like the ignore borders of VOC masks;
                               ``ignore_border=0`` turns this off)
    root/classes.txt           one class name per line (class i+1 of the masks is line i)
    root/labels.csv            header ``stem,classes``; class names joined by ``;``
    root/splits/train.txt      stems, one per line
    root/splits/val.txt
    root/demo.json             the generation parameters; written last, marks a complete demo

Stems are ``train_0000``, ``val_0000``, ... Each image is a deterministic function of
(seed, split, index) and the parameters, so the files are byte-identical across runs.
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from amnseg.data.base import IGNORE_INDEX
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
OUTLINE_COLOR = (18, 18, 18)

SPLITS = ("train", "val")
MIN_MARK_PX = 7  # smallest glyph box (pixels) in which the eight glyphs stay distinguishable
PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class DemoParams:
    """Everything the generated data depends on (stored in ``demo.json``)."""

    seed: int = 0
    num_train: int = 800
    num_val: int = 200
    size: int = 128
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def generate_demo(
    root: str | Path,
    seed: int = DemoParams.seed,
    num_train: int = DemoParams.num_train,
    num_val: int = DemoParams.num_val,
    size: int = DemoParams.size,
    num_classes: int = DemoParams.num_classes,
    max_objects: int = DemoParams.max_objects,
    body_range: tuple[float, float] = DemoParams.body_range,
    mark_range: tuple[float, float] = DemoParams.mark_range,
    marks_per_object: tuple[int, int] = DemoParams.marks_per_object,
    ignore_border: int = DemoParams.ignore_border,
    force: bool = False,
) -> Path:
    """Write the demo dataset to ``root`` (folder format) and return ``root``.

    Skipped when ``root`` already holds a complete demo with the same parameters (unless
    ``force``). The data is generated into a hidden folder beside ``root`` and renamed into
    place at the end, so an interrupted generation never leaves a half-written ``root``. An
    existing ``root`` is replaced only if it is empty or an older demo (it has ``demo.json``);
    any other non-empty folder is left alone and an ``AmnsegError`` is raised.
    """
    root = Path(root)
    params = DemoParams(
        seed=int(seed),
        num_train=int(num_train),
        num_val=int(num_val),
        size=int(size),
        num_classes=int(num_classes),
        max_objects=int(max_objects),
        body_range=(float(body_range[0]), float(body_range[1])),
        mark_range=(float(mark_range[0]), float(mark_range[1])),
        marks_per_object=(int(marks_per_object[0]), int(marks_per_object[1])),
        ignore_border=int(ignore_border),
    )
    params.validate()
    if not force and is_complete_demo(root, params):
        return root
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-{os.getpid()}-", dir=root.parent))
    try:
        _write_demo(tmp, params)
        if not force and is_complete_demo(root, params):
            # Another process finished the same demo meanwhile: keep theirs.
            shutil.rmtree(tmp)
            return root
        _replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_demo(root: str | Path, **params: Any) -> Path:
    """Generate the demo at ``root`` unless a complete one with these parameters is there.

    ``params`` are those of ``generate_demo`` (seed, num_train, ...); returns ``root``.
    """
    return generate_demo(Path(root), **params)


def is_complete_demo(root: str | Path, params: DemoParams) -> bool:
    """True when ``root/demo.json`` matches ``params`` and every file it implies exists."""
    root = Path(root)
    try:
        stored = json.loads((root / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    if stored != params.to_json():
        return False
    fixed = ["classes.txt", "labels.csv", "splits/train.txt", "splits/val.txt"]
    if not all((root / name).is_file() for name in fixed):
        return False
    for stem in all_stems(params):
        if not (root / "images" / f"{stem}.png").is_file():
            return False
        if not (root / "masks" / f"{stem}.png").is_file():
            return False
    return True


def all_stems(params: DemoParams) -> list[str]:
    return split_stems("train", params.num_train) + split_stems("val", params.num_val)


def split_stems(split: str, count: int) -> list[str]:
    width = max(4, len(str(max(count - 1, 0))))
    return [f"{split}_{i:0{width}d}" for i in range(count)]


def render_sample(params: DemoParams, split: str, index: int) -> DemoSample:
    """Render image ``index`` of ``split``: a pure function of (params, split, index)."""
    if split not in SPLITS:
        raise AmnsegError(f"demo split {split!r}: expected one of {SPLITS}")
    count = params.num_train if split == "train" else params.num_val
    stem = split_stems(split, count)[index]
    # One independent stream per image: images do not depend on the split sizes or on the
    # order they are drawn in.
    rng = np.random.default_rng([params.seed, SPLITS.index(split), index])
    return _render(rng, params, stem)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _write_demo(folder: Path, params: DemoParams) -> None:
    """Write a complete demo into ``folder`` (an empty temporary folder); demo.json last."""
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    (folder / "splits").mkdir()
    names = params.class_names
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    rows: list[tuple[str, str]] = []
    for split, count in (("train", params.num_train), ("val", params.num_val)):
        stems = []
        for index in range(count):
            sample = render_sample(params, split, index)
            _save_png(folder / "images" / f"{sample.stem}.png", sample.image)
            _save_png(folder / "masks" / f"{sample.stem}.png", sample.mask)
            rows.append((sample.stem, ";".join(names[c - 1] for c in sample.classes)))
            stems.append(sample.stem)
        (folder / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("stem", "classes"))
    writer.writerows(rows)
    (folder / "labels.csv").write_text(buffer.getvalue())
    (folder / "demo.json").write_text(json.dumps(params.to_json(), indent=2) + "\n")


def _save_png(path: Path, array: np.ndarray) -> None:
    # Plain PIL PNGs carry no timestamp, so equal arrays give byte-identical files.
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def _check_replaceable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise AmnsegError(f"{root}: exists and is not a folder; cannot write the demo there")
    if root.is_dir() and any(root.iterdir()) and not (root / "demo.json").is_file():
        raise AmnsegError(
            f"{root}: folder exists, is not empty and holds no demo.json; refusing to "
            "overwrite it with the demo data (choose another folder or empty it)"
        )


def _replace_dir(new: Path, root: Path) -> None:
    """Move ``new`` to ``root``; an existing (empty or demo) ``root`` is set aside first."""
    if not root.exists():
        os.rename(new, root)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-{os.getpid()}-", dir=root.parent))
    os.rename(root, old / "data")
    try:
        os.rename(new, root)
    except BaseException:
        os.rename(old / "data", root)  # put the previous demo back rather than lose it
        raise
    finally:
        if root.exists():
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(root: Path) -> None:
    """Delete temporary folders left beside ``root`` by generations that were killed."""
    for prefix in (f".{root.name}.partial-", f".{root.name}.old-"):
        for path in root.parent.glob(f"{prefix}*"):
            pid_text = path.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (when unsure: yes)."""
    if pid == os.getpid() or os.name == "nt":
        return True  # on Windows os.kill(pid, 0) would terminate the process: never probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (owned by someone else) or unknown: leave its folder alone
    return True


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    # Log-uniform so that small and large objects are equally common on a ratio scale.
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _render(rng: np.random.Generator, params: DemoParams, stem: str) -> DemoSample:
    size = params.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    image = _background(rng, yy, xx, size)
    labels = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int16)  # which object each pixel shows
    protected = np.zeros((size, size), dtype=bool)  # earlier marks (+ margin): never covered
    placed: list[dict[str, Any]] = []

    count = int(rng.integers(1, params.max_objects + 1))
    for _ in range(count):
        class_index = int(rng.integers(1, params.num_classes + 1))
        obj = _place_object(rng, params, yy, xx, owner, protected, placed)
        if obj is None:
            continue  # no room left for another object with a visible mark
        body, body_area, mark_boxes = obj
        number = len(placed)
        _paint_body(rng, image, body, yy, xx)
        glyph = np.zeros((size, size), dtype=bool)
        outline = np.zeros((size, size), dtype=bool)
        for y0, x0, side in mark_boxes:
            one_glyph, one_outline = _mark_masks(
                rng, MARKS[class_index - 1][1], (y0, x0, side), size
            )
            _paint_mark(rng, image, one_glyph, one_outline, MARKS[class_index - 1][2])
            glyph |= one_glyph
            outline |= one_outline
            protected[max(0, y0 - 3) : y0 + side + 3, max(0, x0 - 3) : x0 + side + 3] = True
        labels[body] = class_index
        owner[body] = number
        placed.append(
            {"class": class_index, "area": body_area, "glyph": glyph, "mark": glyph | outline}
        )

    image += rng.normal(0.0, 1.0, image.shape).astype(np.float32)  # sensor-like noise
    mask = labels.copy()
    if params.ignore_border > 0:
        mask[_inner_contour(labels, params.ignore_border)] = IGNORE_INDEX
    objects = [
        DemoObject(
            class_index=info["class"],
            body=owner == number,
            mark=info["mark"],
            glyph=info["glyph"],
            body_area=info["area"],
        )
        for number, info in enumerate(placed)
    ]
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return DemoSample(stem=stem, image=pixels, mask=mask, objects=objects)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Desaturated, textured background: shading waves, clutter shapes, strong pixel noise."""
    base = _hsv(rng.uniform(), rng.uniform(0.0, 0.18), rng.uniform(0.30, 0.65))
    shade = np.zeros((size, size), dtype=np.float32)
    for _ in range(3):
        freq = rng.uniform(0.5, 3.0, 2) * (2 * np.pi / size)
        shade += rng.uniform(4.0, 10.0) * np.cos(freq[0] * yy + freq[1] * xx + rng.uniform(0, 7))
    image = base[None, None, :] + shade[..., None]
    # Clutter: low-saturation ellipses and strokes, so the background has edges and texture
    # (a classifier cannot just detect "any edge"), yet stays apart from bodies in colour.
    for _ in range(int(rng.integers(3, 9))):
        color = _hsv(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.2, 0.75))
        cy, cx = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            ry, rx = rng.uniform(0.03, 0.15, 2) * size
            angle = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            region = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
        else:
            length = rng.uniform(0.15, 0.5) * size
            angle = rng.uniform(0, np.pi)
            dy, dx = np.sin(angle), np.cos(angle)
            along = np.clip((yy - cy) * dy + (xx - cx) * dx, -length / 2, length / 2)
            dist = np.hypot(yy - cy - along * dy, xx - cx - along * dx)
            region = dist <= rng.uniform(0.6, 1.8)
        image[region] = color + shade[region][:, None]
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    return image.astype(np.float32)


def _body_shape(
    rng: np.random.Generator, params: DemoParams, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, float]:
    """A random body: (in-image mask, full analytic area in pixels)."""
    size = params.size
    long_axis = _log_uniform(rng, *params.body_range) * size
    radius_x = long_axis / 2
    radius_y = radius_x * rng.uniform(0.55, 1.0)
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / radius_x
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / radius_y
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    kind = rng.integers(3)
    thetas = np.linspace(-np.pi, np.pi, 360, endpoint=False, dtype=np.float32)
    if kind == 0:  # ellipse

        def edge(t: np.ndarray) -> np.ndarray:
            return np.ones_like(t)

    elif kind == 1:  # blob: a few low harmonics wobble the outline
        ks = np.arange(2, 5)
        amps = rng.uniform(0.0, 0.13, ks.size)
        phases = rng.uniform(0, 2 * np.pi, ks.size)

        def edge(t: np.ndarray) -> np.ndarray:
            return 1.0 + (amps * np.cos(ks * t[..., None] + phases)).sum(-1)

    else:  # rounded regular polygon with 4-8 sides
        sides = int(rng.integers(4, 9))
        sector = 2 * np.pi / sides
        rot = rng.uniform(0, sector)

        def edge(t: np.ndarray) -> np.ndarray:
            local = np.mod(t + rot, sector) - sector / 2
            polygon = np.cos(sector / 2) / np.cos(local)
            return 0.75 * polygon + 0.25  # mix with a circle to round the corners a bit

    body = rho <= edge(theta)
    # Area of the star-shaped region r <= edge(theta) scaled by the two radii.
    area = float(np.pi * np.mean(edge(thetas) ** 2) * radius_x * radius_y)
    return body, area


def _place_object(
    rng: np.random.Generator,
    params: DemoParams,
    yy: np.ndarray,
    xx: np.ndarray,
    owner: np.ndarray,
    protected: np.ndarray,
    placed: list[dict[str, Any]],
) -> tuple[np.ndarray, int, list[tuple[int, int, int]]] | None:
    """Find a body and its mark boxes for a new object, or None after ``PLACEMENT_TRIES``.

    Constraints: most of the body lies inside the image; it covers no earlier mark; every
    earlier object keeps at least half of its area visible; every mark box (plus a 1-px
    outline and a 2-px margin) lies inside the body, apart from the object's other marks.
    Returns (body, in-image body area, [(top, left, side) of each glyph box]).
    """
    wanted = int(rng.integers(params.marks_per_object[0], params.marks_per_object[1] + 1))
    for _ in range(PLACEMENT_TRIES):
        body, full_area = _body_shape(rng, params, yy, xx)
        area = int(body.sum())
        if area < 0.6 * full_area or (body & protected).any():
            continue
        if any(
            ((owner == number) & ~body).sum() < 0.5 * info["area"]
            for number, info in enumerate(placed)
        ):
            continue
        free = body.copy()
        boxes: list[tuple[int, int, int]] = []
        for _ in range(wanted):
            fraction = _log_uniform(rng, *params.mark_range)
            side = max(MIN_MARK_PX, int(round(np.sqrt(fraction * area))))
            # Box = glyph + 1-px outline + 2-px margin on each side.
            centres = [(y + side_ / 2, x + side_ / 2) for y, x, side_ in boxes]
            box = _random_box_inside(rng, free, side + 2 + 2 * 2, avoid=centres)
            if box is None:
                break  # no room for more marks on this body
            y0, x0 = box[0] + 3, box[1] + 3  # top-left of the glyph box itself
            boxes.append((y0, x0, side))
            free[y0 - 1 : y0 + side + 1, x0 - 1 : x0 + side + 1] = False
        if boxes:
            return body, area, boxes
    return None


def _random_box_inside(
    rng: np.random.Generator,
    region: np.ndarray,
    side: int,
    avoid: list[tuple[float, float]] | None = None,
    candidates: int = 4,
) -> tuple[int, int] | None:
    """Top-left of a random ``side`` x ``side`` box lying entirely inside ``region``.

    With ``avoid`` (box centres), the farthest of ``candidates`` random boxes is taken, which
    spreads an object's marks over its body like the parts of a real object.
    """
    height, width = region.shape
    if side > min(height, width):
        return None
    # Summed-area table: the pixel count of every box at once, no Python loop.
    table = np.zeros((height + 1, width + 1), dtype=np.int32)
    table[1:, 1:] = region.cumsum(0).cumsum(1)
    sums = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
    ys, xs = np.nonzero(sums == side * side)
    if ys.size == 0:
        return None
    if not avoid:
        pick = int(rng.integers(ys.size))
        return int(ys[pick]), int(xs[pick])
    picks = rng.integers(ys.size, size=candidates)
    centres = np.stack([ys[picks], xs[picks]], 1) + side / 2
    others = np.asarray(avoid, dtype=np.float64)
    distance = np.linalg.norm(centres[:, None, :] - others[None, :, :], axis=-1).min(1)
    pick = int(picks[int(distance.argmax())])
    return int(ys[pick]), int(xs[pick])


def _paint_body(
    rng: np.random.Generator, image: np.ndarray, body: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> None:
    """Fill ``body`` with one saturated colour, a gentle gradient and weak noise.

    The colour distribution is the same for every class. Saturation >= 0.45 keeps bodies apart
    from the desaturated background; the smooth interior (noise std ~2 with the final sensor
    noise, brightness gradient within +-4 %) lets a CRF with a 5-level colour kernel spread
    labels across the body.
    """
    color = _hsv(rng.uniform(), rng.uniform(0.45, 0.85), rng.uniform(0.5, 0.82))
    angle = rng.uniform(0, 2 * np.pi)
    size = image.shape[0]
    ramp = ((yy * np.sin(angle) + xx * np.cos(angle)) / size - 0.5) * rng.uniform(0.0, 20.0)
    pixels = color[None, :] * (1.0 + ramp[body][:, None] / 255.0)
    pixels += rng.normal(0.0, 2.0, pixels.shape).astype(np.float32)
    image[body] = pixels


def _glyph(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The glyph ``kind`` in coordinates u, v in [-1, 1] (v down); fits in the unit disk."""
    r = np.hypot(u, v)
    if kind == "disk":
        return r <= 0.9
    if kind == "ring":
        return (r <= 0.95) & (r >= 0.5)
    if kind == "cross":
        return ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (
            np.maximum(np.abs(u), np.abs(v)) <= 0.95
        )
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.68
    if kind == "triangle":
        return (v <= 0.6) & (np.abs(u) <= (v + 0.95) * 0.62)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 0.95
    if kind == "hourglass":
        return (np.abs(u) <= np.abs(v) * 0.95 + 0.12) & (np.abs(v) <= 0.8)
    if kind == "bars":
        inside = np.maximum(np.abs(u), np.abs(v)) <= 0.7
        return inside & (np.floor((v + 0.7) / 0.28).astype(np.int64) % 2 == 0)
    raise ValueError(kind)


def _mark_masks(
    rng: np.random.Generator, kind: str, box: tuple[int, int, int], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(glyph, outline) full-image masks of a glyph in the ``side`` box at (y0, x0)."""
    y0, x0, side = box
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side * 2.0 - 1.0
    v0, u0 = np.meshgrid(coords, coords, indexing="ij")
    # Mild rotation: marks vary a bit, but stay recognisable at 7 px.
    angle = rng.uniform(-0.35, 0.35)
    u = u0 * np.cos(angle) + v0 * np.sin(angle)
    v = -u0 * np.sin(angle) + v0 * np.cos(angle)
    local = _glyph(kind, u, v)
    glyph = np.zeros((size, size), dtype=bool)
    glyph[y0 : y0 + side, x0 : x0 + side] = local
    # 1-px outline: 8-neighbour dilation minus the glyph (the box has room for it).
    grown = glyph.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown |= np.roll(np.roll(glyph, dy, 0), dx, 1)
    return glyph, grown & ~glyph


def _paint_mark(
    rng: np.random.Generator,
    image: np.ndarray,
    glyph: np.ndarray,
    outline: np.ndarray,
    color: tuple[int, int, int],
) -> None:
    image[outline] = np.asarray(OUTLINE_COLOR, np.float32) + rng.normal(
        0.0, 2.0, (int(outline.sum()), 3)
    ).astype(np.float32)
    image[glyph] = np.asarray(color, np.float32) + rng.normal(
        0.0, 2.0, (int(glyph.sum()), 3)
    ).astype(np.float32)


def _inner_contour(labels: np.ndarray, width: int) -> np.ndarray:
    """Foreground pixels within ``width`` px (4-connected steps) of a different label."""
    border = np.zeros(labels.shape, dtype=bool)
    current = labels
    for _ in range(width):
        differs = np.zeros(labels.shape, dtype=bool)
        differs[1:, :] |= current[1:, :] != current[:-1, :]
        differs[:-1, :] |= current[:-1, :] != current[1:, :]
        differs[:, 1:] |= current[:, 1:] != current[:, :-1]
        differs[:, :-1] |= current[:, :-1] != current[:, 1:]
        border |= differs & (labels > 0)
        # Peel the marked ring off (as a fake label) so the next pass marks the next ring in.
        current = np.where(border, np.uint8(254), labels)
    return border
