"""The random walk of :mod:`amnseg.ops.random_walk` as a CUDA C++ kernel, batched over images.

The same step as :mod:`amnseg.ops.random_walk_triton` (one launch per step for a whole batch,
the D forward affinity planes and the degrees of the symmetric A, float64 state):

    x'[c, p] = (x[c, p] + sum_d A[p, p + d] x[c, p + d] + sum_d A[p - d, p] x[c, p - d]) / deg[p]

but where the Triton kernel gathers each of the 2 D + 1 shifted windows of the state from the
caches, a block here copies its tile of the state, with a rim of the stencil's reach, into
shared memory once per step, and every thread then reads its pixel's 69 neighbours (radius 5)
at constant offsets from there. The neighbour offsets are compiled in as literals.

The kernel is compiled at run time with NVRTC (:mod:`amnseg.ops.cuda_rtc`), which CUDA builds of
PyTorch carry: no compiler is needed at install time. The source compiles as plain
C++ too: the tests run its two per-thread phases, tile loading and the pixel update, block by
block on the CPU.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch

from amnseg.ops.affinity import search_directions
from amnseg.ops.cuda_rtc import CudaRtcError, Kernel
from amnseg.ops.walk_batch import WalkBatch

TILE = (8, 32)  # rows x columns of pixels per block, one thread per pixel: the fastest on an H200
LANES = 4  # classes per block: an image with more classes takes several blocks per tile

KERNEL_SOURCE = r"""
#ifdef __CUDACC__
#define DEVICE __device__ __forceinline__
#else
#define DEVICE static inline
#endif

#define HALO_H (TILE_H + 2 * HALO)
#define HALO_W (TILE_W + 2 * HALO)
#define TILE_VALUES (HALO_H * HALO_W)

struct Block {
    int tile;   // which TILE_H x TILE_W tile of the map, row-major
    int chunk;  // which LANES classes
    int image;
};

DEVICE int lanes_in_chunk(Block block, int classes) {
    const int left = classes - block.chunk * LANES;
    return left < LANES ? left : LANES;
}

// Phase 1: copy this block's classes of the state over its tile and a HALO-pixel rim
// (0 outside the map) into shared memory, the block's threads taking every nth value.
DEVICE void load_tile(int thread, Block block, const double* __restrict__ source,
                      double* tile, int classes, int height, int width, int tiles_x) {
    const int top = (block.tile / tiles_x) * TILE_H - HALO;
    const int left = (block.tile % tiles_x) * TILE_W - HALO;
    const long long plane = (long long)height * width;
    const double* state = source + ((long long)block.image * classes + block.chunk * LANES) * plane;
    const int lanes = lanes_in_chunk(block, classes);
    for (int i = thread; i < LANES * TILE_VALUES; i += TILE_H * TILE_W) {
        const int lane = i / TILE_VALUES;
        const int row = top + (i % TILE_VALUES) / HALO_W;
        const int col = left + i % HALO_W;
        double value = 0.0;
        if (lane < lanes && row >= 0 && row < height && col >= 0 && col < width) {
            value = state[lane * plane + (long long)row * width + col];
        }
        tile[i] = value;
    }
}

// One neighbour direction (DY >= 0): the forward neighbour p + d with A[p, p + d] = plane[p],
// then the backward one p - d with A[p - d, p] = plane[p - d], if p - d is in the map (the
// tile holds 0 for a forward neighbour outside it).
#define TAP(K, DY, DX)                                                                     \
    {                                                                                      \
        const double* plane_k = weights + (long long)(K) * plane;                          \
        const double ahead = plane_k[p];                                                   \
        for (int lane = 0; lane < LANES; ++lane)                                           \
            total[lane] += ahead * centre[lane * TILE_VALUES + (DY) * HALO_W + (DX)];      \
        if (y >= (DY) && x - (DX) >= 0 && x - (DX) < width) {                              \
            const double behind = plane_k[p - (DY) * width - (DX)];                        \
            for (int lane = 0; lane < LANES; ++lane)                                       \
                total[lane] += behind * centre[lane * TILE_VALUES - (DY) * HALO_W - (DX)]; \
        }                                                                                  \
    }

// Phase 2: this thread's pixel, from the tile in shared memory.
DEVICE void step_pixel(int thread, Block block, const double* tile,
                       double* __restrict__ target, const double* __restrict__ forward,
                       const double* __restrict__ degree, int classes, int height, int width,
                       int tiles_x) {
    const int y = (block.tile / tiles_x) * TILE_H + thread / TILE_W;
    const int x = (block.tile % tiles_x) * TILE_W + thread % TILE_W;
    if (y >= height || x >= width) return;
    const long long plane = (long long)height * width;
    const int p = y * width + x;
    const double* weights = forward + (long long)block.image * DIRECTIONS * plane;
    const double* centre = tile + (thread / TILE_W + HALO) * HALO_W + thread % TILE_W + HALO;
    double total[LANES];
    for (int lane = 0; lane < LANES; ++lane) total[lane] = centre[lane * TILE_VALUES];
    TAPS
    const double pixel_degree = degree[(long long)block.image * plane + p];
    double* out = target + ((long long)block.image * classes + block.chunk * LANES) * plane + p;
    const int lanes = lanes_in_chunk(block, classes);
    for (int lane = 0; lane < LANES; ++lane) {
        if (lane < lanes) out[lane * plane] = total[lane] / pixel_degree;
    }
}

