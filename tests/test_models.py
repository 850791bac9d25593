"""Backbone layout, frozen BatchNorm, CAM net and multi-scale CAM inference."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from amnseg.data.transforms import normalize, rescale
from amnseg.errors import AmnsegError
from amnseg.models import CAMNet, FixedStatsBatchNorm2d, ResNet, load_imagenet_weights
from amnseg.ops.multiscale import (
    max_normalize,
    merge_cam_scales,
    merge_flip,
    multiscale_cam,
    multiscale_inputs,
    network_batch,
    network_batches,
    rescaled_images,
    strided_size,
    strided_up_size,
)

# The key lists of the authors' files (copied from ../shared/reference/).
REFERENCE = Path(__file__).resolve().parent / "data"


def reference_keys(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    path = REFERENCE / f"official_keys_{name}.tsv"
    keys = {}
    for line in path.read_text().splitlines():
        key, shape, _ = line.split("\t")
        if key.startswith(prefix):
            keys[key[len(prefix):]] = tuple(int(v) for v in shape.strip("()").split(",") if v)
    return keys


def test_resnet50_state_dict_matches_reference_layout():
    model = ResNet(depth=50)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference_keys("cam", "resnet50.")


def test_cam_classifier_matches_reference_layout():
    model = CAMNet(ResNet(depth=50), num_classes=20)
    assert tuple(model.classifier.weight.shape) == reference_keys("cam", "classifier.")["weight"]
    assert model.classifier.bias is None


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_output_stride_and_channels(depth):
    model = ResNet(depth=depth, width=0.125, strides=[2, 2, 2, 1]).eval()
    features = model(torch.randn(1, 3, 50, 37))
    assert features.shape == (1, model.out_channels, 4, 3)  # ceil(50/16), ceil(37/16)
    levels = model.forward_levels(torch.randn(1, 3, 64, 64))
    assert [lv.shape[1] for lv in levels] == model.level_channels
    assert [lv.shape[-1] for lv in levels] == [16, 16, 8, 4, 4]


def test_frozen_batchnorm_uses_running_stats_in_train_mode():
    model = ResNet(depth=18, width=0.25).train()
    for module in model.modules():
        if isinstance(module, FixedStatsBatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    bn = model.bn1
    stem = model.conv1(x)
    expected = (stem - bn.running_mean[None, :, None, None]) / torch.sqrt(
        bn.running_var[None, :, None, None] + bn.eps
    ) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(bn(stem), expected, rtol=1e-5, atol=1e-5)
    train_out = model(x)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed in a train-mode forward"
    torch.testing.assert_close(train_out, model.eval()(x))
    # Only the stem is frozen; every other BatchNorm's gamma/beta train (the reference's
    # optimisers receive them).
    assert not bn.weight.requires_grad and not bn.bias.requires_grad
    assert not model.conv1.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()} - {
        "conv1.weight", "bn1.weight", "bn1.bias"}
    assert {"layer1.0.bn1.weight", "layer4.1.bn2.bias", "layer2.0.downsample.1.weight"} <= trainable
    model(x).sum().backward()
    assert model.layer3[0].bn1.weight.grad is not None and model.bn1.weight.grad is None
    unfrozen = ResNet(depth=18, width=0.25, freeze_stem=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_cam_net_detaches_after_layer2():
    model = CAMNet(ResNet(depth=18, width=0.25, norm="batch", freeze_stem=False), 3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone.layer2.parameters())
    assert all(p.grad is None for p in model.backbone.layer1.parameters())
    assert any(p.grad is not None for p in model.backbone.layer3.parameters())
    assert model.classifier.weight.grad is not None


def test_imagenet_weights_load_and_mismatch_errors(tmp_path):
    source = ResNet(depth=18, width=0.25)
    state = source.state_dict()
    state["fc.weight"] = torch.zeros(1000, 128)  # torchvision files carry the classifier too
    path = tmp_path / "resnet18-test.pth"
    torch.save(state, path)
    target = ResNet(depth=18, width=0.25)
    load_imagenet_weights(target, path)
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    with pytest.raises(AmnsegError, match="resnet18-test.pth.*do not fit"):
        load_imagenet_weights(ResNet(depth=18, width=0.5), path)
    with pytest.raises(AmnsegError, match="not found"):
        load_imagenet_weights(target, tmp_path / "absent.pth")
    wrapped = {f"module.{key}": value for key, value in state.items()}
    torch.save(wrapped, tmp_path / "ddp.pth")
    with pytest.raises(AmnsegError, match=r"ddp.pth: its keys start with 'module.' \(saved "
                                          r"from DataParallel"):
        load_imagenet_weights(target, tmp_path / "ddp.pth")
    for odd, words in [(torch.zeros(64, dtype=torch.complex64), "torch.complex64 torch.strided"),
                       (torch.zeros(64).to_sparse(), "torch.float32 torch.sparse_coo"),
                       (torch.zeros(64, device="meta"), "torch.float32 torch.strided tensor "
                        "without data")]:
        torch.save({**state, "bn1.bias": odd}, tmp_path / "odd.pth")
        with pytest.raises(AmnsegError, match=f"odd.pth: bn1.bias is a {words}"):
            load_imagenet_weights(target, tmp_path / "odd.pth")
    state["layer2.0.bn1.running_var"] = torch.full_like(state["layer2.0.bn1.running_var"],
                                                        math.inf)
    torch.save(state, tmp_path / "inf.pth")
    with pytest.raises(AmnsegError, match=r"inf.pth: the weights hold NaN or infinite values "
                                          r"\(first in layer2.0.bn1.running_var\)"):
        load_imagenet_weights(target, tmp_path / "inf.pth")


def loop_reference_cam(model: CAMNet, image: np.ndarray, scales, stride: int):
    """A direct per-scale, per-image loop written from METHOD.md section 2."""
    height, width = image.shape[:2]
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    h4, w4 = (height - 1) // 4 + 1, (width - 1) // 4 + 1
    up = (((height - 1) // stride + 1) * stride, ((width - 1) // stride + 1) * stride)
    strided_total, full_total = 0, 0
    for scale in scales:
        size = (int(round(width * scale)), int(round(height * scale)))
        scaled = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
        tensor = torch.tensor(((scaled / 255.0 - mean) / std).transpose(2, 0, 1)).float()
        weight = model.classifier.weight
        plain = F.relu(F.conv2d(model.backbone(tensor[None]), weight))[0]
        mirrored = F.relu(F.conv2d(model.backbone(tensor.flip(-1)[None]), weight))[0]
        summed = (plain + mirrored.flip(-1))[None]
        strided_total = strided_total + F.interpolate(summed, (h4, w4), mode="bilinear")[0]
        full = F.interpolate(summed, up, mode="bilinear")[0, :, :height, :width]
        full_total = full_total + full
    return strided_total, full_total


@torch.no_grad()
def test_multiscale_cam_equals_per_scale_loop():
    torch.manual_seed(0)
    model = CAMNet(ResNet(depth=18, width=0.25, strides=[2, 2, 2, 1]), 4).eval()
    torch.nn.init.normal_(model.classifier.weight)
    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    scales = [1.0, 0.5, 1.5, 2.0]
    strided, full = multiscale_cam(
        model.cam, multiscale_inputs(image, scales), (37, 50), model.backbone.output_stride
    )
    ref_strided, ref_full = loop_reference_cam(model, image, scales, 16)
    assert strided.shape == (4, 10, 13) and full.shape == (4, 37, 50)
    torch.testing.assert_close(strided, ref_strided, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full, ref_full, rtol=1e-4, atol=1e-5)
    normalized = max_normalize(full)
    assert torch.all(normalized <= 1.0)
    torch.testing.assert_close(normalized.amax(dim=(1, 2)), full.amax(dim=(1, 2)) / (
        full.amax(dim=(1, 2)) + 1e-5))


@torch.no_grad()
def test_map_groups_run_one_forward_per_scale_with_each_rows_own_label(tmp_path):
    from conftest import write_tiny_folder_dataset

    from amnseg.data.folder import FolderDataset
    from amnseg.stages.common import InferenceJob, multiscale_outputs

    torch.manual_seed(1)
    model = CAMNet(ResNet(depth=18, width=0.25, strides=[2, 2, 2, 1]), 2).eval()
    dataset = FolderDataset(write_tiny_folder_dataset(tmp_path / "data", count=5), "train")
    stems = list(dataset.stems)
    labels = torch.stack([torch.from_numpy(dataset.label(stem)) for stem in stems])
    assert len(set(map(tuple, labels.tolist()))) > 1  # a row given another's label shows
    job = InferenceJob(model, torch.device("cpu"), dataset, [stems[:3], stems[3:]],
                       todo=[stems[0], stems[2], stems[4]])
    scales = [1.0, 0.5, 1.5]
    calls = []

    def forward(rows, row_labels):
        calls.append((tuple(rows.shape), row_labels))
        return model.cam(rows)

    for flip in (True, False):
        calls.clear()
        groups = list(multiscale_outputs(job, forward, scales, flip, 0, "test"))
        rows = 2 if flip else 1
        # One call per scale and group, all its images' rows (each image, then its mirror).
        assert [shape for shape, _ in calls] == [
            (count * rows, 3, side, side) for count in (3, 2) for side in (32, 16, 48)]
        for index, (_, row_labels) in enumerate(calls):
            chosen = labels[:3] if index < 3 else labels[3:]
            assert torch.equal(row_labels, chosen.repeat_interleave(rows, dim=0))
        assert [group.stems for group, _, _ in groups] == [stems[:3], stems[3:]]
        assert [wanted for _, _, wanted in groups] == [[True, False, True], [False, True]]
        for group, outputs, _ in groups:
            assert group.size == (32, 32) and torch.equal(
                group.labels, labels[stems.index(group.stems[0]):][:len(group.stems)])
            for image, stem in enumerate(group.stems):
                alone = network_batches(rescaled_images(dataset.image(stem), scales), flip)
                for output, batch in zip(outputs, alone, strict=True):
                    torch.testing.assert_close(output[image * rows:(image + 1) * rows],
                                               model.cam(batch), rtol=1e-5, atol=1e-5)


def test_network_batch_of_a_group_equals_its_images_batches_bit_for_bit():
    rng = np.random.default_rng(4)
    images = torch.from_numpy(rng.integers(0, 256, (3, 9, 11, 3), dtype=np.uint8))
    for flip in (True, False):
        group = network_batch(images, flip)
        alone = torch.cat([network_batches([image], flip)[0] for image in images])
        assert group.shape == ((6 if flip else 3), 3, 9, 11) and torch.equal(group, alone)
    assert torch.equal(network_batch(images)[1], network_batch(images)[0].flip(-1))


def test_merge_flip_adds_each_images_mirror_flipped_back():
    rows = torch.arange(4 * 2 * 2 * 3, dtype=torch.float32).reshape(4, 2, 2, 3)
    merged = merge_flip(rows, 2)
    assert merged.shape == (2, 2, 2, 3)
    for image in range(2):
        torch.testing.assert_close(merged[image],
                                   rows[2 * image] + rows[2 * image + 1].flip(-1))
    assert merge_flip(rows, 4) is rows  # no mirrors


@torch.no_grad()
def test_cam_maps_of_a_group_equal_those_of_each_image_bit_for_bit():
    from amnseg.stages.cam import class_score_tensors

    torch.manual_seed(3)
    images, channels, size = 3, 4, (21, 30)
    scale_maps = [torch.rand(images * 2, channels, 6, 8), torch.rand(images * 2, channels, 3, 4)]
    labels = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    strided, full = merge_cam_scales(scale_maps, images, size, 8)
    assert strided.shape == (3, 4, 6, 8) and full.shape == (3, 4, 21, 30)
    class_ids, kept_strided, kept_full = class_score_tensors(strided, full, labels)
    assert [ids.tolist() for ids in class_ids] == [[2, 4], [1], []]
    assert kept_strided.shape == (3, 6, 8) and kept_full.shape == (3, 21, 30)
    first = 0
    for image in range(images):
        one = merge_cam_scales([maps[2 * image:2 * image + 2] for maps in scale_maps], 1, size, 8)
        assert torch.equal(one[0][0], strided[image]) and torch.equal(one[1][0], full[image])
        (ids,), alone_strided, alone_full = class_score_tensors(*one, labels[image:image + 1])
        count = len(ids)
        assert torch.equal(alone_strided, kept_strided[first:first + count])
        assert torch.equal(alone_full, kept_full[first:first + count])
        torch.testing.assert_close(alone_full, max_normalize(full[image, ids - 1]))
        first += count


def test_size_groups_cut_runs_of_one_size(tmp_path):
    from conftest import write_tiny_folder_dataset

    from amnseg.data.folder import FolderDataset
    from amnseg.stages.common import size_groups

    root = write_tiny_folder_dataset(tmp_path / "data", count=8)
    for stem in ("img 02", "img 05"):  # other sizes break the runs
        Image.new("RGB", (20, 30)).save(root / "images" / f"{stem}.png")
    dataset = FolderDataset(root, "train")
    stems = list(dataset.stems)
    assert [len(g) for g in size_groups(dataset, stems, 3)] == [2, 1, 2, 1, 2]
    assert size_groups(dataset, stems, 3)[0] == ["img 00", "img 01"]
    assert [len(g) for g in size_groups(dataset, stems, 8)] == [2, 1, 2, 1, 2]
    assert [len(g) for g in size_groups(dataset, stems[:2] + stems[3:5], 2)] == [2, 2]
    assert size_groups(dataset, stems, 1) == [[stem] for stem in stems]
    (root / "images" / "img 07.png").write_bytes(b"not an image")
    with pytest.raises(AmnsegError, match=r"img 07\.png: unreadable image"):
        size_groups(dataset, stems, 2)


@torch.no_grad()
def test_multiscale_cam_without_flip_and_sizes_one_past_the_stride():
    # 33 x 49 is one pixel past a multiple of 4 and 16: the maps are ceil(size / stride).
    assert strided_size(33, 49, 4) == (9, 13) and strided_size(33, 49, 16) == (3, 4)
    assert strided_up_size(33, 49, 16) == (48, 64)
    torch.manual_seed(2)
    model = CAMNet(ResNet(depth=18, width=0.25, strides=[2, 2, 2, 1]), 3).eval()
    torch.nn.init.normal_(model.classifier.weight)
    image = np.random.default_rng(5).integers(0, 256, (33, 49, 3), dtype=np.uint8)
    scales = [1.0, 0.5]

    def cams(picture, flip):
        return multiscale_cam(model.cam, multiscale_inputs(picture, scales, flip), (33, 49), 16)

    plain, both = cams(image, False), cams(image, True)
    mirrored = cams(image[:, ::-1].copy(), False)
    assert plain[0].shape == (3, 9, 13) and plain[1].shape == (3, 33, 49)
    # The mirrored image's stride-4 maps, flipped back, are what flip=True adds. (The full-size
    # maps are upsampled to a multiple of the stride and cropped on the right, which does not
    # commute with a flip, so the identity holds at stride 4 only.)
    assert not torch.allclose(plain[0], mirrored[0].flip(-1))  # the image is not symmetric
    torch.testing.assert_close(plain[0] + mirrored[0].flip(-1), both[0], rtol=1e-4, atol=1e-5)


def test_cam_score_maps_keep_gt_classes_and_divide_by_max_plus_epsilon():
    from amnseg.stages.cam import cam_score_maps

    torch.manual_seed(1)
    model = CAMNet(ResNet(depth=18, width=0.25, strides=[2, 2, 2, 1]), 4).eval()
    # Small classifier weights: map maxima ~1e-4, so the 1e-5 of the normalisation matters.
    torch.nn.init.normal_(model.classifier.weight, std=1e-6)
    image = np.random.default_rng(3).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    scales = [1.0, 0.5]
    label = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
    maps = cam_score_maps(model, multiscale_inputs(image, scales), label, (37, 50))
    with torch.no_grad():
        strided, full = loop_reference_cam(model, image, scales, 16)
    assert maps.class_ids.tolist() == [2, 4]
    for got, raw in ((maps.strided, strided), (maps.full, full)):
        kept = raw[[1, 3]].double()
        peak = kept.amax(dim=(1, 2), keepdim=True)
        assert peak.max() < 1e-3
        np.testing.assert_allclose(got, (kept / (peak + 1e-5)).numpy(), rtol=1e-4, atol=1e-6)
        assert got.max() < 0.99  # the epsilon shows


def test_imagenet_weights_download_through_the_hub_cache(tmp_path, monkeypatch):
    import hashlib

    from amnseg.models import resnet

    source = ResNet(depth=18, width=0.25)
    staged = tmp_path / "staged.pth"
    torch.save(source.state_dict(), staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    server = tmp_path / "server"
    server.mkdir()
    published = server / f"resnet18-{digest}.pth"
    staged.rename(published)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setitem(resnet.IMAGENET_URLS, 18, published.as_uri())

    target = ResNet(depth=18, width=0.25)
    load_imagenet_weights(target, "hub")  # downloaded into the hub cache, hash checked
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / published.name
    assert cached.is_file()
    assert torch.equal(target.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    published.unlink()  # the second time the cache is used, no download
    again = ResNet(depth=18, width=0.25)
    load_imagenet_weights(again, "hub")
    assert torch.equal(again.conv1.weight, source.conv1.weight)

    # A URL given directly works the same; a file whose hash does not match is refused.
    corrupt = server / "resnet18-00000000.pth"
    torch.save(source.state_dict(), corrupt)
    with pytest.raises(AmnsegError, match="could not be downloaded.*backbone.pretrained=null"):
        load_imagenet_weights(ResNet(depth=18, width=0.25), corrupt.as_uri())
    assert not (cached.parent / corrupt.name).exists()
    # Offline (an unreachable address): one clear line naming the way out.
    with pytest.raises(AmnsegError, match="could not be downloaded") as error:
        load_imagenet_weights(ResNet(depth=18, width=0.25), (server / "absent-1234.pth").as_uri())
    assert "\n" not in str(error.value)


def test_reference_imagenet_file_names():
    from amnseg.models.resnet import IMAGENET_URLS

    assert IMAGENET_URLS[50].endswith("/resnet50-19c8e357.pth")  # the file the reference loads
    assert IMAGENET_URLS[101].endswith("/resnet101-5d3b4d8f.pth")


def every_byte_image() -> np.ndarray:
    """A (37, 50, 3) uint8 image holding every value 0-255 (half of them round differently
    when x / 255 is computed as x * (1 / 255))."""
    image = np.random.default_rng(3).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    image.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    return image


def test_network_batches_normalise_and_mirror_like_numpy_bit_for_bit():
    """The loader workers send uint8 images and the device normalises and mirrors them: the
    batches equal those of the numpy normalisation, bit for bit, at every scale."""
    image = every_byte_image()
    scales = [1.0, 0.5, 1.5]
    for flip in (True, False):
        batches = network_batches(rescaled_images(image, scales), flip)
        assert len(batches) == len(scales)
        for scale, batch in zip(scales, batches, strict=True):
            chw = torch.from_numpy(normalize(rescale(image, scale)))
            expected = torch.stack([chw, chw.flip(-1)]) if flip else chw[None]
            assert batch.dtype == torch.float32 and batch.is_contiguous()
            assert torch.equal(batch, expected), (scale, flip)
    # The reference's maps always add the mirror: that is the default.
    assert [batch.shape[0] for batch in network_batches(rescaled_images(image, scales))] == [
        2, 2, 2]


@pytest.mark.gpu
def test_gpu_network_batches_equal_the_cpu_ones_bit_for_bit():
    scaled = rescaled_images(every_byte_image(), [1.0, 0.5, 2.0])
    on_gpu = network_batches(scaled, True, "cuda")
    for gpu, cpu in zip(on_gpu, network_batches(scaled, True), strict=True):
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)



def test_queued_copy_off_the_gpu_is_a_plain_copy():
    from amnseg.ops.multiscale import queued_copy

    seed = torch.from_numpy(np.arange(12, dtype=np.uint8).reshape(3, 4))
    copied = queued_copy(seed, "cpu")
    assert torch.equal(copied, seed) and copied.dtype == torch.uint8 and copied.device.type == "cpu"
    copied = queued_copy(seed != 0, torch.device("cpu"))
    assert copied.dtype == torch.bool and copied.sum().item() == 11


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_queued_copy_to_the_gpu_keeps_the_values_of_its_call():
    """Queued behind a long matrix product, the copy still carries the values the tensor had
    when it was made, although the caller overwrites the tensor at once."""
    from amnseg.ops.multiscale import queued_copy

    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):
        big = big @ big / 64  # work for the copy to queue behind
    source = torch.arange(500 * 375, dtype=torch.int32).reshape(375, 500)  # pageable, 750 kB
    expected = source.clone()
    on_gpu = queued_copy(source, "cuda")
    source.zero_()
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), expected)


def test_a_group_whose_images_changed_size_is_a_one_line_error():
    from amnseg.stages.common import join_group

    items = [(stem, [torch.zeros(height, 5, 3, dtype=torch.uint8)], torch.zeros(2),
              (height, 5), None) for stem, height in (("a", 4), ("b", 4), ("c", 6))]
    assert join_group(items[:2]).scaled[0].shape == (2, 4, 5, 3)
    with pytest.raises(AmnsegError, match=r"^c: image is 5x6, a is 5x4, .* replaced"):
        join_group(items)
