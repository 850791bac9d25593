"""AMN: loss, label conditioning, map post-processing; seeds: procedure and determinism."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from amnseg.losses import amn_loss
from amnseg.models import ResNet
from amnseg.models.amn import AMN
from amnseg.models.aspp import ASPP
from amnseg.stages.amn import amn_scores


def hand_loss(logits: torch.Tensor, seeds: torch.Tensor, eps: float) -> float:
    """Per-pixel loop written from METHOD.md section 4."""
    channels = logits.shape[1]
    num_fg = channels - 1
    bg_terms, fg_terms = [], []
    for b in range(logits.shape[0]):
        for y in range(logits.shape[2]):
            for x in range(logits.shape[3]):
                seed = int(seeds[b, y, x])
                if seed == 255:
                    continue
                z = logits[b, :, y, x].tolist()
                log_norm = math.log(sum(math.exp(v) for v in z))
                ce = 0.0
                for c in range(channels):
                    target = 1 - eps if c == seed else eps / num_fg
                    ce -= target * (z[c] - log_norm)
                (bg_terms if seed == 0 else fg_terms).append(ce)
    mean = lambda terms: sum(terms) / len(terms) if terms else 0.0  # noqa: E731
    return (mean(bg_terms) + mean(fg_terms)) / 2


def test_amn_loss_equals_per_pixel_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    seeds = torch.tensor(
        [
            [[0, 0, 1, 255, 3], [2, 2, 255, 0, 0], [1, 1, 1, 1, 0]],
            [[255, 255, 0, 0, 0], [0, 3, 3, 255, 0], [0, 0, 0, 2, 2]],
        ]
    )
    got = amn_loss(logits, seeds, eps=0.4).item()
    assert got == pytest.approx(hand_loss(logits, seeds, 0.4), rel=1e-9)


def test_amn_loss_without_foreground_or_with_only_unsure_is_finite():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    only_bg = torch.zeros(1, 4, 4, dtype=torch.long)
    only_bg[0, 0] = 255
    loss = amn_loss(logits, only_bg, 0.4)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(hand_loss(logits.detach(), only_bg, 0.4), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    all_unsure = torch.full((1, 4, 4), 255, dtype=torch.long)
    assert amn_loss(logits, all_unsure, 0.4).item() == 0.0


def tiny_amn(num_classes: int = 3) -> AMN:
    torch.manual_seed(0)
    return AMN(ResNet(depth=18, width=0.125, strides=[2, 2, 1, 1]), num_classes).eval()


def test_label_conditioning_changes_output():
    model = tiny_amn()
    torch.nn.init.normal_(model.label_enc.weight)
    images = torch.randn(1, 3, 32, 32)
    one = model(images, torch.tensor([[1.0, 0.0, 0.0]]))
    other = model(images, torch.tensor([[0.0, 1.0, 1.0]]))
    assert one.shape == (1, 4, 4, 4)
    assert not torch.allclose(one, other)


def test_zero_label_gives_bias_only_conditioning():
    model = tiny_amn()
    zeros = torch.zeros(2, 3)
    conditioning = model.conditioning(zeros)
    torch.testing.assert_close(conditioning[:, :, 0, 0], model.label_enc.bias.expand(2, -1))
    with torch.no_grad():
        model.label_enc.bias.zero_()
    assert torch.count_nonzero(model.conditioning(zeros)) == 0
    # zero conditioning leaves only the ASPP biases: a constant map per class
    logits = model(torch.randn(1, 3, 32, 32), zeros)
    expected = sum(conv.bias for conv in model.classifier[1].children())
    torch.testing.assert_close(logits[0, :, 2, 2], expected)


def test_aspp_init_and_reference_key_layout():
    model = AMN(ResNet(depth=50), 20)
    state = model.state_dict()
    keys = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("backbone")}
    assert keys["label_enc.weight"] == (2048, 20)
    assert keys["classifier.1.c3.weight"] == (21, 2048, 3, 3)
    assert set(keys) == {"label_enc.weight", "label_enc.bias"} | {
        f"classifier.1.c{i}.{p}" for i in range(4) for p in ("weight", "bias")
    }
    conv = model.classifier[1].c0
    assert conv.dilation == (6, 6) and conv.padding == (6, 6)
    assert torch.count_nonzero(conv.bias) == 0
    assert abs(conv.weight.std().item() - 0.01) < 0.001


def test_amn_scores_equal_per_pixel_computation():
    """A group of three images, each with its own classes and seed (one with none)."""
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(size=(3, 5, 6, 7)), dtype=torch.float32)
    class_ids = [np.array([2, 4]), np.array([], np.int64), np.array([1, 3, 4])]
    cam_seeds = torch.tensor(rng.choice([0, 2, 4, 255], size=(3, 6, 7)))
    got = amn_scores(logits, class_ids, cam_seeds).numpy()
    expected = []
    for image, ids in enumerate(class_ids):
        scores = np.exp(logits[image].numpy())
        probs = scores / scores.sum(0, keepdims=True)
        for channel in ids:
            plane = probs[channel]
            low, high = plane.min(), plane.max()
            rows = np.zeros((6, 7))
            for y in range(6):
                for x in range(7):
                    value = plane[y, x]
                    if cam_seeds[image, y, x] != 0:
                        value = (value - low) / (high - low + 1e-5)
                    rows[y, x] = value
            expected.append(rows)
    assert got.shape == (5, 6, 7)
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5, atol=1e-6)
    # Each image alone gives its rows of the group's, bit for bit.
    alone = [amn_scores(logits[i:i + 1], class_ids[i:i + 1], cam_seeds[i:i + 1])
             for i in range(3)]
    assert torch.equal(torch.cat(alone), torch.from_numpy(got))


@torch.no_grad()
def test_groups_are_finished_in_parts_of_a_bounded_size():
    """COCO's 81 channels at full size do not fit a whole group at once: its images are
    finished a few at a time, with the same maps as the whole group."""
    from amnseg.stages.amn import amn_score_tensors, merge_amn_scales
    from amnseg.stages.common import ImageGroup, finish_group, group_parts

    rng = np.random.default_rng(3)
    images, channels, size = 5, 4, (9, 12)
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1]],
                          dtype=torch.float32)
    seeds = (torch.from_numpy(rng.integers(0, 3, (images, 3, 3)).astype(np.uint8)),
             torch.from_numpy(rng.integers(0, 3, (images, 9, 12)).astype(np.uint8)))
    group = ImageGroup([f"i{n}" for n in range(images)],
                       [torch.zeros(images, 9, 12, 3, dtype=torch.uint8)], labels, size, seeds)
    outputs = [torch.randn(2 * images, channels, 3, 3), torch.randn(2 * images, channels, 2, 2)]

    def finish(part, rows):
        return amn_score_tensors(*merge_amn_scales(rows, len(part.stems), part.size),
                                 part.labels, part.extra)

    per_image = channels * 9 * 12
    parts = list(group_parts(group, outputs, 2 * per_image + 1))
    assert [part.stems for part, _ in parts] == [["i0", "i1"], ["i2", "i3"], ["i4"]]
    for part, rows in parts:
        first = int(part.stems[0][1:])
        count = len(part.stems)
        assert torch.equal(part.labels, labels[first:first + count])
        assert torch.equal(part.extra[1], seeds[1][first:first + count])
        assert part.scaled[0].shape[0] == count and part.size == size
        for scale, scale_rows in zip(outputs, rows, strict=True):
            assert torch.equal(scale_rows, scale[2 * first:2 * (first + count)])
    assert [len(p.stems) for p, _ in group_parts(group, outputs, per_image - 1)] == [1] * 5
    whole_group = list(group_parts(group, outputs, images * per_image))
    assert len(whole_group) == 1 and whole_group[0][0] is group

    whole = finish(group, outputs)
    in_parts = finish_group(group, outputs, finish, 2 * per_image)
    assert [ids.tolist() for ids in in_parts[0]] == [ids.tolist() for ids in whole[0]]
    assert in_parts[1].shape == (7, 3, 3) and in_parts[2].shape == (7, 9, 12)
    torch.testing.assert_close(in_parts[1], whole[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(in_parts[2], whole[2], rtol=1e-6, atol=0)


def test_amn_scores_of_a_group_equal_one_image_softmax_bit_for_bit():
    """With several threads a softmax over a whole group splits its work elsewhere than over
    one image, and a few tiny probabilities differ in the last bit (which the CRF seeds can
    turn into other labels): the scores are each image's own softmax, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        logits = torch.randn(4, 21, 30, 40) * 30
        assert not torch.equal(torch.softmax(logits, dim=1)[0], torch.softmax(logits[0], dim=0))
        every_class = [np.arange(1, 21)] * 4
        scores = amn_scores(logits, every_class, torch.zeros(4, 30, 40, dtype=torch.uint8))
        expected = torch.cat([torch.softmax(image, dim=0)[1:] for image in logits])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(scores, expected)


