"""IRN: path geometry, pair labels, loss, the boundary net, and the random walk vs dense."""

from __future__ import annotations

import inspect
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amnseg.losses import irn_affinity_loss
from amnseg.models import ResNet
from amnseg.models.irn import BoundaryNet
from amnseg.ops.affinity import (
    affinity_labels,
    pair_region,
    path_affinities,
    path_offsets,
    search_directions,
)
from amnseg.ops.random_walk import affinity_stencil, random_walk, transition_weights

# The key lists of the authors' files (copied from ../shared/reference/).
REFERENCE = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("radius", [2, 3, 5, 10])
def test_search_directions_brute_force(radius):
    expected = set()
    for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
        if (dy, dx) == (0, 0) or dy * dy + dx * dx >= radius * radius:
            continue
        if dy > 0 or (dy == 0 and dx > 0):  # one of each +-pair: the "forward" half-plane
            expected.add((dy, dx))
    got = search_directions(radius)
    assert set(got) == expected and len(got) == len(expected)


def test_radius_ten_matches_reference_displacement_count():
    # The reference IRN checkpoint stores one displacement per search direction of radius 10.
    path = REFERENCE / "official_keys_irn.tsv"
    shape = next(line.split("\t")[1] for line in path.read_text().splitlines()
                 if line.startswith("disp_target"))
    assert f", {len(search_directions(10))}," in shape


@pytest.mark.parametrize("radius", [3, 5, 10])
def test_path_offsets_brute_force(radius):
    for dy, dx in search_directions(radius):
        expected = []
        for y in range(min(0, dy), max(0, dy) + 1):
            for x in range(min(0, dx), max(0, dx) + 1):
                # distance from (y, x) to the line through the origin along (dy, dx)
                distance = abs(dy * x - dx * y) / math.hypot(dy, dx)
                if distance < 1:
                    expected.append((y, x))
        got = path_offsets((dy, dx))
        assert sorted(got) == sorted(expected)
        assert (0, 0) in got and (dy, dx) in got


def test_path_affinities_brute_force():
    rng = np.random.default_rng(0)
    boundary = rng.random((7, 9))
    got = path_affinities(torch.tensor(boundary), 3).numpy()
    for k, (dy, dx) in enumerate(search_directions(3)):
        for y in range(7):
            for x in range(9):
                if not (0 <= y + dy < 7 and 0 <= x + dx < 9):
                    assert got[k, y, x] == 0
                    continue
                peak = max(boundary[y + py, x + px] for py, px in path_offsets((dy, dx)))
                assert got[k, y, x] == pytest.approx(1 - peak)


def test_affinity_labels_brute_force():
    rng = np.random.default_rng(1)
    seed = rng.choice([0, 0, 1, 2, 255], size=(12, 14)).astype(np.uint8)
    radius = 4
    bg, fg, neg = affinity_labels(seed, radius)
    rows, cols = pair_region(12, 14, radius)
    assert rows == slice(0, 9) and cols == slice(3, 11)
    for k, (dy, dx) in enumerate(search_directions(radius)):
        for i, y in enumerate(range(rows.start, rows.stop)):
            for j, x in enumerate(range(cols.start, cols.stop)):
                a, b = int(seed[y, x]), int(seed[y + dy, x + dx])
                ignored = a == 255 or b == 255
                assert bg[k, i, j] == (not ignored and a == b == 0)
                assert fg[k, i, j] == (not ignored and a == b and a != 0)
                assert neg[k, i, j] == (not ignored and a != b)


def test_smallest_crop_that_config_validation_allows_holds_pairs():
    # irn.crop_size >= 4 * (2 * radius - 1): a 19-cell map at radius 10 has exactly one column
    # of source cells with all their pairs; 18 cells have none (the config refuses them).
    labels = affinity_labels(np.zeros((19, 19), np.uint8), 10)
    assert labels[0].shape == (len(search_directions(10)), 10, 1)
    assert labels[0].all()
    assert affinity_labels(np.zeros((19, 18), np.uint8), 10)[0].size == 0


