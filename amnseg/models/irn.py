"""The inter-pixel relation network's boundary branch (IRN, METHOD.md section 5).

A frozen backbone gives five feature levels; each goes through a 1x1 conv to 32 channels,
GroupNorm(4, 32) and ReLU (levels 3-5 upsampled to stride 4 *before* the ReLU and cropped, as in
the reference); the 160 concatenated channels give one boundary logit per stride-4 pixel.
Module names follow the reference checkpoint (``fc_edge1`` .. ``fc_edge6``).
"""

from __future__ import annotations

import torch
from torch import nn

from amnseg.models.resnet import ResNet


def _edge_level(in_channels: int, upsample: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 1, bias=False), nn.GroupNorm(4, 32)]
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BoundaryNet(nn.Module):
    """images (B, 3, H, W) -> boundary logits (B, 1, (H - 1) // 4 + 1, (W - 1) // 4 + 1).

    The backbone is frozen: kept in eval mode and run without gradient.
    """

    def __init__(self, backbone: ResNet):
        super().__init__()
        self.backbone = backbone
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        strides = backbone.level_strides
        for index, (channels, stride) in enumerate(
            zip(backbone.level_channels, strides, strict=True), start=1
        ):
            self.add_module(f"fc_edge{index}", _edge_level(channels, stride // strides[0]))
        self.fc_edge6 = nn.Conv2d(32 * 5, 1, 1, bias=True)

    def train(self, mode: bool = True) -> BoundaryNet:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics and all weights stay as loaded
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            levels = self.backbone.forward_levels(images)
        heads = [self.fc_edge1, self.fc_edge2, self.fc_edge3, self.fc_edge4, self.fc_edge5]
        edges = [head(level) for head, level in zip(heads, levels, strict=True)]
        height, width = edges[1].shape[-2:]
        edges = [edge[..., :height, :width] for edge in edges]
        return self.fc_edge6(torch.cat(edges, dim=1))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]