def test_amn_scores_of_a_group_without_classes_are_empty():
    # COCO has images with no class; a group may hold only such images.
    empty = np.array([], np.int64)
    scores = amn_scores(torch.randn(2, 4, 5, 6), [empty, empty], torch.ones(2, 5, 6))
    assert scores.shape == (0, 5, 6)


@torch.no_grad()
def test_amn_logits_of_a_group_equal_those_of_each_image_bit_for_bit():
    from amnseg.stages.amn import merge_amn_scales

    torch.manual_seed(2)
    scale_logits = [torch.randn(6, 5, 6, 8), torch.randn(6, 5, 3, 4)]
    strided, full = merge_amn_scales(scale_logits, 3, (21, 30))
    assert strided.shape == (3, 5, 6, 8) and full.shape == (3, 5, 21, 30)
    for image in range(3):
        pairs = [logits[2 * image:2 * image + 2] for logits in scale_logits]
        one_strided, one_full = merge_amn_scales(pairs, 1, (21, 30))
        assert torch.equal(one_strided[0], strided[image])
        assert torch.equal(one_full[0], full[image])
    # Scale by scale: the mean of image and mirror, resized, then the mean of the scales.
    expected = sum(F.interpolate(((logits[0] + logits[1].flip(-1)) / 2)[None], (21, 30),
                                 mode="bilinear", align_corners=False)[0]
                   for logits in scale_logits) / 2
    torch.testing.assert_close(full[0], expected)


