"""Pixel painting: the textured background, body fills, mark glyphs and the mask's contours.

Each function paints (or masks) at positions that ``scene`` has already chosen; colours and
noise are drawn from the generator it passes in, so the order of calls is part of the output.
"""

from __future__ import annotations

import colorsys

import numpy as np

# Near-black 1-px outline around every glyph: separates a mark from a body of any colour.
OUTLINE_COLOR = (18, 18, 18)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def textured_background(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int
) -> np.ndarray:
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


def paint_body(
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


def mark_masks(
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


def paint_mark(
    rng: np.random.Generator,
    image: np.ndarray,
    glyph: np.ndarray,
    outline: np.ndarray,
    color: tuple[int, int, int],
) -> None:
    """Paint a mark: the outline near-black, the glyph in the class colour, both with weak noise."""
    image[outline] = np.asarray(OUTLINE_COLOR, np.float32) + rng.normal(
        0.0, 2.0, (int(outline.sum()), 3)
    ).astype(np.float32)
    image[glyph] = np.asarray(color, np.float32) + rng.normal(
        0.0, 2.0, (int(glyph.sum()), 3)
    ).astype(np.float32)


def inner_contour(labels: np.ndarray, width: int) -> np.ndarray:
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