def test_irn_loss_matches_formula():
    rng = np.random.default_rng(2)
    aff = torch.tensor(rng.random((2, 3, 4, 5)))
    masks = [torch.tensor(rng.random((2, 3, 4, 5)) < 0.3).double() for _ in range(3)]
    bg, fg, neg = masks
    pos_loss = -np.log(aff.numpy() + 1e-5)
    neg_loss = -np.log(1 + 1e-5 - aff.numpy())
    mean = lambda m, loss: (m.numpy() * loss).sum() / (m.numpy().sum() + 1e-5)  # noqa: E731
    expected = ((mean(bg, pos_loss) + mean(fg, pos_loss)) / 2 + mean(neg, neg_loss)) / 2
    assert irn_affinity_loss(aff, bg, fg, neg).item() == pytest.approx(expected)


def test_boundary_net_layout_and_frozen_backbone():
    net = BoundaryNet(ResNet(depth=50))
    path = REFERENCE / "official_keys_irn.tsv"
    reference = {
        line.split("\t")[0]: line.split("\t")[1]
        for line in path.read_text().splitlines() if line.startswith("fc_edge")
    }
    ours = {k: str(tuple(v.shape)) for k, v in net.state_dict().items()
            if k.startswith("fc_edge")}
    assert ours == reference and len(reference) == 17
    small = BoundaryNet(ResNet(depth=18, width=0.125, strides=[2, 2, 1, 1])).train()
    assert not small.backbone.training
    assert not any(p.requires_grad for p in small.backbone.parameters())
    assert {id(p) for p in small.trainable_parameters()} == {
        id(p) for name, p in small.named_parameters() if name.startswith("fc_edge")}
    out = small(torch.randn(2, 3, 37, 50))
    assert out.shape == (2, 1, 10, 13)
    out.sum().backward()
    assert all(p.grad is None for p in small.backbone.parameters())
    assert small.fc_edge6.weight.grad is not None


def test_boundary_head_on_given_levels_matches_functional():
    """The head alone, on feature levels with real spatial structure: per level a 1x1 conv,
    GroupNorm(4), a bilinear upsampling (align_corners False) to stride 4 for the deeper
    levels, ReLU; cropped to level 2's size, concatenated, one 1x1 conv."""
    torch.manual_seed(3)
    net = BoundaryNet(ResNet(depth=18, width=0.125, strides=[2, 2, 2, 1])).eval()
    for name, parameter in net.named_parameters():
        if name.startswith("fc_edge"):
            parameter.data.normal_()
    sizes = [(10, 13), (10, 13), (5, 7), (3, 4), (3, 4)]  # strides 4, 4, 8, 16, 16
    levels = [torch.randn(2, c, *size) for c, size in zip(net.backbone.level_channels, sizes,
                                                          strict=True)]
    net.backbone.forward_levels = lambda images: levels
    edges = []
    for index, (level, scale) in enumerate(zip(levels, [1, 1, 2, 4, 4], strict=True), 1):
        conv, norm = getattr(net, f"fc_edge{index}")[:2]
        edge = F.group_norm(F.conv2d(level, conv.weight), 4, norm.weight, norm.bias, norm.eps)
        if scale > 1:
            edge = F.interpolate(edge, scale_factor=scale, mode="bilinear", align_corners=False)
        edges.append(F.relu(edge)[..., :10, :13])
    expected = F.conv2d(torch.cat(edges, dim=1), net.fc_edge6.weight, net.fc_edge6.bias)
    torch.testing.assert_close(net(torch.zeros(2, 3, 37, 50)), expected, rtol=1e-5, atol=1e-5)


def dense_random_walk(maps, boundary, radius, beta, exp_times):
    """The reference formulation: dense affinity matrix, column-normalised, squared 8 times."""
    height, width = boundary.shape
    n = height * width
    affinity = torch.eye(n, dtype=torch.float64)
    for y, x in itertools.product(range(height), range(width)):
        for dy, dx in search_directions(radius):
            ty, tx = y + dy, x + dx
            if 0 <= ty < height and 0 <= tx < width:
                peak = max(boundary[y + py, x + px].item() for py, px in path_offsets((dy, dx)))
                affinity[y * width + x, ty * width + tx] = 1 - peak
                affinity[ty * width + tx, y * width + x] = 1 - peak
    affinity = affinity.pow(beta)
    transition = affinity / affinity.sum(dim=0, keepdim=True)
    for _ in range(exp_times):
        transition = transition @ transition
    return (maps.reshape(maps.shape[0], -1).double() @ transition).reshape(maps.shape)


