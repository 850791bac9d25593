"""amnseg checkpoints: weights plus what is needed to rebuild the model and check its fit.

Layout: ``{"format": "amnseg", "stage": "cam" | "amn" | ..., "class_names": [...],
"backbone": {...BackboneConfig...}, "model": state_dict, **extra}``; loaded with
``weights_only=True`` (no arbitrary unpickling).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from amnseg.config import BackboneConfig
from amnseg.errors import AmnsegError
from amnseg.io import load_checkpoint, save_checkpoint
from amnseg.models.resnet import ResNet


def save_model(
    path: Path,
    stage: str,
    model: nn.Module,
    class_names: list[str],
    backbone: BackboneConfig,
    **extra: Any,
) -> Path:
    backbone_dict = dataclasses.asdict(backbone)
    backbone_dict["pretrained"] = None  # the weights are in the checkpoint now
    save_checkpoint(
        path,
        {
            "format": "amnseg",
            "stage": stage,
            "class_names": list(class_names),
            "backbone": backbone_dict,
            "model": model.state_dict(),
            **extra,
        },
    )
    return path


def load_model_checkpoint(path: Path, stage: str, class_names: list[str]) -> dict[str, Any]:
    """Load an amnseg checkpoint of ``stage`` and check it is for ``len(class_names)`` classes."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("format") != "amnseg" or checkpoint.get("stage") != stage:
        found = checkpoint.get("stage", "unknown") if checkpoint.get("format") == "amnseg" else None
        what = f"an amnseg {found} checkpoint" if found else "not an amnseg checkpoint"
        raise AmnsegError(f"{path}: expected an amnseg {stage} checkpoint, found {what}")
    saved = checkpoint["class_names"]
    if len(saved) != len(class_names):
        raise AmnsegError(
            f"{path}: checkpoint is for {len(saved)} classes, the dataset has {len(class_names)}"
        )
    return checkpoint


def backbone_from_checkpoint(checkpoint: dict[str, Any]) -> ResNet:
    saved = checkpoint["backbone"]
    return ResNet(
        depth=saved["depth"],
        width=saved["width"],
        strides=saved["strides"],
        norm=saved["norm"],
        freeze_conv1=saved["freeze_conv1"],
    )
