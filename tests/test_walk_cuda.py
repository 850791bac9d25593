"""The CUDA C++ random walk (amnseg.ops.random_walk_cuda) against the CPU stencil walk.

Without a GPU the kernel's source is compiled as plain C++ and its two per-thread phases (tile
loading, then the pixel update) run block by block; the Python wrapper around it, batching and
launch grid included, is the one a GPU uses. On CUDA (``gpu`` marker) it runs compiled by NVRTC.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import amnseg.ops.random_walk_cuda as walk_cuda
from amnseg.ops.random_walk import random_walk

# Runs every block of a launch: all threads' tile loads, then all threads' pixel updates (the
# kernel's __syncthreads). The tile sits between NaN guard bands, so that a read outside it
# (or of a value no thread loaded) turns the result into NaN.
EMULATOR = r"""
#include <cmath>
#include <vector>
extern "C" void emulate_walk_step(const double* source, double* target, const double* forward,
                                  const double* degree, const int* image_classes, int classes,
                                  int height, int width, int tiles_x, int tiles, int chunks,
                                  int images) {
    const int guard = 4 * TILE_VALUES;
    std::vector<double> memory(LANES * TILE_VALUES + 2 * guard);
    double* tile = memory.data() + guard;
    for (int image = 0; image < images; ++image) {
        for (int chunk = 0; chunk < chunks; ++chunk) {
            if (chunk * LANES >= image_classes[image]) continue;
            for (int index = 0; index < tiles; ++index) {
                const Block block = {index, chunk, image};
                for (double& value : memory) value = NAN;
                for (int thread = 0; thread < TILE_H * TILE_W; ++thread)
                    load_tile(thread, block, source, tile, classes, height, width, tiles_x);
                for (int thread = 0; thread < TILE_H * TILE_W; ++thread)
                    step_pixel(thread, block, tile, target, forward, degree, classes, height,
                               width, tiles_x);
            }
        }
    }
}
"""


def emulated_step(directory: Path):
    """A stand-in for ``compiled_step`` that compiles the kernel's source with g++."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++")
    calls = []

    def compile_for(directions, tile, lanes, device):
        assert device.type == "cpu"
        source = directory / f"walk_{tile[0]}x{tile[1]}_{lanes}.cpp"
        source.write_text(walk_cuda.kernel_source(directions, tile, lanes) + EMULATOR)
        library = source.with_suffix(".so")
        subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", str(library), str(source)],
                       check=True, capture_output=True)
        emulate = ctypes.CDLL(str(library)).emulate_walk_step

        def launch(grid, block, args):
            assert block == (tile[0] * tile[1], 1, 1)
            calls.append((tile, lanes, grid))
            pointers = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
                        else ctypes.c_int(a) for a in args]
            emulate(*pointers, *(ctypes.c_int(n) for n in grid))

        return launch

    return compile_for, calls


@pytest.fixture
def emulated(tmp_path, monkeypatch):
    compile_for, calls = emulated_step(tmp_path)
    monkeypatch.setattr(walk_cuda, "compiled_step", compile_for)
    return calls


def mixed_inputs(shapes, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.rand((k, h, w), generator=generator, dtype=torch.float64).to(dtype)
            for h, w, k in shapes]
    boundaries = [(torch.rand((h, w), generator=generator, dtype=torch.float64) ** 3).to(dtype)
                  for h, w, k in shapes]
    return maps, boundaries


def test_kernel_source_walks_like_the_cpu_walk_for_mixed_sizes_and_classes(emulated):
    # Several tiles per image, ragged edges, a portrait image, one with no class, one with 5
    # classes (two chunks of 4 lanes: the others skip the second), a single row.
    shapes = [(9, 13, 2), (14, 7, 3), (5, 6, 0), (1, 11, 1), (10, 12, 5)]
    maps, boundaries = mixed_inputs(shapes)
    walked = walk_cuda.random_walk_batch(maps, boundaries, radius=4, beta=7.0, exp_times=3,
                                         tile=(4, 8), lanes=4)
    tile, lanes, grid = emulated[0]
    # Portrait 14x7 walks as 7x14: the batch is 10x14, 3x2 tiles of 4x8.
    assert grid == (6, 2, 5) and len(emulated) == 2**3
    for m, b, w in zip(maps, boundaries, walked, strict=True):
        expected = random_walk(m, b, 4, 7.0, 3)
        assert w.shape == m.shape and w.dtype == torch.float64
        if m.numel():
            assert torch.isfinite(w).all()
            error = ((w - expected).abs().max() / expected.abs().max()).item()
            assert error < 1e-12, (m.shape, error)


def test_kernel_source_at_the_reference_radius_with_the_default_tile(emulated):
    # Radius 5 (34 directions, rim 4), the default tile, 3 lanes for 3 classes; float32
    # maps in, float32 out (the float64 walk rounded once).
    maps, boundaries = mixed_inputs([(20, 40, 3), (37, 18, 2)], seed=1, dtype=torch.float32)
    walked = walk_cuda.random_walk_batch(maps, boundaries, exp_times=4)
    assert emulated[0][:2] == (walk_cuda.TILE, 3)
    for m, b, w in zip(maps, boundaries, walked, strict=True):
        assert w.dtype == torch.float32 and w.shape == m.shape
        assert torch.allclose(w, random_walk(m, b, 5, 10.0, 4), rtol=1e-6, atol=0)


def test_kernel_source_has_the_literal_offsets_of_every_direction():
    directions = ((0, 1), (1, -2))
    source = walk_cuda.kernel_source(directions, (8, 32), 2)
    assert "#define TAPS TAP(0, 0, 1) TAP(1, 1, -2)\n" in source
    assert "#define HALO 2\n" in source and "#define DIRECTIONS 2\n" in source


@pytest.mark.gpu
@pytest.mark.parametrize(("tile", "lanes"), [((8, 32), 4), ((16, 32), 4), ((32, 32), 3)])
def test_gpu_cuda_kernel_equals_the_float64_walk_at_voc_size(tile, lanes):
    from conftest import assert_walks_match, voc_size_case

    assert walk_cuda.available(torch.device("cuda", 0))
    maps, boundaries, _ = voc_size_case()
    assert_walks_match(walk_cuda.random_walk_batch([m.cuda() for m in maps],
                                                   [b.cuda() for b in boundaries], tile=tile,
                                                   lanes=lanes))