@pytest.mark.parametrize("size", [(6, 6), (9, 13), (11, 7)])
def test_random_walk_equals_dense_reference(size):
    generator = torch.Generator().manual_seed(sum(size))
    boundary = torch.rand(size, generator=generator, dtype=torch.float64) ** 3
    maps = torch.rand((2, *size), generator=generator, dtype=torch.float64)
    dense = dense_random_walk(maps, boundary, 5, 10.0, 8)
    ours = random_walk(maps, boundary, 5, 10.0, 8)
    assert ours.dtype == torch.float64
    relative = (ours - dense).abs().max() / dense.abs().max()
    assert relative <= 1e-8
    # float32 maps: float64 accumulation, one rounding at the end.
    single = random_walk(maps.float(), boundary.float(), 5, 10.0, 8)
    assert single.dtype == torch.float32
    assert (single.double() - dense).abs().max() / dense.abs().max() <= 1e-6


@pytest.mark.parametrize("beta, exp_times, radius", [(3.0, 2, 3), (10.0, 5, 5), (7.0, 3, 4)])
def test_random_walk_constants_reach_the_product(beta, exp_times, radius):
    generator = torch.Generator().manual_seed(7)
    boundary = torch.rand((8, 10), generator=generator, dtype=torch.float64) ** 2
    maps = torch.rand((1, 8, 10), generator=generator, dtype=torch.float64)
    dense = dense_random_walk(maps, boundary, radius, beta, exp_times)
    ours = random_walk(maps, boundary, radius, beta, exp_times)
    assert ((ours - dense).abs().max() / dense.abs().max()).item() <= 1e-9


def test_transition_weights_are_the_dense_transition_matrix():
    # Rebuild T from the stencil (offsets, weights) and compare with the dense reference T.
    generator = torch.Generator().manual_seed(3)
    height, width, radius, beta = 6, 7, 3, 10.0
    boundary = torch.rand((height, width), generator=generator, dtype=torch.float64) ** 2
    offsets, weights = transition_weights(boundary, radius, beta)
    n = height * width
    from_stencil = torch.zeros(n, n, dtype=torch.float64)
    for k, (dy, dx) in enumerate(offsets):
        for y, x in itertools.product(range(height), range(width)):
            if 0 <= y + dy < height and 0 <= x + dx < width:
                # x'[j] = sum_k w[k, j] x[j + offset_k]  <=>  T[j + offset_k, j] = w[k, j]
                from_stencil[(y + dy) * width + x + dx, y * width + x] += weights[k, y, x]
    identity = torch.eye(n, dtype=torch.float64).reshape(n, height, width)
    dense = dense_random_walk(identity, boundary, radius, beta, 0).reshape(n, n)
    assert torch.allclose(from_stencil, dense, rtol=0, atol=1e-12)


def test_affinity_stencil_is_the_dense_affinity_matrix_and_its_degrees():
    # The half stencil of the GPU kernel: A[p, p + d] at p (and A[p - d, p] read at p - d),
    # rebuilt into the dense symmetric A; degrees = its column sums; A / degree = T.
    generator = torch.Generator().manual_seed(4)
    height, width, radius, beta = 5, 8, 3, 7.0
    boundary = torch.rand((height, width), generator=generator, dtype=torch.float64) ** 2
    directions, forward, degree = affinity_stencil(boundary, radius, beta)
    n = height * width
    dense = torch.eye(n, dtype=torch.float64)
    for k, (dy, dx) in enumerate(directions):
        for y, x in itertools.product(range(height), range(width)):
            if 0 <= y + dy < height and 0 <= x + dx < width:
                p, q = y * width + x, (y + dy) * width + x + dx
                dense[p, q] = dense[q, p] = forward[k, y, x]
            else:
                assert forward[k, y, x] == 0  # no affinity across the border
    assert torch.allclose(degree.reshape(-1), dense.sum(dim=0), rtol=1e-14, atol=0)
    identity = torch.eye(n, dtype=torch.float64).reshape(n, height, width)
    transition = dense_random_walk(identity, boundary, radius, beta, 0).reshape(n, n)
    assert torch.allclose(dense / degree.reshape(1, -1), transition, rtol=0, atol=1e-12)


