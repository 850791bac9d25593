"""The arithmetic of amnseg/models/{resnet,aspp,deeplab}.py, written against the one-line
mutants (tools/mutate.py) that the rest of the suite let through. Every value is checked
against an independent computation written here (a forward with torch.nn.functional, strides
from the feature sizes, the published key layout), on tiny CPU networks."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from amnseg.errors import AmnsegError
from amnseg.models.aspp import ASPP
from amnseg.models.deeplab import MSC, DeepLabV2
from amnseg.models.resnet import (
    IMAGENET_URLS,
    BasicBlock,
    Bottleneck,
    FixedStatsBatchNorm2d,
    ResNet,
    build_backbone,
    load_imagenet_weights,
    resnet_from_config,
)

BLOCK_COUNTS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
EXPANSION = {18: 1, 34: 1, 50: 4, 101: 4}
EPS = 1e-5
SHARED_KEYS = Path(__file__).resolve().parent / "data" / "deeplabv2_msc_keys.tsv"


# --- a hand-written ResNet forward ------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so no BN is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


def bn(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    def channel(key):
        return state[f"{name}.{key}" if name else key][None, :, None, None]

    return (x - channel("running_mean")) / torch.sqrt(channel("running_var") + EPS) * channel(
        "weight") + channel("bias")


def reference_levels(state: dict, x: torch.Tensor, depth: int, strides, dilations,
                     stride_in_1x1: bool, ceil: bool) -> list[torch.Tensor]:
    """The five levels from the state dict alone (only weights, never the modules)."""
    x = F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=strides[0], padding=3), state, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1, ceil_mode=ceil)
    levels = [x]
    for layer, count in enumerate(BLOCK_COUNTS[depth]):
        for index in range(count):
            p = f"layer{layer + 1}.{index}"
            stride = (1, *strides[1:])[layer] if index == 0 else 1
            dilation = dilations[layer]
            if f"{p}.downsample.0.weight" in state:
                identity = bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride),
                              state, f"{p}.downsample.1")
            else:
                identity = x
            if EXPANSION[depth] == 1:
                out = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"], stride=stride,
                                         padding=dilation, dilation=dilation), state, f"{p}.bn1"))
                out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], padding=dilation,
                                  dilation=dilation), state, f"{p}.bn2")
            else:
                s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
                out = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"], stride=s1), state,
                                f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, state[f"{p}.conv2.weight"], stride=s3,
                                         padding=dilation, dilation=dilation), state, f"{p}.bn2"))
                out = bn(F.conv2d(out, state[f"{p}.conv3.weight"]), state, f"{p}.bn3")
            x = F.relu(out + identity)
        levels.append(x)
    return levels


def expected_keys(depth: int, width: float) -> dict[str, tuple[int, ...]]:
    """torchvision's ResNet state-dict layout, written out from the block counts."""
    widths = [max(1, int(round(w * width))) for w in (64, 128, 256, 512)]
    keys: dict[str, tuple[int, ...]] = {}

    def norm(name, n):
        for key in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{key}"] = (n,)
        keys[f"{name}.num_batches_tracked"] = ()

    keys["conv1.weight"] = (widths[0], 3, 7, 7)
    norm("bn1", widths[0])
    inplanes = widths[0]
    expansion = EXPANSION[depth]
    for layer, (planes, count) in enumerate(zip(widths, BLOCK_COUNTS[depth], strict=True)):
        for index in range(count):
            p = f"layer{layer + 1}.{index}"
            if expansion == 1:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                norm(f"{p}.bn1", planes)
                norm(f"{p}.bn2", planes)
            else:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                norm(f"{p}.bn1", planes)
                norm(f"{p}.bn2", planes)
                norm(f"{p}.bn3", planes * 4)
            # layer1 of ResNet-18/34 keeps its width and stride: no projection there
            if index == 0 and (layer > 0 or inplanes != planes * expansion):
                keys[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                norm(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return keys


CONFIGS = [
    # depth, strides, dilations, stride_in_1x1, stem_pool_ceil
    (18, (2, 2, 2, 1), (1, 1, 1, 2), False, False),
    (34, (1, 2, 1, 2), (1, 2, 1, 1), False, True),
    (50, (2, 2, 1, 1), (1, 1, 2, 4), True, True),  # DeepLab-v2's backbone
    (50, (2, 1, 2, 2), (2, 1, 1, 1), False, False),
]


@pytest.mark.parametrize("depth,strides,dilations,stride_in_1x1,ceil", CONFIGS)
def test_resnet_forward_equals_a_hand_written_one(depth, strides, dilations, stride_in_1x1, ceil):
    torch.manual_seed(depth)
    model = ResNet(depth=depth, width=0.0625, strides=strides, dilations=dilations,
                   stride_in_1x1=stride_in_1x1, stem_pool_ceil=ceil)
    model = randomize(model.double()).train()  # frozen statistics: train() changes nothing
    state = {k: v.detach() for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_keys(depth, 0.0625)
    x = torch.randn(2, 3, 45, 38, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        levels = model.forward_levels(x)
        features = model(x)
    expected = reference_levels(state, x, depth, strides, dilations, stride_in_1x1, ceil)
    assert [lv.shape for lv in levels] == [lv.shape for lv in expected]
    for got, want in zip(levels, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(features, expected[-1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_block_counts_types_and_key_layout_per_depth(depth):
    model = ResNet(depth=depth, width=1 / 32)
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == (
        BLOCK_COUNTS[depth])
    block = BasicBlock if depth < 50 else Bottleneck
    assert all(type(b) is block for b in model.modules() if isinstance(b, BasicBlock | Bottleneck))
    assert block.expansion == EXPANSION[depth]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_keys(
        depth, 1 / 32)


def test_resnet18_full_width_layout():
    model = ResNet(depth=18)  # the default width 1.0
    assert model.level_channels == [64, 64, 128, 256, 512] and model.out_channels == 512
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_keys(18, 1.0)


def test_width_rounds_and_never_drops_below_one_channel():
    # 64 / 128 = 0.5 rounds to 0 and is raised to 1; the others are exact
    model = ResNet(depth=18, width=1 / 128)
    assert model.level_channels == [1, 1, 1, 2, 4]
    assert model.conv1.weight.shape == (1, 3, 7, 7)


@pytest.mark.parametrize("strides", [(2, 2, 2, 1), (1, 2, 1, 2), (2, 1, 2, 2), (1, 1, 1, 1),
                                     (2, 2, 2, 2)])
def test_level_strides_and_channels_match_the_feature_maps(strides):
    model = ResNet(depth=50, width=1 / 32, strides=strides).eval()
    size = 64
    with torch.no_grad():
        levels = model.forward_levels(torch.randn(1, 3, size, size))
    stem = 2 * strides[0]
    cumulative = [stem, stem]
    for stride in strides[1:]:
        cumulative.append(cumulative[-1] * stride)
    assert [size // lv.shape[-1] for lv in levels] == cumulative
    assert model.level_strides == cumulative
    assert all(type(s) is int for s in model.level_strides)
    assert model.output_stride == cumulative[-1] and type(model.output_stride) is int
    assert model.level_channels == [2, 8, 16, 32, 64] == [lv.shape[1] for lv in levels]
    assert model.out_channels == 64
    assert model.conv1.stride == (strides[0],) * 2


def test_resnet_constructor_defaults():
    model = ResNet(width=1 / 32)
    assert model.depth == 50 and isinstance(model.layer1[0], Bottleneck)
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == (
        BLOCK_COUNTS[50])
    assert model.level_strides == [4, 4, 8, 16, 16]
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    assert model.layer4[0].conv2.stride == (1, 1)
    assert all(m.dilation == (1, 1) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert model.maxpool.ceil_mode is False
    assert all(isinstance(m, FixedStatsBatchNorm2d) for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    assert not model.conv1.weight.requires_grad
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 33, 47)).shape == (1, 64, 3, 3)
    assert ResNet(depth=18).level_channels == [64, 64, 128, 256, 512]


def test_resnet_from_config_defaults():
    model = resnet_from_config({"width": 1 / 32})
    assert model.depth == 50 and isinstance(model.layer1[0], Bottleneck)
    assert model.level_strides == [4, 4, 8, 16, 16]
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    assert all(m.dilation == (1, 1) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert model.maxpool.ceil_mode is False
    assert not model.conv1.weight.requires_grad and not model.bn1.weight.requires_grad
    assert resnet_from_config({"depth": 18}).level_channels == [64, 64, 128, 256, 512]
    # the option's old name still works
    legacy = resnet_from_config({"depth": 18, "width": 1 / 32, "freeze_conv1": False})
    assert legacy.conv1.weight.requires_grad


@pytest.mark.parametrize("kind", ["frozen", "batch"])
def test_norm_kinds(kind):
    model = ResNet(depth=18, width=1 / 32, norm=kind)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((type(m) is FixedStatsBatchNorm2d) == (kind == "frozen") for m in norms)


def test_frozen_batchnorm_is_running_statistics_in_train_mode_and_ignores_momentum():
    norm = randomize(FixedStatsBatchNorm2d(3)).train()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 2
    state = norm.state_dict()
    torch.testing.assert_close(norm(x), bn(x, state, ""))
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key])


# --- ASPP ---------------------------------------------------------------------------------------


def reference_aspp(aspp: ASPP, x: torch.Tensor, rates) -> torch.Tensor:
    convs = [getattr(aspp, f"c{i}") for i in range(len(rates))]
    return sum(F.conv2d(x, conv.weight, conv.bias, padding=rate, dilation=rate)
               for conv, rate in zip(convs, rates, strict=True))


@pytest.mark.parametrize("shape", [(1, 2, 7, 30), (1, 2, 30, 7), (3, 2, 13, 26), (1, 5, 6, 25),
                                   (2, 40, 3, 3)])
def test_aspp_default_rates_equal_plain_dilated_convs(shape):
    """Maps with fewer channels or images than the rates, or one side shorter than some rates
    and the other longer: only taps that read padding alone may be dropped."""
    torch.manual_seed(0)
    aspp = ASPP(shape[1], 3).double()
    rates = (6, 12, 18, 24)
    assert [c.dilation for c in aspp.children()] == [(r, r) for r in rates]
    with torch.no_grad():
        for conv in aspp.children():
            conv.weight.normal_()
            conv.bias.normal_()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        out = aspp(x)
    assert out.shape == (shape[0], 3, *shape[2:])
    torch.testing.assert_close(out, reference_aspp(aspp, x, rates), rtol=1e-10, atol=1e-10)


def test_aspp_init_every_branch():
    torch.manual_seed(0)
    aspp = ASPP(64, 21)
    assert [name for name, _ in aspp.named_children()] == ["c0", "c1", "c2", "c3"]
    for conv in aspp.children():
        assert conv.weight.shape == (21, 64, 3, 3)
        assert abs(conv.weight.mean().item()) < 1e-3
        assert abs(conv.weight.std().item() - 0.01) < 5e-4
        assert conv.bias is not None and torch.count_nonzero(conv.bias) == 0


# --- DeepLab-v2 and MSC -----------------------------------------------------------------------


def tiny_deeplab(classes: int = 3, rates=None) -> DeepLabV2:
    torch.manual_seed(0)
    backbone = ResNet(depth=50, width=1 / 32, strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4),
                      stride_in_1x1=True, stem_pool_ceil=True)
    model = DeepLabV2(backbone, classes) if rates is None else DeepLabV2(backbone, classes, rates)
    randomize(model)
    with torch.no_grad():
        for conv in model.aspp.children():
            conv.weight.normal_(std=0.1)
            conv.bias.normal_()
    return model.eval()


def test_deeplab_default_rates_and_head_on_a_large_map():
    model = tiny_deeplab()
    assert model.num_classes == 3
    assert [c.dilation for c in model.aspp.children()] == [(r, r) for r in (6, 12, 18, 24)]
    x = torch.randn(1, 3, 209, 209, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = model.backbone(x)
        assert features.shape[-2:] == (27, 27)  # stride 8, the stem rounding up
        logits = model(x)
    expected = reference_aspp(model.aspp, features, (6, 12, 18, 24))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_msc_default_scales_and_training_outputs():
    model = MSC(tiny_deeplab())
    assert model.scales == (0.5, 0.75) and model.input_kind == "caffe"
    images = torch.randn(1, 3, 57, 43, generator=torch.Generator().manual_seed(3))
    base = model.base
    with torch.no_grad():
        logits = base(images)
        others = []
        for scale in (0.5, 0.75):
            size = (math.floor(57 * scale), math.floor(43 * scale))
            small = F.interpolate(images, scale_factor=scale, mode="bilinear",
                                  align_corners=False)
            assert small.shape[-2:] == size
            others.append(base(small))
        model.train()
        outputs = model(images)
    assert len(outputs) == 4
    for got, want in zip(outputs[:3], [logits, *others], strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    fused = logits
    for other in others:
        fused = torch.maximum(fused, F.interpolate(other, size=logits.shape[-2:],
                                                   mode="bilinear", align_corners=False))
    torch.testing.assert_close(outputs[3], fused, rtol=1e-4, atol=1e-5)


def test_hand_written_layout_matches_the_published_deeplab_key_list():
    """The layout the tests above compare with is DeepLab-v2's ResNet-101 (shapes in order)."""
    rows = [line.split("\t") for line in SHARED_KEYS.read_text().splitlines()]
    published = [tuple(int(v) for v in shape.strip("()").split(",") if v)
                 for key, shape, _ in rows if ".aspp." not in key]
    assert sorted(published) == sorted(expected_keys(101, 1.0).values())
    aspp = {key: shape for key, shape, _ in rows if ".aspp." in key}
    assert aspp == {f"base.aspp.c{i}.{p}": s for i in range(4)
                    for p, s in (("weight", "(21, 2048, 3, 3)"), ("bias", "(21,)"))}


# --- ImageNet weights -----------------------------------------------------------------------


def test_imagenet_urls_cover_each_depth_with_its_own_file():
    assert sorted(IMAGENET_URLS) == [18, 34, 50, 101]
    for depth, url in IMAGENET_URLS.items():
        assert url.startswith(f"https://download.pytorch.org/models/resnet{depth}-")


def test_weights_without_batch_counters_load(tmp_path):
    """torchvision's ImageNet files have no num_batches_tracked: they load all the same."""
    source = randomize(ResNet(depth=18, width=1 / 32), seed=4)
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "resnet18-old.pth"
    torch.save(state, path)
    target = ResNet(depth=18, width=1 / 32)
    load_imagenet_weights(target, path)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key


class Planted:
    """A pickled object that runs code when unpickled: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_downloaded_weights_are_loaded_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    state = ResNet(depth=18, width=1 / 32).state_dict()
    marker = tmp_path / "code_ran"
    state["fc.payload"] = Planted(marker)  # fc.* is dropped after loading: only the load sees it
    staged = tmp_path / "staged.pth"
    torch.save(state, staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    published = tmp_path / f"resnet18-{digest}.pth"
    staged.rename(published)
    with pytest.raises(AmnsegError, match="never unpickled"):
        load_imagenet_weights(ResNet(depth=18, width=1 / 32), published.as_uri())
    assert not marker.exists()  # the planted code did not run
    # The same file given as a path: the same refusal, nothing run.
    with pytest.raises(AmnsegError, match=f"^{published}: .*never unpickled"):
        load_imagenet_weights(ResNet(depth=18, width=1 / 32), published)
    assert not marker.exists()


def test_download_shows_its_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    source = ResNet(depth=18, width=1 / 32)
    staged = tmp_path / "staged.pth"
    torch.save(source.state_dict(), staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    published = tmp_path / f"resnet18-{digest}.pth"
    staged.rename(published)
    target = ResNet(depth=18, width=1 / 32)
    load_imagenet_weights(target, published.as_uri())
    assert "100%" in capsys.readouterr().err  # the download's progress bar
    assert torch.equal(target.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_build_backbone_loads_the_configured_weights(tmp_path):
    from types import SimpleNamespace

    source = randomize(ResNet(depth=18, width=1 / 32), seed=5)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone(SimpleNamespace(depth=18, width=1 / 32, pretrained=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
