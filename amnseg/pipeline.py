"""The whole pipeline as one resumable command (``amnseg run``).

Stages run in order; each has a fingerprint: a hash of the config options it reads plus the
fingerprint of the stage before it. The run folder's ``manifest.json`` records, per stage, the
fingerprint, status, timings and metrics. A stage whose fingerprint is unchanged and whose
status is ``done`` is skipped; a changed option changes that stage's fingerprint and so every
fingerprint downstream: those stages' outputs are cleared and recomputed. A stage that was
interrupted (status ``running`` with the same fingerprint) resumes: map, seed and mask stages
skip the images already written, training stages restart from their last epoch checkpoint.

A stage's evaluation (mIoU on the split with ground truth) has its own fingerprint: the
evaluation options (thresholds, sweeps, the segmentation net's flip and CRF, the val split) and
the data evaluated. When only that changes, the stage's outputs are kept and only evaluated
again. Each record also keeps the option values it was made with (``options``), so that a
report labels its rows with the values that made them, and ``status`` can say which stages the
run's current config would make differently (``stale_stages``).

To add a stage: write its function ``(config) -> metrics`` and append a ``Stage`` to
``STAGES`` with its command name, the config options it reads and the paths it owns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amnseg import distributed
from amnseg.checkpoints import load_model_checkpoint, save_once
from amnseg.config import Config, config_from_dict, config_to_dict, image_scales, validate
from amnseg.data import build_dataset, build_splits, run_dataset, skipped_images
from amnseg.data.base import SegDataset
from amnseg.data.check import MIN_SIDE, check_dataset, min_side
from amnseg.data.signature import data_signature, file_token, folder_token
from amnseg.errors import AmnsegError
from amnseg.io import (
    DAMAGED,
    TEMP_NAME,
    atomic_path,
    folder_lock,
    load_json,
    output_file,
    save_json,
)
from amnseg.layout import (
    checkpoint_path,
    eval_dir,
    log_path,
    maps_dir,
    masks_dir,
    seeds_dir,
    skipped_images_path,
    training_state_path,
)
from amnseg.models.resnet import build_backbone
from amnseg.stages.amn import make_amn_maps, train_amn
from amnseg.stages.cam import make_cams, train_cam
from amnseg.stages.common import processed_images
from amnseg.stages.evaluate import evaluate_label_maps, evaluate_maps
from amnseg.stages.irn import make_masks, train_irn
from amnseg.stages.seeds import SeedFollower, make_seeds, overlap_seeds
from amnseg.stages.seg import (
    SEG_INIT_WORDS,
    check_init_file,
    evaluate_seg,
    imagenet_backbone_config,
    mask_source,
    seg_steps_per_epoch,
    train_seg,
)
from amnseg.training import batch_option, crf_device_of, steps_per_epoch

MANIFEST = "manifest.json"


PREVIOUS = "<previous>"


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # the CLI command that runs this stage alone
    run: Callable[[Config], dict[str, Any]]
    options: tuple[str, ...]  # dotted config keys (or whole sections) the outputs depend on
    outputs: Callable[[Config], tuple[Path, ...]]  # the files/folders this stage owns
    description: str
    upstream: str | None = PREVIOUS  # the stage whose outputs it reads (None: only the data)
    # Whether, with this config, it reads files the user gave instead of its upstream's outputs
    # (seg on a masks folder or on the ground truth): it then reads only the data and those.
    own_inputs: Callable[[Config], bool] = lambda config: False
    enabled: Callable[[Config], bool] = lambda config: True
    data: tuple[str, ...] = ()  # the image sets it reads directly: "processed" and/or "val"
    # Its evaluation (metrics for the manifest, files in <run>/eval), run after ``run`` and on
    # its own when only the options and image sets of the evaluation changed.
    evaluate: Callable[[Config], dict[str, Any]] | None = None
    evaluation: tuple[str, ...] = ()  # the options the evaluation reads
    evaluation_data: tuple[str, ...] = ()  # the image sets it reads
    # The files that must exist for the stage to count as done (besides its record).
    expected: Callable[[Config], list[Path]] = lambda config: []
    # The next stage, when its per-image work can start as soon as this one has written an
    # image's output (see ``_start_follower_record``); ``run`` then takes ``on_saved=``.
    follower: Follower | None = None


@dataclass(frozen=True)
class Follower:
    stage: str
    start: Callable[[Config], SeedFollower]  # a context manager with submit(stem)
    wanted: Callable[[Config], bool]


def _pick(config: Config, dotted: str) -> Any:
    value: Any = config_to_dict(config)
    for part in dotted.split("."):
        value = value[part]
    return value


def stage_options(stage: Stage, config: Config) -> dict[str, Any]:
    """The values of the options ``stage``'s outputs depend on, by dotted name."""
    values = {key: _pick(config, key) for key in stage.options}
    return {key: value for key, value in values.items()
            if key not in _ADDED_LATER or value != _ADDED_LATER[key]}


def _hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(
    stage: Stage, config: Config, upstream: str, signatures: dict[str, str] | None = None,
    recorded: Any = None,
) -> str:
    """Hash of the stage's options, the signatures of the data it reads (and of the files
    its options name; ``recorded``: the stage record's, for those gone since) and its
    upstream's fingerprint."""
    names = (*stage.data, "processed") if stage.own_inputs(config) else stage.data
    data = {name: (signatures or {}).get(name) for name in dict.fromkeys(names)}
    given = _given_paths(stage, config, recorded.get("given") if isinstance(recorded, dict)
                         else None)
    if isinstance(recorded, dict) and "fingerprint" in recorded and "given" not in recorded:
        given = {}  # a record from before files were signed: kept, not redone for that alone
    if given:  # (absent otherwise: the fingerprints of runs without them stay as they were)
        data["given"] = given
    return _hash(upstream, stage.name, stage_options(stage, config), data)


