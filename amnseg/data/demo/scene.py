"""Random scene layout: where bodies and their marks go, and the rendering of one sample.

``render_sample`` is the entry point: it lays out bodies (``_body_shape``) and their mark boxes
(``_place_object``, ``_random_box_inside``) and has ``draw`` paint them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from amnseg.data.base import IGNORE_INDEX
from amnseg.data.demo.draw import (
    inner_contour,
    mark_masks,
    paint_body,
    paint_mark,
    textured_background,
)
from amnseg.data.demo.params import MARKS, SPLITS, DemoObject, DemoParams, DemoSample, split_stems
from amnseg.errors import AmnsegError

MIN_MARK_PX = 7  # smallest glyph box (pixels) in which the eight glyphs stay distinguishable
PLACEMENT_TRIES = 40


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


def _render(rng: np.random.Generator, params: DemoParams, stem: str) -> DemoSample:
    """Lay out and paint one sample. Every random number comes from ``rng``, in a fixed order."""
    size = params.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    image = textured_background(rng, yy, xx, size)
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
        paint_body(rng, image, body, yy, xx)
        glyph = np.zeros((size, size), dtype=bool)
        outline = np.zeros((size, size), dtype=bool)
        for y0, x0, side in mark_boxes:
            one_glyph, one_outline = mark_masks(
                rng, MARKS[class_index - 1][1], (y0, x0, side), size
            )
            paint_mark(rng, image, one_glyph, one_outline, MARKS[class_index - 1][2])
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
        mask[inner_contour(labels, params.ignore_border)] = IGNORE_INDEX
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


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    # Log-uniform so that small and large objects are equally common on a ratio scale.
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))
