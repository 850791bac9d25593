"""Inter-pixel geometry of IRN (METHOD.md section 5): search directions, paths, affinities,
and the pair labels that train the boundary network.

Search directions within a radius r cover half the neighbourhood: (0, x) for 1 <= x < r, and
(y, x) for 1 <= y < r, -r < x < r with x^2 + y^2 < r^2. The path of a direction is the set of
integer offsets in its bounding box whose squared distance to the line through (0, 0) and the
direction is < 1; the affinity of two pixels is 1 - the largest boundary probability on it.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F


@cache
def search_directions(radius: int) -> tuple[tuple[int, int], ...]:
    """The (dy, dx) offsets of the half neighbourhood, in the reference's order."""
    directions = [(0, x) for x in range(1, radius)]
    directions += [
        (y, x)
        for y in range(1, radius)
        for x in range(-radius + 1, radius)
        if x * x + y * y < radius * radius
    ]
    return tuple(directions)


@cache
def path_offsets(direction: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Integer offsets on the straight path from (0, 0) to ``direction`` (both ends included)."""
    dy, dx = direction
    length_sq = dy * dy + dx * dx
    return tuple(
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < length_sq  # squared distance to the line < 1
    )


def shifted(maps: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """out[..., i, j] = maps[..., i + dy, j + dx], ``fill`` where that falls outside."""
    height, width = maps.shape[-2:]
    pad = max(abs(dy), abs(dx))
    padded = F.pad(maps, (pad, pad, pad, pad), value=fill)
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def path_affinities(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """Affinity of every pixel with its neighbour in each search direction.

    ``boundary`` (..., H, W) in [0, 1] -> (..., D, H, W), D = len(search_directions(radius)):
    1 - max boundary over the path from the pixel to the pixel + direction; 0 where that
    neighbour is outside the map (the path would leave it: boundary there counts as 1).
    """
    affinities = []
    for direction in search_directions(radius):
        path_max = torch.stack(
            [shifted(boundary, dy, dx, 1.0) for dy, dx in path_offsets(direction)]
        ).amax(dim=0)
        affinities.append(1.0 - path_max)
    return torch.stack(affinities, dim=-3)


def pair_region(height: int, width: int, radius: int) -> tuple[slice, slice]:
    """Source pixels whose every neighbour within ``radius`` lies inside the map (as in the
    reference's training pairs): rows [0, H - (r - 1)), columns [r - 1, W - (r - 1))."""
    margin = radius - 1
    return slice(0, height - margin), slice(margin, width - margin)


def affinity_labels(seed: np.ndarray, radius: int, dtype: type = np.float32
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair labels of a stride-4 seed map for IRN training.

    ``seed`` (h, w): 0 bg, 1..C, 255 unsure. For every source pixel of :func:`pair_region` and
    every search direction d: background-positive if both ends are 0, foreground-positive if both
    are the same class 1..C, negative if they differ (no 255 involved); a pair with a 255 end is
    in none. Returns three arrays (D, h', w') of 0/1 of ``dtype``.
    """
    rows, cols = pair_region(*seed.shape, radius)
    source = seed[rows, cols]
    bg_pos, fg_pos, neg = [], [], []
    for dy, dx in search_directions(radius):
        target = seed[rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]
        valid = (source != 255) & (target != 255)
        same = source == target
        bg_pos.append(valid & same & (source == 0))
        fg_pos.append(valid & same & (source != 0))
        neg.append(valid & ~same)
    return tuple(np.stack(group).astype(dtype) for group in (bg_pos, fg_pos, neg))