# Options that name a file or folder a stage reads: its content counts as an input of the
# stage, like the data's (a masks folder made again, a checkpoint replaced at the same path).
_GIVEN_PATH_OPTIONS = ("cam.checkpoint", "amn.checkpoint", "irn.checkpoint", "seg.checkpoint",
                       "seg.masks", "seg.init", "backbone.pretrained", "seg.backbone.pretrained")
_NOT_PATHS = ("", "pseudo", "gt", "imagenet", "cam")  # values of those options that name no file


def _given_paths(stage: Stage, config: Config, recorded: Any = None) -> dict[str, str]:
    """{option: token} of the files and folders that ``stage``'s options name (by size and
    modification time, or content, as ``data.signature`` says). One gone since the stage ran
    counts as it was (``recorded``): a finished stage no longer needs its ImageNet weights."""
    given = {}
    for option in _GIVEN_PATH_OPTIONS:
        if not any(option == key or option.startswith(f"{key}.") for key in stage.options):
            continue
        value = _pick(config, option)
        path = Path(value) if isinstance(value, str) and value not in _NOT_PATHS else None
        if path is not None and path.is_file():
            given[option] = file_token(path, config.data.signature)
        elif path is not None and path.is_dir():
            given[option] = folder_token(path, config.data.signature)
        elif path is not None and isinstance(recorded, dict) and option in recorded:
            given[option] = recorded[option]
    return given


def evaluation_fingerprint(stage: Stage, config: Config,
                           signatures: dict[str, str] | None = None) -> str:
    """Hash of the options and the data signatures that ``stage``'s evaluation reads ("" for a
    stage without one)."""
    if stage.evaluate is None:
        return ""
    payload = {key: _pick(config, key) for key in stage.evaluation}
    data = {name: (signatures or {}).get(name) for name in stage.evaluation_data}
    return _hash(stage.name, payload, data)


def data_signatures(config: Config) -> dict[str, str]:
    """Signatures of the image sets the stages read: "processed" (train + infer split, their
    images, labels and masks) and "val" (when the config has a val split that exists)."""
    kind = config.data.signature
    data = config.data
    everything = build_splits(data, [data.train_split, data.infer_split])  # skipped ones too
    signatures = {"processed": data_signature(everything, kind)}
    if config.data.val_split:
        try:
            signatures["val"] = data_signature(
                build_dataset(config.data, config.data.val_split), kind)
        except AmnsegError:
            signatures["val"] = "absent"  # the stages that need it say why when they run
    return signatures


def check_data(config: Config, signatures: dict[str, str], manifest: dict[str, Any],
               progress: Callable[[str], None]) -> None:
    """Check every image the run reads (``amnseg.data.check``) once per change of the data or
    of the policy: with ``data.on_bad_image=error`` the first bad file stops the run, with
    ``skip`` the bad ones are listed in ``skipped_images.json`` and left out of every stage."""
    data = config.data
    key = [signatures, data.on_bad_image, data.max_pixels]
    if data.exif_orientation:  # (without it, the key of the folders checked before it existed)
        key.append("exif_orientation")
    smallest = min_side(image_scales(config))
    if smallest[0] != MIN_SIDE:  # (likewise)
        key.append(f"min_side {smallest[0]}")
    if manifest.get("checked", {}).get("key") == key and skipped_images_path(config).is_file():
        return  # checked before (the list of skipped images is part of that check's result)
    skip = data.on_bad_image == "skip"
    # The splits whose masks are read (evaluation; seg_gt trains on the train split's): every
    # image needs a mask, or none has one (then the split is not evaluated).
    with_masks = [data.infer_split, *([data.val_split] if signatures.get("val", "absent")
                                      != "absent" else []),
                  *([data.train_split] if config.seg.upper_bound else [])]
    for split in dict.fromkeys(with_masks):
        dataset = build_dataset(data, split)
        missing = dataset.missing_masks()
        if missing:
            raise AmnsegError(
                f"{missing[0]}: mask not found; split {split!r} has masks for "
                f"{len(dataset) - len(missing)} of its {len(dataset)} images (a split that is "
                "evaluated needs a mask for every image, or none)")
    problems: dict[str, str] = {}
    sets = [build_splits(data, [data.train_split, data.infer_split])]
    if signatures.get("val", "absent") != "absent":
        sets.append(build_dataset(data, data.val_split))
        _check_same_classes(sets[0], sets[1])
    for dataset in sets:
        problems.update(check_dataset(dataset, data.max_pixels, decode=skip,
                                      stop_at_first=not skip, smallest=smallest))
    with atomic_path(skipped_images_path(config)) as tmp:
        tmp.write_text(json.dumps(problems, indent=2) + "\n")
    if problems:
        progress(f"skipping {len(problems)} bad images (why: {skipped_images_path(config)})")
        splits = [data.train_split, data.infer_split,
                  *([data.val_split] if signatures.get("val", "absent") != "absent" else [])]
        for split in dict.fromkeys(splits):
            dataset = build_dataset(data, split)
            if all(stem in problems for stem in dataset.stems):
                raise AmnsegError(f"split {split!r}: all its {len(dataset)} images are bad and "
                                  f"skipped (why: {skipped_images_path(config)})")
    manifest["checked"] = {"key": key, "skipped": len(problems)}


def _check_same_classes(train: SegDataset, val: SegDataset) -> None:
    """The val split is scored with the network trained on the train split: the same classes
    in the same order (COCO keeps them in each split's own file)."""
    val_names, train_names = list(val.class_names), list(train.class_names)
    if val_names == train_names:
        return
    pairs = zip(val_names, train_names, strict=False)
    first = next((index for index, (theirs, ours) in enumerate(pairs) if theirs != ours),
                 min(len(val_names), len(train_names)))
    theirs, ours = (f"'{names[first]}'" if first < len(names) else "none"
                    for names in (val_names, train_names))
    raise AmnsegError(
        f"{_classes_source(val)}: split {val.split!r} has other classes than the training split "
        f"({_classes_source(train)}): {len(val_names)} against {len(train_names)}, class "
        f"{first + 1} is {theirs} against {ours}")


