"""The segmentation stage (METHOD.md section 6): DeepLab-v2 shapes and layout, MSC against a
per-scale loop, the recipe's augmentation, loss, optimiser and schedule by hand, the test-time
CRF against pydensecrf, DeepLab-v2 files, a tiny net that learns, predict and the Python API."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydensecrf.utils import unary_from_softmax

from amnseg.checkpoints import export_reference, import_deeplab, load_model_checkpoint
from amnseg.config import SegConfig, deeplab_backbone, deeplab_crf, load_config
from amnseg.data.transforms import (
    DEEPLAB_MEAN_BGR,
    DeepLabTrainTransform,
    deeplab_input,
    normalize,
)
from amnseg.errors import AmnsegError
from amnseg.models.deeplab import MSC, DeepLabV2
from amnseg.models.resnet import ResNet, resnet_from_config
from amnseg.ops.crf import crf_refine_probabilities
from amnseg.stages import seg as seg_stage

KEYS = Path(__file__).resolve().parent / "data" / "deeplabv2_msc_keys.tsv"


def tiny_deeplab_backbone(**changes) -> ResNet:
    options = {"depth": 50, "width": 0.125, "strides": [2, 2, 1, 1], "dilations": [1, 1, 2, 4],
               "stride_in_1x1": True, "stem_pool_ceil": True, "freeze_stem": False, **changes}
    return ResNet(**options)


def tiny_msc(num_outputs: int = 3, seed: int = 0) -> MSC:
    torch.manual_seed(seed)
    model = MSC(DeepLabV2(tiny_deeplab_backbone(), num_outputs))
    for conv in model.base.aspp.children():
        torch.nn.init.normal_(conv.weight, std=0.1)
    return model.eval()


# --- the network --------------------------------------------------------------------------


def test_deeplab_layout_matches_the_published_key_list():
    rows = [line.split("\t") for line in KEYS.read_text().splitlines()]
    published = {key.removeprefix("base."): eval(shape) for key, shape, _ in rows}  # noqa: S307
    model = MSC(DeepLabV2(resnet_from_config(deeplab_backbone()), 21))
    ours = {seg_key: tuple(v.shape) for seg_key, v in model.state_dict().items()}
    exported = export_reference({"format": "amnseg", "stage": "seg", "model": model.state_dict(),
                                 "backbone": dataclasses.asdict(deeplab_backbone())})
    assert {k.removeprefix("base."): tuple(v.shape) for k, v in exported.items()} == published
    assert len(ours) == len(published) == 632


def test_output_stride_8_and_caffe_block_layout():
    backbone = tiny_deeplab_backbone()
    block = backbone.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)  # stride on the 1x1
    assert backbone.layer3[0].conv2.dilation == (2, 2) and backbone.layer3[5].conv2.dilation == (
        2, 2)
    assert backbone.layer4[2].conv2.dilation == (4, 4) and backbone.layer4[2].conv2.padding == (
        4, 4)
    model = DeepLabV2(backbone, 5).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 321, 321)).shape == (1, 5, 41, 41)
        # The stem's max-pool rounds up (Caffe): 500 x 375 -> 63 x 48, not 63 x 47.
        assert model(torch.zeros(1, 3, 375, 500)).shape == (1, 5, 48, 63)
    torchvision_layout = tiny_deeplab_backbone(stride_in_1x1=False)
    assert torchvision_layout.layer2[0].conv2.stride == (2, 2)


def test_msc_equals_a_per_scale_loop():
    model = tiny_msc()
    images = torch.randn(2, 3, 65, 49, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = model(images)
        base = model.base
        logits = base(images)
        maxed = logits
        for scale in (0.5, 0.75):
            small = F.interpolate(images, scale_factor=scale, mode="bilinear",
                                  align_corners=False)
            other = F.interpolate(base(small), size=logits.shape[-2:], mode="bilinear",
                                  align_corners=False)
            maxed = torch.maximum(maxed, other)
    torch.testing.assert_close(fused, maxed)
    model.train()
    outputs = model(images)
    assert len(outputs) == 4
    torch.testing.assert_close(outputs[0], logits, rtol=1e-4, atol=1e-5)
    assert outputs[1].shape[-2:] != outputs[0].shape[-2:]  # each scale at its own size
    torch.testing.assert_close(outputs[3], fused, rtol=1e-4, atol=1e-5)


def test_deeplab_input_is_bgr_minus_mean():
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 200  # R, G, B
    x = deeplab_input(image, "caffe")
    assert x.shape == (3, 2, 3)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), [200 - 104.008, 20 - 116.669, 10 - 122.675],
                               rtol=1e-6)
    # torchvision's weights (and the package's backbones) take ImageNet-normalised RGB.
    torch.testing.assert_close(deeplab_input(image, "imagenet"), torch.from_numpy(normalize(image)))


# --- training arithmetic --------------------------------------------------------------------


def test_train_transform_scales_pads_crops_flips_and_subtracts_the_mean():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    labels = rng.integers(0, 4, (20, 30)).astype(np.uint8)
    transform = DeepLabTrainTransform([0.5], 24, "caffe", flip=False)
    crop, label_crop = transform(image, labels, np.random.default_rng(3))
    # 0.5: 10 x 15, padded to 24 x 24 (mean colour / 255), the whole canvas is the crop.
    bgr = torch.tensor(image[..., ::-1].transpose(2, 0, 1).copy(), dtype=torch.float32)
    small = F.interpolate(bgr[None], (10, 15), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(DEEPLAB_MEAN_BGR)[:, None, None]
    torch.testing.assert_close(crop[:, :10, :15], small - mean)
    assert torch.count_nonzero(crop[:, 10:, :]) == 0 and torch.count_nonzero(crop[:, :, 15:]) == 0
    rows = np.floor((np.arange(10) + 0.5) * 2).astype(int)
    cols = np.floor((np.arange(15) + 0.5) * 2).astype(int)
    np.testing.assert_array_equal(label_crop[:10, :15], labels[np.ix_(rows, cols)])
    assert (label_crop[10:] == 255).all() and (label_crop[:, 15:] == 255).all()

    flipping = DeepLabTrainTransform([1.0], 16, "caffe", flip=True)
    seen_flip = False
    for seed in range(8):
        crop, label_crop = flipping(image, labels, np.random.default_rng(seed))
        window = None
        for top in range(20 - 16 + 1):
            for left in range(30 - 16 + 1):
                part = labels[top:top + 16, left:left + 16]
                if np.array_equal(part, label_crop):
                    window = (top, left, False)
                elif np.array_equal(part[:, ::-1], label_crop):
                    window = (top, left, True)
        assert window is not None
        top, left, flipped = window
        expected = bgr[:, top:top + 16, left:left + 16] - mean
        torch.testing.assert_close(crop, expected.flip(-1) if flipped else expected)
        seen_flip |= flipped
    assert seen_flip

    # ImageNet input: padded with the ImageNet mean, which normalises to 0.
    imagenet = DeepLabTrainTransform([1.0], 24, "imagenet", flip=False)
    crop, label_crop = imagenet(image, labels, np.random.default_rng(1))
    top, left = next((t, c) for t in range(5) for c in range(7)
                     if np.array_equal(label_crop[:20 - t, :24], labels[t:, c:c + 24]))
    window = torch.from_numpy(normalize(image))[:, top:top + 24, left:left + 24]
    torch.testing.assert_close(crop[:, :window.shape[1]], window, rtol=1e-5, atol=1e-5)
    assert window.shape[1] < 24  # the rows below the image are padding
    torch.testing.assert_close(crop[:, window.shape[1]:],
                               torch.zeros(3, 24 - window.shape[1], 24), rtol=0, atol=1e-6)


def test_probabilities_with_flip_are_the_softmax_of_the_mean_logits_at_image_size():
    model = tiny_msc(num_outputs=3, seed=7)
    for conv in model.base.aspp.children():  # logits of a few units: the softmax is not
        conv.weight.data *= 3e-4             # saturated, so every factor shows
    image = np.random.default_rng(7).integers(0, 256, (29, 37, 3), dtype=np.uint8)
    batch = deeplab_input(image, model.input_kind)[None]
    with torch.no_grad():
        plain, mirrored = model(batch), model(batch.flip(-1)).flip(-1)
    for flip, logits in ((False, plain), (True, (plain + mirrored) / 2)):
        expected = torch.softmax(F.interpolate(logits, (29, 37), mode="bilinear",
                                               align_corners=False), dim=1)[0]
        got = seg_stage.predict_probabilities(model, image, flip=flip)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, mirrored, atol=1e-2)  # the mirror does change the logits
    assert 0.5 < plain.abs().max() < 20


def test_cross_entropy_is_the_mean_over_the_labelled_pixels_only():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 3, 2, 2, generator=generator)
    target = torch.full((1, 2, 2), 255)
    target[0, 0, 1] = 2  # one labelled pixel: its own cross-entropy, not half of it
    expected = -torch.log_softmax(logits, dim=1)[0, 2, 0, 1]
    torch.testing.assert_close(seg_stage.cross_entropy(logits, target), expected)
    nothing = seg_stage.cross_entropy(logits, torch.full((1, 2, 2), 255))
    assert nothing.item() == 0.0  # no labelled pixel: no loss (not 0 / 0)


def test_msc_loss_is_the_sum_of_per_scale_cross_entropies():
    generator = torch.Generator().manual_seed(2)
    outputs = [torch.randn(2, 3, 5, 5, generator=generator),
               torch.randn(2, 3, 3, 3, generator=generator),
               torch.randn(2, 3, 4, 4, generator=generator),
               torch.randn(2, 3, 5, 5, generator=generator)]
    targets = [torch.randint(0, 3, (2, s, s), generator=generator) for s in (5, 3, 4)]
    targets[0][0, 0, :3] = 255

    def ce(logits, target):
        log_probs = torch.log_softmax(logits.double(), dim=1)
        valid = target != 255
        picked = log_probs.gather(1, target.clamp(max=2)[:, None])[:, 0]
        return -(picked * valid).sum() / valid.sum()

    expected = (ce(outputs[0], targets[0]) + ce(outputs[1], targets[1])
                + ce(outputs[2], targets[2]) + ce(outputs[3], targets[0]))
    assert seg_stage.msc_loss(outputs, *targets).item() == pytest.approx(expected.item(),
                                                                          rel=1e-6)


def test_seg_optimizer_groups_rates_and_stepwise_poly():
    model = tiny_msc(num_outputs=4)
    seg_stage.freeze_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.weight.requires_grad or m.bias.requires_grad for m in norms)
    config = SegConfig(iterations=100)
    optimizer, scheduler = seg_stage.seg_optimizer(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert groups[0] == {f"{n}.weight" for n in convs if ".aspp." not in f".{n}."}
    assert "base.backbone.conv1.weight" in groups[0]  # the stem trains too
    assert not any("bn" in n or "downsample.1" in n for n in groups[0])
    assert groups[1] == {f"base.aspp.c{i}.weight" for i in range(4)}
    assert groups[2] == {f"base.aspp.c{i}.bias" for i in range(4)}
    assert [g["lr"] for g in optimizer.param_groups] == [2.5e-4, 2.5e-3, 5e-3]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 5e-4, 0.0]
    assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)
    rates = []
    for _ in range(25):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [2.5e-4 * (1 - (k // 10 * 10) / 100) ** 0.9 for k in range(25)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    assert rates[9] == rates[0] and rates[10] < rates[9]  # updated every 10 iterations


def test_one_sgd_step_with_accumulation_by_hand():
    from amnseg.training import train_step

    model = tiny_msc(num_outputs=3).train()
    seg_stage.freeze_batchnorm(model)
    optimizer, scheduler = seg_stage.seg_optimizer(model, SegConfig(iterations=50))
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(2):
        images = torch.randn(2, 3, 33, 33, generator=generator)
        sizes = [tuple(o.shape[-2:]) for o in model(images)[:-1]]
        batches.append([images, *[torch.randint(0, 3, (2, *s), generator=generator)
                                  for s in sizes]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_fn(net, images, *targets):
        return seg_stage.msc_loss(net(images), *targets)

    # The accumulated gradient is the mean of the two batches' gradients.
    reference = {}
    for batch in batches:
        model.zero_grad()
        loss_fn(model, *batch).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                reference[n] = reference.get(n, 0) + p.grad / 2
    train_step(model, batches, loss_fn, optimizer, scheduler)
    lr = {0: 2.5e-4, 1: 2.5e-3, 2: 5e-3}
    decay = {0: 5e-4, 1: 5e-4, 2: 0.0}
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for name, p in model.named_parameters():
        if id(p) not in group_of:
            assert torch.equal(p.detach(), before[name]), name  # BatchNorm stays
            continue
        g = group_of[id(p)]
        expected = before[name] - lr[g] * (reference[name] + decay[g] * before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-8)


# --- test-time CRF --------------------------------------------------------------------------


def test_test_time_crf_equals_direct_pydensecrf():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (19, 27, 3)).astype(np.uint8)
    image[:, 13:] = (200, 40, 40)
    logits = rng.normal(size=(3, 19, 27)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    got = crf_refine_probabilities(image, probs, deeplab_crf())
    crf = dcrf.DenseCRF2D(27, 19, 3)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
    expected = np.array(crf.inference(10)).reshape(3, 19, 27)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert (got.argmax(0) != probs.argmax(0)).any()  # the CRF changes the labels here


# --- DeepLab-v2 files ---------------------------------------------------------------------


def synthetic_deeplab(prefix: str = "base.", classes: int = 21) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(9)
    state = {}
    for line in KEYS.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        shape = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
        key = key.removeprefix("base.")
        if key.startswith("aspp."):
            shape = (classes, *shape[1:])
        if dtype == "torch.int64":
            state[prefix + key] = torch.randint(0, 100, shape, generator=generator)
        else:
            state[prefix + key] = torch.randn(shape, generator=generator)
    return state


def test_deeplab_file_imports_and_exports_bit_exactly(tmp_path):
    state = synthetic_deeplab()
    source = tmp_path / "deeplab_voc.pth"
    torch.save(state, source)
    classes = [f"c{i}" for i in range(20)]
    checkpoint = import_deeplab(source, classes, tmp_path / "seg.pt")
    assert checkpoint["backbone"]["stride_in_1x1"] and checkpoint["backbone"]["depth"] == 101
    exported = export_reference(load_model_checkpoint(tmp_path / "seg.pt", "seg", classes))
    assert exported.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(exported[key], value), key
    # The DeepLab file itself is accepted wherever a seg checkpoint is.
    direct = load_model_checkpoint(source, "seg", classes)
    assert torch.equal(direct["model"]["base.aspp.c2.bias"], state["base.aspp.c2.bias"])


def test_deeplab_file_errors(tmp_path):
    classes = [f"c{i}" for i in range(20)]
    state = synthetic_deeplab()
    missing = dict(state)
    del missing["base.layer4.block7.conv3x3.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(AmnsegError, match=r"missing\.pth: layer4\.block7\.conv3x3\.conv\.weight "
                                          r"is missing"):
        import_deeplab(tmp_path / "missing.pth", classes)
    extra = {**state, "base.layer9.block1.reduce.conv.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(AmnsegError, match="unexpected key"):
        import_deeplab(tmp_path / "extra.pth", classes)
    wrong = dict(state)
    wrong["base.layer2.block1.reduce.conv.weight"] = torch.zeros(64, 64, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(AmnsegError, match=r"has shape \(64, 64, 3, 3\), expected \(64, 64, 1, 1\)"):
        import_deeplab(tmp_path / "wrong.pth", classes)
    torch.save(state, tmp_path / "voc.pth")
    with pytest.raises(AmnsegError, match="checkpoint is for 20 classes, 80 class names given"):
        import_deeplab(tmp_path / "voc.pth", [f"c{i}" for i in range(80)])
    # The same inside a training script's {"state_dict": ...} wrapper.
    torch.save({"state_dict": state, "iteration": 20000}, tmp_path / "wrapped.pth")
    with pytest.raises(AmnsegError, match="checkpoint is for 20 classes, 80 class names given"):
        import_deeplab(tmp_path / "wrapped.pth", [f"c{i}" for i in range(80)])
    assert torch.equal(import_deeplab(tmp_path / "wrapped.pth", classes)["model"][
        "base.aspp.c3.weight"], state["base.aspp.c3.weight"])
    partial = {k: v for k, v in state.items() if k != "base.aspp.c1.bias"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(AmnsegError, match=r"partial\.pth: incomplete ASPP head \(7 of its 8"):
        import_deeplab(tmp_path / "partial.pth", classes)
    init = synthetic_deeplab(prefix="")
    init = {k: v for k, v in init.items() if not k.startswith("aspp.")}
    torch.save(init, tmp_path / "init.pth")
    with pytest.raises(AmnsegError, match="no ASPP head.*seg.init"):
        import_deeplab(tmp_path / "init.pth", classes)


@pytest.mark.parametrize("key, words", [
    ("base.layerx.block1.reduce.conv.weight", "not in the DeepLab-v2 layout"),
    ("base.layer2.blockx.reduce.conv.weight", "not in the DeepLab-v2 layout"),
    ("base.layer1.block1.reduce.conv.weight", "not in the DeepLab-v2 layout"),  # the stem's
    ("base.layer6.block1.reduce.conv.weight", "not in the DeepLab-v2 layout"),
    ("base.layer2.block0.reduce.conv.weight", "not in the DeepLab-v2 layout"),
    ("base.layer5.block4.reduce.conv.weight", "the network has no such weight"),
    ("base.aspp.c4.weight", "the network has no such weight"),
])
def test_deeplab_keys_outside_the_network_are_named_as_in_the_file(tmp_path, key, words):
    state = {**synthetic_deeplab(), key: torch.zeros(4, 4, 1, 1)}
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(AmnsegError, match=rf"odd.pth: unexpected key {re.escape(key)} "
                       rf"\({words}\)"):
        import_deeplab(tmp_path / "odd.pth", [f"c{i}" for i in range(20)])


def test_deeplab_files_without_batch_counters_or_with_a_mixed_head_or_a_nan(tmp_path):
    classes = [f"c{i}" for i in range(20)]
    state = synthetic_deeplab()
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")  # saved by a PyTorch without batch counters
    checkpoint = import_deeplab(tmp_path / "old.pth", classes)
    assert torch.equal(checkpoint["model"]["base.aspp.c1.weight"], state["base.aspp.c1.weight"])
    mixed = {**state, "base.aspp.c3.weight": torch.zeros(22, 2048, 3, 3),
             "base.aspp.c3.bias": torch.zeros(22)}
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(AmnsegError, match=r"mixed.pth: the ASPP head's branches have different "
                                          r"output counts \(21, 22\)"):
        import_deeplab(tmp_path / "mixed.pth", classes)
    broken = dict(state)
    broken["base.layer3.block2.increase.bn.weight"] = broken[
        "base.layer3.block2.increase.bn.weight"].clone()
    broken["base.layer3.block2.increase.bn.weight"][5] = math.nan
    torch.save(broken, tmp_path / "nan.pth")
    with pytest.raises(AmnsegError, match=r"nan.pth: the weights hold NaN or infinite values "
                                          r"\(first in base.layer3.block2.increase.bn.weight\)"):
        import_deeplab(tmp_path / "nan.pth", classes)


def test_deeplab_head_of_another_shape_is_named(tmp_path):
    state = synthetic_deeplab()
    state["base.aspp.c2.weight"] = torch.zeros(21, 1024, 3, 3)
    torch.save(state, tmp_path / "head.pth")
    with pytest.raises(AmnsegError, match=r"head.pth: base.aspp.c2.weight has shape "
                       r"\(21, 1024, 3, 3\), expected \(outputs, 2048, 3, 3\)"):
        import_deeplab(tmp_path / "head.pth", [f"c{i}" for i in range(20)])


def test_init_files_without_prefix_or_with_another_head_load_their_backbone(tmp_path):
    init = synthetic_deeplab(prefix="", classes=91)  # a COCO-init file: another-sized ASPP
    torch.save(init, tmp_path / "coco_init.pth")
    config = load_config("voc12", [f"run_dir={tmp_path}", f"seg.init={tmp_path / 'coco_init.pth'}"])
    model, backbone_cfg, description = seg_stage.initial_seg_model(config, 20)
    assert backbone_cfg.stride_in_1x1 and "backbone only" in description
    assert torch.equal(model.base.backbone.layer3[4].conv2.weight,
                       init["layer4.block5.conv3x3.conv.weight"])
    assert model.base.aspp.c0.weight.shape[0] == 21
    assert abs(model.base.aspp.c0.weight.std().item() - 0.01) < 0.002  # fresh N(0, 0.01)


def test_imagenet_init_puts_the_stride_on_the_3x3_conv(tmp_path):
    """torchvision's ImageNet weights were trained with the stride on the 3x3 conv; the
    recipe's Caffe files (and no init) keep it on the first 1x1 conv."""
    config = load_config("voc12", [f"run_dir={tmp_path}", "seg.init=imagenet",
                                   "seg.backbone.pretrained=null", "seg.backbone.depth=50",
                                   "seg.backbone.width=0.125"])
    model, backbone_cfg, description = seg_stage.initial_seg_model(config, 20)
    assert not backbone_cfg.stride_in_1x1 and description == "none (random weights)"
    block = model.base.backbone.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    config.seg.init = "none"
    model, backbone_cfg, _ = seg_stage.initial_seg_model(config, 20)
    assert backbone_cfg.stride_in_1x1
    assert model.base.backbone.layer2[0].conv1.stride == (2, 2)