def test_amn_scores_min_max_uses_its_epsilon():
    # A channel of small probabilities (range ~8e-5): the 1e-5 in the denominator matters.
    logits = torch.zeros(3, 2, 3)
    logits[1] = torch.tensor([[-10.0, -9.7, -9.0], [-9.4, -9.9, -10.0]])
    seed = torch.ones(1, 2, 3, dtype=torch.long)
    got = amn_scores(logits[None], [np.array([1])], seed)[0].double()
    probs = torch.softmax(logits.double(), dim=0)[1]
    expected = (probs - probs.min()) / (probs.max() - probs.min() + 1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert expected.max() < 0.9  # without the epsilon it would be 1


# --- stage arithmetic against computations written here from METHOD.md -------------------

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def normalized(image: np.ndarray, scale: float) -> torch.Tensor:
    """PIL bicubic rescale to (round(H s), round(W s)), then ImageNet normalisation."""
    from PIL import Image

    height, width = image.shape[:2]
    size = (int(round(width * scale)), int(round(height * scale)))
    scaled = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC)) if scale != 1 else image
    return torch.tensor(((scaled / 255.0 - MEAN) / STD).transpose(2, 0, 1), dtype=torch.float32)


def pil_nearest_rows(size: int, count: int) -> np.ndarray:
    """Rows PIL's NEAREST picks when shrinking ``size`` to ``count``: the cell centres."""
    return np.floor((np.arange(count) + 0.5) * size / count).astype(int)


