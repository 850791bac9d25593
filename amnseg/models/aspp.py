"""Atrous spatial pyramid pooling as DeepLab-v2 (and the AMN head) use it: parallel dilated
3x3 convs whose outputs are summed."""

from __future__ import annotations

import torch
from torch import nn


class ASPP(nn.Module):
    """Sum of parallel dilated 3x3 convs (``c0``..``c3``), weights N(0, 0.01), bias 0.

    (B, in_channels, h, w) -> (B, out_channels, h, w).
    """

    def __init__(self, in_channels: int, out_channels: int, rates=(6, 12, 18, 24)):
        super().__init__()
        for index, rate in enumerate(rates):
            conv = nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=True)
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
            self.add_module(f"c{index}", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.children())
