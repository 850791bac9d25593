"""``backbone.space_to_batch``: dilated "same" convolutions computed as undilated ones over the
image's interleaved sub-grids (amnseg/models/resnet.py, ``space_to_batch_conv``). Checked in
float64 against ``F.conv2d`` with the dilation, outputs and gradients, and as a whole network
against the same weights without the option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amnseg.config import load_config
from amnseg.models import resnet
from amnseg.models.resnet import ResNet, convolve, resnet_from_config, space_to_batch_conv

# (height, width, dilation, kernel): sizes that are and are not multiples of the dilation,
# an image smaller than the dilation, non-square images, the seg net's 41 / 21 / 31 at
# crop 321 and its MSC scales.
CASES = [(8, 8, 2, 3), (9, 7, 2, 3), (41, 41, 2, 3), (21, 31, 4, 3), (3, 5, 4, 3),
         (13, 10, 3, 5), (11, 11, 6, 3)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("height,width,dilation,kernel", CASES)
def test_space_to_batch_is_the_dilated_convolution(height, width, dilation, kernel, bias,
                                                   channels_last):
    generator = torch.Generator().manual_seed(height * 100 + width + dilation)
    x = torch.randn(2, 3, height, width, dtype=torch.float64, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(5, 3, kernel, kernel, dtype=torch.float64, generator=generator,
                         requires_grad=True)
    bias_value = (torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
                  if bias else None)
    padding = dilation * (kernel - 1) // 2
    expected = F.conv2d(x, weight, bias_value, 1, padding, dilation)
    got = space_to_batch_conv(x, weight, bias_value, dilation)
    assert got.shape == expected.shape == (2, 5, height, width)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # The result keeps the input's memory format (the GPU options use channels_last).
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    params = [x, weight, *([bias_value] if bias else [])]
    got_grads = torch.autograd.grad(got, params, upstream)
    want_grads = torch.autograd.grad(expected, params, upstream)
    for name, a, b in zip(["x", "weight", "bias"], got_grads, want_grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)


def test_only_dilated_same_convolutions_are_rearranged(monkeypatch):
    calls = []

    def counted(x, weight, bias, dilation):
        calls.append(dilation)
        return space_to_batch_conv(x, weight, bias, dilation)

    monkeypatch.setattr(resnet, "space_to_batch_conv", counted)
    x = torch.randn(1, 4, 12, 10, dtype=torch.float64)
    convs = {  # (conv, rearranged when asked)
        "dilated 3x3": (torch.nn.Conv2d(4, 4, 3, 1, 2, 2), True),
        "undilated 3x3": (torch.nn.Conv2d(4, 4, 3, 1, 1, 1), False),
        "strided dilated": (torch.nn.Conv2d(4, 4, 3, 2, 2, 2), False),
        "dilated, other padding": (torch.nn.Conv2d(4, 4, 3, 1, 1, 2), False),
        "grouped dilated": (torch.nn.Conv2d(4, 4, 3, 1, 2, 2, groups=2), False),
    }
    for name, (conv, rearranged) in convs.items():
        conv = conv.double()
        conv.space_to_batch = True
        calls.clear()
        got = convolve(conv, x, conv.weight, conv.bias)
        assert calls == ([2] if rearranged else []), name
        torch.testing.assert_close(got, conv(x), rtol=1e-12, atol=1e-12, msg=name)
        conv.space_to_batch = False  # and never without the option
        calls.clear()
        convolve(conv, x, conv.weight, conv.bias)
        assert calls == [], name


@pytest.mark.parametrize("fold_norm", [False, True])
def test_a_space_to_batch_resnet_is_the_same_network(fold_norm, monkeypatch):
    from tests.test_fold_norm import randomise_norms

    # DeepLab-v2's layout: layer3 at dilation 2, layer4 at 4.
    options = dict(depth=50, width=0.125, strides=[2, 2, 1, 1], dilations=[1, 1, 2, 4],
                   stride_in_1x1=True, stem_pool_ceil=True, freeze_stem=False)
    torch.manual_seed(0)
    plain = ResNet(**options).double()
    randomise_norms(plain, 3, mild=True)
    rearranged = ResNet(**options, fold_norm=fold_norm, space_to_batch=True).double()
    assert list(rearranged.state_dict()) == list(plain.state_dict())
    rearranged.load_state_dict(plain.state_dict())
    for a, b in zip(rearranged.modules(), plain.modules(), strict=True):
        if isinstance(a, torch.nn.BatchNorm2d):
            a.eps = b.eps  # not in the state dict
    dilations = []

    def counted(x, weight, bias, dilation):
        dilations.append(dilation)
        return space_to_batch_conv(x, weight, bias, dilation)

    monkeypatch.setattr(resnet, "space_to_batch_conv", counted)
    images = torch.randn(2, 3, 45, 38, dtype=torch.float64)  # odd feature sizes at stride 8
    plain_out, rearranged_out = plain(images), rearranged(images)
    assert sorted(dilations) == [2] * 6 + [4] * 3  # every block of layer3 and layer4
    assert rearranged_out.shape == plain_out.shape == (2, 256, 6, 5)
    torch.testing.assert_close(rearranged_out, plain_out, rtol=1e-9, atol=1e-9)
    upstream = torch.randn_like(plain_out)
    (plain_out * upstream).sum().backward()
    (rearranged_out * upstream).sum().backward()
    plain_grads = dict(plain.named_parameters())
    for name, parameter in rearranged.named_parameters():
        torch.testing.assert_close(parameter.grad, plain_grads[name].grad, rtol=1e-8,
                                   atol=1e-8, msg=name)


def test_the_option_reaches_the_network_from_a_config_or_a_checkpoint():
    config = load_config(None, ["seg.backbone.space_to_batch=true"])
    for source in (config.seg.backbone, {"depth": 18, "space_to_batch": True}):
        model = resnet_from_config(source)
        assert all(m.space_to_batch for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    older = resnet_from_config({"depth": 18})  # checkpoints written before the option
    assert not any(m.space_to_batch for m in older.modules()
                   if isinstance(m, torch.nn.Conv2d))
    defaults = load_config(None, [])
    assert defaults.backbone.space_to_batch is False
    assert defaults.seg.backbone.space_to_batch is False
    assert load_config("voc12", []).seg.backbone.space_to_batch is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_space_to_batch_on_the_gpu_matches_the_dilated_kernels():
    """bf16 channels_last (the seg stage's fast options): within bf16's rounding of the
    dilated convolution; float32 (TF32 off) to float32 rounding."""
    torch.backends.cudnn.allow_tf32 = False
    generator = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        x = torch.randn(4, 64, 41, 41, device="cuda", generator=generator).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(64, 64, 3, 3, device="cuda", generator=generator) / 24).to(dtype)
        weight = weight.contiguous(memory_format=torch.channels_last)
        for dilation in (2, 4):
            expected = F.conv2d(x.double(), weight.double(), None, 1, dilation, dilation)
            got = space_to_batch_conv(x, weight, None, dilation)
            assert got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)