def test_init_file_for_the_same_classes_keeps_its_head(tmp_path):
    init = synthetic_deeplab(prefix="")  # 21 outputs: VOC's 20 classes + background
    torch.save(init, tmp_path / "voc_init.pth")
    config = load_config("voc12", [f"run_dir={tmp_path}", f"seg.init={tmp_path / 'voc_init.pth'}"])
    model, _, description = seg_stage.initial_seg_model(config, 20)
    assert "with its ASPP head" in description
    for branch in range(4):
        assert torch.equal(getattr(model.base.aspp, f"c{branch}").weight,
                           init[f"aspp.c{branch}.weight"])
    # The same file for 19 classes (20 outputs) keeps only the backbone.
    _, _, description = seg_stage.initial_seg_model(config, 19)
    assert "backbone only" in description


@pytest.mark.parametrize("stage", ["cam", "amn"])
def test_init_from_the_runs_classifier_or_amn_takes_its_backbone(tiny_dataset, tmp_path, stage):
    from conftest import tiny_config

    from amnseg.checkpoints import new_model, save_model
    from amnseg.layout import checkpoint_path
    from amnseg.models import build_backbone

    config = tiny_config(tiny_dataset, tmp_path / "run", f"seg.init={stage}",
                         "seg.backbone.depth=18", "seg.backbone.width=0.125",
                         "seg.backbone.pretrained=null")
    torch.manual_seed(3)
    trained = new_model(stage, build_backbone(config.backbone), 2)
    save_model(checkpoint_path(config, stage), stage, trained, ["square", "disc"],
               config.backbone)
    model, _, description = seg_stage.initial_seg_model(config, 2)
    assert description == f"the run's {stage.upper()} backbone"
    ours, theirs = model.base.backbone.state_dict(), trained.backbone.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_pickled_payload_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"base.layer1.conv1.conv.weight": Payload()}, f)
    with pytest.raises(AmnsegError, match="not a readable checkpoint"):
        import_deeplab(path, ["a"])


