"""Networks: the ResNet backbone and the per-stage models built on it."""

from amnseg.models.cam import CAMNet
from amnseg.models.resnet import (
    FixedStatsBatchNorm2d,
    ResNet,
    build_backbone,
    load_imagenet_weights,
)

__all__ = ["CAMNet", "FixedStatsBatchNorm2d", "ResNet", "build_backbone", "load_imagenet_weights"]
