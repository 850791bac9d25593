"""DeepLab-v2 (ResNet-101, ASPP) with the multi-scale wrapper, as the segmentation stage trains
it (METHOD.md section 6, the recipe of kazuto1011/deeplab-pytorch that the WSSS literature uses).

The backbone is the package's ``ResNet`` with DeepLab's options: output stride 8 (layer3 and
layer4 keep stride 1 with dilations 2 and 4), Caffe's block layout (stride on the first 1x1
conv) and Caffe's rounding-up stem max-pool.

Inputs follow the weights the network starts from: ``caffe`` (the recipe's, for its
Caffe-converted files): BGR, 0-255, minus ``DEEPLAB_MEAN_BGR``, no division by a standard
deviation; ``imagenet`` (torchvision's weights, and the package's own backbones): RGB / 255
minus ImageNet's mean, divided by its std (``amnseg.data.transforms.deeplab_input``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amnseg.models.aspp import ASPP
from amnseg.models.resnet import ResNet

MSC_SCALES = (0.5, 0.75)  # besides 1.0


class DeepLabV2(nn.Module):
    """images (B, 3, H, W) -> logits (B, num_classes, h, w) at the backbone's output stride
    (8 with DeepLab's backbone: h = ceil(H / 8) up to the stem's rounding)."""

    def __init__(self, backbone: ResNet, num_classes: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, num_classes, rates)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone(images))


class MSC(nn.Module):
    """Multi-scale inputs, pixel-wise max of the logits.

    The image at scale 1 and resized by each of ``scales`` (bilinear, align_corners=False,
    ``scale_factor`` as given); each scale's logits are resized to the scale-1 logit size and
    fused by a pixel-wise max. ``forward`` in training returns [scale-1 logits, logits of each
    scale at their own size, fused max] (every one gets a loss); in eval the fused logits.
    """

    def __init__(self, base: DeepLabV2, scales: Sequence[float] = MSC_SCALES,
                 input_kind: str = "caffe"):
        super().__init__()
        self.base = base
        self.scales = tuple(scales)
        self.input_kind = input_kind  # how images are normalised for it (deeplab_input)

    def pyramid(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(scale-1 logits, [logits of each scale at their own size])."""
        logits = self.base(images)
        others = [
            self.base(F.interpolate(images, scale_factor=scale, mode="bilinear",
                                    align_corners=False))
            for scale in self.scales
        ]
        return logits, others

    def fuse(self, logits: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
        size = logits.shape[-2:]
        resized = [F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                   for o in others]
        return torch.stack([logits, *resized]).amax(dim=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        logits, others = self.pyramid(images)
        fused = self.fuse(logits, others)
        return [logits, *others, fused] if self.training else fused

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """(every backbone conv weight, ASPP weights, ASPP biases): the recipe's 1x, 10x and 20x
        learning-rate groups. BatchNorm parameters are in none: they stay as initialised."""
        convs = [m.weight for m in self.base.backbone.modules() if isinstance(m, nn.Conv2d)]
        aspp = [m for m in self.base.aspp.children() if isinstance(m, nn.Conv2d)]
        return convs, [m.weight for m in aspp], [m.bias for m in aspp]
