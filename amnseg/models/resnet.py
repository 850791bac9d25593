"""ResNet backbone with torchvision's state-dict layout, configurable depth, width and strides.

Differences from torchvision's classifier: no ``avgpool``/``fc`` (we only need features), a
``width`` multiplier for tiny test networks, per-stage strides (the reference uses
(2, 2, 2, 1): conv1 stride 2, a fixed stride-2 max-pool, then layer2/3/4 strides 2, 2, 1, so
features come at 1/16 of the input), and BatchNorm layers whose statistics can be fixed.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from amnseg.errors import AmnsegError
from amnseg.io import check_tensors, load_tensors


class FixedStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics, which never change.

    As in the reference, only the statistics are fixed: the affine ``weight`` (gamma) and
    ``bias`` (beta) are ordinary parameters that an optimiser may train. It keeps BatchNorm2d's
    state-dict keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``), so ImageNet checkpoints load unchanged; ``model.train()`` changes
    nothing.
    """

    # Set by ``ResNet(fold_norm=True)``: the convolution before this layer applies it (conv_norm).
    fold = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel map this layer applies, ``x * scale + shift``; (C,) each."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale


def conv_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))``. When ``norm`` folds (fixed statistics, ``fold`` set), one convolution
    whose weight and bias carry the norm's per-channel map: the same function up to rounding
    (gradients reach the conv weight and gamma/beta through the product), without BatchNorm's
    passes over the activations, forward and backward, which on a GPU cost about as much as
    the convolutions themselves (benchmarks/RESULTS.md, "Segmentation stage on an H200: fused
    accumulation and folded BatchNorm")."""
    if not getattr(norm, "fold", False):
        return norm(convolve(conv, x, conv.weight, conv.bias))
    scale, shift = norm.scale_shift()
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return convolve(conv, x, weight, shift)


def convolve(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s convolution of ``x`` with ``weight`` and ``bias`` in its place. A dilated
    "same" convolution of a ResNet built with ``space_to_batch`` runs as
    :func:`space_to_batch_conv`."""
    dilation = conv.dilation[0]
    if (getattr(conv, "space_to_batch", False) and dilation > 1 and conv.groups == 1
            and conv.stride == (1, 1) and conv.dilation == (dilation, dilation)
            and conv.padding == tuple(dilation * (k - 1) // 2 for k in conv.kernel_size)):
        return space_to_batch_conv(x, weight, bias, dilation)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def space_to_batch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        dilation: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation * (k - 1) // 2, dilation=dilation)`` for an
    odd k x k ``weight``, computed without dilation: (B, C, H, W) -> (B, O, H, W).

    Output pixel (i, j) of the dilated convolution reads only pixels of its own phase
    (i mod d, j mod d). So ``x``, zero-padded to multiples of d (where the dilated
    convolution's own zero padding reads zeros too), is cut into its d * d phases, each a
    (ceil(H / d), ceil(W / d)) image; one undilated convolution runs over all of them as a
    batch, and the outputs are interleaved back. Every output is the same sum of products in
    another order, from ordinary convolution kernels (on an H100 the two rearranging copies
    cost more than the dilated kernels do, unless torch.compile fuses them: benchmarks/
    RESULTS.md, "Dilated convolutions: as dilated kernels and space to batch"). The work
    happens on channels-last views, the layout the GPU options use, where each rearrangement
    is a single copy; the result has the input's memory format."""
    batch, channels, height, width = x.shape
    rows, cols = -(-height // dilation), -(-width // dilation)
    padded = F.pad(x, (0, cols * dilation - width, 0, rows * dilation - height))
    # (B, rows * d, cols * d, C) -> (B, d, d, rows, cols, C): phase (p, q) holds the pixels
    # (p + d * r, q + d * c).
    phases = (padded.permute(0, 2, 3, 1)
              .reshape(batch, rows, dilation, cols, dilation, channels)
              .permute(0, 2, 4, 1, 3, 5)
              .reshape(batch * dilation * dilation, rows, cols, channels)
              .permute(0, 3, 1, 2))
    out = F.conv2d(phases, weight, bias, 1, tuple((k - 1) // 2 for k in weight.shape[-2:]))
    out_channels = out.shape[1]
    merged = (out.permute(0, 2, 3, 1)
              .reshape(batch, dilation, dilation, rows, cols, out_channels)
              .permute(0, 3, 1, 4, 2, 5)
              .reshape(batch, rows * dilation, cols * dilation, out_channels)
              [:, :height, :width].permute(0, 3, 1, 2))
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    return merged.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class ConvNorm(nn.Sequential):
    """A convolution then its norm (keys ``0.*``, ``1.*``, as torchvision's downsample)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.BatchNorm2d):
        super().__init__(conv, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_norm(self[0], self[1], x)


NORMS = ("frozen", "batch")


def make_norm(kind: str, channels: int) -> nn.BatchNorm2d:
    """``frozen``: fixed statistics (the reference); ``batch``: ordinary BatchNorm."""
    if kind == "frozen":
        return FixedStatsBatchNorm2d(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise AmnsegError(f"backbone.norm={kind!r}: expected one of {', '.join(NORMS)}")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34), both with ``dilation``.

    (B, in, H, W) -> (B, planes, H/stride, W/stride).
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int, norm: str, dilation: int = 1,
        stride_in_1x1: bool = False,  # no 1x1 conv here: accepted for a uniform signature
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (with ``dilation``) -> 1x1 (ResNet-50/101).

    The stride sits on the 3x3 conv (torchvision), or on the first 1x1 conv with
    ``stride_in_1x1`` (the original Caffe ResNet that DeepLab-v2 uses).
    (B, in, H, W) -> (B, 4 * planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, norm: str, dilation: int = 1,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride_1x1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride_3x3, dilation, dilation, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = make_norm(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        return self.relu(out + identity)


def _downsample(inplanes: int, outplanes: int, stride: int, norm: str) -> ConvNorm | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return ConvNorm(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False),
                    make_norm(norm, outplanes))


ARCHITECTURES: dict[int, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}


class ResNet(nn.Module):
    """ResNet feature extractor.

    Input (B, 3, H, W) normalised RGB. ``forward`` returns layer4 features
    (B, ``out_channels``, H / ``output_stride``, W / ``output_stride``) (sizes rounded up);
    ``forward_levels`` returns the five levels [stem, layer1, ..., layer4] that IRN uses.

    ``strides``: conv1's stride and the strides of layer2, layer3, layer4. ``dilations``: of the
    3x3 convs of layer1..layer4 (every block of a layer; DeepLab-v2: 1, 1, 2, 4).
    ``stride_in_1x1``: Caffe's block layout (stride on the first 1x1 conv).
    ``stem_pool_ceil``: the stem's max-pool rounds its output size up (Caffe, DeepLab-v2).
    ``fold_norm``: each frozen BatchNorm is applied by the convolution before it (``conv_norm``;
    needs ``norm="frozen"``). ``space_to_batch``: dilated 3x3 convs run as undilated ones over
    their interleaved sub-grids (``space_to_batch_conv``).
    """

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        strides: tuple[int, ...] | list[int] = (2, 2, 2, 1),
        norm: str = "frozen",
        freeze_stem: bool = True,
        dilations: tuple[int, ...] | list[int] = (1, 1, 1, 1),
        stride_in_1x1: bool = False,
        stem_pool_ceil: bool = False,
        fold_norm: bool = False,
        space_to_batch: bool = False,
    ):
        super().__init__()
        if fold_norm and norm != "frozen":
            raise AmnsegError(f"backbone.fold_norm=true needs backbone.norm=frozen, not {norm!r} "
                              "(BatchNorm that normalises with batch statistics cannot be folded)")
        if depth not in ARCHITECTURES:
            raise AmnsegError(f"backbone.depth={depth}: expected one of {sorted(ARCHITECTURES)}")
        if len(strides) != 4:
            raise AmnsegError(f"backbone.strides={list(strides)}: expected four strides")
        if len(dilations) != 4:
            raise AmnsegError(f"backbone.dilations={list(dilations)}: expected four dilations")
        block, counts = ARCHITECTURES[depth]
        widths = [max(1, int(round(w * width))) for w in (64, 128, 256, 512)]
        self.depth = depth
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, strides[0], 3, bias=False)
        self.bn1 = make_norm(norm, widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=stem_pool_ceil)
        layer_strides = [1, strides[1], strides[2], strides[3]]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(block, widths[i], counts[i], layer_strides[i], norm, dilations[i],
                             stride_in_1x1)
            for i in range(4)
        )
        self.level_channels = [widths[0]] + [w * block.expansion for w in widths]
        self.out_channels = self.level_channels[-1]
        stem_stride = 2 * strides[0]  # conv1, then the stride-2 max-pool
        self.level_strides = [
            stem_stride,
            stem_stride,
            stem_stride * strides[1],
            stem_stride * strides[1] * strides[2],
            stem_stride * strides[1] * strides[2] * strides[3],
        ]
        self.output_stride = self.level_strides[-1]
        self._init_weights()
        for module in self.modules():
            if isinstance(module, FixedStatsBatchNorm2d):
                module.fold = fold_norm
            if isinstance(module, nn.Conv2d):
                module.space_to_batch = space_to_batch
        if freeze_stem:
            for parameter in (*self.conv1.parameters(), *self.bn1.parameters()):
                parameter.requires_grad_(False)

    def _make_layer(
        self, block, planes: int, count: int, stride: int, norm: str, dilation: int,
        stride_in_1x1: bool,
    ) -> nn.Sequential:
        blocks = [block(self.inplanes, planes, stride, norm, dilation, stride_in_1x1)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes, 1, norm, dilation, stride_in_1x1)
                   for _ in range(1, count)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, level_channels[0], H / (2 * strides[0]), ...)."""
        return self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = [self.stem(x)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            levels.append(layer(levels[-1]))
        return levels


def resnet_from_config(config) -> ResNet:
    """The (untrained) ResNet of a ``BackboneConfig``, or of its dict form in a checkpoint."""
    get = config.get if isinstance(config, dict) else lambda key, default: getattr(
        config, key, default)
    return ResNet(
        depth=get("depth", 50),
        width=get("width", 1.0),
        strides=get("strides", (2, 2, 2, 1)),
        norm=get("norm", "frozen"),
        # checkpoints written before the option's rename call it freeze_conv1
        freeze_stem=get("freeze_stem", get("freeze_conv1", True)),
        dilations=get("dilations", (1, 1, 1, 1)),
        stride_in_1x1=get("stride_in_1x1", False),
        stem_pool_ceil=get("stem_pool_ceil", False),
        fold_norm=get("fold_norm", False),
        space_to_batch=get("space_to_batch", False),
    )


def build_backbone(config, key: str = "backbone.pretrained") -> ResNet:
    """Build the backbone of a ``BackboneConfig`` and load its ImageNet weights if asked
    (``key`` names the option in errors)."""
    model = resnet_from_config(config)
    if config.pretrained:
        load_imagenet_weights(model, config.pretrained, key)
    return model


# torchvision's original ImageNet files (the ones the reference loads); the part of the name
# after the dash is the start of the file's SHA-256, checked on download.
IMAGENET_URLS = {
    depth: f"https://download.pytorch.org/models/resnet{depth}-{digest}.pth"
    for depth, digest in ((18, "5c106cde"), (34, "333f7ec4"), (50, "19c8e357"),
                          (101, "5d3b4d8f"))
}


def _download_weights(url: str, key: str) -> dict[str, torch.Tensor]:
    """Weights from ``url`` via the torch hub cache: downloaded once (the SHA-256 prefix in the
    file's name checked; the file appears only when complete), then read as any weights file is
    (``load_tensors``: nothing but tensors and plain containers is unpickled)."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
    if not cache.is_file():
        digest = torch.hub.HASH_REGEX.search(cache.name)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cache), digest.group(1) if digest else None,
                                           progress=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
            reason = str(getattr(exc, "reason", exc)).strip().splitlines()[0]
            raise AmnsegError(
                f"{url}: ImageNet weights could not be downloaded ({reason}); put the file at "
                f"{cache}, set {key}=/path/to/weights.pth, or use {key}=null to start from "
                "random weights"
            ) from None
    return load_tensors(cache, "weights file")


def _read_weights(path: Path, key: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AmnsegError(
            f"{path}: ImageNet weights not found ({key}; {key}=null starts from random weights)"
        )
    return load_tensors(path, "weights file")


def load_imagenet_weights(
    model: ResNet, source: str | Path, key: str = "backbone.pretrained"
) -> None:
    """Load torchvision-format ImageNet weights (``fc.*`` is ignored).

    ``source``: ``hub`` (torchvision's file for the model's depth, from the torch hub cache or
    downloaded into it), a URL, or a file path. ``key``: the option that gave it, for errors.
    """
    text = str(source)
    if text == "hub":
        if model.depth not in IMAGENET_URLS:
            raise AmnsegError(f"{key}=hub: no ImageNet file for depth {model.depth}")
        text = IMAGENET_URLS[model.depth]
    if "://" in text:
        state, where = _download_weights(text, key), text
    else:
        state, where = _read_weights(Path(text), key), text
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AmnsegError(f"{where}: not a state dict of weights")
    check_tensors(state, where, "a state dict of weights")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        if unexpected and all(k.startswith("module.") for k in unexpected):
            raise AmnsegError(f"{where}: its keys start with 'module.' (saved from DataParallel "
                              "or DistributedDataParallel): save model.module.state_dict() "
                              "instead, or strip the prefix")
        problem = (
            f"missing {missing[0]}" if missing
            else f"unexpected {unexpected[0]}" if unexpected
            else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
            f"the model wants {tuple(own[wrong[0]].shape)}"
        )
        raise AmnsegError(
            f"{where}: weights do not fit ResNet-{model.depth} (width "
            f"{own['conv1.weight'].shape[0]} stem channels): {problem}"
        )
    model.load_state_dict(state, strict=False)
