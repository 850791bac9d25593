"""Building the stages' networks and their checkpoints: the one place every stage gets its
models from (new, from a checkpoint, or from the authors' files).

Checkpoint layout: ``{"format": "amnseg", "stage": "cam" | "amn" | ..., "class_names": [...],
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
from amnseg.models.amn import AMN
from amnseg.models.cam import CAMNet
from amnseg.models.irn import BoundaryNet
from amnseg.models.resnet import ResNet, build_backbone


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
    """Load a checkpoint of ``stage`` (amnseg's or the authors'), checking that it was made for
    exactly ``class_names`` (count, names and order)."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("format") != "amnseg" and any(k.startswith("resnet50.") for k in checkpoint):
        # An authors' checkpoint: convert it on the fly.
        return import_reference(stage, path, class_names)
    if checkpoint.get("format") != "amnseg" or checkpoint.get("stage") != stage:
        found = checkpoint.get("stage", "unknown") if checkpoint.get("format") == "amnseg" else None
        what = f"an amnseg {found} checkpoint" if found else "not an amnseg checkpoint"
        raise AmnsegError(f"{path}: expected an amnseg {stage} checkpoint, found {what}")
    saved = list(checkpoint["class_names"])
    if len(saved) != len(class_names):
        raise AmnsegError(
            f"{path}: checkpoint is for {len(saved)} classes, the dataset has {len(class_names)}"
        )
    if saved != list(class_names):
        index = next(i for i, (a, b) in enumerate(zip(saved, class_names, strict=True)) if a != b)
        raise AmnsegError(
            f"{path}: checkpoint class {index + 1} is {saved[index]!r}, the dataset's is "
            f"{class_names[index]!r} (a checkpoint is only valid for its own class list)"
        )
    return checkpoint


def backbone_from_checkpoint(checkpoint: dict[str, Any]) -> ResNet:
    saved = checkpoint["backbone"]
    return ResNet(
        depth=saved["depth"],
        width=saved["width"],
        strides=saved["strides"],
        norm=saved["norm"],
        # checkpoints written before the option's rename call it freeze_conv1
        freeze_stem=saved.get("freeze_stem", saved.get("freeze_conv1", True)),
    )


def new_model(stage: str, backbone: ResNet, num_classes: int, **options: Any) -> nn.Module:
    """An untrained network of ``stage`` (cam, amn, irn) on ``backbone``."""
    if stage == "cam":
        return CAMNet(backbone, num_classes)
    if stage == "amn":
        return AMN(backbone, num_classes, **options)
    if stage == "irn":
        return BoundaryNet(backbone)
    raise AmnsegError(f"unknown checkpoint kind {stage!r}: expected cam, amn or irn")


def build_model(checkpoint: dict[str, Any]) -> nn.Module:
    """The model of an amnseg checkpoint, with its weights loaded."""
    model = new_model(
        checkpoint["stage"], backbone_from_checkpoint(checkpoint), len(checkpoint["class_names"])
    )
    model.load_state_dict(checkpoint["model"])
    return model


def load_model(path: Path, stage: str, class_names: list[str]) -> nn.Module:
    """The trained network of ``stage`` in ``path`` (amnseg's or the authors' checkpoint)."""
    return build_model(load_model_checkpoint(path, stage, class_names))


def initial_backbone(
    backbone: BackboneConfig, source: str, stage: str, cam_checkpoint: Path,
    class_names: list[str],
) -> ResNet:
    """The backbone a later stage starts from: ``imagenet`` (the reference: ``backbone``'s
    weights, i.e. ImageNet when ``backbone.pretrained`` is set) or ``cam`` (the trained CAM
    classifier's backbone, ``cam_checkpoint``; for data far from ImageNet or without ImageNet
    weights)."""
    if source == "imagenet":
        return build_backbone(backbone)
    if source == "cam":
        return load_model(cam_checkpoint, "cam", class_names).backbone
    raise AmnsegError(f"{stage}.backbone_init={source!r}: expected imagenet or cam")


# --- the authors' checkpoints (res50_cam.pth, res50_amn.pth, res50_irn.pth) ----------------

REFERENCE_BACKBONE = BackboneConfig(depth=50, width=1.0, strides=[2, 2, 2, 1], norm="frozen",
                                    freeze_stem=True, pretrained=None)