# --- a tiny network learns ------------------------------------------------------------------


def test_tiny_network_overfits_a_few_demo_images(tmp_path):
    from amnseg.data.demo import DemoParams, render_sample
    from amnseg.metrics import confusion_matrix, miou

    params = DemoParams(size=64, num_classes=3, max_objects=1, body_range=(0.5, 0.8))
    samples = [render_sample(params, "train", i) for i in range(4)]
    torch.manual_seed(0)
    backbone = ResNet(depth=18, width=0.25, strides=[2, 2, 1, 1], dilations=[1, 1, 2, 4],
                      norm="batch", freeze_stem=False)
    model = MSC(DeepLabV2(backbone, 4), input_kind="imagenet")
    config = SegConfig(lr=0.01, iterations=60, lr_decay_every=1)
    optimizer, scheduler = seg_stage.seg_optimizer(model, config)
    transform = DeepLabTrainTransform([1.0], 64, "imagenet", flip=False)
    sizes = seg_stage.pyramid_sizes(model, 64)
    batch = [transform(s.image, s.mask, np.random.default_rng(0)) for s in samples]
    images = torch.stack([b[0] for b in batch])
    targets = [torch.stack([torch.from_numpy(seg_stage.resize_labels(b[1], size).astype(np.int64))
                            for b in batch]) for size in sizes]
    from amnseg.training import train_step

    model.train()
    losses = [train_step(model, [[images, *targets]],
                         lambda net, x, *t: seg_stage.msc_loss(net(x), *t),
                         optimizer, scheduler) for _ in range(60)]
    assert losses[-1] < 0.3 * losses[0]
    confusion = sum(confusion_matrix(seg_stage.predict_labels(model, s.image), s.mask, 4)
                    for s in samples)
    assert miou(confusion) > 0.6  # chance is ~0.1


