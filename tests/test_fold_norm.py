"""``backbone.fold_norm``: each frozen BatchNorm applied inside the convolution before it
(amnseg/models/resnet.py, ``conv_norm``). Checked in float64 against BatchNorm written out by
hand and against the unfolded network with the same weights, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amnseg.config import load_config
from amnseg.errors import AmnsegError
from amnseg.models.resnet import FixedStatsBatchNorm2d, ResNet, conv_norm, resnet_from_config


def randomise_norms(model: torch.nn.Module, seed: int, mild: bool = False) -> None:
    """Statistics and affine far from the identity (variances near eps, so eps counts; values
    then grow by orders of magnitude through a deep net, which only float64 holds). ``mild``:
    variances around 1 and gamma below 1, for float32."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FixedStatsBatchNorm2d):
            size = module.num_features
            draw = torch.rand(size, generator=generator)
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(size, generator=generator))
                module.running_var.copy_(draw + 0.5 if mild else draw * 0.01 + 1e-4)
                module.weight.copy_(torch.randn(size, generator=generator) * (0.3 if mild else 1))
                module.bias.copy_(torch.randn(size, generator=generator))
                module.eps = 1e-3


def by_hand(x, conv, norm):
    """Convolution, then (y - mean) / sqrt(var + eps) * gamma + beta, written out."""
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    column = (1, -1, 1, 1)
    return ((y - norm.running_mean.reshape(column))
            / torch.sqrt(norm.running_var.reshape(column) + norm.eps)
            * norm.weight.reshape(column) + norm.bias.reshape(column))


@pytest.mark.parametrize("bias", [True, False])
def test_conv_norm_is_the_convolution_then_the_norm(bias):
    torch.manual_seed(0)
    # stride, padding and dilation all differ, so swapping any two changes the output.
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=3, dilation=2, bias=bias).double()
    norm = FixedStatsBatchNorm2d(6).double()
    randomise_norms(norm, 1)
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64, requires_grad=True)
    # A norm folds only when asked (ResNet(fold_norm=True)): until then, the layers as they are.
    torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)), rtol=0, atol=0)
    norm.fold = True
    folded = conv_norm(conv, norm, x)
    expected = by_hand(x, conv, norm)
    assert folded.shape == expected.shape == (2, 6, 7, 6)
    torch.testing.assert_close(folded, expected, rtol=1e-12, atol=1e-12)
    # The gradients reach the input, the conv weight and bias, and gamma/beta through the fold.
    upstream = torch.randn_like(expected)
    params = [x, conv.weight, norm.weight, norm.bias, *([conv.bias] if bias else [])]
    got = torch.autograd.grad(folded, params, upstream)
    want = torch.autograd.grad(expected, params, upstream)
    for name, a, b in zip(["x", "weight", "gamma", "beta", "bias"], got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


LAYOUTS = {
    "resnet18": dict(depth=18, width=0.25),
    # DeepLab-v2's layout: dilations, the stride on the first 1x1 conv, ceil max-pool.
    "deeplab50": dict(depth=50, width=0.125, strides=[2, 2, 1, 1], dilations=[1, 1, 2, 4],
                      stride_in_1x1=True, stem_pool_ceil=True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_folded_resnet_is_the_same_network(layout):
    options = dict(LAYOUTS[layout], freeze_stem=False)
    torch.manual_seed(0)
    plain = ResNet(**options).double()
    randomise_norms(plain, 2)
    folded = ResNet(**options, fold_norm=True).double()
    assert list(folded.state_dict()) == list(plain.state_dict())  # checkpoints load as before
    folded.load_state_dict(plain.state_dict())
    for module in folded.modules():
        if isinstance(module, FixedStatsBatchNorm2d):
            module.eps = 1e-3  # not in the state dict
    norms = [m for m in folded.modules() if isinstance(m, FixedStatsBatchNorm2d)]
    assert norms and all(m.fold for m in norms)
    assert not any(m.fold for m in plain.modules() if isinstance(m, FixedStatsBatchNorm2d))

    images = torch.randn(2, 3, 37, 29, dtype=torch.float64)
    plain_levels, folded_levels = plain.forward_levels(images), folded.forward_levels(images)
    weights = [torch.randn_like(level) for level in plain_levels]
    for levels in (plain_levels, folded_levels):
        sum((w * level).sum() for w, level in zip(weights, levels, strict=True)).backward()
    for a, b in zip(folded_levels, plain_levels, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    plain_grads = dict(plain.named_parameters())
    for name, parameter in folded.named_parameters():
        torch.testing.assert_close(parameter.grad, plain_grads[name].grad, rtol=1e-8,
                                   atol=1e-8, msg=name)


def test_the_option_reaches_the_network_from_a_config_or_a_checkpoint():
    config = load_config(None, ["backbone.fold_norm=true", "backbone.depth=18"])
    for source in (config.backbone, {"depth": 18, "fold_norm": True}):
        model = resnet_from_config(source)
        assert all(m.fold for m in model.modules() if isinstance(m, FixedStatsBatchNorm2d))
    older = resnet_from_config({"depth": 18})  # checkpoints written before the option
    assert not any(m.fold for m in older.modules() if isinstance(m, FixedStatsBatchNorm2d))
    assert load_config(None, []).backbone.fold_norm is False
    assert load_config(None, []).seg.backbone.fold_norm is False


def test_folding_batch_statistics_is_refused():
    with pytest.raises(AmnsegError, match="fold_norm=true needs backbone.norm=frozen"):
        ResNet(depth=18, width=0.25, norm="batch", fold_norm=True)
    for prefix in ("backbone", "seg.backbone"):
        with pytest.raises(AmnsegError, match=f"^{prefix}.fold_norm=True: needs {prefix}.norm"
                           "=frozen"):
            load_config(None, [f"{prefix}.norm=batch", f"{prefix}.fold_norm=true"])
    with pytest.raises(AmnsegError, match="backbone.fold_norm: Value 'maybe' is not a valid bool"):
        load_config(None, ["backbone.fold_norm=maybe"])


def test_the_option_changes_the_fingerprints_of_the_stages_that_train_that_network():
    from amnseg.pipeline import STAGES, fingerprint

    base = load_config(None, [])
    for option, trained in (("backbone.fold_norm=true", {"cam", "amn", "irn"}),
                            ("seg.backbone.fold_norm=true", {"seg", "seg_gt"})):
        changed = load_config(None, [option])
        differs = {stage.name for stage in STAGES
                   if fingerprint(stage, base, "") != fingerprint(stage, changed, "")}
        assert differs == trained, option


@pytest.mark.gpu
def test_folding_on_cuda_in_channels_last_matches_the_cpu_network():
    """cuDNN with NHWC weights made by the product: the float64 CPU network's levels."""
    options = dict(LAYOUTS["deeplab50"], freeze_stem=False)
    torch.manual_seed(0)
    plain = ResNet(**options).double()
    randomise_norms(plain, 3, mild=True)
    folded = ResNet(**options, fold_norm=True)
    folded.load_state_dict(plain.state_dict())
    for module in folded.modules():
        if isinstance(module, FixedStatsBatchNorm2d):
            module.eps = 1e-3
    folded = folded.cuda().to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 37, 29, dtype=torch.float64)
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        levels = folded.forward_levels(
            images.float().cuda().contiguous(memory_format=torch.channels_last))
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    for got, want in zip(levels, plain.forward_levels(images), strict=True):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)