# Canonical key prefixes of each reference file -> ours. Everything else in those files is an
# alias (stage*, backbone.*, newly_added.*, edge_layers.*, ...) or an instance-segmentation part
# we do not use (displacement branch, path index buffers).
REFERENCE_PREFIXES: dict[str, dict[str, str]] = {
    "cam": {"resnet50.": "backbone.", "classifier.": "classifier."},
    "amn": {"resnet50.": "backbone.", "label_enc.": "label_enc.", "classifier.": "classifier."},
    "irn": {"resnet50.": "backbone.", **{f"fc_edge{i}.": f"fc_edge{i}." for i in range(1, 7)}},
}
UNUSED_PREFIXES = ("fc_dp", "dp_layers.", "mean_shift.", "path_indices", "disp_target")


def reference_class_count(stage: str, state: dict[str, Any]) -> int | None:
    if stage == "cam" and "classifier.weight" in state:
        return int(state["classifier.weight"].shape[0])
    if stage == "amn" and "label_enc.weight" in state:
        return int(state["label_enc.weight"].shape[1])
    return None  # IRN's boundary branch does not depend on the classes


def _fingerprint(tensor) -> tuple:
    return (tuple(tensor.shape), str(tensor.dtype), tensor.double().sum().item(),
            tensor.double().abs().sum().item())


def import_reference(
    stage: str, source: Path, class_names: list[str], destination: Path | None = None
) -> dict[str, Any]:
    """Convert an authors' checkpoint into an amnseg checkpoint (written if ``destination``).

    Loads with ``weights_only=True``; checks that every aliased copy equals a canonical tensor,
    that the class count matches ``class_names`` and that every tensor fits our model.
    """
    state = load_checkpoint(source)
    if not isinstance(state, dict) or not state:
        raise AmnsegError(f"{source}: not a state dict")
    if state.get("format") == "amnseg":
        raise AmnsegError(f"{source}: already an amnseg checkpoint (nothing to import)")
    if stage not in REFERENCE_PREFIXES:
        raise AmnsegError(f"unknown checkpoint kind {stage!r}: expected cam, amn or irn")
    prefixes = REFERENCE_PREFIXES[stage]
    count = reference_class_count(stage, state)
    if count is not None and count != len(class_names):
        raise AmnsegError(
            f"{source}: checkpoint is for {count} classes, {len(class_names)} class names given"
        )
    canonical: dict[str, Any] = {}
    aliases: dict[str, Any] = {}
    for key, tensor in state.items():
        target = next((ours + key[len(ref):] for ref, ours in prefixes.items()
                       if key.startswith(ref)), None)
        if target is not None:
            canonical[target] = tensor
        elif not key.startswith(UNUSED_PREFIXES):
            aliases[key] = tensor
    known = {_fingerprint(t) for t in canonical.values()}
    for key, tensor in aliases.items():
        if hasattr(tensor, "shape") and tensor.numel() > 1 and _fingerprint(tensor) not in known:
            raise AmnsegError(
                f"{source}: aliased tensor {key} matches no canonical tensor (corrupt file?)"
            )
    model = new_model(stage, ResNet(depth=50), len(class_names))
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in canonical)
    if missing:
        raise AmnsegError(f"{source}: not a reference {stage} checkpoint: {missing[0]} is missing")
    for key, value in expected.items():
        if tuple(canonical[key].shape) != tuple(value.shape):
            raise AmnsegError(
                f"{source}: {key} has shape {tuple(canonical[key].shape)}, "
                f"expected {tuple(value.shape)}"
            )
    model.load_state_dict({k: canonical[k] for k in expected})
    checkpoint = {
        "format": "amnseg",
        "stage": stage,
        "class_names": list(class_names),
        "backbone": dataclasses.asdict(REFERENCE_BACKBONE),
        "model": model.state_dict(),
        "imported_from": str(source),
    }
    if destination is not None:
        save_checkpoint(destination, checkpoint)
    return checkpoint


def export_reference(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """An amnseg checkpoint's weights under the reference's canonical key names."""
    stage = checkpoint.get("stage")
    if checkpoint.get("format") != "amnseg" or stage not in REFERENCE_PREFIXES:
        raise AmnsegError("not an amnseg cam, amn or irn checkpoint")
    reverse = {ours: ref for ref, ours in REFERENCE_PREFIXES[stage].items()}
    exported = {}
    for key, tensor in checkpoint["model"].items():
        prefix = next(p for p in reverse if key.startswith(p))
        exported[reverse[prefix] + key[len(prefix):]] = tensor
    return exported