def _classes_source(dataset: SegDataset) -> str:
    """What defines a dataset's classes, for messages: COCO's annotation file, else its root."""
    return str(getattr(dataset, "annotation_file", None) or getattr(dataset, "root", "?"))


def _per_image(folder: Callable[[Config], Path], suffix: str) -> Callable[[Config], list[Path]]:
    """Every processed image's file in ``folder``."""
    return lambda config: [output_file(folder(config), stem, suffix)
                           for stem in processed_images(config).stems]


# --- the stages ---------------------------------------------------------------------------
# Each returns metrics for the manifest; evaluation runs on data.infer_split when it has
# ground-truth masks.


def _evaluated_images(config: Config) -> SegDataset | None:
    dataset = run_dataset(config, config.data.infer_split)
    return dataset if dataset.has_masks else None


def _evaluate_maps(config: Config, source: str) -> dict[str, Any]:
    dataset = _evaluated_images(config)
    if dataset is None:
        return {}
    result = evaluate_maps(
        maps_dir(config, source),
        dataset,
        config.eval.thresholds(),
        eval_dir(config),
        name=source,
        threshold=getattr(config, source).eval_threshold,
        robust_range=tuple(config.eval.robust_range),
        workers=config.data.num_workers,
    )
    return {
        f"{source}_miou_at_threshold": result["miou_at_threshold"],
        f"{source}_best_miou": result["best_miou"],
        f"{source}_best_threshold": result["best_threshold"],
    }


def _evaluate_labels(config: Config, name: str, folder: Path) -> dict[str, Any]:
    dataset = _evaluated_images(config)
    if dataset is None:
        return {}
    result = evaluate_label_maps(folder, dataset, eval_dir(config), name=name)
    return {f"{name}_miou": result["miou"]}


def _training(stage: str, train: Callable[[Config], Path]) -> Callable[[Config], dict]:
    """A training stage: ``train(config)``, or, when ``<stage>.checkpoint`` is given, that
    checkpoint (either format) checked against the dataset and copied into place."""

    def run(config: Config) -> dict[str, Any]:
        given = getattr(config, stage).checkpoint
        dataset = run_dataset(config, config.data.train_split)  # without skipped images
        if given:
            checkpoint = load_model_checkpoint(Path(given), stage, dataset.class_names)
            save_once(checkpoint_path(config, stage), checkpoint)
            return {"checkpoint": given}
        train(config)
        return {"train_split": config.data.train_split, "train_images": len(dataset)}

    return run