# --- prediction and the Python API ----------------------------------------------------------


def save_tiny_seg_checkpoint(path: Path, class_names: tuple[str, ...] = ("cat", "dog")
                             ) -> Path:
    """An amnseg seg checkpoint of ``tiny_msc(len(class_names) + 1, seed=4)``."""
    from amnseg.io import save_checkpoint

    backbone = {"depth": 50, "width": 0.125, "strides": [2, 2, 1, 1], "dilations": [1, 1, 2, 4],
                "stride_in_1x1": True, "stem_pool_ceil": True, "freeze_stem": False,
                "norm": "frozen"}
    save_checkpoint(path, {"format": "amnseg", "stage": "seg", "class_names": list(class_names),
                           "backbone": backbone,
                           "model": tiny_msc(num_outputs=len(class_names) + 1,
                                             seed=4).state_dict(),
                           "msc_scales": [0.5, 0.75], "init": "test"})
    return path


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_seg_checkpoint(tmp_path_factory.mktemp("seg") / "seg.pt")


def test_python_api_readme_example(seg_checkpoint):
    # The README's example, with this test's checkpoint and image.
    from amnseg import Segmenter

    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    segmenter = Segmenter.from_checkpoint(seg_checkpoint, device="cpu")
    mask = segmenter(image)
    assert mask.shape == (45, 61) and mask.dtype == np.uint8 and mask.max() <= 2
    model = tiny_msc(num_outputs=3, seed=4)
    expected = seg_stage.predict_labels(model, image)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(segmenter(Image.fromarray(image)), expected)
    assert segmenter.class_names == ["cat", "dog"]