#ifdef __CUDACC__
// grid (tiles, chunks of LANES classes, images), block TILE_H * TILE_W threads.
extern "C" __global__ void __launch_bounds__(TILE_H * TILE_W)
walk_step(const double* __restrict__ source, double* __restrict__ target,
          const double* __restrict__ forward, const double* __restrict__ degree,
          const int* __restrict__ image_classes, int classes, int height, int width,
          int tiles_x) {
    __shared__ double tile[LANES * TILE_VALUES];
    const Block block = {(int)blockIdx.x, (int)blockIdx.y, (int)blockIdx.z};
    // Chunks past this image's own classes hold zeros: skipped, never read back.
    if (block.chunk * LANES >= image_classes[block.image]) return;
    load_tile(threadIdx.x, block, source, tile, classes, height, width, tiles_x);
    __syncthreads();
    step_pixel(threadIdx.x, block, tile, target, forward, degree, classes, height, width,
               tiles_x);
}
#endif
"""


def kernel_source(
    directions: tuple[tuple[int, int], ...], tile: tuple[int, int], lanes: int
) -> str:
    """The kernel's source for these search directions (all with dy >= 0), a (rows, columns)
    tile and ``lanes`` classes per block."""
    halo = max(max(abs(dy), abs(dx)) for dy, dx in directions)
    taps = " ".join(f"TAP({k}, {dy}, {dx})" for k, (dy, dx) in enumerate(directions))
    defines = {"TILE_H": tile[0], "TILE_W": tile[1], "HALO": halo, "LANES": lanes,
               "DIRECTIONS": len(directions), "TAPS": taps}
    header = "".join(f"#define {name} {value}\n" for name, value in defines.items())
    return header + KERNEL_SOURCE


@cache
def compiled_step(
    directions: tuple[tuple[int, int], ...], tile: tuple[int, int], lanes: int,
    device: torch.device,
) -> Kernel:
    """The ``walk_step`` kernel compiled for ``device`` (cached)."""
    return Kernel(kernel_source(directions, tile, lanes), "walk_step", device)


@cache
def available(device: torch.device) -> bool:
    """Whether the kernel compiles and loads for the CUDA ``device`` (NVRTC and the driver
    found); if not, says why once."""
    try:
        compiled_step(search_directions(5), TILE, LANES, device)
    except (CudaRtcError, OSError, AttributeError) as error:  # AttributeError: an old NVRTC
        warnings.warn(f"the CUDA walk kernel is not available ({error}); the walk uses the "
                      "Triton kernel", stacklevel=2)
        return False
    return True


def random_walk_batch(
    maps: list[torch.Tensor],
    boundaries: list[torch.Tensor],
    radius: int = 5,
    beta: float = 10.0,
    exp_times: int = 8,
    tile: tuple[int, int] = TILE,
    lanes: int = LANES,
) -> list[torch.Tensor]:
    """:func:`amnseg.ops.random_walk.random_walk` of each (maps[i] (K_i, H_i, W_i),
    boundaries[i] (H_i, W_i)) pair, all on one CUDA device: 2^exp_times launches for the whole
    batch, float64 inside. Returns the walked maps, each in its input's shape and dtype.
    ``tile`` (rows, columns: one thread per pixel) and ``lanes`` (classes per block, at most
    the batch's largest class count) shape the blocks."""
    if not maps:
        return []
    batch = WalkBatch.of(maps, boundaries, radius, beta)
    images, classes, height, width = batch.state.shape
    lanes = min(lanes, classes)
    step = compiled_step(batch.directions, tuple(tile), lanes, batch.state.device)
    tiles_x = -(-width // tile[1])
    grid = (tiles_x * -(-height // tile[0]), -(-classes // lanes), images)
    block = (tile[0] * tile[1], 1, 1)
    # Zeros, not empty: lanes of skipped chunks are then 0 in both buffers.
    buffers = [batch.state, torch.zeros_like(batch.state)]
    for index in range(2**exp_times):
        source, target = buffers[index % 2], buffers[(index + 1) % 2]
        step(grid=grid, block=block, args=[source, target, batch.forward, batch.degree,
                                           batch.classes, classes, height, width, tiles_x])
    return batch.unpack(buffers[2**exp_times % 2])
