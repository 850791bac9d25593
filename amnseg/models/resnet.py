"""ResNet backbone with torchvision's state-dict layout, configurable depth, width and strides.

Differences from torchvision's classifier: no ``avgpool``/``fc`` (we only need features), a
``width`` multiplier for tiny test networks, per-stage strides (the reference uses
(2, 2, 2, 1): conv1 stride 2, a fixed stride-2 max-pool, then layer2/3/4 strides 2, 2, 1, so
features come at 1/16 of the input), and BatchNorm layers that can be frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from amnseg.errors import AmnsegError


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics and never trains.

    It keeps BatchNorm2d's state-dict keys (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so ImageNet checkpoints load unchanged, but
    ``model.train()`` changes nothing: the statistics are never updated.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def make_norm(kind: str, channels: int) -> nn.BatchNorm2d:
    if kind == "frozen":
        return FrozenBatchNorm2d(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise AmnsegError(f"backbone.norm={kind!r}: expected 'frozen' or 'batch'")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). (B, in, H, W) -> (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1 (ResNet-50/101).

    (B, in, H, W) -> (B, 4 * planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = make_norm(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(inplanes: int, outplanes: int, stride: int, norm: str) -> nn.Sequential | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), make_norm(norm, outplanes)
    )


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
    """

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        strides: tuple[int, ...] | list[int] = (2, 2, 2, 1),
        norm: str = "frozen",
        freeze_conv1: bool = True,
    ):
        super().__init__()
        if depth not in ARCHITECTURES:
            raise AmnsegError(f"backbone.depth={depth}: expected one of {sorted(ARCHITECTURES)}")
        if len(strides) != 4:
            raise AmnsegError(f"backbone.strides={list(strides)}: expected four strides")
        block, counts = ARCHITECTURES[depth]
        widths = [max(1, int(round(w * width))) for w in (64, 128, 256, 512)]
        self.depth = depth
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, strides[0], 3, bias=False)
        self.bn1 = make_norm(norm, widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layer_strides = [1, strides[1], strides[2], strides[3]]
        self.layer1 = self._make_layer(block, widths[0], counts[0], layer_strides[0], norm)
        self.layer2 = self._make_layer(block, widths[1], counts[1], layer_strides[1], norm)
        self.layer3 = self._make_layer(block, widths[2], counts[2], layer_strides[2], norm)
        self.layer4 = self._make_layer(block, widths[3], counts[3], layer_strides[3], norm)
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
        if freeze_conv1:
            self.conv1.weight.requires_grad_(False)

    def _make_layer(self, block, planes: int, count: int, stride: int, norm: str) -> nn.Sequential:
        blocks = [block(self.inplanes, planes, stride, norm)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes, 1, norm) for _ in range(1, count)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, level_channels[0], H / (2 * strides[0]), ...)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = [self.stem(x)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            levels.append(layer(levels[-1]))
        return levels


def build_backbone(config) -> ResNet:
    """Build the backbone of a ``BackboneConfig`` and load its ImageNet weights if asked."""
    model = ResNet(
        depth=config.depth,
        width=config.width,
        strides=config.strides,
        norm=config.norm,
        freeze_conv1=config.freeze_conv1,
    )
    if config.pretrained:
        load_imagenet_weights(model, config.pretrained)
    return model


def find_hub_weights(depth: int) -> Path:
    """The torchvision ImageNet file for ``depth`` in the torch hub cache (no download)."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(hub_dir.glob(f"resnet{depth}-*.pth"))
    if not found:
        raise AmnsegError(
            f"{hub_dir}: no resnet{depth}-*.pth in the torch hub cache; "
            "download it once or set backbone.pretrained=/path/to/weights.pth"
        )
    return found[0]


def load_imagenet_weights(model: ResNet, source: str | Path) -> None:
    """Load torchvision-format ImageNet weights (``fc.*`` is ignored) from a path or ``hub``."""
    path = find_hub_weights(model.depth) if str(source) == "hub" else Path(source)
    if not path.is_file():
        raise AmnsegError(f"{path}: ImageNet weights not found (backbone.pretrained)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AmnsegError(f"{path}: not a readable weights file ({type(exc).__name__})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        problem = (
            f"missing {missing[0]}" if missing
            else f"unexpected {unexpected[0]}" if unexpected
            else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
            f"the model wants {tuple(own[wrong[0]].shape)}"
        )
        raise AmnsegError(
            f"{path}: weights do not fit ResNet-{model.depth} (width {own['conv1.weight'].shape[0]}"
            f" stem channels): {problem}"
        )
    model.load_state_dict(state, strict=False)