def test_predict_reads_any_image_mode(seg_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from amnseg.cli import app

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(rgb).convert("L").save(inputs / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(inputs / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(inputs / "cmyk.jpg")
    sixteen = (rgb[..., 0].astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(inputs / "deep.png")  # 16-bit grayscale
    result = CliRunner().invoke(app, ["predict", str(seg_checkpoint), str(inputs),
                                      "--out", str(tmp_path / "out"), "--overlay", "--no-crf"])
    assert result.exit_code == 0, result.output
    from amnseg.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(seg_checkpoint)
    for stem in ("gray", "rgba", "cmyk", "deep"):
        with Image.open(tmp_path / "out" / f"{stem}.png") as written:
            assert written.mode == "P" and written.size == (41, 30)
            labels = np.asarray(written)
        with Image.open(next(inputs.glob(f"{stem}.*"))) as source:
            np.testing.assert_array_equal(labels, segmenter(source))
        assert (tmp_path / "out" / "overlay" / f"{stem}.png").is_file()
    # 16-bit: read by its 16-bit values (not clipped to white): the same as the 8-bit gray.
    with Image.open(inputs / "deep.png") as deep, Image.open(inputs / "gray.png") as gray:
        assert deep.mode.startswith("I")
        np.testing.assert_array_equal(segmenter(deep),
                                      segmenter(np.repeat(rgb[..., :1], 3, axis=2)))
        assert gray.mode == "L"


def test_voc_submission_layout(seg_checkpoint, tmp_path):
    from amnseg.data.voc import VOC_CLASSES
    from amnseg.segmenter import Segmenter, predict_files

    image = np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "2008_000001.jpg")
    with pytest.raises(AmnsegError, match="--voc-submission: the checkpoint's classes are not "
                       "VOC's 20 .cat, dog, ...."):
        predict_files(Segmenter.from_checkpoint(seg_checkpoint), [tmp_path / "2008_000001.jpg"],
                      tmp_path / "sub", voc_submission=True)
    assert not (tmp_path / "sub").exists()
    voc = save_tiny_seg_checkpoint(tmp_path / "voc.pt", VOC_CLASSES)
    segmenter = Segmenter.from_checkpoint(voc, crf=True)
    written = predict_files(segmenter, [tmp_path / "2008_000001.jpg"], tmp_path / "sub",
                            voc_submission=True)
    target = tmp_path / "sub" / "results/VOC2012/Segmentation/comp6_test_cls/2008_000001.png"
    assert written == [target]
    with Image.open(target) as png:
        assert png.mode == "L"  # raw class indices
        with Image.open(tmp_path / "2008_000001.jpg") as source:
            np.testing.assert_array_equal(np.asarray(png), segmenter(source))
    # Palette masks into the same folder have places of their own; then the submission files
    # are still this command's own (a rerun resumes, replacing nothing).
    plain = predict_files(segmenter, [tmp_path / "2008_000001.jpg"], tmp_path / "sub")
    assert plain == [tmp_path / "sub" / "2008_000001.png"]
    assert predict_files(segmenter, [tmp_path / "2008_000001.jpg"], tmp_path / "sub",
                         voc_submission=True) == [target]


def test_segmenter_rejects_non_seg_checkpoints_and_bad_arrays(seg_checkpoint, tmp_path):
    from amnseg.io import save_checkpoint
    from amnseg.segmenter import Segmenter, as_rgb

    save_checkpoint(tmp_path / "cam.pt", {"format": "amnseg", "stage": "cam"})
    with pytest.raises(AmnsegError, match="cam.pt: an amnseg cam checkpoint, not a "
                       "segmentation network"):
        Segmenter.from_checkpoint(tmp_path / "cam.pt")
    from test_checkpoints import synthetic_reference

    torch.save(synthetic_reference("amn"), tmp_path / "res50_amn.pth")
    with pytest.raises(AmnsegError, match=r"res50_amn.pth: the authors' amn network "
                       r"\(res50_amn.pth\), not a segmentation network"):
        Segmenter.from_checkpoint(tmp_path / "res50_amn.pth")
    with pytest.raises(AmnsegError, match="image array of shape"):
        as_rgb(np.zeros((4, 4, 2), np.uint8))
    assert as_rgb(np.zeros((4, 5), np.uint16)).shape == (4, 5, 3)
    assert math.isclose(float(as_rgb(np.full((1, 1), 65535, np.uint16))[0, 0, 0]), 255)


def test_arrays_of_every_documented_layout_become_the_same_rgb():
    from amnseg.segmenter import as_rgb

    rng = np.random.default_rng(12)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (5, 7, 1), dtype=np.uint8)
    np.testing.assert_array_equal(as_rgb(np.concatenate([rgb, alpha], axis=2)), rgb)
    gray = rgb[..., 0]
    expected_gray = np.stack([gray] * 3, axis=2)
    np.testing.assert_array_equal(as_rgb(gray[..., None]), expected_gray)
    np.testing.assert_array_equal(as_rgb(gray), expected_gray)
    # 16 bits: v * 257 is v, and values between round to the nearest 8-bit level.
    wide = rgb.astype(np.uint16) * 257 + rng.integers(0, 129, rgb.shape).astype(np.uint16)
    np.testing.assert_array_equal(as_rgb(wide), rgb)
    np.testing.assert_array_equal(as_rgb(np.concatenate([wide, wide[..., :1]], axis=2)), rgb)
    assert as_rgb(np.array([[128, 129, 385, 386]], np.uint16))[0, :, 0].tolist() == [0, 1, 1, 2]


def test_segmenter_defaults_no_flip_no_crf_files_as_stored(seg_checkpoint, tmp_path):
    from amnseg.segmenter import Segmenter, as_rgb

    image = np.random.default_rng(13).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image).save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(as_rgb(tmp_path / "turned.png"), image)
    model = tiny_msc(num_outputs=3, seed=4)
    plain = seg_stage.predict_probabilities(model, image).numpy()
    mirrored = seg_stage.predict_probabilities(model, image, flip=True).numpy()
    assert np.abs(plain - mirrored).max() > 1e-4  # the test can tell a flip
    for segmenter in (Segmenter.from_checkpoint(seg_checkpoint),
                      Segmenter(tiny_msc(num_outputs=3, seed=4), ["cat", "dog"])):
        assert segmenter.flip is False and segmenter.crf is None
        assert segmenter.exif_orientation is False
        np.testing.assert_allclose(segmenter.probabilities(image), plain, atol=1e-6)
        np.testing.assert_allclose(segmenter.probabilities(tmp_path / "turned.png"), plain,
                                   atol=1e-6)
    assert Segmenter.from_checkpoint(seg_checkpoint, crf=True).crf == deeplab_crf()


def test_segmenter_refuses_images_above_its_pixel_limit(seg_checkpoint):
    from amnseg.config import DataConfig
    from amnseg.segmenter import Segmenter

    assert Segmenter.from_checkpoint(seg_checkpoint).max_pixels == DataConfig.max_pixels
    image = np.zeros((20, 30, 3), np.uint8)
    at_limit = Segmenter.from_checkpoint(seg_checkpoint, max_pixels=600)
    assert at_limit(image).shape == (20, 30)
    assert at_limit.probabilities(image).shape[1:] == (20, 30)
    below = Segmenter(at_limit.model, at_limit.class_names, max_pixels=599)
    for label in (below, below.probabilities):
        with pytest.raises(AmnsegError, match=r"^image: image is 30x20 \(0.0 MP\), above "
                           "max_pixels=599 .*raise max_pixels"):
            label(image)
    assert Segmenter(at_limit.model, at_limit.class_names, max_pixels=0)(image).shape == (20, 30)
    for bad in (-1, 1.5, "600", True):
        with pytest.raises(AmnsegError, match=f"max_pixels={bad!r}: expected a whole number"):
            Segmenter(at_limit.model, at_limit.class_names, max_pixels=bad)


def test_train_seg_on_ground_truth_then_evaluate(tiny_dataset, tmp_path, monkeypatch):
    from conftest import tiny_config, training_log

    from amnseg.checkpoints import load_model
    from amnseg.data import build_dataset
    from amnseg.metrics import confusion_matrix, miou

    # Masks with ignored pixels (255), as VOC's object outlines: no prediction may be taken
    # for the ground truth.
    for path in (tiny_dataset / "masks").glob("*.png"):
        mask = np.array(Image.open(path))
        mask[0] = 255
        Image.fromarray(mask).save(path)
    # 8 images, steps of 1 x 2: 4 steps per epoch, so 5 iterations take 2 epochs (5 steps;
    # epochs and batch size differ, so that neither can stand for the other).
    config = tiny_config(tiny_dataset, tmp_path / "run", "seg.init=null", "seg.iterations=5",
                         "seg.batch_size=1", "seg.accumulation=2", "seg.crop_size=32",
                         "seg.msc_scales=[]", "seg.eval_images=2", "seg.backbone.depth=18",
                         "seg.backbone.width=0.125", "seg.backbone.pretrained=null")
    path = seg_stage.train_seg(config, "seg_gt", "gt")
    log = training_log(config, "seg_gt")
    assert [record["epoch"] for record in log] == [1, 2]
    assert [record["steps"] for record in log] == [4, 1]
    state = torch.load(tmp_path / "run" / "seg_gt" / "last.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 5
    # The last epoch's val check: the trained net's mIoU on the first 2 val images.
    val = build_dataset(config.data, "val")
    model = load_model(path, "seg", val.class_names).eval()
    confusion = sum(confusion_matrix(seg_stage.predict_labels(model, val.image(stem)),
                                     val.mask(stem), 3) for stem in val.stems[:2])
    assert log[-1]["val_miou"] == pytest.approx(float(miou(confusion)))

    # Evaluation on the whole val split, without and with the CRF, in 1 or 2 CRF workers.
    results = []
    for workers in (1, 2):
        overrides = [f"seg.crf_workers={workers}", "seg.crf.iterations=3"]
        results.append(seg_stage.evaluate_seg(
            tiny_config(tiny_dataset, tmp_path / "run", *overrides), "seg_gt"))
    assert results[0] == results[1]
    plain = refined = 0
    crf = tiny_config(tiny_dataset, tmp_path / "run", "seg.crf.iterations=3").seg.crf
    for stem in val.stems:
        image, gt = val.image(stem), val.mask(stem)
        plain = plain + confusion_matrix(seg_stage.predict_labels(model, image), gt, 3)
        refined = refined + confusion_matrix(seg_stage.predict_labels(model, image, crf=crf),
                                             gt, 3)
    assert results[0]["no_crf"]["miou"] == pytest.approx(float(miou(plain)))
    assert results[0]["crf"]["miou"] == pytest.approx(float(miou(refined)))
    assert list(results[0]["crf"]["per_class_iou"]) == ["background", "square", "disc"]
    # seg.crf_device: the PyTorch CRF (here on the CPU, as it would run on a GPU) scores the same.
    monkeypatch.setattr(seg_stage, "crf_device_of", lambda spec, option: torch.device("cpu"))
    on_device = seg_stage.evaluate_seg(
        tiny_config(tiny_dataset, tmp_path / "run", "seg.crf.iterations=3"), "seg_gt")
    assert on_device == results[0]


def test_msc_loss_in_parts_is_the_mean_of_each_slices_own_msc_loss():
    generator = torch.Generator().manual_seed(8)
    outputs = [torch.randn(4, 3, 5, 5, generator=generator),
               torch.randn(4, 3, 3, 3, generator=generator),
               torch.randn(4, 3, 5, 5, generator=generator)]
    targets = (torch.randint(0, 3, (4, 5, 5), generator=generator),
               torch.randint(0, 3, (4, 3, 3), generator=generator))
    # The two halves have very different numbers of labelled pixels, so a loss averaged over
    # the whole batch's pixels (or over other slices) differs from the recipe's.
    targets[0][0, :4] = 255
    targets[1][1, :2] = 255
    halves = [seg_stage.msc_loss([o[k:k + 2] for o in outputs], *(t[k:k + 2] for t in targets))
              for k in (0, 2)]
    fused = seg_stage.msc_loss_in_parts(outputs, targets, 2)
    torch.testing.assert_close(fused, (halves[0] + halves[1]) / 2)
    assert not torch.allclose(fused, seg_stage.msc_loss(outputs, *targets))
    torch.testing.assert_close(seg_stage.msc_loss_in_parts(outputs, targets, 1),
                               seg_stage.msc_loss(outputs, *targets), rtol=0, atol=0)


def test_fused_accumulation_trains_the_recipes_weights(tiny_dataset, tmp_path):
    """One forward pass over both accumulated batches: the same crops, the same per-batch loss
    normalisation, so the same weights as two passes up to floating-point order."""
    from conftest import tiny_config, training_log

    weights, logs = [], []
    for run, overrides in [("two", ["seg.accumulation=2"]),
                           ("fused", ["seg.accumulation=2", "seg.fused_accumulation=true"]),
                           ("one", ["seg.accumulation=1", "seg.batch_size=4"])]:
        config = tiny_config(
            tiny_dataset, tmp_path / run, "seg.init=null", "seg.iterations=3",
            "seg.batch_size=2", "seg.crop_size=32", "seg.eval_images=0",
            "seg.backbone.depth=18", "seg.backbone.width=0.125",
            "seg.backbone.pretrained=null", "seg.lr=0.05", *overrides)
        path = seg_stage.train_seg(config, "seg_gt", "gt")
        weights.append(torch.load(path, weights_only=True)["model"])
        logs.append(training_log(config, "seg_gt"))
    two, fused, one = weights
    assert [r["steps"] for r in logs[0]] == [r["steps"] for r in logs[1]] == [2, 1]
    for first, second in zip(logs[0], logs[1], strict=True):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-5)
    for key, value in two.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-4, atol=1e-6)
    # The same crops as one batch of 4 averaged over all its pixels: other weights, so the
    # comparison above can tell a wrong loss normalisation apart.
    assert max((one[k] - two[k]).abs().max().item() for k in two) > 1e-4


