"""The random walk of :mod:`amnseg.ops.random_walk` as a Triton kernel, batched over images.

The CPU path spends one tensor operation per neighbour and step (2 x 69 x 256 per image at
radius 5): on a GPU those launches, not arithmetic, bound it. Here one launch per step covers
every image of a batch: a program takes a tile of one image's pixels and, for every class at
once (each affinity read once per step, not once per class), sums the 2 D + 1 neighbours:

    x'[c, p] = (x[c, p] + sum_d A[p, p + d] x[c, p + d] + sum_d A[p - d, p] x[c, p - d]) / deg[p]

A is symmetric, so only its D forward planes A[p, p + d] and the degrees are stored: half the
bytes of the 2 D + 1 transition weights, and bytes are what a step costs (benchmarks/RESULTS.md).

Images of different sizes share a batch by padding: boundary 1 (affinity 0) and maps 0 outside
each image, so padded pixels neither give nor take mass and every image walks exactly as alone.
Portrait images walk transposed (the neighbourhood, the paths and so the transition matrix are
symmetric under transposition), so that 500x375 and 375x500 images share a batch unpadded.
The state accumulates in float64 like the CPU path; summation order differs, so results agree
to rounding (~1e-14 relative), not bit for bit.

Import this module only where Triton is installed. With ``TRITON_INTERPRET=1`` set before the
import, the same kernel runs on CPU tensors (slowly), which is how CI tests it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from amnseg.ops.random_walk import affinity_stencil

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


def pad_batch(
    maps: list[torch.Tensor], boundaries: list[torch.Tensor], classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (K_i, H_i, W_i) maps and (H_i, W_i) boundaries into (B, classes, H, W) float64
    maps (zeros outside) and (B, H, W) float64 boundaries (ones outside), H, W the largest."""
    height = max(boundary.shape[0] for boundary in boundaries)
    width = max(boundary.shape[1] for boundary in boundaries)
    device = boundaries[0].device
    state = torch.zeros((len(maps), classes, height, width), dtype=torch.float64, device=device)
    walls = torch.ones((len(maps), height, width), dtype=torch.float64, device=device)
    for index, (image_maps, boundary) in enumerate(zip(maps, boundaries, strict=True)):
        rows, cols = boundary.shape
        state[index, : image_maps.shape[0], :rows, :cols] = image_maps
        walls[index, :rows, :cols] = boundary
    return state, walls


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
    portrait = [b.shape[0] > b.shape[1] for b in boundaries]
    maps_in = [m.transpose(-1, -2) if turn else m for m, turn in zip(maps, portrait, strict=True)]
    walls_in = [b.t() if turn else b for b, turn in zip(boundaries, portrait, strict=True)]
    classes = max(m.shape[0] for m in maps)
    state, walls = pad_batch(maps_in, walls_in, max(classes, 1))
    directions, forward, degree = affinity_stencil(walls, radius, beta)
    forward, degree = forward.contiguous(), degree.contiguous()
    batch, height, width = walls.shape
    if 2 * state.numel() >= 2**31 or forward.numel() >= 2**31:
        raise ValueError(f"a walk batch of {batch} {height}x{width} images is too large for "
                         "32-bit indices; walk fewer images at once")
    dy = torch.tensor([d[0] for d in directions], dtype=torch.int32, device=state.device)
    dx = torch.tensor([d[1] for d in directions], dtype=torch.int32, device=state.device)
    buffers = torch.stack([state, torch.empty_like(state)])
    steps = 2**exp_times
    grid = (batch, triton.cdiv(height * width, tile))
    for step in range(steps):
        _walk_step[grid](
            buffers[step % 2], buffers[(step + 1) % 2], forward, degree, dy, dx,
            state.shape[1], height, width, DIRECTIONS=len(directions),
            CLASSES=triton.next_power_of_2(state.shape[1]), BLOCK=tile, num_warps=num_warps,
        )
    walked = buffers[steps % 2]
    results = []
    for index, (m, turn) in enumerate(zip(maps_in, portrait, strict=True)):
        result = walked[index, : m.shape[0], : m.shape[1], : m.shape[2]].to(m.dtype)
        results.append(result.transpose(-1, -2).contiguous() if turn else result)
    return results
