"""The random walk of :mod:`amnseg.ops.random_walk` as a Triton kernel, batched over images.

The CPU path spends one tensor operation per neighbour and step (2 x 69 x 256 per image at
radius 5): on a GPU those launches, not arithmetic, bound it. Here one launch per step covers
every image of a batch: a program takes a tile of one image's pixels and, for every class at
once (each affinity read once per step, not once per class), sums the 2 D + 1 neighbours:

    x'[c, p] = (x[c, p] + sum_d A[p, p + d] x[c, p + d] + sum_d A[p - d, p] x[c, p - d]) / deg[p]

A is symmetric, so only its D forward planes A[p, p + d] and the degrees are stored: half the
bytes of the 2 D + 1 transition weights, and bytes are what a step costs (benchmarks/RESULTS.md).
Batching, padding and float64 state: :mod:`amnseg.ops.walk_batch`.

Import this module only where Triton is installed. With ``TRITON_INTERPRET=1`` set before the
import, the same kernel runs on CPU tensors (slowly), which is how CI tests it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from amnseg.ops.walk_batch import WalkBatch

TILE = 128  # pixels per program: 64 and 128 were the fastest of 64-256 on an H200 (RESULTS.md)


@triton.jit
def _add_neighbour(
    total, source_ptr, state, lanes, plane_ptr, pixels, inside, near_rows, near_cols, height,
    width, BACKWARD: tl.constexpr,
):
    """total + A * x[near] for one neighbour ``near`` of each pixel p; ``plane_ptr`` is the
    forward-affinity plane of its direction d, where A[p, p + d] is stored at p and (BACKWARD,
    near = p - d) A[p - d, p] at p - d."""
    valid = inside & (near_rows >= 0) & (near_rows < height)
    valid = valid & (near_cols >= 0) & (near_cols < width)
    near = near_rows * width + near_cols
    if BACKWARD:
        weight = tl.load(plane_ptr + near, mask=valid, other=0.0)
    else:
        weight = tl.load(plane_ptr + pixels, mask=valid, other=0.0)
    values = tl.load(source_ptr + state + near[None, :], mask=lanes & valid[None, :], other=0.0)
    return total + weight[None, :] * values


@triton.jit
def _walk_step(
    source_ptr, target_ptr, forward_ptr, degree_ptr, dy_ptr, dx_ptr, classes, height, width,
    DIRECTIONS: tl.constexpr, CLASSES: tl.constexpr, BLOCK: tl.constexpr,
):
    """One step on one tile (program (image, tile)) of the (B, classes, H, W) state."""
    image = tl.program_id(0)
    plane = height * width
    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = pixels < plane
    rows = pixels // width
    cols = pixels % width
    channel = tl.arange(0, CLASSES)
    lanes = channel[:, None] < classes  # CLASSES is classes rounded up to a power of 2
    state = image * classes * plane + channel[:, None] * plane
    affinity = forward_ptr + image * DIRECTIONS * plane
    total = tl.load(source_ptr + state + pixels[None, :], mask=lanes & inside[None, :],
                    other=0.0)
    for k in tl.static_range(DIRECTIONS):
        dy = tl.load(dy_ptr + k)
        dx = tl.load(dx_ptr + k)
        plane_ptr = affinity + k * plane
        total = _add_neighbour(total, source_ptr, state, lanes, plane_ptr, pixels, inside,
                               rows + dy, cols + dx, height, width, BACKWARD=False)
        total = _add_neighbour(total, source_ptr, state, lanes, plane_ptr, pixels, inside,
                               rows - dy, cols - dx, height, width, BACKWARD=True)
    degree = tl.load(degree_ptr + image * plane + pixels, mask=inside, other=1.0)
    tl.store(target_ptr + state + pixels[None, :], total / degree[None, :],
             mask=lanes & inside[None, :])


def random_walk_batch(
    maps: list[torch.Tensor],
    boundaries: list[torch.Tensor],
    radius: int = 5,
    beta: float = 10.0,
    exp_times: int = 8,
    tile: int = TILE,
    num_warps: int = 4,
) -> list[torch.Tensor]:
    """:func:`amnseg.ops.random_walk.random_walk` of each (maps[i] (K_i, H_i, W_i),
    boundaries[i] (H_i, W_i)) pair, all on one device: 2^exp_times launches for the whole
    batch, float64 inside. Returns the walked maps, each in its input's shape and dtype.
    ``tile`` (a power of 2) and ``num_warps`` set each program's pixels and warps."""
    if not maps:
        return []
    batch = WalkBatch.of(maps, boundaries, radius, beta)
    state = batch.state
    dy = torch.tensor([d[0] for d in batch.directions], dtype=torch.int32, device=state.device)
    dx = torch.tensor([d[1] for d in batch.directions], dtype=torch.int32, device=state.device)
    buffers = torch.stack([state, torch.empty_like(state)])
    steps = 2**exp_times
    images, classes, height, width = state.shape
    grid = (images, triton.cdiv(height * width, tile))
    for step in range(steps):
        _walk_step[grid](
            buffers[step % 2], buffers[(step + 1) % 2], batch.forward, batch.degree, dy, dx,
            classes, height, width, DIRECTIONS=len(batch.directions),
            CLASSES=triton.next_power_of_2(classes), BLOCK=tile, num_warps=num_warps,
        )
    return batch.unpack(buffers[steps % 2])