def test_folded_norm_trains_the_same_weights(tiny_dataset, tmp_path):
    """seg.backbone.fold_norm reaches the stage's network (and its checkpoint), which trains
    the weights of the unfolded network up to floating-point order."""
    from conftest import tiny_config, training_log

    from amnseg.checkpoints import load_model
    from amnseg.models.resnet import FixedStatsBatchNorm2d

    weights, losses = [], []
    for run, folded in (("plain", "false"), ("folded", "true")):
        config = tiny_config(
            tiny_dataset, tmp_path / run, "seg.init=null", "seg.iterations=2",
            "seg.batch_size=2", "seg.crop_size=32", "seg.eval_images=0",
            "seg.backbone.depth=18", "seg.backbone.width=0.125",
            "seg.backbone.pretrained=null", "seg.lr=0.05", f"seg.backbone.fold_norm={folded}")
        path = seg_stage.train_seg(config, "seg_gt", "gt")
        weights.append(torch.load(path, weights_only=True)["model"])
        losses.append([record["loss"] for record in training_log(config, "seg_gt")])
        norms = [m for m in load_model(path, "seg", ["square", "disc"]).modules()
                 if isinstance(m, FixedStatsBatchNorm2d)]
        assert norms and all(m.fold == (folded == "true") for m in norms)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_fused_accumulation_needs_fixed_batchnorm_statistics():
    from amnseg.config import load_config

    with pytest.raises(AmnsegError, match="seg.fused_accumulation=True: needs seg.backbone.norm"):
        load_config(None, ["seg.fused_accumulation=true", "seg.backbone.norm=batch"])


