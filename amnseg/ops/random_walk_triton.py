"""The random walk of :mod:`amnseg.ops.random_walk` as a Triton kernel, batched over images.

The CPU path spends one tensor operation per neighbour and step (2 x 69 x 256 per image at
radius 5): on a GPU those launches, not arithmetic, bound it. Here one program per image runs
all 2^exp_times steps (``persistent``): per step it sweeps its image in pixel tiles, each tile
summing its 2 D + 1 weighted neighbours for every class at once (each weight read once per
step, not once per class), then waits at a block barrier before the next step reads what this
one wrote. The alternative (``persistent=False``) launches one grid of (image, tile) programs
per step: more programs at once, one launch per step.

Images of different sizes share a batch by padding: boundary 1 (affinity 0) and maps 0 outside
each image, so padded pixels neither give nor take mass and every image walks exactly as alone.
Portrait images walk transposed (the neighbourhood, the paths and so the transition matrix are
symmetric under transposition), so that 500x375 and 375x500 images share a batch unpadded.
The state accumulates in float64 like the CPU path; summation order differs, so results agree
to rounding (~1e-15 relative), not bit for bit.

Import this module only where Triton is installed. With ``TRITON_INTERPRET=1`` set before the
import, the same kernel runs on CPU tensors (slowly), which is how CI tests it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from amnseg.ops.random_walk import transition_weights

TILE = 256  # pixels per tile; a tile holds (classes x TILE) float64 states in registers


@triton.jit
def _walk_tile(
    source_ptr, target_ptr, weight_ptr, dy_ptr, dx_ptr, image, tile, height, width,
    NUM_OFFSETS: tl.constexpr, CLASSES: tl.constexpr, BLOCK: tl.constexpr,
):
    """One step on one tile: target[c, p] = sum_k weight[k, p] * source[c, p + offset_k]."""
    plane = height * width
    pixels = tile * BLOCK + tl.arange(0, BLOCK)
    inside = pixels < plane
    rows = pixels // width
    cols = pixels % width
    classes = tl.arange(0, CLASSES)
    state_base = image * CLASSES * plane
    weight_base = image * NUM_OFFSETS * plane
    total = tl.zeros((CLASSES, BLOCK), dtype=tl.float64)
    for k in tl.static_range(NUM_OFFSETS):
        dy = tl.load(dy_ptr + k)
        dx = tl.load(dx_ptr + k)
        weight = tl.load(weight_ptr + weight_base + k * plane + pixels, mask=inside, other=0.0)
        near_rows = rows + dy
        near_cols = cols + dx
        valid = inside & (near_rows >= 0) & (near_rows < height)
        valid = valid & (near_cols >= 0) & (near_cols < width)
        near = near_rows * width + near_cols
        values = tl.load(
            source_ptr + state_base + classes[:, None] * plane + near[None, :],
            mask=valid[None, :], other=0.0,
        )
        total += weight[None, :] * values
    tl.store(
        target_ptr + state_base + classes[:, None] * plane + pixels[None, :], total,
        mask=inside[None, :],
    )


@triton.jit
def _walk_all_steps(
    state_ptr, weight_ptr, dy_ptr, dx_ptr, steps, buffer_size, height, width,
    NUM_OFFSETS: tl.constexpr, CLASSES: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program ``image`` runs every step on its image, ping-ponging between the two halves of
    ``state`` (2, B, CLASSES, H, W); after ``steps`` steps the result is in half steps % 2."""
    image = tl.program_id(0)
    tiles = tl.cdiv(height * width, BLOCK)
    for step in range(steps):
        source = state_ptr + (step % 2) * buffer_size
        target = state_ptr + ((step + 1) % 2) * buffer_size
        for tile in range(tiles):
            _walk_tile(source, target, weight_ptr, dy_ptr, dx_ptr, image, tile, height, width,
                       NUM_OFFSETS, CLASSES, BLOCK)
        # The next step reads neighbours that other threads of this program wrote.
        tl.debug_barrier()


@triton.jit
def _walk_one_step(
    source_ptr, target_ptr, weight_ptr, dy_ptr, dx_ptr, height, width,
    NUM_OFFSETS: tl.constexpr, CLASSES: tl.constexpr, BLOCK: tl.constexpr,
):
    _walk_tile(source_ptr, target_ptr, weight_ptr, dy_ptr, dx_ptr, tl.program_id(0),
               tl.program_id(1), height, width, NUM_OFFSETS, CLASSES, BLOCK)


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
    persistent: bool = True,
    tile: int = TILE,
    num_warps: int = 4,
) -> list[torch.Tensor]:
    """:func:`amnseg.ops.random_walk.random_walk` of each (maps[i] (K_i, H_i, W_i),
    boundaries[i] (H_i, W_i)) pair, all on one device, in one kernel launch (float64 inside).
    Returns the walked maps, each in its input's shape and dtype. ``tile`` (a power of 2) and
    ``num_warps`` set the kernel's pixels per tile and warps per program."""
    if not maps:
        return []
    portrait = [b.shape[0] > b.shape[1] for b in boundaries]
    maps_in = [m.transpose(-1, -2) if turn else m for m, turn in zip(maps, portrait, strict=True)]
    walls_in = [b.t() if turn else b for b, turn in zip(boundaries, portrait, strict=True)]
    classes = max(1, triton.next_power_of_2(max(m.shape[0] for m in maps)))
    state, walls = pad_batch(maps_in, walls_in, classes)
    offsets, weights = transition_weights(walls, radius, beta)  # (B, N, H, W)
    weights = weights.contiguous()
    batch, height, width = walls.shape
    if state.numel() * 2 >= 2**31 or weights.numel() >= 2**31:
        raise ValueError(f"a walk batch of {batch} {height}x{width} images is too large for "
                         "32-bit indices; walk fewer images at once")
    dy = torch.tensor([o[0] for o in offsets], dtype=torch.int32, device=state.device)
    dx = torch.tensor([o[1] for o in offsets], dtype=torch.int32, device=state.device)
    buffers = torch.stack([state, torch.empty_like(state)])
    steps = 2**exp_times
    constants = dict(NUM_OFFSETS=len(offsets), CLASSES=classes, BLOCK=tile, num_warps=num_warps)
    if persistent:
        _walk_all_steps[(batch,)](buffers, weights, dy, dx, steps, state.numel(), height, width,
                                  **constants)
    else:
        grid = (batch, triton.cdiv(height * width, tile))
        for step in range(steps):
            _walk_one_step[grid](buffers[step % 2], buffers[(step + 1) % 2], weights, dy, dx,
                                 height, width, **constants)
    walked = buffers[steps % 2]
    results = []
    for index, (m, turn) in enumerate(zip(maps_in, portrait, strict=True)):
        result = walked[index, : m.shape[0], : m.shape[1], : m.shape[2]].to(m.dtype)
        results.append(result.transpose(-1, -2).contiguous() if turn else result)
    return results
