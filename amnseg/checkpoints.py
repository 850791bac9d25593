"""Building the stages' networks and their checkpoints: the one place every stage gets its
models from (new, from a checkpoint, or from the authors' files).

Checkpoint layout: ``{"format": "amnseg", "stage": "cam" | "amn" | ..., "class_names": [...],
"backbone": {...BackboneConfig...}, "model": state_dict, **extra}``; loaded with
``weights_only=True`` (no arbitrary unpickling).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amnseg import distributed
from amnseg.config import BackboneConfig, deeplab_backbone
from amnseg.data.transforms import INPUT_KINDS
from amnseg.errors import AmnsegError
from amnseg.io import check_tensors, first_non_finite, load_checkpoint, save_checkpoint
from amnseg.models.amn import AMN
from amnseg.models.cam import CAMNet
from amnseg.models.deeplab import MSC, MSC_SCALES, DeepLabV2
from amnseg.models.irn import BoundaryNet
from amnseg.models.resnet import ResNet, build_backbone, resnet_from_config


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
    return save_once(
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


def save_once(path: Path, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` from rank 0 only (under torchrun every rank holds the same weights);
    every rank returns once it is there."""
    if distributed.is_main():
        save_checkpoint(path, checkpoint)
    distributed.barrier()
    return path


def load_model_checkpoint(path: Path, stage: str, class_names: list[str]) -> dict[str, Any]:
    """Load a checkpoint of ``stage`` (amnseg's or the authors'), checking that it was made for
    exactly ``class_names`` (count, names and order)."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("format") != "amnseg" and any(k.startswith("resnet50.") for k in checkpoint):
        if stage not in REFERENCE_PREFIXES:
            kind = reference_kind(checkpoint) or "ResNet-50"
            raise AmnsegError(f"{path}: an authors' {kind} checkpoint, not a {stage} one")
        # An authors' checkpoint: convert it on the fly.
        return import_reference(stage, path, class_names)
    if checkpoint.get("format") != "amnseg" and stage == "seg" and is_deeplab_state(checkpoint):
        return import_deeplab(path, class_names)
    if checkpoint.get("format") != "amnseg" or checkpoint.get("stage") != stage:
        found = checkpoint.get("stage", "unknown") if checkpoint.get("format") == "amnseg" else None
        what = f"an amnseg {found} checkpoint" if found else "not an amnseg checkpoint"
        if not found and {"optimizer", "epochs_done"} <= checkpoint.keys():
            what = (f"a training state (last.pt: resumes training; the trained network is "
                    f"<run_dir>/{stage}/{stage}.pt)")
        raise AmnsegError(f"{path}: expected an amnseg {stage} checkpoint, found {what}")
    check_amnseg_fields(checkpoint, path)
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


def check_amnseg_fields(checkpoint: dict[str, Any], path: Path | str) -> None:
    """The fields of an amnseg checkpoint have their types (a hand-edited file or one from
    elsewhere gets one line naming it, not a traceback from building the network)."""
    names = checkpoint.get("class_names")
    problem = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        problem = "class_names is not a list of class names"
    elif not all(name.strip() for name in names) or len(set(names)) < len(names):
        problem = "class_names holds an empty or a repeated name"
    elif not isinstance(checkpoint.get("backbone"), dict):
        problem = "backbone is not a record of the backbone's options"
    elif not isinstance(checkpoint.get("model"), dict) or not all(
            isinstance(v, torch.Tensor) for v in checkpoint["model"].values()):
        problem = "model is not a state dict of tensors"
    elif any(value.is_floating_point() == key.endswith("num_batches_tracked")
             for key, value in checkpoint["model"].items()):
        problem = "model holds integer weights or a float step count (edited?)"
    elif "msc_scales" in checkpoint and not (
            isinstance(checkpoint["msc_scales"], list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
                for v in checkpoint["msc_scales"])):
        problem = f"msc_scales {checkpoint['msc_scales']!r} is not a list of numbers > 0"
    elif "input" in checkpoint and checkpoint["input"] not in INPUT_KINDS:
        problem = f"input {checkpoint['input']!r} is not one of {', '.join(INPUT_KINDS)}"
    if problem:
        raise AmnsegError(f"{path}: damaged amnseg checkpoint ({problem})")
    key = first_non_finite(checkpoint["model"])
    if key is not None:
        raise AmnsegError(f"{path}: the weights hold NaN or infinite values (first in {key}): "
                          "the training that wrote them diverged")


def weights_mismatch(model: nn.Module, state: dict[str, Any]) -> str | None:
    """What keeps ``state`` from loading into ``model`` (missing, unknown or other-shaped
    weights), or None when it fits exactly."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unknown = [key for key in state if key not in expected]
    shaped = [key for key in expected if key in state
              and tuple(getattr(state[key], "shape", ())) != tuple(expected[key].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing, first {missing[0]}")
    if unknown:
        parts.append(f"{len(unknown)} unknown weights, first {unknown[0]}")
    if shaped:
        key = shaped[0]
        parts.append(f"{len(shaped)} weights of another shape, first {key} "
                     f"{tuple(getattr(state[key], 'shape', ()))} for "
                     f"{tuple(expected[key].shape)}")
    return "; ".join(parts) or None


def backbone_from_checkpoint(checkpoint: dict[str, Any]) -> ResNet:
    return resnet_from_config(checkpoint["backbone"])


STAGES_WITH_MODELS = ("cam", "amn", "irn", "seg")


def new_model(stage: str, backbone: ResNet, num_classes: int, **options: Any) -> nn.Module:
    """An untrained network of ``stage`` on ``backbone``; ``num_classes`` foreground classes.

    cam: CAMNet; amn: AMN (option ``dropout``); irn: BoundaryNet; seg: MSC(DeepLabV2) with
    ``num_classes + 1`` outputs (options ``msc_scales``, ``input_kind``).
    """
    if stage == "cam":
        return CAMNet(backbone, num_classes)
    if stage == "amn":
        return AMN(backbone, num_classes, **options)
    if stage == "irn":
        return BoundaryNet(backbone)
    if stage == "seg":
        return MSC(DeepLabV2(backbone, num_classes + 1), options.get("msc_scales", MSC_SCALES),
                   options.get("input_kind", "caffe"))
    raise AmnsegError(
        f"unknown checkpoint kind {stage!r}: expected one of {', '.join(STAGES_WITH_MODELS)}"
    )


def build_model(checkpoint: dict[str, Any], source: Path | str = "checkpoint") -> nn.Module:
    """The model of an amnseg checkpoint (read from ``source``), with its weights loaded."""
    options = {"msc_scales": checkpoint["msc_scales"]} if "msc_scales" in checkpoint else {}
    if "input" in checkpoint:
        options["input_kind"] = checkpoint["input"]
    try:
        model = new_model(checkpoint["stage"], backbone_from_checkpoint(checkpoint),
                          len(checkpoint["class_names"]), **options)
    except (AmnsegError, KeyError, TypeError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, AmnsegError) else f"{type(exc).__name__} {exc}"
        raise AmnsegError(f"{source}: damaged amnseg checkpoint (its network cannot be built: "
                          f"{reason})") from None
    mismatch = weights_mismatch(model, checkpoint["model"])
    if mismatch:
        raise AmnsegError(f"{source}: the weights do not fit the {checkpoint['stage']} network "
                          f"the checkpoint describes ({mismatch})")
    model.load_state_dict(checkpoint["model"])
    return model


def load_model(path: Path, stage: str, class_names: list[str]) -> nn.Module:
    """The trained network of ``stage`` in ``path`` (amnseg's or the authors' checkpoint)."""
    return build_model(load_model_checkpoint(path, stage, class_names), path)


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


def unwrapped_state(state: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a state dict saved inside a training script's checkpoint (``{"state_dict":
    ...}`` or ``{"model": ...}``) or by DataParallel (``module.`` keys), under their own keys;
    amnseg's files and training states as they are."""
    if state.get("format") == "amnseg" or "epochs_done" in state:
        return state
    for wrapper in ("state_dict", "model"):
        inner = state.get(wrapper)
        if isinstance(inner, dict) and inner and all(isinstance(key, str) for key in inner):
            state = inner
            break
    if all(isinstance(key, str) and key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def reference_kind(state: dict[str, Any]) -> str | None:
    """The kind of an authors' checkpoint from its head's keys: the one stage whose every head
    prefix the file has (AMN's include CAM's: the most specific wins), None if none fits."""
    fits = [stage for stage, prefixes in REFERENCE_PREFIXES.items()
            if all(any(key.startswith(prefix) for key in state) for prefix in prefixes)]
    return max(fits, key=lambda stage: len(REFERENCE_PREFIXES[stage]), default=None)


def reference_class_count(stage: str, state: dict[str, Any]) -> int | None:
    """The class count an authors' ``stage`` file was trained for, None where its head does not
    tell (IRN's boundary branch does not depend on the classes; a damaged head is found by the
    shape checks)."""
    if stage == "cam" and "classifier.weight" in state and state["classifier.weight"].dim() == 4:
        return int(state["classifier.weight"].shape[0])
    if stage == "amn" and "label_enc.weight" in state and state["label_enc.weight"].dim() == 2:
        return int(state["label_enc.weight"].shape[1])
    return None


def _unmatched_alias(aliases: dict[str, torch.Tensor], canonical: dict[str, torch.Tensor]
                     ) -> str | None:
    """The first alias equal to no canonical tensor (compared exactly, among those of its
    shape and dtype), or None."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for tensor in canonical.values():
        by_kind.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)
    for key, tensor in aliases.items():
        candidates = by_kind.get((tuple(tensor.shape), tensor.dtype), [])
        if not any(torch.equal(tensor, other) for other in candidates):
            return key
    return None


def import_reference(
    stage: str, source: Path, class_names: list[str], destination: Path | None = None
) -> dict[str, Any]:
    """Convert an authors' checkpoint into an amnseg checkpoint (written if ``destination``).

    Loads with ``weights_only=True``; checks that every aliased copy equals a canonical tensor,
    that the class count matches ``class_names`` and that every tensor fits our model.
    """
    state = unwrapped_state(load_checkpoint(source))
    if not isinstance(state, dict) or not state:
        raise AmnsegError(f"{source}: not a state dict")
    if state.get("format") == "amnseg":
        raise AmnsegError(f"{source}: already an amnseg checkpoint (nothing to import)")
    if stage not in REFERENCE_PREFIXES:
        raise AmnsegError(f"unknown checkpoint kind {stage!r}: expected cam, amn or irn")
    check_tensors(state, source, "a reference checkpoint")
    prefixes = REFERENCE_PREFIXES[stage]
    if not any(key.startswith("resnet50.") for key in state):
        raise AmnsegError(f"{source}: not an authors' {stage} checkpoint (no resnet50.* "
                          "weights)")
    kind = reference_kind(state)
    if kind is not None and kind != stage:
        raise AmnsegError(f"{source}: a reference {kind} checkpoint, not {stage} (import it as "
                          f"{kind})")
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
    unmatched = _unmatched_alias(aliases, canonical)
    if unmatched is not None:
        raise AmnsegError(
            f"{source}: {unmatched} is no weight of the authors' {stage} network and equals "
            "none of them (the release's aliased copies do): an unknown key, or a damaged copy"
        )
    model = new_model(stage, ResNet(depth=50), len(class_names))
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in canonical)
    if missing:
        theirs = next(ref + missing[0][len(ours):] for ref, ours in prefixes.items()
                      if missing[0].startswith(ours))
        raise AmnsegError(f"{source}: not a reference {stage} checkpoint: {theirs} is missing")
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
    """An amnseg checkpoint's weights under the reference's canonical key names (the authors'
    for cam, amn, irn; kazuto's DeepLab-v2 layout for seg)."""
    stage = checkpoint.get("stage")
    if checkpoint.get("format") != "amnseg" or stage not in (*REFERENCE_PREFIXES, "seg"):
        raise AmnsegError("not an amnseg cam, amn, irn or seg checkpoint (a training state, "
                          "last.pt, is none: export the stage's <stage>.pt)")
    _check_reference_layout(checkpoint)
    if stage == "seg":
        return export_deeplab(checkpoint)
    reverse = {ours: ref for ref, ours in REFERENCE_PREFIXES[stage].items()}
    exported = {}
    for key, tensor in checkpoint["model"].items():
        prefix = next(p for p in reverse if key.startswith(p))
        exported[reverse[prefix] + key[len(prefix):]] = tensor
    return exported


# The backbone options that decide the reference network's shapes and arithmetic; the others
# (norm, freeze_stem, fold_norm, space_to_batch, pretrained) only decide how it trained or runs.
LAYOUT_FIELDS = ("depth", "width", "strides", "dilations", "stride_in_1x1", "stem_pool_ceil")


def _check_reference_layout(checkpoint: dict[str, Any]) -> None:
    """Refuse to export a network the reference's code would read wrongly or not at all: a
    backbone other than its ResNet (e.g. the demo's small one), or a segmentation net fed
    another input than Caffe's BGR minus the mean."""
    stage = checkpoint["stage"]
    reference = deeplab_backbone() if stage == "seg" else REFERENCE_BACKBONE
    name = "DeepLab-v2's ResNet-101" if stage == "seg" else "the authors' ResNet-50"
    ours = checkpoint.get("backbone")
    if not isinstance(ours, dict):
        raise AmnsegError("damaged amnseg checkpoint (backbone is not a record of the "
                          "backbone's options)")
    defaults = BackboneConfig()
    differences = [
        f"{field} {ours.get(field, getattr(defaults, field))}, not {getattr(reference, field)}"
        for field in LAYOUT_FIELDS
        if ours.get(field, getattr(defaults, field)) != getattr(reference, field)
    ]
    if stage == "seg" and checkpoint.get("input", "caffe") != "caffe":
        differences.append(f"input {checkpoint['input']}, not caffe")
    if differences:
        raise AmnsegError(f"its {stage} network is not {name} ({'; '.join(differences)}): the "
                          "reference's code could not use the exported file")


# --- DeepLab-v2 files (kazuto1011/deeplab-pytorch's MSC(DeepLabV2) layout) ------------------
# Stem "layer1.conv1.{conv,bn}", blocks "layer<k>.block<j>.{reduce,conv3x3,increase,shortcut}
# .{conv,bn}" (k = 2..5 is our layer k - 1, j = 1.. our block j - 1), head "aspp.c0..c3".
# Trained files prefix every key with "base."; the init files the recipe starts from do not, and
# have no ASPP or one for another class count.

DEEPLAB_PARTS = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"),
                 "increase": ("conv3", "bn3"), "shortcut": ("downsample.0", "downsample.1")}


def is_deeplab_state(state: dict[str, Any]) -> bool:
    return any(isinstance(k, str) and k.endswith("layer1.conv1.conv.weight") for k in state)


def deeplab_to_ours(key: str) -> str | None:
    """A DeepLab-v2 key (without ``base.``) -> our MSC key, or None if it is not one."""
    parts = key.split(".")
    if parts[0] == "aspp" and len(parts) == 3:
        return f"base.aspp.{parts[1]}.{parts[2]}"
    if parts[:2] == ["layer1", "conv1"] and len(parts) == 4 and parts[2] in ("conv", "bn"):
        return f"base.backbone.{'conv1' if parts[2] == 'conv' else 'bn1'}.{parts[3]}"
    if (len(parts) == 5 and parts[0][:5] == "layer" and parts[0][5:].isdigit()
            and parts[1].startswith("block") and parts[1][5:].isdigit()
            and parts[2] in DEEPLAB_PARTS and parts[3] in ("conv", "bn")):
        layer, block = int(parts[0][5:]) - 1, int(parts[1][5:]) - 1
        if 1 <= layer <= 4 and block >= 0:
            conv, norm = DEEPLAB_PARTS[parts[2]]
            return f"base.backbone.layer{layer}.{block}.{conv if parts[3] == 'conv' else norm}" \
                f".{parts[4]}"
    return None


def ours_to_deeplab(key: str) -> str:
    """The inverse of ``deeplab_to_ours`` (without ``base.``)."""
    name = key.removeprefix("base.")
    if name.startswith("aspp."):
        return name
    name = name.removeprefix("backbone.")
    if name.startswith(("conv1.", "bn1.")):
        module, rest = name.split(".", 1)
        return f"layer1.conv1.{'conv' if module == 'conv1' else 'bn'}.{rest}"
    layer, block, rest = name.split(".", 2)
    for part, (conv, norm) in DEEPLAB_PARTS.items():
        for ours, kind in ((conv, "conv"), (norm, "bn")):
            if rest.startswith(ours + "."):
                tail = rest[len(ours) + 1:]
                return f"layer{int(layer[5:]) + 1}.block{int(block) + 1}.{part}.{kind}.{tail}"
    raise AmnsegError(f"{key}: not a DeepLab-v2 parameter")


def deeplab_tensors(source: Path) -> dict[str, Any]:
    """The tensors of a DeepLab-v2 file under its own keys (unwrapped from ``state_dict``)."""
    state = unwrapped_state(load_checkpoint(source))
    if state.get("format") == "amnseg":
        raise AmnsegError(f"{source}: an amnseg {state.get('stage')} checkpoint, not a "
                          "DeepLab-v2 file")
    if not is_deeplab_state(state):
        raise AmnsegError(f"{source}: not a DeepLab-v2 file (no layer1.conv1.conv.weight)")
    check_tensors(state, source, "a DeepLab-v2 file")
    return state


def read_deeplab_state(source: Path, backbone: BackboneConfig, num_outputs: int | None,
                       ) -> tuple[dict[str, Any], bool]:
    """The tensors of a DeepLab-v2 file under our MSC keys, checked against the model of
    ``backbone``: (state, whether it has a usable ASPP head). Every backbone tensor must be
    there with the right shape; an unknown key is an error. The ASPP is kept when its output
    count is ``num_outputs`` (None: any)."""
    state = deeplab_tensors(source)
    trained = all(k.startswith("base.") for k in state)
    mapped: dict[str, Any] = {}
    names: dict[str, str] = {}  # ours -> the file's key, for messages
    for key, tensor in state.items():
        ours = deeplab_to_ours(key.removeprefix("base.") if trained else key)
        if ours is None:
            raise AmnsegError(f"{source}: unexpected key {key} (not in the DeepLab-v2 layout)")
        mapped[ours], names[ours] = tensor, key
    expected = new_model("seg", resnet_from_config(backbone), 1).state_dict()
    extra = [k for k in mapped if k not in expected]
    if extra:
        raise AmnsegError(f"{source}: unexpected key {names[extra[0]]} (the network has no such "
                          "weight)")
    for key, value in expected.items():
        if key not in mapped:
            if key.endswith("num_batches_tracked"):  # older PyTorch saved none; frozen BN
                mapped[key] = value                  # never reads it
                continue
            if key.startswith("base.aspp."):
                continue
            raise AmnsegError(f"{source}: {ours_to_deeplab(key)} is missing")
        # An ASPP head has as many outputs as its classes (+ background): any count is read.
        shape, wanted = tuple(mapped[key].shape), tuple(value.shape)
        if key.startswith("base.aspp.") and shape[:1] and shape[1:] == wanted[1:]:
            continue
        if shape != wanted:
            what = "(outputs, " + ", ".join(map(str, wanted[1:])) + ")" \
                if key.startswith("base.aspp.") else str(wanted)
            raise AmnsegError(f"{source}: {names[key]} has shape {shape}, expected {what}")
    head = [k for k in mapped if k.startswith("base.aspp.")]
    outputs = {int(mapped[k].shape[0]) for k in head}
    usable = len(head) == 8 and (num_outputs is None or outputs == {num_outputs})
    if not usable:
        mapped = {k: v for k, v in mapped.items() if not k.startswith("base.aspp.")}
    return mapped, usable


def import_deeplab(
    source: Path, class_names: list[str], destination: Path | None = None,
    backbone: BackboneConfig | None = None,
) -> dict[str, Any]:
    """A trained DeepLab-v2 file (kazuto's MSC layout, ``base.`` keys) as an amnseg ``seg``
    checkpoint for ``class_names`` (+ background), written to ``destination`` if given."""
    backbone = backbone or deeplab_backbone()
    state, has_head = read_deeplab_state(source, backbone, len(class_names) + 1)
    if not has_head:
        head = {k: v for k, v in deeplab_tensors(source).items() if ".aspp." in f".{k}"}
        found = {int(v.shape[0]) for v in head.values()}
        if len(found) > 1:
            raise AmnsegError(f"{source}: the ASPP head's branches have different output counts "
                              f"({', '.join(map(str, sorted(found)))}): a damaged file")
        if found and found != {len(class_names) + 1}:
            raise AmnsegError(
                f"{source}: checkpoint is for {min(found) - 1} classes, "
                f"{len(class_names)} class names given"
            )
        if found:
            raise AmnsegError(f"{source}: incomplete ASPP head ({len(head)} of its 8 tensors)")
        raise AmnsegError(
            f"{source}: no ASPP head (an init file: give it as seg.init to train from it)"
        )
    model = new_model("seg", resnet_from_config(backbone), len(class_names))
    model.load_state_dict(state, strict=True)
    checkpoint = {
        "format": "amnseg",
        "stage": "seg",
        "class_names": list(class_names),
        "backbone": dataclasses.asdict(backbone),
        "model": model.state_dict(),
        "msc_scales": list(MSC_SCALES),
        "input": "caffe",  # kazuto's files take BGR minus the mean
        "init": f"imported from {source}",
        "imported_from": str(source),
    }
    if destination is not None:
        save_checkpoint(destination, checkpoint)
    return checkpoint


def export_deeplab(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """An amnseg ``seg`` checkpoint's weights in kazuto's MSC layout (``base.`` keys)."""
    return {f"base.{ours_to_deeplab(k)}": v for k, v in checkpoint["model"].items()}
