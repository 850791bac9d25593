"""The whole pipeline as one resumable command (``amnseg run``).

Stages run in order; each has a fingerprint: a hash of the config options it reads plus the
fingerprint of the stage before it. The run folder's ``manifest.json`` records, per stage, the
fingerprint, status, timings and metrics. A stage whose fingerprint is unchanged and whose
status is ``done`` is skipped; a changed option changes that stage's fingerprint and so every
fingerprint downstream: those stages' outputs are cleared and recomputed. A stage that was
interrupted (status ``running`` with the same fingerprint) resumes: map, seed and mask stages
skip the images already written, training stages restart from their last epoch checkpoint.

To add a stage: write its function ``(config) -> metrics`` and append a ``Stage`` to
``STAGES`` with its command name, the config options it reads and the paths it owns.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amnseg.checkpoints import load_model_checkpoint
from amnseg.config import Config, config_to_dict
from amnseg.data import build_dataset
from amnseg.data.base import SegDataset
from amnseg.errors import AmnsegError
from amnseg.io import load_json, save_checkpoint, save_json
from amnseg.layout import (
    checkpoint_path,
    eval_dir,
    log_path,
    maps_dir,
    masks_dir,
    seeds_dir,
    training_state_path,
)
from amnseg.stages.amn import make_amn_maps, train_amn
from amnseg.stages.cam import make_cams, train_cam
from amnseg.stages.common import processed_images
from amnseg.stages.evaluate import evaluate_label_maps, evaluate_maps
from amnseg.stages.irn import make_masks, train_irn
from amnseg.stages.seeds import make_seeds

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # the CLI command that runs this stage alone
    run: Callable[[Config], dict[str, Any]]
    options: tuple[str, ...]  # dotted config keys (or whole sections) the outputs depend on
    outputs: Callable[[Config], tuple[Path, ...]]  # the files/folders this stage owns
    description: str


def _pick(config: Config, dotted: str) -> Any:
    value: Any = config_to_dict(config)
    for part in dotted.split("."):
        value = value[part]
    return value


def fingerprint(stage: Stage, config: Config, upstream: str) -> str:
    payload = {key: _pick(config, key) for key in stage.options}
    text = json.dumps([upstream, stage.name, payload], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the stages ---------------------------------------------------------------------------
# Each returns metrics for the manifest; evaluation runs on data.infer_split when it has
# ground-truth masks.


def _evaluated_images(config: Config) -> SegDataset | None:
    dataset = build_dataset(config.data, config.data.infer_split)
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
        dataset = build_dataset(config.data, config.data.train_split)
        if given:
            checkpoint = load_model_checkpoint(Path(given), stage, dataset.class_names)
            save_checkpoint(checkpoint_path(config, stage), checkpoint)
            return {"checkpoint": given}
        train(config)
        return {"train_split": config.data.train_split, "train_images": len(dataset)}

    return run


def _maps(source: str, make: Callable[[Config], Path]) -> Callable[[Config], dict]:
    def run(config: Config) -> dict[str, Any]:
        make(config)
        return {"images": len(processed_images(config)), **_evaluate_maps(config, source)}

    return run


def _seed_stage(source: str, description: str) -> Stage:
    """The stage that makes CRF seeds from the ``source`` (cam or amn) maps."""

    def run(config: Config) -> dict[str, Any]:
        out_dir = make_seeds(config, source)
        return _evaluate_labels(config, f"{source}_seeds", out_dir)

    options = (f"seeds.{source}_fg_threshold", f"seeds.{source}_bg_threshold", "seeds.crf")
    return Stage(f"{source}_seeds", f"make-{source}-seeds", run, options,
                 lambda config: (seeds_dir(config, source),), description)


def _masks(config: Config) -> dict[str, Any]:
    out_dir = make_masks(config)
    return {"images": len(processed_images(config)),
            **_evaluate_labels(config, "pseudo_masks", out_dir)}


def _training_outputs(stage: str) -> Callable[[Config], tuple[Path, ...]]:
    return lambda config: (checkpoint_path(config, stage), training_state_path(config, stage),
                           log_path(config, stage))


_DATA = ("seed", "data.kind", "data.root", "data.train_split", "data.infer_split",
         "data.aug_mask_dir", "data.semantic_dir")
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

STAGES: tuple[Stage, ...] = (
    Stage("cam", "train-cam", _training("cam", train_cam), (*_DATA, "backbone", *_CAM_TRAIN),
          _training_outputs("cam"), "train the CAM classifier on data.train_split"),
    Stage("cam_maps", "make-cam", _maps("cam", make_cams), ("cam.scales", "cam.flip"),
          lambda config: (maps_dir(config, "cam"),), "multi-scale CAMs"),
    _seed_stage("cam", "CRF seeds from CAMs"),
    Stage("amn", "train-amn", _training("amn", lambda c: train_amn(c, seeds_dir(c, "cam"))),
          ("backbone", *_AMN_TRAIN), _training_outputs("amn"),
          "train AMN on the CAM seeds of data.train_split"),
    Stage("amn_maps", "make-amn-maps",
          _maps("amn", lambda c: make_amn_maps(c, seeds_dir(c, "cam"))), ("amn.scales",),
          lambda config: (maps_dir(config, "amn"),), "AMN maps"),
    _seed_stage("amn", "CRF seeds from AMN maps"),
    Stage("irn", "train-irn", _training("irn", lambda c: train_irn(c, seeds_dir(c, "amn"))),
          ("backbone", *_IRN_TRAIN), _training_outputs("irn"),
          "train IRN on the AMN seeds of data.train_split"),
    Stage("masks", "make-masks", _masks, _IRN_WALK, lambda config: (masks_dir(config),),
          "random walk -> pseudo masks"),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def load_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    return load_json(path) if path.is_file() else {"stages": {}}


def _clear_outputs(config: Config, stage: Stage) -> None:
    for path in stage.outputs(config):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_pipeline(
    config: Config,
    start: str | None = None,
    stop: str | None = None,
    progress: Callable[[str], None] = print,
    require_upstream: bool = True,
) -> dict[str, Any]:
    """Run (or skip) the stages from ``start`` to ``stop``; returns the manifest.

    With ``require_upstream`` (``amnseg run --from``), the stages before ``start`` must be done
    with this config; without it (a single stage's own command), a stage whose inputs are
    missing says so when it reads them.
    """
    for name in (start, stop):
        if name is not None and name not in STAGE_NAMES:
            raise AmnsegError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    first = STAGE_NAMES.index(start) if start else 0
    last = STAGE_NAMES.index(stop) if stop else len(STAGES) - 1
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(run_dir / "config.json", config_to_dict(config))
    manifest = load_manifest(run_dir)
    records = manifest.setdefault("stages", {})
    upstream = ""
    for index, stage in enumerate(STAGES):
        stage_hash = fingerprint(stage, config, upstream)
        upstream = stage_hash
        record = records.get(stage.name, {})
        same = record.get("fingerprint") == stage_hash
        if index < first or index > last:
            done = same and record.get("status") == "done"
            if index < first and require_upstream and not done:
                raise AmnsegError(
                    f"{run_dir}: stage {stage.name} is not done with this config; "
                    f"run without --from (or --from {stage.name}) first"
                )
            continue
        if same and record.get("status") == "done":
            progress(f"[skip] {stage.name}: up to date")
            continue
        if not same:
            _clear_outputs(config, stage)
            # Everything downstream depended on the old outputs.
            for later in STAGES[index + 1:]:
                records.pop(later.name, None)
        progress(f"[run] {stage.name}: {stage.description}"
                 + (" (resuming)" if same else ""))
        record = {"fingerprint": stage_hash, "status": "running",
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "seconds": record.get("seconds", 0.0) if same else 0.0}
        records[stage.name] = record
        save_json(run_dir / MANIFEST, manifest)
        started = time.perf_counter()
        metrics = stage.run(config)
        record.update(status="done", metrics=metrics,
                      seconds=record["seconds"] + time.perf_counter() - started,
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        save_json(run_dir / MANIFEST, manifest)
    return manifest