def _maps(source: str, make: Callable[[Config, Callable[[str], None] | None], Path]
          ) -> Callable[..., dict]:
    def run(config: Config, on_saved: Callable[[str], None] | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        make(config, on_saved)
        # The stage's time without its evaluation (this run's share, if it resumed).
        made = round(time.perf_counter() - started, 2)
        return {"images": len(processed_images(config)), "make_seconds": made}

    return run


def _seed_stage(source: str, description: str) -> Stage:
    """The stage that makes CRF seeds from the ``source`` (cam or amn) maps."""

    def run(config: Config) -> dict[str, Any]:
        make_seeds(config, source)
        return {}

    options = (f"seeds.{source}_fg_threshold", f"seeds.{source}_bg_threshold", "seeds.crf")
    folder = lambda config: seeds_dir(config, source)  # noqa: E731
    return Stage(f"{source}_seeds", f"make-{source}-seeds", run, options,
                 lambda config: (folder(config),), description,
                 expected=_per_image(folder, ".png"),
                 evaluate=lambda config: _evaluate_labels(config, f"{source}_seeds",
                                                          folder(config)))


def _masks(config: Config) -> dict[str, Any]:
    make_masks(config)
    return {"images": len(processed_images(config))}


def _train_seg(stage: str, masks: str | None) -> Callable[[Config], dict[str, Any]]:
    """Train the segmentation network (or take ``seg.checkpoint``)."""

    def run(config: Config) -> dict[str, Any]:
        dataset = run_dataset(config, config.data.train_split)  # without skipped images
        if config.seg.checkpoint and stage == "seg":
            checkpoint = load_model_checkpoint(Path(config.seg.checkpoint), "seg",
                                               dataset.class_names)
            save_once(checkpoint_path(config, stage), checkpoint)
            return {"checkpoint": config.seg.checkpoint}
        train_seg(config, stage, masks)
        return {"train_split": config.data.train_split, "train_images": len(dataset)}

    return run


def _evaluate_seg(config: Config, stage: str) -> dict[str, Any]:
    if not config.data.val_split or not build_dataset(config.data,
                                                       config.data.val_split).has_masks:
        return {}
    result = evaluate_seg(config, stage)
    metrics = {f"{stage}_miou": result["no_crf"]["miou"]}
    if result["crf"] is not None:
        metrics[f"{stage}_crf_miou"] = result["crf"]["miou"]
    return metrics


def _training_outputs(stage: str) -> Callable[[Config], tuple[Path, ...]]:
    return lambda config: (checkpoint_path(config, stage), training_state_path(config, stage),
                           log_path(config, stage))


# Options of every stage that runs a network, and of every training stage.
_PRECISION = ("amp", "channels_last")
_TRAINING = (*_PRECISION, "compile_training", "cudnn_benchmark")
_DATA = ("seed", "data.kind", "data.root", "data.train_split", "data.infer_split",
         "data.aug_mask_dir", "data.semantic_dir", "data.exif_orientation")
# Options added after run folders existed, with the value that computes what was computed
# before them: at that value they stay out of the fingerprints, so that those folders'
# stages stay up to date.
_ADDED_LATER = {"data.exif_orientation": False}
_CAM_TRAIN = tuple(f"cam.{name}" for name in (
    "epochs", "batch_size", "lr", "head_lr_mult", "weight_decay", "momentum", "poly_power",
    "resize_long", "crop_size", "flip", "checkpoint"))
_AMN_TRAIN = tuple(f"amn.{name}" for name in (
    "epochs", "batch_size", "backbone_lr", "head_lr", "weight_decay", "label_smoothing",
    "dropout", "crop_size", "rescale", "flip", "backbone_init", "checkpoint"))
_IRN_TRAIN = tuple(f"irn.{name}" for name in (
    "radius", "epochs", "batch_size", "lr", "weight_decay", "momentum", "poly_power",
    "crop_size", "rescale", "flip", "backbone_init", "checkpoint"))
_IRN_WALK = tuple(f"irn.{name}" for name in (
    "infer_pad_size", "walk_radius", "beta", "exp_times", "cam_power", "bg_threshold"))
_SEG = (*_TRAINING, *(f"seg.{name}" for name in (
    "backbone", "init", "iterations", "batch_size", "accumulation", "fused_accumulation",
    "lr", "momentum",
    "weight_decay", "poly_power", "lr_decay_every", "aspp_weight_lr_mult", "aspp_bias_lr_mult",
    "crop_size", "rescale", "flip", "msc_scales")))
# What the segmentation net's evaluation reads besides the network (the per-iteration val
# check during training only logs, so the val split is not an option of the training).
_SEG_EVALUATION = ("data.val_split", "seg.msc_scales", "seg.eval_flip", "seg.eval_crf",
                   "seg.crf")
# The threshold sweep and the robust range of every map evaluation.
_SWEEP = ("eval",)

def _training_stage(name: str, train: Callable[[Config], Path], options: tuple[str, ...],
                    description: str, **extra: Any) -> Stage:
    return Stage(name, f"train-{name}", _training(name, train), options,
                 _training_outputs(name), description,
                 expected=lambda config: [checkpoint_path(config, name)], **extra)


def _map_stage(source: str, command: str,
               make: Callable[[Config, Callable[[str], None] | None], Path],
               options: tuple[str, ...], description: str) -> Stage:
    """The stage that writes ``source`` maps; the seed stage from them follows it."""
    return Stage(f"{source}_maps", command, _maps(source, make), options,
                 lambda config: (maps_dir(config, source),), description,
                 expected=_per_image(lambda config: maps_dir(config, source), ".npz"),
                 follower=Follower(f"{source}_seeds",
                                   lambda config: SeedFollower(config, source), overlap_seeds),
                 evaluate=lambda config: _evaluate_maps(config, source),
                 evaluation=(f"{source}.eval_threshold", *_SWEEP))


def _seg_stage(name: str, masks: str | None, options: tuple[str, ...], description: str,
               **extra: Any) -> Stage:
    return Stage(name, f"train-{name.replace('_', '-')}", _train_seg(name, masks), options,
                 lambda config: (*_training_outputs(name)(config),
                                 eval_dir(config) / f"{name}.json"),
                 description, expected=lambda config: [checkpoint_path(config, name)],
                 evaluate=lambda config: _evaluate_seg(config, name),
                 evaluation=_SEG_EVALUATION, evaluation_data=("val",), **extra)


STAGES: tuple[Stage, ...] = (
    _training_stage("cam", train_cam, (*_DATA, *_TRAINING, "backbone", *_CAM_TRAIN),
                    "train the CAM classifier on data.train_split", data=("processed",)),
    _map_stage("cam", "make-cam", lambda c, on_saved: make_cams(c, on_saved=on_saved),
               (*_PRECISION, "cam.scales", "cam.flip"), "multi-scale CAMs"),
    _seed_stage("cam", "CRF seeds from CAMs"),
    _training_stage("amn", lambda c: train_amn(c, seeds_dir(c, "cam")),
                    (*_TRAINING, "backbone", *_AMN_TRAIN),
                    "train AMN on the CAM seeds of data.train_split"),
    _map_stage("amn", "make-amn-maps",
               lambda c, on_saved: make_amn_maps(c, seeds_dir(c, "cam"), on_saved=on_saved),
               (*_PRECISION, "amn.scales"), "AMN maps"),
    _seed_stage("amn", "CRF seeds from AMN maps"),
    _training_stage("irn", lambda c: train_irn(c, seeds_dir(c, "amn")),
                    (*_TRAINING, "backbone", *_IRN_TRAIN),
                    "train IRN on the AMN seeds of data.train_split"),
    Stage("masks", "make-masks", _masks, (*_PRECISION, *_IRN_WALK),
          lambda config: (masks_dir(config),),
          "random walk -> pseudo masks", expected=_per_image(masks_dir, ".png"),
          evaluate=lambda config: _evaluate_labels(config, "pseudo_masks", masks_dir(config))),
    _seg_stage("seg", None, (*_SEG, "seg.masks", "seg.checkpoint"),
               "train DeepLab-v2 on the pseudo masks of data.train_split, evaluate on "
               "data.val_split", own_inputs=lambda config: config.seg.masks != "pseudo"),
    _seg_stage("seg_gt", "gt", (*_DATA, *_SEG),
               "the same network on the ground-truth masks (upper bound; seg.upper_bound=true)",
               upstream=None, enabled=lambda config: config.seg.upper_bound,
               data=("processed",)),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


RUN_CONFIG = "config.json"


def load_run_config(run_dir: Path) -> Config:
    """The config of a run folder's last command (its ``config.json``), with ``run_dir`` set to
    where the folder is now (it may have moved since)."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise AmnsegError(f"{run_dir}: no {RUN_CONFIG} (not an amnseg run folder)")
    config = config_from_dict(load_json(path, dict), path)
    config.run_dir = str(run_dir)
    return config


def load_manifest(run_dir: Path, to_run: bool = False) -> dict[str, Any]:
    """The run folder's manifest. ``status`` and ``report`` show a hand-edited stage record as
    unknown; a run (``to_run``), which decides from the records what to do, refuses one."""
    path = run_dir / MANIFEST
    manifest = load_json(path, dict) if path.is_file() else {"stages": {}}
    if not isinstance(manifest.get("stages", {}), dict):
        raise AmnsegError(f"{path}: \"stages\" is not a JSON object; {DAMAGED}")
    if to_run:
        parts = {**{f"stages.{name}": record for name, record in manifest["stages"].items()},
                 **{key: manifest[key] for key in ("checked", "data") if key in manifest}}
        for key, value in parts.items():
            if not isinstance(value, dict):
                raise AmnsegError(f"{path}: \"{key}\" is not a JSON object; {DAMAGED}")
    return manifest


LOCK = ".amnseg.lock"


def run_folder_lock(run_dir: Path) -> AbstractContextManager[None]:
    """Hold ``<run_dir>/.amnseg.lock`` (released when the process ends in any way): a second
    run on the same folder is refused with the first one's pid."""
    return folder_lock(run_dir, LOCK, "another amnseg run", "is using this run folder; wait "
                       "for it to finish or choose another run_dir")


def remove_leftover_temp_files(config: Config) -> int:
    """Delete the temporary files a killed run left (``.<name>.<12 hex digits>.tmp``, never a
    final output) beside the run's own files; returns how many. Only safe while holding the
    run folder's lock. Folders the stages do not write (a dataset inside the run folder,
    another command's outputs) are left alone."""
    folders = {Path(config.run_dir), eval_dir(config)}
    for stage in STAGES:
        for path in stage.outputs(config):
            folders.update((path, path.parent))
    count = 0
    for folder in sorted(folder for folder in folders if folder.is_dir()):
        for path in folder.iterdir():
            if TEMP_NAME.fullmatch(path.name) and path.is_file():
                path.unlink()
                count += 1
    return count


def _clear_outputs(config: Config, stage: Stage) -> None:
    for path in stage.outputs(config):
        try:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        except OSError as error:  # rmtree names a file relative to the folder it was in
            raise AmnsegError(f"{path}: the stage's old outputs could not be removed "
                              f"({error.strerror}: {error.filename})") from None


def run_pipeline(
    config: Config,
    start: str | None = None,
    stop: str | None = None,
    progress: Callable[[str], None] | None = print,
    require_upstream: bool = True,
) -> dict[str, Any]:
    """Run (or skip) the stages from ``start`` to ``stop``; returns the manifest.

    With ``require_upstream`` (``amnseg run --from``, a single stage's own command), the
    stages before ``start`` whose outputs the stages asked for read must be done with this
    config and data: a stage must not run on outputs made with other options or data (and be
    recorded as made with these). Without it, a stage whose inputs are missing says so when it
    reads them. Under torchrun every rank calls this: rank 0 holds the run folder, decides
    what runs and writes the manifest, every rank takes part in each stage.
    """
    validate(config)  # a Config built or edited in Python has not been checked yet
    distributed.setup(config.device)
    first, last = stage_range(start, stop)
    run_dir = Path(config.run_dir)
    main = distributed.is_main()
    if not main or progress is None:
        progress = _silent
    with run_folder_lock(run_dir) if main else nullcontext():
        if main:
            removed = remove_leftover_temp_files(config)
            if removed:
                progress(f"removed {removed} temporary files of an interrupted run")
        distributed.barrier()
        return _run_stages(config, run_dir, first, last, progress, require_upstream)


def stage_range(start: str | None, stop: str | None) -> tuple[int, int]:
    """The positions of the stages ``--from start`` and ``--to stop`` (None: the first, the
    last); unknown or reversed names are one-line errors."""
    for name in (start, stop):
        if name is not None and name not in STAGE_NAMES:
            raise AmnsegError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    first = STAGE_NAMES.index(start) if start else 0
    last = STAGE_NAMES.index(stop) if stop else len(STAGES) - 1
    if first > last:
        raise AmnsegError(f"--from {start} comes after --to {stop}: nothing to run (the stages "
                          f"in order: {', '.join(STAGE_NAMES)})")
    return first, last


def _silent(line: str) -> None:
    """Ranks other than 0 print nothing."""


def _plan(stage: Stage, index: int, first: int, last: int, config: Config, record: dict,
          stage_hash: str, require_upstream: bool, run_dir: Path,
          eval_hash: str = "") -> tuple[str, str]:
    """(what to do, why): "skip", "run", "resume", "evaluate" (outputs up to date, evaluation
    options changed) or "error" (the why is the message)."""
    same = record.get("fingerprint") == stage_hash
    if not stage.enabled(config):
        return "skip", "not enabled by this config" if first <= index <= last else ""
    if index < first or index > last:
        done = same and record.get("status") == "done"
        needed = _upstream_of([later.name for later in STAGES[first:last + 1]
                               if later.enabled(config)], config)
        if index < first and require_upstream and not done and stage.name in needed:
            return "error", (f"{run_dir}: stage {stage.name} is not done with this config "
                             "(it did not run, or its options or data changed since), and the "
                             f"stages asked for read its outputs; run it first (amnseg run "
                             f"--to {stage.name}, or without --from)")
        return "skip", ""
    missing = [path for path in stage.expected(config) if not path.is_file()]
    if same and record.get("status") == "done" and not missing:
        if record.get("eval_fingerprint", "") != eval_hash:
            return "evaluate", " (its evaluation options or data changed: evaluating again)"
        return "skip", "up to date"
    if not same:
        # Outputs made with other options or data are replaced: say so, and what changed
        # (they may be wanted: hours of training).
        return "run", _what_changed(stage, config, record) if record.get(
            "status") == "done" else ""
    if record.get("status") == "done":
        return "resume", f" ({len(missing)} output files missing, first {missing[0]}; resuming)"
    return "resume", " (resuming)"


def _what_changed(stage: Stage, config: Config, record: dict) -> str:
    """Why a done stage runs again: the options whose values changed since, or else its data
    or an earlier stage."""
    before = record.get("options")
    now = stage_options(stage, config)
    changed = [key for key, value in now.items()
               if isinstance(before, dict) and key in before and before[key] != value]
    if changed:
        shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
        return f" ({shown} changed since it ran: its outputs are replaced)"
    return (" (its options or data changed since it ran, or an earlier stage did: its outputs "
            "are replaced)")


def _given_inputs(stage: Stage, config: Config) -> str:
    """What the stage's description does not say: a network given instead of trained, masks
    given instead of the pseudo masks."""
    section = getattr(config, stage.name, None)
    if getattr(section, "checkpoint", None):
        return f" (from {stage.name}.checkpoint={section.checkpoint}: nothing to train)"
    if stage.own_inputs(config):
        return f" (on seg.masks={config.seg.masks}, not the pseudo masks)"
    return ""


def _upstream(stage: Stage, config: Config) -> str | None:
    """The stage whose outputs ``stage`` reads with this config (None: only the data)."""
    if stage.upstream is None or stage.own_inputs(config) or stage is STAGES[0]:
        return None
    if stage.upstream == PREVIOUS:
        return STAGE_NAMES[STAGES.index(stage) - 1]
    return stage.upstream


def _upstream_of(names: list[str], config: Config) -> set[str]:
    """The stages whose outputs the stages ``names`` read, directly or through others."""
    found: set[str] = set()
    for name in names:
        upstream = _upstream(STAGES[STAGE_NAMES.index(name)], config)
        while upstream is not None:
            found.add(upstream)
            upstream = _upstream(STAGES[STAGE_NAMES.index(upstream)], config)
    return found


def _check_given_paths(config: Config, stages: list[str]) -> None:
    """The files and folders that options of the stages to run name must exist: said now,
    not when the stage starts after hours of the stages before it."""
    given: list[tuple[str, str, str]] = []  # (option, path, "file" or "folder")
    for stage in ("cam", "amn", "irn", "seg"):
        if stage in stages and getattr(config, stage).checkpoint:
            given.append((f"{stage}.checkpoint", getattr(config, stage).checkpoint, "file"))
    trains_seg = "seg" in stages or "seg_gt" in stages
    if trains_seg and config.seg.init not in SEG_INIT_WORDS:
        given.append(("seg.init", config.seg.init, "file"))
    if "seg" in stages and config.seg.masks not in ("pseudo", "gt"):
        given.append(("seg.masks", config.seg.masks, "folder"))
    for option, value, kind in given:
        path = Path(value)
        if not (path.is_file() if kind == "file" else path.is_dir()):
            raise AmnsegError(f"{option}={value}: {kind} not found")
    # Their contents too: a run whose options changed clears the stage's outputs before it
    # runs, and a file that cannot serve must not cost the ones there.
    class_names = None
    for option, value, _ in given:
        if option.endswith(".checkpoint"):
            class_names = class_names or build_dataset(config.data,
                                                       config.data.train_split).class_names
            load_model_checkpoint(Path(value), option.split(".")[0], class_names)
        elif option == "seg.init":
            check_init_file(config)


def _note_val_inside_train(config: Config, progress: Callable[[str], None]) -> None:
    """Say so when every val image is a training image (e.g. a folder dataset without
    ``splits/``, whose every split is all its images): the segmentation network's val mIoU
    is then measured on images it trained on."""
    data = config.data
    val = set(build_dataset(data, data.val_split).stems)
    if val and val <= set(build_dataset(data, data.train_split).stems):
        progress(f"note: all {len(val)} images of data.val_split={data.val_split!r} are in "
                 f"data.train_split={data.train_split!r}: the segmentation network's val mIoU "
                 "is measured on images it trained on")


def _trains(config: Config, stage: str, stages: list[str]) -> bool:
    """Whether training stage ``stage`` is among ``stages`` and trains (it takes the file
    ``<stage>.checkpoint`` names instead when one is given; seg_gt always trains)."""
    return stage in stages and (stage == "seg_gt" or not getattr(config, stage).checkpoint)


def _recorded_error(error: BaseException) -> str:
    """What the manifest says of a stage's failure (its last line)."""
    if distributed.peer_stopped(error):
        return distributed.PEER_STOPPED.replace("above", "in the job's output")
    return str(error).strip().splitlines()[-1] if str(error) else type(error).__name__


def _check_training(config: Config, stages: list[str]) -> None:
    """What the training stages among ``stages`` (those that will run) need and can be
    checked before any stage, as a stage whose options changed clears its outputs when it
    starts: a training set of at least one optimisation step, and ImageNet weights (a file,
    the hub cache or a download) that can be read and fit the network."""
    batches = {"cam": config.cam.batch_size, "amn": config.amn.batch_size,
               "irn": config.irn.batch_size}
    training = [stage for stage in (*batches, "seg", "seg_gt") if _trains(config, stage, stages)]
    if not training:
        return
    images = len(run_dataset(config, config.data.train_split))
    for stage in training:
        batch = batches.get(stage, config.seg.batch_size)
        distributed.per_rank_batch(batch, batch_option(stage))  # under torchrun
        what = f"{config.data.root} ({stage})"
        if stage in batches:
            steps_per_epoch(images, batches[stage], what)
        else:
            seg_steps_per_epoch(images, config.seg, what)
    if config.backbone.pretrained and ("cam" in training or any(
            stage in training and getattr(config, stage).backbone_init == "imagenet"
            for stage in ("amn", "irn"))):
        build_backbone(config.backbone)
    if config.seg.init == "imagenet" and config.seg.backbone.pretrained and (
            "seg" in training or "seg_gt" in training):
        build_backbone(imagenet_backbone_config(config.seg), key="seg.backbone.pretrained")


def _with_skipped(config: Config, signatures: dict[str, str]) -> dict[str, str]:
    """The data signatures with the images the run skips: a stage trained or run with an image
    is out of date once it is skipped, and the other way round. Unchanged when none is skipped
    (the fingerprints of runs without skipped images stay as they were)."""
    skipped = sorted(skipped_images(config))
    if not skipped:
        return signatures
    digest = hashlib.sha256(json.dumps(skipped).encode()).hexdigest()[:16]
    return {name: f"{value}|skipping {digest}" for name, value in signatures.items()}


def _fingerprints(config: Config, signatures: dict[str, str], records: Any = None
                  ) -> dict[str | None, str]:
    """Every stage's fingerprint (None: the empty upstream of the stages that read only data)."""
    hashes: dict[str | None, str] = {None: ""}
    for stage in STAGES:
        record = records.get(stage.name) if isinstance(records, dict) else None
        hashes[stage.name] = fingerprint(stage, config, hashes[_upstream(stage, config)],
                                         signatures, record)
    return hashes


def stale_stages(config: Config, manifest: dict[str, Any],
                 data: dict[str, str] | None = None) -> list[str]:
    """The stages recorded as done whose outputs (or evaluation) ``config`` would make
    differently, with the data signatures ``data`` (default: those the manifest recorded):
    e.g. the stages after an ``amnseg run --to`` whose options changed, until they run
    again."""
    recorded = manifest.get("data") if data is None else data
    signatures = _with_skipped(config, recorded if isinstance(recorded, dict) else {})
    records = manifest.get("stages")
    hashes = _fingerprints(config, signatures, records)
    stale = []
    for stage in STAGES:
        record = records.get(stage.name) if isinstance(records, dict) else None
        if not isinstance(record, dict) or record.get("status") != "done":
            continue
        if not stage.enabled(config) or record.get("fingerprint") != hashes[stage.name] or (
                record.get("eval_fingerprint", "")
                != evaluation_fingerprint(stage, config, signatures)):
            stale.append(stage.name)
    return stale


def missing_outputs(config: Config, manifest: dict[str, Any]) -> dict[str, int]:
    """{stage: how many of its output files are gone} of the stages recorded as done (the
    next run remakes them)."""
    records = manifest.get("stages")
    missing = {}
    for stage in STAGES:
        record = records.get(stage.name) if isinstance(records, dict) else None
        if isinstance(record, dict) and record.get("status") == "done" and stage.enabled(config):
            count = sum(not path.is_file() for path in stage.expected(config))
            if count:
                missing[stage.name] = count
    return missing


def run_in_progress(run_dir: Path) -> bool:
    """Whether the process that holds (or last held) the run folder's lock is alive on this
    machine: a stage recorded as running without it was interrupted."""
    try:
        pid = int((run_dir / LOCK).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def stage_status(record: Any, stale: bool = False) -> str:
    """A manifest record's status as shown to users; "out of date" for a stale stage."""
    if not isinstance(record, dict):
        return "?"  # a hand-edited manifest
    status = str(record.get("status", "?"))
    return f"{status}, out of date" if stale else status


def _start_record(records: dict[str, Any], stage: Stage, stage_hash: str, action: str,
                  config: Config) -> dict[str, Any]:
    """The manifest record of a stage that starts ("run") or resumes ("resume") now; a resumed
    one keeps its seconds so far and the count of outputs made beside the stage before it."""
    name = stage.name
    record: dict[str, Any] = {"fingerprint": stage_hash, "status": "running",
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": 0.0,
                              "options": stage_options(stage, config)}
    given = _given_paths(stage, config)
    if given:
        record["given"] = given
    if action == "resume":
        earlier = records.get(name, {})
        record["seconds"] = earlier.get("seconds", 0.0)
        if "made_beside" in earlier:
            record["made_beside"] = earlier["made_beside"]
    records[name] = record
    return record


def _start_follower_record(
    stage: Stage, first: int, last: int, config: Config, records: dict[str, Any],
    hashes: dict[str | None, str], require_upstream: bool, run_dir: Path,
    progress: Callable[[str], None],
) -> bool:
    """Whether ``stage``'s follower is to run beside it: when it is wanted and will run in this
    call. Its record is then started (and its outputs cleared, when it starts afresh) as if it
    were running: the files it makes beside ``stage`` are kept when it runs itself, resuming
    to make only what is missing."""
    follower = stage.follower
    if follower is None or not follower.wanted(config):
        return False
    index = STAGE_NAMES.index(follower.stage)
    following = STAGES[index]
    action, _ = _plan(following, index, first, last, config, records.get(following.name, {}),
                      hashes[following.name], require_upstream, run_dir)
    if action not in ("run", "resume"):
        return False
    if action == "run":
        _clear_outputs(config, following)
    _start_record(records, following, hashes[following.name], action, config)
    progress(f"[beside] {following.name}: {following.description}, as {stage.name} writes "
             "each image")
    return True


def _evaluation(stage: Stage, config: Config, eval_hash: str) -> dict[str, Any]:
    """The stage's evaluation, as manifest record fields: its metrics, the fingerprint of what
    it read and which metrics it made ({} for a stage without one)."""
    if stage.evaluate is None:
        return {}
    metrics = distributed.run_on_main(stage.evaluate, config)
    return {"metrics": metrics, "eval_fingerprint": eval_hash, "eval_metrics": sorted(metrics)}


def _evaluate_again(stage: Stage, config: Config, record: dict[str, Any], eval_hash: str
                    ) -> None:
    """Evaluate a stage whose outputs are up to date; its record gets the new metrics in place
    of the ones its last evaluation made."""
    evaluated = _evaluation(stage, config, eval_hash)
    if distributed.is_main():
        made, previous = record.get("metrics"), record.get("eval_metrics")
        previous = {key for key in previous if isinstance(key, str)} if isinstance(
            previous, list) else set()  # (a hand-edited manifest may hold anything)
        kept = {key: value for key, value in (made if isinstance(made, dict) else {}).items()
                if key not in previous}
        record.update(metrics={**kept, **evaluated.pop("metrics")}, **evaluated)


def _run_stages(
    config: Config, run_dir: Path, first: int, last: int, progress: Callable[[str], None],
    require_upstream: bool,
) -> dict[str, Any]:
    main = distributed.is_main()
    manifest = load_manifest(run_dir, to_run=True)
    records = manifest.setdefault("stages", {})
    signatures = distributed.run_on_main(data_signatures, config)
    running = [stage.name for stage in STAGES[first:last + 1] if stage.enabled(config)]
    _check_given_paths(config, running)
    # The CRF devices are resolved when their stage starts: said now, not after the others.
    if {"cam_seeds", "amn_seeds"} & set(running):
        crf_device_of(config.seeds.crf_device, "seeds.crf_device")
    if {"seg", "seg_gt"} & set(running) and config.seg.eval_crf:
        crf_device_of(config.seg.crf_device, "seg.crf_device")
    if signatures.get("val") == "absent" and any(
            "val" in (*stage.data, *stage.evaluation_data)
            for stage in STAGES[first:last + 1] if stage.name in running):
        # A stage of this call reads the val split: say what is wrong with it now, not after
        # the stages before it have run.
        build_dataset(config.data, config.data.val_split)
    if main:
        save_json(run_dir / RUN_CONFIG, config_to_dict(config))
        manifest["data"] = signatures
        check_data(config, signatures, manifest, progress)
    distributed.barrier()
    has_val = signatures.get("val") != "absent"
    signatures = _with_skipped(config, signatures)
    hashes = _fingerprints(config, signatures, records)
    to_run = [stage.name for index, stage in enumerate(STAGES) if distributed.run_on_main(
        _plan, stage, index, first, last, config, records.get(stage.name, {}),
        hashes[stage.name], require_upstream, run_dir)[0] in ("run", "resume")]
    _check_training(config, to_run)
    masks_record = records.get("masks", {})
    masks_made = (masks_record.get("status") == "done"
                  and masks_record.get("fingerprint") == hashes["masks"])
    if "seg" in running and config.seg.masks != "gt" and (
            "masks" not in running or config.seg.masks != "pseudo") and (
            masks_made or config.seg.masks != "pseudo" or not require_upstream):
        # The masks seg trains on exist already: a missing one is said before the stage's
        # earlier outputs are cleared. (Pseudo masks not made yet under --from: the stages
        # that make them are named below.)
        mask_source(config, config.seg.masks, run_dataset(config, config.data.train_split),
                    check_all=True)
    for index, stage in enumerate(STAGES):
        stage_hash = hashes[stage.name]
        eval_hash = evaluation_fingerprint(stage, config, signatures)
        record = records.get(stage.name, {})
        action, why = distributed.run_on_main(
            _plan, stage, index, first, last, config, record, stage_hash, require_upstream,
            run_dir, eval_hash)
        if action == "error":
            raise AmnsegError(why)
        if action == "skip":
            if why:
                progress(f"[skip] {stage.name}: {why}")
            continue
        if action == "evaluate":
            progress(f"[evaluate] {stage.name}{why}")
            _evaluate_again(stage, config, record, eval_hash)
            if main:
                save_json(run_dir / MANIFEST, manifest)
            distributed.barrier()
            continue
        if main:
            if action == "run":
                # Stages that read this one's outputs have changed fingerprints too and rerun.
                _clear_outputs(config, stage)
            if stage.name in ("seg", "seg_gt") and has_val:
                _note_val_inside_train(config, progress)
            progress(f"[run] {stage.name}: {stage.description}{_given_inputs(stage, config)}"
                     f"{why}")
            record = _start_record(records, stage, stage_hash, action, config)
        follower = stage.follower if distributed.run_on_main(
            _start_follower_record, stage, first, last, config, records, hashes,
            require_upstream, run_dir, progress) else None
        if main:
            save_json(run_dir / MANIFEST, manifest)
        distributed.barrier()
        started = time.perf_counter()
        try:
            if follower is None:
                metrics = stage.run(config)
            else:
                with follower.start(config) as beside:
                    metrics = stage.run(config, on_saved=beside.submit)
                made = int(distributed.sum_across([beside.made])[0])  # by every rank
                if main:
                    records[follower.stage]["made_beside"] = made
                if beside.failure:
                    progress(f"[beside] {follower.stage} stopped ({beside.failure}); it "
                             "makes the rest when it runs")
            evaluated = _evaluation(stage, config, eval_hash)
        except BaseException as error:
            # The manifest says what happened; the error itself goes on to the caller.
            if main:
                interrupted = isinstance(error, KeyboardInterrupt)
                record.update(status="interrupted" if interrupted else "failed",
                              error=_recorded_error(error),
                              seconds=record["seconds"] + time.perf_counter() - started)
                save_json(run_dir / MANIFEST, manifest)
            raise
        if main:
            record.update(status="done", metrics={**metrics, **evaluated.pop("metrics", {})},
                          seconds=record["seconds"] + time.perf_counter() - started,
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **evaluated)
            save_json(run_dir / MANIFEST, manifest)
        distributed.barrier()
    return manifest
