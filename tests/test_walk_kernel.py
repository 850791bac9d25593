"""The Triton random walk (amnseg.ops.random_walk_triton) against the CPU stencil walk.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, which must be set
before Triton is imported, hence a subprocess); on CUDA (``gpu`` marker) it runs compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh Python with the Triton interpreter on; returns its stdout."""
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


WALK_CHECK = """
    import torch
    from amnseg.ops.random_walk import random_walk
    from amnseg.ops.random_walk_triton import random_walk_batch

    generator = torch.Generator().manual_seed(0)
    # (height, width, classes): sizes and class counts differ, one image has no class, one
    # has 3 classes (padded to 4 in the kernel), one is a single row.
    shapes = [(9, 13, 2), (12, 7, 3), (5, 6, 0), (1, 11, 1)]
    maps = [torch.rand((k, h, w), generator=generator, dtype=torch.float64) for h, w, k in shapes]
    boundaries = [torch.rand((h, w), generator=generator, dtype=torch.float64) ** 3
                  for h, w, k in shapes]
    walked = random_walk_batch(maps, boundaries, radius=4, beta=7.0, exp_times=3)
    for m, b, w in zip(maps, boundaries, walked):
        # Each image walks as it would alone: the padded neighbours took nothing.
        expected = random_walk(m, b, 4, 7.0, 3)
        assert w.shape == m.shape and w.dtype == torch.float64, (w.shape, w.dtype)
        if m.numel():
            error = ((w - expected).abs().max() / expected.abs().max()).item()
            assert error < 1e-12, (m.shape, error)
    # float32 in, float32 out, the float64 walk rounded once.
    single = random_walk_batch([m.float() for m in maps], [b.float() for b in boundaries],
                               radius=4, beta=7.0, exp_times=3)
    for m, b, w in zip(maps, boundaries, single):
        assert w.dtype == torch.float32
        assert torch.allclose(w, random_walk(m.float(), b.float(), 4, 7.0, 3), rtol=1e-6, atol=0)
    print("ok")
"""


def test_kernel_equals_the_cpu_walk_for_a_batch_of_mixed_sizes(tmp_path):
    assert run_interpreted(WALK_CHECK, tmp_path).strip() == "ok"


def test_kernel_input_padding_marks_outside_as_walls():
    from amnseg.ops.walk_batch import pad_batch

    maps = [torch.ones(2, 3, 4), torch.full((1, 5, 2), 2.0)]
    boundaries = [torch.full((3, 4), 0.5), torch.full((5, 2), 0.25)]
    state, walls = pad_batch(maps, boundaries, classes=4)
    assert state.shape == (2, 4, 5, 4) and walls.shape == (2, 5, 4)
    assert state.dtype == walls.dtype == torch.float64
    assert state[0, :2, :3, :4].eq(1).all() and state[0, 2:].eq(0).all()
    assert state[0, :, 3:].eq(0).all() and state[1, 0, :, :2].eq(2).all()
    assert state[1, 1:].eq(0).all() and state[1, :, :, 2:].eq(0).all()
    assert walls[0, :3, :4].eq(0.5).all() and walls[0, 3:].eq(1).all()
    assert walls[1, :, :2].eq(0.25).all() and walls[1, :, 2:].eq(1).all()


