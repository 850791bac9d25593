"""Atrous spatial pyramid pooling as DeepLab-v2 (and the AMN head) use it: parallel dilated
3x3 convs whose outputs are summed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        return sum(dilated_conv(conv, x) for conv in self.children())


def dilated_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 3x3 conv padded by its dilation, without the taps that only ever read
    padding: when the rate is at least the map's height, the kernel's top and bottom rows fall
    outside the map for every output pixel (likewise columns and width), so they add exact
    zeros. Dropping them is the same sum (up to floating-point order) and gradient (theirs is
    zero either way), and much less work on small maps, where the backward pass does not skip
    padding: the demo's 12x12 and 16x16 maps, DeepLab's 0.5 scale of a 321 crop."""
    rate_y, rate_x = conv.dilation
    skip_rows, skip_cols = rate_y >= x.shape[-2], rate_x >= x.shape[-1]
    if not (skip_rows or skip_cols):
        return conv(x)
    rows = slice(1, 2) if skip_rows else slice(None)
    cols = slice(1, 2) if skip_cols else slice(None)
    padding = (0 if skip_rows else rate_y, 0 if skip_cols else rate_x)
    return F.conv2d(x, conv.weight[:, :, rows, cols], conv.bias, padding=padding,
                    dilation=conv.dilation)
