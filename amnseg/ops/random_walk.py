"""The random walk that propagates score maps along inter-pixel affinities (METHOD.md 5).

The reference builds the dense (HW x HW) transition matrix T and squares it 8 times (x T^256):
O((HW)^3) time, O((HW)^2) memory. ``random_walk`` computes the same product as 256
applications of T to the maps, each a weighted sum over the (2 D + 1) neighbours of every pixel
(D search directions): O(HW r^2) per step and O(HW r^2) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amnseg.ops.affinity import path_affinities, search_directions, shifted


def _affinities(
    boundary: torch.Tensor, radius: int, beta: float
) -> tuple[tuple[tuple[int, int], ...], torch.Tensor, torch.Tensor]:
    """(directions d, A[p, p + d] (..., D, H, W), A[p, p - d] (..., D, H, W)) for the
    symmetric A = affinity ** beta; A[p, p - d] is A[p - d, p], the forward affinity at p - d."""
    forward = path_affinities(boundary, radius).pow(beta)
    directions = search_directions(radius)
    backward = torch.stack(
        [shifted(forward[..., k, :, :], -dy, -dx, 0.0) for k, (dy, dx) in enumerate(directions)],
        dim=-3,
    )
    return directions, forward, backward


def affinity_stencil(
    boundary: torch.Tensor, radius: int, beta: float
) -> tuple[tuple[tuple[int, int], ...], torch.Tensor, torch.Tensor]:
    """The symmetric affinity matrix A = affinity ** beta (self-affinity 1) in half-stencil
    form: half the memory of :func:`transition_weights`.

    ``boundary`` (..., H, W). Returns (directions, forward (..., D, H, W), degree (..., H, W)):
    forward[d, p] = A[p, p + d] for the D search directions d (A[p, p - d] is forward[d, p - d]),
    degree[p] = sum_q A[p, q], so that T[i, j] = A[i, j] / degree[j].
    """
    directions, forward, backward = _affinities(boundary, radius, beta)
    return directions, forward, 1 + forward.sum(dim=-3) + backward.sum(dim=-3)


def transition_weights(
    boundary: torch.Tensor, radius: int, beta: float
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The column-normalised transition matrix in stencil form.

    ``boundary`` (..., H, W). Returns (offsets, weights (..., N, H, W)) with N = 2 D + 1 such
    that one step x -> x T is ``x'[j] = sum_k weights[k, j] * x[j + offsets[k]]``: T[i, j] =
    A[i, j] / sum_i A[i, j] with A = affinity ** beta (self-affinity 1), symmetric.
    """
    directions, forward, backward = _affinities(boundary, radius, beta)
    offsets = [(0, 0), *directions, *[(-dy, -dx) for dy, dx in directions]]
    affinity = torch.cat([torch.ones_like(boundary)[..., None, :, :], forward, backward], dim=-3)
    degree = affinity.sum(dim=-3, keepdim=True)  # column sums of A (A is symmetric)
    return offsets, affinity / degree


def random_walk(
    maps: torch.Tensor,
    boundary: torch.Tensor,
    radius: int = 5,
    beta: float = 10.0,
    exp_times: int = 8,
    precision: torch.dtype = torch.float64,
) -> torch.Tensor:
    """x T^(2^exp_times) for each map, T from the boundary map (METHOD.md section 5).

    ``maps`` (K, H, W); ``boundary`` (H, W) in [0, 1]. Returns (K, H, W) in the maps' dtype.
    The 2^exp_times steps accumulate in ``precision`` (float64 by default: 256 float32 steps
    drift by ~1e-4 relative from the exact product, float64 stays at ~1e-12).
    """
    offsets, weights = transition_weights(boundary.to(precision), radius, beta)
    height, width = boundary.shape
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    views = [(pad + dy, pad + dx) for dy, dx in offsets]
    state = maps.to(precision)
    for _ in range(2**exp_times):
        padded = F.pad(state, (pad, pad, pad, pad))
        state = weights[0] * state
        for k in range(1, len(views)):
            top, left = views[k]
            state = state + weights[k] * padded[..., top : top + height, left : left + width]
    return state.to(maps.dtype)