def test_walk_batch_turns_pads_and_unpacks_so_that_each_image_walks_as_alone():
    """What every GPU kernel is given (in-process, no kernel): portrait images turned, all padded
    with walls to the largest size, the stencil of the padded walls; walking the padded images
    with the CPU walk and unpacking gives each image's own walk."""
    import torch.nn.functional as F

    from amnseg.ops.random_walk import affinity_stencil, random_walk
    from amnseg.ops.walk_batch import WalkBatch

    generator = torch.Generator().manual_seed(3)
    shapes = [(2, 9, 13), (3, 13, 9), (1, 7, 7)]  # landscape, portrait, square
    maps = [torch.rand(shape, generator=generator) for shape in shapes]
    boundaries = [torch.rand(shape[1:], generator=generator) for shape in shapes]
    batch = WalkBatch.of(maps, boundaries, radius=3, beta=4.0)
    assert batch.portrait == [False, True, False]
    assert batch.classes.tolist() == [2, 3, 1] and batch.classes.dtype == torch.int32
    # The test's own padding: turned portrait, maps 0 and walls 1 outside, 3 classes each.
    turned = [(m.transpose(1, 2), b.t()) if m.shape[1] > m.shape[2] else (m, b)
              for m, b in zip(maps, boundaries, strict=True)]
    padded_maps = torch.stack([F.pad(m.double(), (0, 13 - m.shape[2], 0, 9 - m.shape[1],
                                                  0, 3 - m.shape[0])) for m, _ in turned])
    walls = torch.stack([F.pad(b.double(), (0, 13 - b.shape[1], 0, 9 - b.shape[0]), value=1.0)
                         for _, b in turned])
    assert torch.equal(batch.state, padded_maps)
    directions, forward, degree = affinity_stencil(walls, 3, 4.0)
    assert batch.directions == directions
    assert torch.equal(batch.forward, forward) and torch.equal(batch.degree, degree)
    walked = torch.stack([random_walk(m, w, 3, 4.0, 3) for m, w in zip(padded_maps, walls,
                                                                        strict=True)])
    for result, m, b in zip(batch.unpack(walked), maps, boundaries, strict=True):
        assert result.dtype == m.dtype and result.shape == m.shape
        torch.testing.assert_close(result, random_walk(m, b, 3, 4.0, 3), rtol=1e-6, atol=1e-7)
    # Images without a class still get one (empty) channel to walk.
    empty = WalkBatch.of([torch.zeros(0, 5, 6)], [torch.rand(5, 6)], radius=3, beta=4.0)
    assert empty.state.shape == (1, 1, 5, 6) and empty.classes.tolist() == [0]


def test_walk_batches_must_fit_32_bit_indices():
    from amnseg.ops.walk_batch import fits_32_bit_indices

    assert fits_32_bit_indices(2**30 - 1, 2**31 - 1)
    assert not fits_32_bit_indices(2**30, 0)  # two state buffers of 2^30 values
    assert not fits_32_bit_indices(0, 2**31)


MASKS_CHECK = """
    import shutil, sys
    import numpy as np
    sys.path.insert(0, "tests")
    from conftest import tiny_config, write_tiny_folder_dataset
    from amnseg.data.base import read_index_png
    from amnseg.pipeline import run_pipeline
    import amnseg.stages.irn as irn
    from pathlib import Path

    tmp = Path(sys.argv[0]).parent
    data = write_tiny_folder_dataset(tmp / "data", count=7)
    config = tiny_config(data, tmp / "run", "irn.exp_times=2", "irn.epochs=1",
                         "amn.epochs=1", "cam.epochs=1", "amn.batch_size=4", "irn.batch_size=4")
    run_pipeline(config, stop="masks", progress=lambda message: None)
    masks = tmp / "run" / "irn" / "masks"
    one_by_one = {p.name: read_index_png(p) for p in masks.glob("*.png")}
    shutil.rmtree(masks)
    # The GPU path's batching (chunks of 3, 3 and 1 images through the kernel), on the CPU.
    from amnseg.ops.random_walk_triton import random_walk_batch
    irn.gpu_walk_kernel = lambda device: random_walk_batch
    irn.GPU_WALK_BATCH = 3
    irn.make_masks(config)
    batched = {p.name: read_index_png(p) for p in masks.glob("*.png")}
    assert sorted(batched) == sorted(one_by_one) and len(batched) == 7, sorted(batched)
    differing = [name for name in batched if not np.array_equal(batched[name], one_by_one[name])]
    assert not differing, differing
    print("ok")
"""


def test_masks_stage_batches_walks_through_the_kernel_with_the_same_masks(tmp_path):
    assert run_interpreted(MASKS_CHECK, tmp_path).strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [64, 128, 256])
def test_gpu_kernel_equals_the_float64_walk_at_voc_size(tile):
    from conftest import assert_walks_match, voc_size_case

    from amnseg.ops.random_walk_triton import random_walk_batch

    maps, boundaries, _ = voc_size_case()
    assert_walks_match(random_walk_batch([m.cuda() for m in maps],
                                         [b.cuda() for b in boundaries], tile=tile))