def test_random_walk_defaults_are_the_reference_constants():
    # METHOD.md section 5: radius 5, beta 10, 2^8 steps.
    defaults = {name: p.default for name, p in inspect.signature(random_walk).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults["radius"] == 5 and defaults["beta"] == 10.0 and defaults["exp_times"] == 8
    assert defaults["precision"] == torch.float64


def test_random_walk_handles_zero_maps_and_full_boundaries():
    zeros = random_walk(torch.zeros(1, 5, 6), torch.ones(5, 6))
    assert torch.isfinite(zeros).all() and torch.count_nonzero(zeros) == 0
    walled = random_walk(torch.rand(1, 5, 6), torch.ones(5, 6))
    assert torch.isfinite(walled).all()


def test_pseudo_masks_for_background_only_and_all_zero_maps():
    from amnseg.config import load_config
    from amnseg.stages.irn import masks_from_walk, pseudo_mask

    config = load_config(None, ["irn.infer_pad_size=0", "irn.exp_times=3"])
    model = BoundaryNet(ResNet(depth=18, width=0.125, strides=[2, 2, 1, 1])).eval()
    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    none = pseudo_mask(model, image, np.zeros((0, 10, 13), np.float32), np.array([]), config)
    assert none.shape == (37, 50) and none.dtype == np.uint8 and not none.any()
    zeros = pseudo_mask(model, image, np.zeros((2, 10, 13), np.float32), np.array([3, 5]),
                        config)
    assert zeros.shape == (37, 50) and not zeros.any()  # nothing anywhere: all background
    walked = torch.zeros(1, 10, 13)
    walked[0, 2, 3] = 1.0
    mask = masks_from_walk(walked, np.array([7]), (37, 50), 0.25)
    assert set(np.unique(mask)) == {0, 7}


# --- stage arithmetic against computations written here from METHOD.md -------------------


def asymmetric_image(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    xx = np.mgrid[:height, :width][1]
    image = rng.integers(0, 120, (height, width, 3)).astype(np.float64)
    image[..., 2] += 130 * xx / width
    image[: height // 3, : width // 4] = (240, 30, 30)
    return image.clip(0, 255).astype(np.uint8)


def tiny_boundary_net() -> BoundaryNet:
    torch.manual_seed(2)
    net = BoundaryNet(ResNet(depth=18, width=0.125, strides=[2, 2, 1, 1])).eval()
    torch.nn.init.normal_(net.fc_edge6.weight, std=0.5)
    return net


@pytest.mark.parametrize("pad", [0, 64])
def test_infer_boundary_averages_the_mirror_before_the_sigmoid(pad):
    from amnseg.stages.irn import infer_boundary

    net = tiny_boundary_net()
    image = asymmetric_image(37, 50)
    got = infer_boundary(net, image, pad)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    chw = (torch.tensor(image).permute(2, 0, 1) / 255.0 - mean) / std
    mirrored = chw.flip(-1)
    if pad:  # zeros at the bottom and right of each (normalised) input
        chw = F.pad(chw, (0, pad - 50, 0, pad - 37))
        mirrored = F.pad(mirrored, (0, pad - 50, 0, pad - 37))
    with torch.no_grad():
        plain = net(chw[None].float())[0, 0, :10, :13]
        back = net(mirrored[None].float())[0, 0, :10, :13].flip(-1)
    expected = torch.sigmoid((plain + back) / 2)
    assert got.shape == (10, 13)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_irn_training_pairs_come_from_the_seed_at_cell_centres(tmp_path):
    from amnseg.config import IrnConfig
    from amnseg.data.base import Sample
    from amnseg.io import save_label_png
    from amnseg.stages.irn import IrnTrainingItems

    size = 48
    yy, xx = np.mgrid[:size, :size]
    seed = ((yy * 5 + xx * 3) % 5).astype(np.uint8)
    seed[seed == 4] = 255
    save_label_png(tmp_path / "s.png", seed)
    config = IrnConfig(crop_size=size, rescale=[1.0, 1.0], flip=False, radius=3)
    items = IrnTrainingItems(tmp_path, config)
    sample = Sample("s", asymmetric_image(size, size), np.array([1.0], np.float32), None)
    _, bg_pos, fg_pos, neg = items(sample, np.random.default_rng(0))
    expected = affinity_labels(seed[2::4, 2::4], 3)  # x0.25 nearest: pixels 4i + 2
    for got, want in zip((bg_pos, fg_pos, neg), expected, strict=True):
        assert got.dtype == torch.uint8  # a quarter of float32's bytes between processes
        assert want.dtype == np.float32 and set(np.unique(want)) == {0.0, 1.0}
        np.testing.assert_array_equal(got.numpy(), want)


def test_walk_input_is_power_of_maps_times_non_boundary():
    from amnseg.config import IrnConfig
    from amnseg.stages.irn import walk

    generator = torch.Generator().manual_seed(11)
    boundary = torch.rand((9, 12), generator=generator, dtype=torch.float64) ** 2
    maps = torch.rand((2, 9, 12), generator=generator, dtype=torch.float64)
    config = IrnConfig(exp_times=4)
    got = walk(maps, boundary, config)
    expected = dense_random_walk(maps.pow(1.3) * (1 - boundary), boundary, 5, 10.0, 4)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-9


def test_walk_scores_upsample_normalise_and_prepend_background():
    from amnseg.stages.irn import masks_from_walk, walk_scores

    generator = torch.Generator().manual_seed(12)
    walked = torch.rand((2, 10, 13), generator=generator, dtype=torch.float64) * 3.7
    got = walk_scores(walked, (37, 50), 0.25)
    up = F.interpolate(walked[None], size=(40, 52), mode="bilinear", align_corners=False)[0]
    up = up[:, :37, :50]
    expected = torch.cat([torch.full((1, 37, 50), 0.25, dtype=torch.float64), up / up.max()])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    mask = masks_from_walk(walked, np.array([3, 7]), (37, 50), 0.25)
    keys = np.array([0, 3, 7])
    np.testing.assert_array_equal(mask, keys[expected.argmax(dim=0).numpy()])
    assert set(np.unique(mask)) == {0, 3, 7}


def test_pseudo_mask_composes_boundary_walk_and_scores():
    from amnseg.config import load_config
    from amnseg.stages.irn import infer_boundary, pseudo_mask

    config = load_config(None, ["irn.exp_times=3", "irn.infer_pad_size=0"])
    net = tiny_boundary_net()
    image = asymmetric_image(37, 50)
    generator = torch.Generator().manual_seed(13)
    maps = torch.rand((2, 10, 13), generator=generator).numpy()
    got = pseudo_mask(net, image, maps, np.array([2, 6]), config)
    boundary = infer_boundary(net, image, 0).double()
    walked = dense_random_walk(
        torch.tensor(maps).double().pow(1.3) * (1 - boundary), boundary, 5, 10.0, 3)
    up = F.interpolate(walked[None], size=(40, 52), mode="bilinear", align_corners=False)[0]
    up = up[:, :37, :50] / up[:, :37, :50].max()
    scores = torch.cat([torch.full((1, 37, 50), 0.25, dtype=torch.float64), up])
    expected = np.array([0, 2, 6])[scores.argmax(dim=0).numpy()]
    margin = scores.sort(dim=0).values
    clear = (margin[-1] - margin[-2]).numpy() > 1e-4  # pixels not decided by rounding
    np.testing.assert_array_equal(got[clear], expected[clear])
    assert clear.mean() > 0.99 and len(np.unique(got)) == 3


def test_irn_training_loss_is_the_pair_loss_of_path_affinities():
    from amnseg.stages.irn import irn_training_loss

    torch.manual_seed(4)
    model = BoundaryNet(ResNet(depth=18, width=0.125, strides=[2, 2, 1, 1])).eval()
    images = torch.randn(2, 3, 40, 48)
    radius = 3
    with torch.no_grad():
        boundary = torch.sigmoid(model(images))[:, 0].double()  # (2, 10, 12)
    rng = np.random.default_rng(8)
    seeds = rng.choice([0, 1, 2, 255], size=(2, 10, 12)).astype(np.uint8)
    labels = [torch.from_numpy(np.stack(group)) for group in
              zip(*(affinity_labels(seed, radius) for seed in seeds), strict=True)]
    with torch.no_grad():
        got = irn_training_loss(model, images, *labels, radius=radius).item()
        # The loader's uint8 labels give the same loss to the bit.
        as_bytes = [label.to(torch.uint8) for label in labels]
        assert irn_training_loss(model, images, *as_bytes, radius=radius).item() == got
    # Brute force: affinity of source (y, x) and direction d = 1 - max boundary on the path.
    rows, cols = pair_region(10, 12, radius)
    affinity = np.zeros(labels[0].shape)
    for b in range(2):
        for k, (dy, dx) in enumerate(search_directions(radius)):
            for i, y in enumerate(range(rows.start, rows.stop)):
                for j, x in enumerate(range(cols.start, cols.stop)):
                    affinity[b, k, i, j] = 1 - max(
                        boundary[b, y + py, x + px].item() for py, px in path_offsets((dy, dx)))
    bg, fg, neg = (label.numpy() for label in labels)
    pos_loss, neg_loss = -np.log(affinity + 1e-5), -np.log(1 + 1e-5 - affinity)
    mean = lambda m, loss: (m * loss).sum() / (m.sum() + 1e-5)  # noqa: E731
    expected = ((mean(bg, pos_loss) + mean(fg, pos_loss)) / 2 + mean(neg, neg_loss)) / 2
    assert got == pytest.approx(expected, rel=1e-5)


def test_train_irn_runs_its_epochs_of_its_batches_down_to_lr_zero(tiny_dataset, tmp_path):
    from conftest import tiny_config, training_log, write_random_seeds

    from amnseg.stages.irn import train_irn

    config = tiny_config(tiny_dataset, tmp_path / "run", "irn.epochs=3", "irn.batch_size=4",
                         "irn.crop_size=32", "irn.radius=3")
    stems = write_random_seeds(config, tmp_path / "seeds")
    train_irn(config, tmp_path / "seeds")
    log = training_log(config, "irn")
    assert [record["epoch"] for record in log] == [1, 2, 3]
    state = torch.load(tmp_path / "run" / "irn" / "last.pt", weights_only=True)
    # 8 images in batches of 4: 2 steps per epoch; the poly schedule spans exactly those 6.
    assert state["scheduler"]["last_epoch"] == len(stems) // 4 * 3
    assert all(lr == 0.0 for lr in state["scheduler"]["_last_lr"])
    # After epochs 1 and 2 (steps 2 and 4 of 6): lr0 (1 - 2/6)^0.9 and lr0 (1 - 4/6)^0.9.
    first, second = np.array(log[0]["lr"]), np.array(log[1]["lr"])
    assert (first > 0).all()
    np.testing.assert_allclose(first / second, 2.0**0.9, rtol=1e-9)


def test_masks_stage_groups_give_each_images_own_pseudo_mask(tiny_dataset, tmp_path):
    """The masks stage infers boundaries for groups of images of one size per forward pass
    (mixed sizes here, padded to infer_pad_size); every mask equals ``pseudo_mask`` of its image
    alone, and a mask deleted after the run is recomputed byte for byte."""
    from conftest import tiny_config
    from PIL import Image

    from amnseg.checkpoints import save_model
    from amnseg.data import build_dataset
    from amnseg.data.base import read_index_png
    from amnseg.io import ScoreMaps, save_score_maps
    from amnseg.layout import checkpoint_path, maps_dir
    from amnseg.stages.irn import make_masks, pseudo_mask

    for stem in ("img 02", "img 03", "img 06"):
        path = tiny_dataset / "images" / f"{stem}.png"
        Image.open(path).resize((41, 26)).save(path)
    config = tiny_config(tiny_dataset, tmp_path / "run", "map_batch_images=3",
                         "irn.infer_pad_size=48", "irn.exp_times=2")
    dataset = build_dataset(config.data, "train")
    net = tiny_boundary_net()
    save_model(checkpoint_path(config, "irn"), "irn", net, dataset.class_names, config.backbone)
    amn_maps = maps_dir(config, "amn")
    amn_maps.mkdir(parents=True)
    generator = np.random.default_rng(4)
    for stem in dataset.stems:
        height, width = dataset.image(stem).shape[:2]
        class_ids = np.flatnonzero(dataset.label(stem)) + 1
        strided = generator.random((len(class_ids), (height + 3) // 4, (width + 3) // 4))
        save_score_maps(amn_maps / f"{stem}.npz", ScoreMaps(
            class_ids, strided.astype(np.float32),
            np.zeros((len(class_ids), height, width), np.float32)))
    masks = make_masks(config)
    for stem in dataset.stems:
        maps = np.load(amn_maps / f"{stem}.npz")
        expected = pseudo_mask(net, dataset.image(stem), maps["strided"], maps["class_ids"],
                               config)
        np.testing.assert_array_equal(read_index_png(masks / f"{stem}.png"), expected)
    victim = masks / "img 05.png"  # in the group img 04, img 05
    before = victim.read_bytes()
    victim.unlink()
    make_masks(config)
    assert victim.read_bytes() == before


def test_irn_loss_epsilons_on_single_pairs_and_under_torchrun(monkeypatch):
    """One pair per term: the 1e-5 of each mean's denominator shows at 1e-5 relative."""
    from amnseg import distributed

    aff = torch.tensor([[[[0.3, 0.8, 0.6]]]], dtype=torch.float64)
    bg, fg, neg = (torch.tensor([[[[float(i == k) for i in range(3)]]]], dtype=torch.float64)
                   for k in range(3))
    values = aff.flatten().tolist()
    expected = ((-math.log(values[0] + 1e-5) / (1 + 1e-5) - math.log(values[1] + 1e-5)
                 / (1 + 1e-5)) / 2 - math.log(1 + 1e-5 - values[2]) / (1 + 1e-5)) / 2
    assert irn_affinity_loss(aff, bg, fg, neg).item() == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(distributed, "loss_scale", lambda: 4)
    monkeypatch.setattr(distributed, "global_count", lambda count: count * 4)
    assert irn_affinity_loss(aff, bg, fg, neg).item() == pytest.approx(
        ((-math.log(values[0] + 1e-5) / (4 + 1e-5) - math.log(values[1] + 1e-5) / (4 + 1e-5))
         / 2 - math.log(1 + 1e-5 - values[2]) / (4 + 1e-5)) / 2 * 4, rel=1e-12)


def test_pad_bottom_right_pads_with_zeros_below_and_right_only():
    from amnseg.stages.irn import pad_bottom_right

    images = torch.rand(2, 3, 5, 7) + 1  # no zero inside
    assert torch.equal(pad_bottom_right(images, 0), images)
    assert torch.equal(pad_bottom_right(images, 4), images)  # smaller than the image: as it is
    padded = pad_bottom_right(images, 8)
    assert padded.shape == (2, 3, 8, 8)
    assert torch.equal(padded[:, :, :5, :7], images)
    assert (padded[:, :, 5:] == 0).all() and (padded[:, :, :, 7:] == 0).all()
    tall = pad_bottom_right(torch.rand(1, 3, 9, 4) + 1, 6)  # taller than the size, narrower
    assert tall.shape == (1, 3, 9, 6) and (tall[..., 4:] == 0).all() and (tall[..., :4] > 0).all()


def test_walks_batched_on_a_gpu_kernel_get_the_same_inputs_as_one_by_one(monkeypatch):
    """The kernel's contract: (walk starts, boundaries, radius, beta, exp_times) -> walks. A
    kernel keeping it, given by hand, gives what the walks one after the other give."""
    from amnseg.config import IrnConfig
    from amnseg.stages import irn as irn_stage

    rng = np.random.default_rng(17)
    maps = [torch.from_numpy(rng.random((k, h, w))) for k, h, w in ((2, 6, 7), (1, 5, 4))]
    boundaries = [torch.from_numpy(rng.random(m.shape[1:])) for m in maps]
    config = IrnConfig(walk_radius=2, exp_times=3, beta=7.0, cam_power=2)
    one_by_one = irn_stage.walk_many(maps, boundaries, config)
    calls = []

    def kernel(starts, given_boundaries, radius, beta, exp_times):
        calls.append((radius, beta, exp_times))
        return [random_walk(start, boundary, radius, beta, exp_times)
                for start, boundary in zip(starts, given_boundaries, strict=True)]

    monkeypatch.setattr(irn_stage, "gpu_walk_kernel", lambda device: kernel)
    batched = irn_stage.walk_many(maps, boundaries, config)
    assert calls == [(2, 7.0, 3)]
    for got, expected in zip(batched, one_by_one, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
