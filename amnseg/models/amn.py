"""The activation manipulation network (AMN, METHOD.md section 4).

Backbone features are multiplied channel-wise by an encoding of the image-level label ("label
conditioning"), then a dropout + ASPP head predicts C + 1 classes (background first) per pixel.
"""

from __future__ import annotations

import torch
from torch import nn

from amnseg.models.aspp import ASPP
from amnseg.models.resnet import ResNet


class AMN(nn.Module):
    """images (B, 3, H, W) + labels (B, C) multi-hot -> logits (B, C + 1, H / s, W / s).

    ``label_enc`` is Linear(C -> backbone channels); ``classifier`` is Dropout(0.1) + ASPP.
    """

    def __init__(self, backbone: ResNet, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.label_enc = nn.Linear(num_classes, backbone.out_channels)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), ASPP(backbone.out_channels, num_classes + 1)
        )

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, C) labels -> (B, channels, 1, 1) multipliers of the backbone features."""
        return self.label_enc(labels)[:, :, None, None]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images) * self.conditioning(labels))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, new-layer parameters) for the two learning rates."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        new = list(self.label_enc.parameters()) + list(self.classifier.parameters())
        return backbone, new