def test_predict_decodes_every_input_before_writing_and_labels_a_file_once(seg_checkpoint,
                                                                          tmp_path):
    from amnseg.segmenter import Segmenter, predict_files

    inputs = tmp_path / "in"
    inputs.mkdir()
    image = np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(inputs / "a.png")
    Image.fromarray(image).save(tmp_path / "whole.png")
    (inputs / "b.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])  # cut short
    segmenter = Segmenter.from_checkpoint(seg_checkpoint)
    with pytest.raises(AmnsegError, match="b.png: "):
        predict_files(segmenter, [inputs], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (inputs / "b.png").unlink()
    # Path() drops "." but keeps "..": the same file under two spellings is labelled once,
    # and the outputs are named as it was first given.
    written = predict_files(segmenter, [inputs / "a.png", inputs, inputs / ".." / "in" / "a.png"],
                            tmp_path / "out")
    assert written == [tmp_path / "out" / "a.png"]
    # No overlay; the record of what wrote the masks.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".amnseg-predict.lock", "a.png", "amnseg-predict.jsonl"]
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(image).save(other / "a.png")
    with pytest.raises(AmnsegError, match=r"other/a\.png: same name as .*in/a\.png \(outputs "
                       "would collide\\)"):
        predict_files(segmenter, [inputs, other], tmp_path / "out")


def test_predict_resumes_into_its_own_outputs_and_replaces_nothing_else(seg_checkpoint,
                                                                         tmp_path):
    from amnseg.segmenter import Segmenter, predict_files

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(15)
    for stem in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(
            inputs / f"{stem}.png")
    segmenter = Segmenter.from_checkpoint(seg_checkpoint)
    out = tmp_path / "out"
    written = predict_files(segmenter, [inputs], out, with_overlay=True)
    assert written == [out / "a.png", out / "b.png", out / "c.png"]

    def identity(path: Path) -> tuple[int, int]:  # a file replaced gets a new inode
        return path.stat().st_ino, path.stat().st_mtime_ns

    # An interrupted run: b's mask and c's overlay missing. a is not labelled again; b and c
    # are.
    (out / "b.png").unlink()
    (out / "overlay" / "c.png").unlink()
    kept = identity(out / "a.png"), identity(out / "overlay" / "a.png")
    assert predict_files(segmenter, [inputs], out, with_overlay=True) == written
    assert (identity(out / "a.png"), identity(out / "overlay" / "a.png")) == kept
    for stem in ("b", "c"):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}.png")),
                                      segmenter(inputs / f"{stem}.png"))
        assert (out / "overlay" / f"{stem}.png").is_file()
    # An input changed under the same name gets its mask again.
    Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(inputs / "c.png")
    predict_files(segmenter, [inputs], out, with_overlay=True)
    assert (identity(out / "a.png"), identity(out / "overlay" / "a.png")) == kept
    np.testing.assert_array_equal(np.asarray(Image.open(out / "c.png")),
                                  segmenter(inputs / "c.png"))
    # Another option, another checkpoint, or a segmenter with no checkpoint file: the files
    # there are not its own, and none is replaced.
    other_checkpoint = save_tiny_seg_checkpoint(tmp_path / "other.pt", ("cat", "cow"))
    before = {path: path.read_bytes() for path in out.rglob("*.png")}
    for other in (Segmenter.from_checkpoint(seg_checkpoint, flip=True),
                  Segmenter.from_checkpoint(seg_checkpoint, crf=True),
                  Segmenter.from_checkpoint(other_checkpoint),
                  Segmenter(segmenter.model, segmenter.class_names)):
        with pytest.raises(AmnsegError, match=r"out/a\.png: already exists \(6 of the outputs "
                           r"do, not written with this checkpoint and these options\); pass "
                           r"--overwrite to replace them, or choose another --out$"):
            predict_files(other, [inputs], out, with_overlay=True)
    assert {path: path.read_bytes() for path in out.rglob("*.png")} == before
    # Without the overlays the masks alone are the outputs (3 of them).
    flipped = Segmenter.from_checkpoint(seg_checkpoint, flip=True)
    with pytest.raises(AmnsegError, match=r"already exists \(3 of the outputs do, not"):
        predict_files(flipped, [inputs], out)
    # --overwrite of one image with the other options: the other two masks are still the
    # first options' (not the flipped run's to resume into), and a's overlay too.
    predict_files(flipped, [inputs / "a.png"], out, overwrite=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")),
                                  flipped(inputs / "a.png"))
    with pytest.raises(AmnsegError, match=r"out/b\.png: already exists \(2 of the outputs do"):
        predict_files(flipped, [inputs], out)
    predict_files(flipped, [inputs], out, overwrite=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "b.png")),
                                  flipped(inputs / "b.png"))
    predict_files(flipped, [inputs], out)  # its own now
    # A mask edited by hand, or a file put where a new image's mask goes: not its own.
    Image.fromarray(np.full((20, 26), 7, np.uint8)).save(out / "a.png")
    with pytest.raises(AmnsegError, match=r"out/a\.png: already exists \(1 of the outputs"):
        predict_files(flipped, [inputs], out)
    (out / "a.png").unlink()
    Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(inputs / "d.png")
    (out / "d.png").write_bytes(b"someone else's")
    with pytest.raises(AmnsegError, match=r"out/d\.png: already exists \(1 of the outputs"):
        predict_files(flipped, [inputs], out)
    (out / "d.png").unlink()
    # A line of the list cut short (a run killed while writing it) counts for nothing.
    predict_files(flipped, [inputs], out)
    log = out / "amnseg-predict.jsonl"
    log.write_text(log.read_text()[:-20])
    with pytest.raises(AmnsegError, match=r"out/d\.png: already exists \(1 of the outputs"):
        predict_files(flipped, [inputs], out)
    # A folder of files amnseg did not write (ground-truth masks, say): no list, no resume.
    masks = tmp_path / "SegmentationClass"
    masks.mkdir()
    Image.fromarray(np.full((20, 26), 7, np.uint8)).save(masks / "b.png")
    with pytest.raises(AmnsegError, match=r"SegmentationClass/b\.png: already exists \(1 of "
                       r"the outputs do\); pass --overwrite"):
        predict_files(segmenter, [inputs], masks)
    assert sorted(p.name for p in masks.iterdir()) == ["b.png"]


