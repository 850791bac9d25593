"""The PyTorch dense CRF (amnseg/ops/permutohedral.py) against pydensecrf, the reference: the
lattice's filter alone (through pydensecrf's unnormalised kernels, any feature dimension), whole
mean-field marginals on images, and the seed stage's files with the CRFs run that way."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from conftest import tiny_config, write_tiny_folder_dataset
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from amnseg.config import CrfConfig, deeplab_crf, load_config
from amnseg.data import build_dataset
from amnseg.data.base import read_index_png
from amnseg.errors import AmnsegError
from amnseg.io import ScoreMaps, save_score_maps
from amnseg.ops.crf import (
    crf_refine_labels_batch,
    crf_refine_labels_many,
    crf_refine_probabilities,
    dense_crf_many,
)
from amnseg.ops.permutohedral import DenseCrf, PermutohedralLattice, _pack, _pack_with, _unpack
from amnseg.stages import seeds as seeds_stage
from amnseg.training import crf_device_of


def reference_filtered_step(features: np.ndarray, first: np.ndarray, compat: float) -> np.ndarray:
    """One mean-field step of a two-label pydensecrf CRF with one unnormalised kernel over
    ``features`` (N, d), starting from marginals (first, 1 - first): softmax of
    log(Q) + compat * K Q, with K pydensecrf's lattice filter."""
    count = len(first)
    marginals = np.stack([first, 1 - first]).astype(np.float32)
    crf = dcrf.DenseCRF(count, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(marginals)))
    crf.addPairwiseEnergy(np.ascontiguousarray(features.T, dtype=np.float32), compat=compat,
                          kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
    return np.asarray(crf.inference(1))


@pytest.mark.parametrize("dims", [1, 2, 3, 5])
@pytest.mark.parametrize("grid", [False, True])
def test_lattice_filter_equals_pydensecrfs(dims, grid):
    rng = np.random.default_rng(dims)
    count = 400
    if grid:  # integer positions over a kernel width, as images give: ties in every rank
        features = (rng.integers(0, 12, (count, dims)) / np.float32(3.0)).astype(np.float32)
    else:
        features = (rng.random((count, dims)) * 6).astype(np.float32)
    first = rng.uniform(0.05, 0.95, count).astype(np.float32)
    compat = 0.2 if dims < 5 else 1.0  # sparser points in 5-d: a stronger kernel to see them
    expected = reference_filtered_step(features, first, compat)

    lattice = PermutohedralLattice(torch.from_numpy(features))
    marginals = torch.from_numpy(np.stack([first, 1 - first], axis=1))
    filtered = lattice.filter(marginals)
    got = torch.softmax(torch.log(marginals) + compat * filtered, dim=1).numpy().T
    np.testing.assert_allclose(got, expected, atol=2e-6)
    # The step moved the marginals: the kernel's values, not only the unary, were compared.
    assert np.abs(expected - np.stack([first, 1 - first])).max() > 0.05
    # Each point's weights over its simplex's vertices are barycentric: they sum to 1.
    torch.testing.assert_close(lattice.weights.sum(1), torch.ones(count), atol=1e-5, rtol=0)


def simplex_by_hand(point: np.ndarray) -> tuple[list[float], list[tuple[int, ...]]]:
    """Adams et al.'s enclosing simplex of one point, written out as pydensecrf's loop does it
    (float32 throughout): the d + 1 barycentric weights and the vertices' first d coordinates,
    vertex r being the remainder-r one."""
    dims = len(point)
    f32 = np.float32
    inv_std_dev = f32(np.sqrt(2.0 / 3.0) * (dims + 1))
    elevated = [f32(0)] * (dims + 1)
    running = f32(0)
    for axis in range(dims, 0, -1):
        scaled = point[axis - 1] * f32(1.0 / np.sqrt((axis + 1) * axis) * np.float64(inv_std_dev))
        elevated[axis] = f32(running - f32(axis) * scaled)
        running = f32(running + scaled)
    elevated[0] = running
    down = f32(1.0) / f32(dims + 1)
    rem0, total = [], 0
    for value in elevated:
        nearest = int(np.round(value * down))  # no ties in random features
        rem0.append(nearest * (dims + 1))
        total += nearest
    rank = [0] * (dims + 1)
    for i in range(dims + 1):
        for j in range(i + 1, dims + 1):
            if elevated[i] - rem0[i] < elevated[j] - rem0[j]:
                rank[i] += 1
            else:
                rank[j] += 1
    for i in range(dims + 1):  # back onto the hyperplane: the coordinates' remainders sum to 0
        if total > 0 and rank[i] >= dims + 1 - total:
            rem0[i] -= dims + 1
            rank[i] += total - (dims + 1)
        elif total < 0 and rank[i] < -total:
            rem0[i] += dims + 1
            rank[i] += dims + 1 + total
        else:
            rank[i] += total
    barycentric = [f32(0)] * (dims + 2)
    for i in range(dims + 1):
        share = f32(f32(elevated[i] - f32(rem0[i])) * down)
        barycentric[dims - rank[i]] = f32(barycentric[dims - rank[i]] + share)
        barycentric[dims + 1 - rank[i]] = f32(barycentric[dims + 1 - rank[i]] - share)
    barycentric[0] = f32(barycentric[0] + f32(1 + barycentric[dims + 1]))
    vertices = [tuple(rem0[i] + (r if rank[i] <= dims - r else r - (dims + 1))
                      for i in range(dims)) for r in range(dims + 1)]
    return [float(w) for w in barycentric[:dims + 1]], vertices


@pytest.mark.parametrize("dims", [1, 2, 5])
def test_simplex_vertices_and_weights_equal_a_loop_by_hand(dims):
    """Not only a filter of nearly the same values: the same lattice points and weights (a
    consistently shifted rank gives other vertices whose filter differs only by ~1e-6)."""
    from amnseg.ops.permutohedral import _simplex_vertices

    features = (np.random.default_rng(dims).random((200, dims)) * 9 - 3).astype(np.float32)
    weights, keys = _simplex_vertices(torch.from_numpy(features))
    for point, point_weights, point_keys in zip(features, weights, keys, strict=True):
        expected_weights, expected_keys = simplex_by_hand(point)
        assert [tuple(key) for key in point_keys.tolist()] == expected_keys
        np.testing.assert_allclose(point_weights.numpy(), expected_weights, rtol=0, atol=1e-6)


def test_lattice_filter_is_linear():
    features = torch.rand(300, 3, generator=torch.Generator().manual_seed(0)) * 4
    lattice = PermutohedralLattice(features)
    first, second = torch.rand(300, 2), torch.rand(300, 2)
    torch.testing.assert_close(lattice.filter(2 * first + second),
                               2 * lattice.filter(first) + lattice.filter(second))
    # Every point's own value reaches it (its vertices carry it), at most once.
    own = lattice.filter(torch.eye(300)).diagonal()
    assert (own > 0).all() and own.max() <= 1.0


def test_lattice_finds_its_vertices_and_no_key_outside_their_range():
    generator = torch.Generator().manual_seed(3)
    features = torch.rand(600, 1, generator=generator) * 5
    lattice = PermutohedralLattice(features, torch.arange(600) % 3)  # three groups
    coords = _unpack(lattice._keys, lattice._lows, lattice._spans)
    torch.testing.assert_close(lattice._find(coords), torch.arange(1, lattice.vertices + 1))
    highs = lattice._lows + lattice._spans - 1
    aliased = 0
    for column in range(coords.shape[1]):
        for edge, step in ((lattice._lows, -1), (highs, 1)):
            past = coords[coords[:, column] == edge[column]].clone()
            past[:, column] += step
            assert (lattice._find(past) == 0).all()
            codes = _pack_with(past, lattice._lows, lattice._spans)
            aliased += int(torch.isin(codes, lattice._keys).sum())
    assert aliased > 0  # some keys past the range have another vertex's code: not found


def image_scene(height: int, width: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    blocks = rng.integers(0, 256, (height // 9 + 1, width // 9 + 1, 3)).astype(np.float32)
    image = np.kron(blocks, np.ones((9, 9, 1)))[:height, :width]
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def smooth_logits(labels: int, height: int, width: int, seed: int) -> np.ndarray:
    coarse = torch.from_numpy(np.random.default_rng(seed).normal(
        0, 2.5, (1, labels, height // 8 + 2, width // 8 + 2)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear")[0].numpy()


@pytest.mark.parametrize("params", [CrfConfig(), deeplab_crf(),
                                    CrfConfig(iterations=3, gaussian_sxy=1.5, bilateral_srgb=13)])
@pytest.mark.parametrize(("height", "width", "labels", "kind"),
                         [(45, 61, 3, "blocks"), (37, 29, 2, "noise"), (40, 52, 6, "blocks")])
def test_crf_marginals_equal_pydensecrfs(params, height, width, labels, kind):
    image = image_scene(height, width, kind, seed=labels)
    logits = smooth_logits(labels, height, width, seed=height)
    probs = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
    unaries = [unary_from_labels(logits.argmax(0), labels, gt_prob=0.7, zero_unsure=False),
               unary_from_softmax(probs)]
    expected = dense_crf_many(image, unaries, params)  # pydensecrf

    got = DenseCrf([torch.from_numpy(image)], params).inference(
        [torch.from_numpy(np.stack(unaries))], params.iterations)[0].numpy()
    for ours, theirs, unary in zip(got, expected, unaries, strict=True):
        # float32 sums in another order: ~1e-7 typically, up to ~1e-4 where mean field amplifies
        difference = np.abs(ours - theirs)
        assert difference.max() < 1e-4 and difference.mean() < 1e-6
        np.testing.assert_array_equal(ours.argmax(0), theirs.argmax(0))
        # The CRF changed something: its kernels were compared, not only the unary.
        assert np.abs(theirs - torch.softmax(torch.from_numpy(-unary), 0).numpy()).max() > 0.1
    # The dispatch: a torch device runs this module, None pydensecrf.
    for ours, theirs in zip(dense_crf_many(image, unaries, params, device="cpu"), got,
                            strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_crf_refinements_on_a_device_equal_pydensecrfs():
    image = image_scene(33, 47, "blocks", seed=3)
    logits = smooth_logits(4, 33, 47, seed=5)
    maps = [logits.argmax(0), np.roll(logits.argmax(0), 3, axis=1)]
    for ours, theirs in zip(crf_refine_labels_many(image, maps, 4, CrfConfig(), device="cpu"),
                            crf_refine_labels_many(image, maps, 4, CrfConfig()), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    probs = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
    np.testing.assert_allclose(crf_refine_probabilities(image, probs, deeplab_crf(), "cpu"),
                               crf_refine_probabilities(image, probs, deeplab_crf()), atol=2e-5)


def test_crfs_of_a_batch_of_images_are_each_images_own():
    # Images of different sizes and label counts (one with a single label) in one lattice.
    shapes = [(31, 40, 3), (22, 57, 5), (30, 30, 1), (18, 25, 2)]
    images = [image_scene(h, w, "blocks", seed=k) for k, (h, w, _) in enumerate(shapes)]
    maps = [[smooth_logits(count, h, w, seed=k).argmax(0),
             smooth_logits(count, h, w, seed=k + 10).argmax(0)]
            for k, (h, w, count) in enumerate(shapes)]
    counts = [count for _, _, count in shapes]
    params = CrfConfig(iterations=5)
    batched = crf_refine_labels_batch(images, maps, counts, params, "cpu")
    for image, image_maps, count, got in zip(images, maps, counts, batched, strict=True):
        alone = crf_refine_labels_many(image, image_maps, count, params)  # pydensecrf
        for ours, theirs in zip(got, alone, strict=True):
            np.testing.assert_array_equal(ours, theirs)
    # Marginals too: padding the 2-label image to 5 labels adds only zeros to its sums.
    energies = [torch.from_numpy(np.stack([
        unary_from_labels(m, count, gt_prob=0.7, zero_unsure=False) for m in image_maps]))
        for image_maps, count in zip(maps, counts, strict=True) if count >= 2]
    kept = [image for image, count in zip(images, counts, strict=True) if count >= 2]
    together = DenseCrf([torch.from_numpy(i) for i in kept], params).inference(energies, 5)
    for image, energy, marginals in zip(kept, energies, together, strict=True):
        alone = DenseCrf([torch.from_numpy(image)], params).inference([energy], 5)[0]
        assert marginals.shape == energy.shape
        torch.testing.assert_close(marginals, alone, atol=1e-5, rtol=0)  # float order only


def test_lattice_keys_that_do_not_fit_are_a_clear_error():
    # Spans whose product is 2^62 are refused; one less fits, and packs reversibly.
    keys = torch.tensor([[0, 0, 0, 0, 0], [2**12 - 1, 2**12 - 1, 2**12 - 1, 2**13 - 1, 2**13 - 1]])
    with pytest.raises(AmnsegError, match="do not fit 62 bits"):
        _pack(keys)
    with pytest.raises(AmnsegError, match="do not fit 62 bits"):  # 2^65: no int64 wrap-around
        _pack(torch.tensor([[0] * 5, [2**13] * 5]))
    keys[1, 4] -= 1
    codes, lows, spans = _pack(keys)
    assert codes[1] == 2**62 - 2**49 - 1 and (_unpack(codes, lows, spans) == keys).all()
    with pytest.raises(ValueError, match="float32"):
        PermutohedralLattice(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="pixels"):
        DenseCrf([torch.zeros(4, 5, 3, dtype=torch.uint8)], CrfConfig()).inference(
            [torch.zeros(1, 2, 21)], 1)


@pytest.mark.parametrize(("workers", "batch_images", "device"), [
    (1, 1, "cpu"), (2, 3, "cpu"), pytest.param(2, 3, "cuda", marks=pytest.mark.gpu)])
def test_seed_files_with_crfs_on_a_device_equal_pydensecrfs(tmp_path, monkeypatch, workers,
                                                           batch_images, device):
    data = write_tiny_folder_dataset(tmp_path / "data", count=5, size=40)
    config = tiny_config(data, tmp_path / "run", f"seeds.crf_batch_images={batch_images}")
    dataset = build_dataset(config.data, "train")
    rng = np.random.default_rng(7)
    for stem in dataset.stems:
        class_ids = np.flatnonzero(dataset.label(stem)) + 1
        full = rng.random((len(class_ids), 40, 40)).astype(np.float32) ** 2
        save_score_maps(tmp_path / "run" / "cam" / "maps" / f"{stem}.npz",
                        ScoreMaps(class_ids, full[:, ::4, ::4], full))
    reference = seeds_stage.make_seeds(config, "cam", out_dir=tmp_path / "reference", workers=1)
    # seeds.crf_device=cuda; without a GPU its device made the CPU: the stage's whole GPU path.
    config.seeds.crf_device = "cuda"
    if device == "cpu":
        monkeypatch.setattr(seeds_stage, "crf_device_of",
                            lambda spec, option: torch.device("cpu"))
    calls = []
    batch = seeds_stage.seeds_from_thresholded
    monkeypatch.setattr(seeds_stage, "seeds_from_thresholded",
                        lambda images, *rest: calls.append(len(images)) or batch(images, *rest))
    on_device = seeds_stage.make_seeds(config, "cam", out_dir=tmp_path / "device",
                                       workers=workers)
    assert calls == ([1] * 5 if batch_images == 1 else [3, 2])
    for stem in dataset.stems:
        expected = read_index_png(reference / f"{stem}.png")
        np.testing.assert_array_equal(read_index_png(on_device / f"{stem}.png"), expected)
    assert len({int(v) for stem in dataset.stems
                for v in np.unique(read_index_png(reference / f"{stem}.png"))}) >= 3


def test_crf_device_options_are_checked(tmp_path):
    with pytest.raises(AmnsegError, match="seeds.crf_device"):
        load_config(overrides=[f"run_dir={tmp_path}", "seeds.crf_device=gpu"])
    with pytest.raises(AmnsegError, match="seeds.crf_batch_images"):
        load_config(overrides=[f"run_dir={tmp_path}", "seeds.crf_batch_images=0"])
    with pytest.raises(AmnsegError, match="seg.crf_device"):
        load_config(overrides=[f"run_dir={tmp_path}", "seg.crf_device=tpu"])
    with pytest.raises(AmnsegError, match="seeds beside the maps need seeds.crf_device=cpu"):
        load_config(overrides=[f"run_dir={tmp_path}", "seeds.overlap=true",
                               "seeds.crf_device=cuda"])
    config = load_config(overrides=[f"run_dir={tmp_path}", "seeds.crf_device=cuda",
                                    "device=cuda"])
    assert not seeds_stage.overlap_seeds(config)  # made after the maps, on the GPU
    assert crf_device_of("cpu") is None and crf_device_of("cpu:0") is None  # pydensecrf
    assert (crf_device_of("auto") is None) == (not torch.cuda.is_available())
    if not torch.cuda.is_available():
        with pytest.raises(AmnsegError, match="crf_device=cuda: CUDA is not available"):
            crf_device_of("cuda")
    with pytest.raises(AmnsegError, match="seg.crf_device=tpu: expected"):
        crf_device_of("tpu", "seg.crf_device")


@pytest.mark.gpu
def test_crf_on_cuda_equals_pydensecrf_on_a_voc_size_image():
    image = image_scene(375, 500, "blocks", seed=11)
    logits = smooth_logits(3, 375, 500, seed=12)
    unaries = [unary_from_labels(logits.argmax(0), 3, gt_prob=0.7, zero_unsure=False),
               unary_from_labels(np.roll(logits.argmax(0), 9, axis=0), 3, gt_prob=0.7,
                                 zero_unsure=False)]
    expected = dense_crf_many(image, unaries, CrfConfig())
    got = dense_crf_many(image, unaries, CrfConfig(), device="cuda")
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        assert (ours.argmax(0) == theirs.argmax(0)).mean() >= 0.9999
    # The lattice on the GPU is the CPU's: same vertices, same weights.
    for params in (CrfConfig(), deeplab_crf()):
        on_cpu = DenseCrf([torch.from_numpy(image)], params)
        on_gpu = DenseCrf([torch.from_numpy(image).cuda()], params)
        for (cpu_lattice, cpu_norm, _), (gpu_lattice, gpu_norm, _) in zip(
                on_cpu.kernels, on_gpu.kernels, strict=True):
            assert torch.equal(cpu_lattice._keys, gpu_lattice._keys.cpu())
            assert torch.equal(cpu_lattice.offsets, gpu_lattice.offsets.cpu())
            assert torch.equal(cpu_lattice.weights, gpu_lattice.weights.cpu())
            torch.testing.assert_close(cpu_norm, gpu_norm.cpu(), rtol=1e-5, atol=0)


def test_kernel_normalisation_is_pydensecrfs_double_precision_formula():
    """pydensecrf normalises each kernel by 1.0 / sqrt(density + 1e-20) in double precision,
    stored as float32: computed in float32 instead, some values differ in the last bit."""
    image = image_scene(33, 47, "blocks", seed=3)
    crf = DenseCrf([torch.from_numpy(image)], CrfConfig())
    for lattice, norm, _ in crf.kernels:
        density = lattice.filter(torch.ones(lattice.offsets.shape[0], 1)).numpy()
        expected = (1.0 / np.sqrt(density.astype(np.float64) + 1e-20)).astype(np.float32)
        assert norm.dtype == torch.float32
        np.testing.assert_array_equal(norm.numpy(), expected)
        in_float32 = np.float32(1.0) / np.sqrt(density.astype(np.float32))
        assert not np.array_equal(in_float32, expected)  # the test can tell the two apart
