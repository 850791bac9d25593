"""The CAM classifier: backbone -> global average pooling -> bias-free 1x1 conv (METHOD.md 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amnseg.models.resnet import ResNet


class CAMNet(nn.Module):
    """Multi-label classifier whose 1x1 classifier weights give class activation maps.

    ``forward``: images (B, 3, H, W) -> logits (B, C). The output of layer2 is detached, as in
    the reference: the stem, layer1 and layer2 receive no gradient.
    ``cam``: images (B, 3, H, W) -> ReLU'd activation maps (B, C, H / s, W / s), s the
    backbone's output stride.
    """

    # Its stem, layer1 and layer2 are trainable but sit behind the detach (see
    # training.for_training).
    has_unused_parameters = True

    def __init__(self, backbone: ResNet, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = net.layer2(net.layer1(net.stem(images))).detach()
        x = net.layer4(net.layer3(x))
        x = x.mean(dim=(2, 3), keepdim=True)
        return self.classifier(x).flatten(1)

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(self.backbone(images), self.classifier.weight))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, new-layer parameters) for the two learning rates."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = list(self.classifier.parameters())
        return backbone, head