def test_two_predicts_into_one_folder_at_once_are_refused(seg_checkpoint, tmp_path):
    """Both would find the folder free of foreign files, then write each other's masks."""
    from amnseg.io import folder_lock
    from amnseg.segmenter import PREDICT_LOCK, Segmenter, predict_files

    Image.fromarray(np.zeros((20, 26, 3), np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    script = (f"import time; from pathlib import Path; from amnseg.io import folder_lock\n"
              f"with folder_lock(Path({str(out)!r}), {PREDICT_LOCK!r}, 'x', 'y'):\n"
              "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AmnsegError, match=rf"out: another amnseg predict \(pid {holder.pid}\)"
                           r" is writing into this folder; wait for it to finish or choose "
                           r"another --out$"):
            predict_files(Segmenter.from_checkpoint(seg_checkpoint), [tmp_path / "a.png"], out)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [PREDICT_LOCK]
    with folder_lock(out, PREDICT_LOCK, "x", "y"):  # free again once its holder is gone
        pass


def test_predict_under_torchrun_labels_each_process_share(seg_checkpoint, tmp_path,
                                                         monkeypatch):
    """Each of 2 processes labels every other image (a, c, e and b, d), as the README says;
    the list of what was written then covers all, and a rerun labels nothing again."""
    from amnseg import distributed
    from amnseg.segmenter import Segmenter, predict_files

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(16)
    stems = ["a", "b", "c", "d", "e"]
    for stem in stems:
        Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(
            inputs / f"{stem}.png")
    segmenter = Segmenter.from_checkpoint(seg_checkpoint)
    out = tmp_path / "out"
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    written = predict_files(segmenter, [inputs], out)
    assert written == [out / f"{stem}.png" for stem in stems]
    assert sorted(p.stem for p in out.glob("*.png")) == ["a", "c", "e"]
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    predict_files(segmenter, [inputs], out)
    assert sorted(p.stem for p in out.glob("*.png")) == stems
    for stem in stems:
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}.png")),
                                      segmenter(inputs / f"{stem}.png"))
    assert len((out / "amnseg-predict.jsonl").read_text().splitlines()) == 5
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    before = {p: p.stat().st_ino for p in out.glob("*.png")}
    predict_files(segmenter, [inputs], out)
    assert {p: p.stat().st_ino for p in out.glob("*.png")} == before


def test_smallest_image_is_one_pixel_at_the_smallest_scale(seg_checkpoint):
    from amnseg.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(seg_checkpoint)  # scales 1, 0.5, 0.75
    assert segmenter(np.zeros((2, 2, 3), np.uint8)).shape == (2, 2)
    for shape in ((1, 5, 3), (5, 1, 3)):
        for label in (segmenter, segmenter.probabilities):
            with pytest.raises(AmnsegError, match=r"^image: \d+x\d+ pixels is too small to "
                               r"segment \(at least 2 pixels a side, for the input scale "
                               r"0.5\)"):
                label(np.zeros(shape, np.uint8))


def test_overlay_blends_labelled_pixels_half_with_their_colour():
    from amnseg.data.voc import voc_palette
    from amnseg.segmenter import overlay

    image = np.random.default_rng(14).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    labels = np.array([[0, 1, 2, 3, 0, 15]] * 4, np.uint8)
    colours = np.array(voc_palette(), np.float64).reshape(256, 3)[labels]
    expected = np.where(labels[..., None] == 0, image, np.round(0.5 * image + 0.5 * colours))
    np.testing.assert_array_equal(overlay(image, labels), expected.astype(np.uint8))


def test_segmenter_takes_image_files_and_checks_flip(seg_checkpoint, tmp_path):
    from amnseg.segmenter import Segmenter

    image = np.random.default_rng(6).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    segmenter = Segmenter.from_checkpoint(seg_checkpoint)
    expected = segmenter(image)
    np.testing.assert_array_equal(segmenter(tmp_path / "photo.png"), expected)
    np.testing.assert_array_equal(segmenter(str(tmp_path / "photo.png")), expected)
    with pytest.raises(AmnsegError, match="nowhere.png"):
        segmenter(tmp_path / "nowhere.png")
    with pytest.raises(AmnsegError, match="flip='no': expected True or False"):
        Segmenter.from_checkpoint(seg_checkpoint, flip="no")


def test_segmenter_and_predict_can_read_files_as_viewers_show_them(seg_checkpoint, tmp_path):
    from amnseg.segmenter import Segmenter, predict_files

    stored = np.random.default_rng(8).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8  # shown turned a quarter anticlockwise
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    plain = Segmenter.from_checkpoint(seg_checkpoint)
    turned = Segmenter.from_checkpoint(seg_checkpoint, exif_orientation=True)
    np.testing.assert_array_equal(plain(tmp_path / "photo.png"), plain(stored))
    np.testing.assert_array_equal(turned(tmp_path / "photo.png"), plain(np.rot90(stored, 1)))
    # Arrays and PIL images are taken as given.
    np.testing.assert_array_equal(turned(stored), plain(stored))
    [written] = predict_files(turned, [tmp_path / "photo.png"], tmp_path / "out")
    assert Image.open(written).size == (21, 30)
    with pytest.raises(AmnsegError, match="exif_orientation=1: expected True or False"):
        Segmenter.from_checkpoint(seg_checkpoint, exif_orientation=1)


def test_deeplab_transform_draws_every_scale_alike_and_flips_half_the_time():
    """kazuto's recipe: a scale picked uniformly from the list (each one, the last included),
    then a horizontal flip with probability 1/2."""
    image = np.zeros((20, 20, 3), np.uint8)
    labels = np.full((20, 20), 2, np.uint8)
    labels[:, :10] = 1
    transform = DeepLabTrainTransform([0.5, 0.75, 1.0, 1.25, 1.5], 40, "caffe")
    assert transform.flip is True
    rng = np.random.default_rng(5)
    sides, flipped = [], 0
    for _ in range(500):
        _, label_crop = transform(image, labels, rng)
        inside = label_crop != 255
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        sides.append(len(rows))
        flipped += int(label_crop[rows[0], cols[0]] == 2)
    counts = {side: sides.count(side) for side in sorted(set(sides))}
    assert list(counts) == [10, 15, 20, 25, 30]  # int(20 * s) for every scale
    assert all(70 <= count <= 130 for count in counts.values()), counts
    assert 200 <= flipped <= 300


def test_evaluation_without_a_val_split_says_so(tiny_dataset, tmp_path):
    from conftest import tiny_config

    config = tiny_config(tiny_dataset, tmp_path / "run", "data.val_split=''")
    with pytest.raises(AmnsegError, match=r"^data.val_split is not set: name the split"):
        seg_stage.evaluate_seg(config, checkpoint=tmp_path / "none.pt")


def test_an_edited_checkpoint_with_odd_class_names_or_integer_weights_is_named(tmp_path):
    from amnseg.io import load_checkpoint, save_checkpoint
    from amnseg.segmenter import Segmenter

    path = save_tiny_seg_checkpoint(tmp_path / "seg.pt")
    good = load_checkpoint(path)
    for change, words in [
            ({"class_names": ["cat", "cat"]}, "class_names holds an empty or a repeated name"),
            ({"class_names": [" ", "dog"]}, "class_names holds an empty or a repeated name"),
            ({"model": {key: value.long() if value.is_floating_point() else value
                        for key, value in good["model"].items()}},
             "model holds integer weights or a float step count (edited?)")]:
        save_checkpoint(tmp_path / "edited.pt", {**good, **change})
        with pytest.raises(AmnsegError, match=re.escape(f"edited.pt: damaged amnseg checkpoint "
                                                        f"({words})")):
            Segmenter.from_checkpoint(tmp_path / "edited.pt")