def asymmetric_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    image = rng.integers(0, 256, (height, width, 3)).astype(np.float64) * 0.3
    image[..., 0] += 150 * (xx / width)  # a left-right ramp: not mirror-symmetric
    image[(yy < height // 2) & (xx < width // 3)] = (250, 200, 10)
    return image.clip(0, 255).astype(np.uint8)


def test_amn_maps_equal_direct_computation_with_background_in_the_seed():
    from amnseg.stages.amn import amn_maps_for_image

    model = tiny_amn(4)
    torch.nn.init.normal_(model.label_enc.weight)
    for conv in model.classifier[1].children():
        torch.nn.init.normal_(conv.weight, std=0.05)
    height, width = 37, 50
    image = asymmetric_image(height, width)
    label = torch.tensor([0.0, 1.0, 0.0, 1.0])
    rng = np.random.default_rng(5)
    seed = rng.choice([0, 0, 2, 4, 255], size=(height, width)).astype(np.uint8)
    scales = [1.0, 0.5, 1.5]
    batches = []
    for scale in scales:
        chw = normalized(image, scale)
        batches.append(torch.stack([chw, chw.flip(-1)]))
    maps = amn_maps_for_image(model, batches, label, seed, "cpu")

    # By hand: per scale, average the image's and the flipped-back mirror's logits, resize
    # bilinearly to the stride-4 size and to H x W, average the scales.
    h4, w4 = (height - 1) // 4 + 1, (width - 1) // 4 + 1
    with torch.no_grad():
        strided, full = 0, 0
        for batch in batches:
            plain = model(batch[:1], label[None])[0]
            mirrored = model(batch[1:], label[None])[0].flip(-1)
            mean = ((plain + mirrored) / 2)[None]
            strided = strided + F.interpolate(mean, (h4, w4), mode="bilinear")[0]
            full = full + F.interpolate(mean, (height, width), mode="bilinear")[0]
        strided, full = strided / len(scales), full / len(scales)

    def scores(logits, seed_at_size):
        probs = torch.softmax(logits.double(), dim=0)[[0, 2, 4]]
        low = probs.amin(dim=(1, 2), keepdim=True)
        high = probs.amax(dim=(1, 2), keepdim=True)
        minmax = (probs - low) / (high - low + 1e-5)
        return torch.where(torch.as_tensor(seed_at_size != 0)[None], minmax, probs)[1:]

    # The stride-4 seed: PIL NEAREST picks the cell centres (rows 1, 5, 9, 12, ... here).
    small_seed = seed[np.ix_(pil_nearest_rows(height, h4), pil_nearest_rows(width, w4))]
    assert not np.array_equal(small_seed, seed[::4, ::4])  # the two samplings differ here
    assert maps.class_ids.tolist() == [2, 4]
    np.testing.assert_allclose(maps.strided, scores(strided, small_seed), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps.full, scores(full, seed), rtol=1e-4, atol=1e-6)


def test_amn_training_targets_sample_cell_centres(tmp_path):
    from amnseg.config import AmnConfig
    from amnseg.data.base import Sample
    from amnseg.io import save_label_png
    from amnseg.stages.amn import AmnTrainingItems

    size = 64
    yy, xx = np.mgrid[:size, :size]
    seed = ((yy * 7 + xx * 3) % 6).astype(np.uint8)  # every pixel differs from its neighbours
    seed[seed == 5] = 255
    save_label_png(tmp_path / "s.png", seed)
    image = asymmetric_image(size, size)
    config = AmnConfig(crop_size=size, rescale=[1.0, 1.0], flip=False)
    items = AmnTrainingItems(tmp_path, config, output_stride=16)
    sample = Sample("s", image, np.array([1.0, 0.0], np.float32), None)
    crop, label, target = items(sample, np.random.default_rng(0))
    assert crop.shape == (3, size, size) and label.tolist() == [1.0, 0.0]
    np.testing.assert_allclose(crop.numpy(), normalized(image, 1.0).numpy(), atol=1e-5)
    assert target.dtype == torch.int64 and target.shape == (4, 4)
    np.testing.assert_array_equal(target.numpy(), seed[8::16, 8::16])  # 16i + 8, not 16i


def test_train_amn_runs_its_epochs_of_its_batches(tiny_dataset, tmp_path):
    from conftest import tiny_config, training_log, write_random_seeds

    from amnseg.stages.amn import train_amn

    config = tiny_config(tiny_dataset, tmp_path / "run", "amn.epochs=3", "amn.batch_size=4",
                         "amn.crop_size=32", "amn.eval_images=0")
    stems = write_random_seeds(config, tmp_path / "seeds")
    train_amn(config, tmp_path / "seeds")
    assert [record["epoch"] for record in training_log(config, "amn")] == [1, 2, 3]
    state = torch.load(tmp_path / "run" / "amn" / "last.pt", weights_only=True)
    # 8 images in batches of 4: 2 steps per epoch, 6 in all (Adam counts them).
    steps = {int(v["step"]) for v in state["optimizer"]["state"].values()}
    assert steps == {len(stems) // 4 * 3}


def test_amn_map_files_and_training_check_equal_direct_computation(tiny_dataset, tmp_path):
    from conftest import tiny_config, write_random_seeds

    from amnseg.checkpoints import load_model, save_model
    from amnseg.data import build_dataset
    from amnseg.io import load_score_maps
    from amnseg.layout import checkpoint_path
    from amnseg.metrics import confusion_matrix, miou, scores_to_labels
    from amnseg.models import build_backbone
    from amnseg.ops.multiscale import multiscale_inputs
    from amnseg.stages.amn import amn_maps_for_image, make_amn_maps, quick_amn_miou

    config = tiny_config(tiny_dataset, tmp_path / "run", "amn.scales=[1.0,0.5]",
                         "amn.eval_images=3", "amn.eval_threshold=0.3", "compress_maps=false")
    dataset = build_dataset(config.data, "train")
    torch.manual_seed(0)
    model = AMN(build_backbone(config.backbone), dataset.num_classes)
    torch.nn.init.normal_(model.label_enc.weight)
    for conv in model.classifier[1].children():
        torch.nn.init.normal_(conv.weight, std=0.05)
    save_model(checkpoint_path(config, "amn"), "amn", model, dataset.class_names,
               config.backbone)
    seeds = tmp_path / "seeds"
    write_random_seeds(config, seeds, seed=1)

    out_dir = make_amn_maps(config, seeds)
    model = load_model(checkpoint_path(config, "amn"), "amn", dataset.class_names).eval()
    confusion = 0
    for index, stem in enumerate(dataset.stems):
        image = dataset.image(stem)
        label = torch.from_numpy(dataset.label(stem))
        seed = np.array(Image.open(seeds / f"{stem}.png"))
        # The files: every scale with its mirror image (the reference's AMN maps use flips).
        expected = amn_maps_for_image(model, multiscale_inputs(image, [1.0, 0.5], flip=True),
                                      label, seed, "cpu")
        got = load_score_maps(out_dir / f"{stem}.npz")
        with zipfile.ZipFile(out_dir / f"{stem}.npz") as stored:  # compress_maps=false
            assert {i.compress_type for i in stored.infolist()} == {zipfile.ZIP_STORED}
        np.testing.assert_array_equal(got.class_ids, expected.class_ids)
        np.testing.assert_allclose(got.full, expected.full, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.strided, expected.strided, rtol=1e-5, atol=1e-6)
        if index < 3:  # the training check: scale 1 + flip, first amn.eval_images images
            single = amn_maps_for_image(model, multiscale_inputs(image, [1.0]), label, seed, "cpu")
            prediction = scores_to_labels(single.full, single.class_ids, 0.3)
            confusion = confusion + confusion_matrix(prediction, dataset.mask(stem), 3)
    assert quick_amn_miou(model, dataset, seeds, config, "cpu") == pytest.approx(miou(confusion))


@pytest.mark.parametrize("height,width", [(5, 7), (6, 20), (13, 12), (16, 16), (30, 25)])
def test_aspp_skips_only_padding_taps(height, width):
    """ASPP drops the kernel rows/columns that read only padding on small maps: the output and
    every gradient equal those of the plain padded convs (float64, so only rounding differs)."""
    torch.manual_seed(0)
    aspp = ASPP(4, 3, rates=(1, 6, 12, 18)).double()
    with torch.no_grad():
        for conv in aspp.children():
            conv.bias.normal_()
    x = torch.randn(2, 4, height, width, dtype=torch.float64, requires_grad=True)
    out = aspp(x)
    direct = sum(F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation)
                 for conv in aspp.children())
    torch.testing.assert_close(out, direct, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out)
    inputs = [x, *aspp.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    direct_grads = torch.autograd.grad((direct * weights).sum(), inputs)
    for grad, direct_grad in zip(grads, direct_grads, strict=True):
        torch.testing.assert_close(grad, direct_grad, rtol=1e-12, atol=1e-12)


def test_amn_loss_default_smoothing_and_one_pixel_classes():
    """The default eps is METHOD.md's 0.4; a class with one seed pixel is averaged over that
    one pixel."""
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 2, 3, dtype=torch.float64)
    seeds = torch.tensor([[[0, 255, 255], [255, 2, 255]]])  # one background, one foreground
    assert amn_loss(logits, seeds).item() == pytest.approx(hand_loss(logits, seeds, 0.4),
                                                           rel=1e-12)


def test_amn_loss_is_the_global_batch_mean_under_torchrun(monkeypatch):
    """With R ranks holding the same batch, each rank's loss is R x its own pixels' sum over the
    global count, which DDP's gradient averaging turns into the global mean: the same value."""
    from amnseg import distributed

    torch.manual_seed(2)
    logits = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    seeds = torch.randint(0, 4, (2, 3, 5))
    alone = amn_loss(logits, seeds, 0.4).item()
    monkeypatch.setattr(distributed, "loss_scale", lambda: 3)
    monkeypatch.setattr(distributed, "global_count", lambda count: count * 3)
    assert amn_loss(logits, seeds, 0.4).item() == pytest.approx(alone, rel=1e-12)


def test_segmentation_transform_draws_the_rescale_range_flips_half_and_keeps_pairs_aligned():
    """AMN's and IRN's augmentation: a scale uniform in ``rescale`` (both ends reached), a flip
    half the time, image and labels moved together, pads 0 and 255."""
    from amnseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegmentationTrainTransform

    image = np.zeros((20, 16, 3), np.uint8)
    image[:, :8] = 255
    labels = np.full((20, 16), 2, np.uint8)
    labels[:, :8] = 1  # class 1 where the image is white
    transform = SegmentationTrainTransform((0.5, 1.5), crop_size=40)
    assert transform.flip is True
    white = (1.0 - IMAGENET_MEAN) / IMAGENET_STD
    rng = np.random.default_rng(4)
    sides, flipped = [], 0
    for _ in range(300):
        crop, label_crop = transform(image, labels, rng)
        crop, label_crop = crop.numpy(), label_crop.numpy()
        inside = label_crop != 255
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        assert abs(len(cols) - 0.8 * len(rows)) <= 1  # 20 x 16 keeps its shape
        sides.append(len(rows))
        assert (crop[:, ~inside] == 0).all()  # the image is padded with 0 where labels are 255
        is_white = np.isclose(crop, white[:, None, None], atol=1e-5).all(axis=0)
        # The pair moved together (the bicubic image blurs the edge the labels keep sharp).
        assert not (is_white & (label_crop != 1)).any()
        assert is_white.sum() >= 0.5 * (label_crop == 1).sum()
        flipped += int(label_crop[rows[0], cols[0]] == 2)
    assert 10 <= min(sides) <= 11 and 29 <= max(sides) <= 30
    assert abs(np.mean(sides) - 20) < 1.0  # uniform on [10, 30]
    assert 120 <= flipped <= 180


def test_amn_maps_read_their_seeds_in_loader_workers(tiny_dataset, tmp_path):
    """The CAM seeds are read in the loader workers: the same files as without workers, and a
    missing seed is still one line naming it."""
    from conftest import tiny_config, write_random_seeds

    from amnseg.checkpoints import save_model
    from amnseg.cli import one_line
    from amnseg.data import build_dataset
    from amnseg.errors import AmnsegError
    from amnseg.io import load_score_maps
    from amnseg.layout import checkpoint_path
    from amnseg.models import build_backbone
    from amnseg.stages.amn import make_amn_maps

    made = {}
    for workers in (0, 2):
        config = tiny_config(tiny_dataset, tmp_path / f"run{workers}", "amn.scales=[1.0]",
                             f"data.num_workers={workers}")
        dataset = build_dataset(config.data, "train")
        torch.manual_seed(0)
        model = AMN(build_backbone(config.backbone), dataset.num_classes)
        torch.nn.init.normal_(model.label_enc.weight)
        save_model(checkpoint_path(config, "amn"), "amn", model, dataset.class_names,
                   config.backbone)
        seeds = tmp_path / f"seeds{workers}"
        write_random_seeds(config, seeds, seed=2)
        out_dir = make_amn_maps(config, seeds)
        made[workers] = {p.stem: load_score_maps(p) for p in sorted(out_dir.glob("*.npz"))}
    assert list(made[0]) == list(made[2]) == list(dataset.stems)
    for stem, maps in made[0].items():
        np.testing.assert_array_equal(made[2][stem].full, maps.full)
        np.testing.assert_array_equal(made[2][stem].strided, maps.strided)

    missing = seeds / f"{dataset.stems[1]}.png"
    missing.unlink()
    for done in out_dir.glob("*.npz"):  # all to make again
        done.unlink()
    with pytest.raises(AmnsegError) as caught:
        make_amn_maps(config, seeds)
    assert one_line(caught.value) == f"{missing}: seed not found; run the seed stage first"


def test_read_cam_seed_sizes_shrinks_the_seed_it_checks(tmp_path):
    from amnseg.errors import AmnsegError
    from amnseg.io import save_label_png
    from amnseg.stages.amn import read_cam_seed_sizes

    seed = np.arange(5 * 9, dtype=np.uint8).reshape(5, 9) % 4
    save_label_png(tmp_path / "a.png", seed)
    strided, full = read_cam_seed_sizes(tmp_path, "a", (5, 9))
    assert torch.equal(full, torch.from_numpy(seed))
    # PIL NEAREST to (2, 3): rows floor((i + 0.5) * 5 / 2) = 1, 3; columns 1, 4, 7
    assert torch.equal(strided, torch.from_numpy(seed[[1, 3]][:, [1, 4, 7]]))
    with pytest.raises(AmnsegError, match="seed is 9x5, the image is 5x9"):
        read_cam_seed_sizes(tmp_path, "a", (9, 5))
