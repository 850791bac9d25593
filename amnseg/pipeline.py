"""The whole pipeline as one resumable command (``amnseg run``).

Stages run in order; each has a fingerprint: a hash of the config options it reads plus the
fingerprint of the stage before it. The run folder's ``manifest.json`` records, per stage, the
fingerprint, status, timings and metrics. A stage whose fingerprint is unchanged and whose
status is ``done`` is skipped; a changed option changes that stage's fingerprint and so every
fingerprint downstream: those stages' outputs are cleared and recomputed. A stage that was
interrupted (status ``running`` with the same fingerprint) resumes: map, seed and mask stages
skip the images already written, training stages restart from their last epoch checkpoint.

To add a stage: write its function ``(config) -> metrics`` and append a ``Stage`` to
``STAGES`` with the config options it reads and the folders it owns.
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

from amnseg.config import Config, config_to_dict
from amnseg.errors import AmnsegError
from amnseg.io import load_json, save_json

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config], dict[str, Any]]
    options: tuple[str, ...]  # dotted config keys (or whole sections) the outputs depend on
    outputs: tuple[str, ...]  # folders/files under the run folder that this stage owns
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
# Each returns metrics for the manifest; evaluation runs where ground-truth masks exist.


def _run_dir(config: Config) -> Path:
    return Path(config.run_dir)


def _has_masks(config: Config) -> bool:
    from amnseg.data import build_dataset

    return build_dataset(config.data, config.data.infer_split).has_masks


def _evaluate_maps(config: Config, name: str, maps: Path, threshold: float) -> dict[str, Any]:
    if not _has_masks(config):
        return {}
    from amnseg.data import build_dataset
    from amnseg.stages.evaluate import evaluate_maps

    result = evaluate_maps(
        maps,
        build_dataset(config.data, config.data.infer_split),
        config.eval.thresholds(),
        _run_dir(config) / "eval",
        name=name,
        threshold=threshold,
        robust_range=tuple(config.eval.robust_range),
    )
    return {
        f"{name}_miou_at_threshold": result["miou_at_threshold"],
        f"{name}_best_miou": result["best_miou"],
        f"{name}_best_threshold": result["best_threshold"],
    }


def _evaluate_labels(config: Config, name: str, folder: Path) -> dict[str, Any]:
    if not _has_masks(config):
        return {}
    from amnseg.data import build_dataset
    from amnseg.stages.evaluate import evaluate_label_maps

    result = evaluate_label_maps(
        folder, build_dataset(config.data, config.data.infer_split),
        _run_dir(config) / "eval", name=name,
    )
    return {f"{name}_miou": result["miou"]}


def _use_given_checkpoint(config: Config, stage: str, given: str) -> dict[str, Any]:
    """Import a given checkpoint (either format) to the stage's default place: no training."""
    from amnseg.checkpoints import load_model_checkpoint
    from amnseg.data import build_dataset
    from amnseg.io import save_checkpoint
    from amnseg.stages import checkpoint_path

    class_names = build_dataset(config.data, config.data.infer_split).class_names
    checkpoint = load_model_checkpoint(Path(given), stage, class_names)
    checkpoint["class_names"] = list(class_names)
    save_checkpoint(checkpoint_path(config, stage), checkpoint)
    return {"checkpoint": given}


def run_cam(config: Config) -> dict[str, Any]:
    from amnseg.stages.cam import train_cam

    if config.cam.checkpoint:
        return _use_given_checkpoint(config, "cam", config.cam.checkpoint)
    train_cam(config)
    return {}


def run_cam_maps(config: Config) -> dict[str, Any]:
    from amnseg.stages.cam import make_cams

    maps = make_cams(config)
    return _evaluate_maps(config, "cam", maps, config.cam.eval_threshold)


def _seeds_from(source: str) -> Callable[[Config], dict[str, Any]]:
    """The stage that makes CRF seeds from the ``source`` (cam or amn) maps."""

    def run(config: Config) -> dict[str, Any]:
        from amnseg.stages.seeds import make_seeds, seed_settings

        fg, bg, maps, out_dir = seed_settings(config, source)
        make_seeds(config, maps, out_dir, fg, bg)
        return _evaluate_labels(config, f"{source}_seeds", out_dir)

    return run


def run_amn(config: Config) -> dict[str, Any]:
    from amnseg.stages.amn import train_amn

    if config.amn.checkpoint:
        return _use_given_checkpoint(config, "amn", config.amn.checkpoint)
    train_amn(config, _run_dir(config) / "seeds" / "cam")
    return {}


def run_amn_maps(config: Config) -> dict[str, Any]:
    from amnseg.stages.amn import make_amn_maps

    maps = make_amn_maps(config, _run_dir(config) / "seeds" / "cam")
    return _evaluate_maps(config, "amn", maps, config.amn.eval_threshold)


def run_irn(config: Config) -> dict[str, Any]:
    from amnseg.stages.irn import train_irn

    if config.irn.checkpoint:
        return _use_given_checkpoint(config, "irn", config.irn.checkpoint)
    train_irn(config, _run_dir(config) / "seeds" / "amn")
    return {}


def run_masks(config: Config) -> dict[str, Any]:
    from amnseg.stages.irn import make_masks

    out_dir = make_masks(config, _run_dir(config) / "amn" / "maps")
    return _evaluate_labels(config, "pseudo_masks", out_dir)


_DATA = ("seed", "data.kind", "data.root", "data.infer_split", "data.aug_mask_dir",
         "data.semantic_dir")
_CRF = tuple(f"seeds.crf_{name}" for name in (
    "iterations", "gt_prob", "gaussian_sxy", "gaussian_compat", "bilateral_sxy",
    "bilateral_srgb", "bilateral_compat"))
_CAM_TRAIN = tuple(f"cam.{name}" for name in (
    "epochs", "batch_size", "lr", "head_lr_mult", "weight_decay", "momentum", "poly_power",
    "resize_long", "crop_size", "checkpoint"))
_AMN_TRAIN = tuple(f"amn.{name}" for name in (
    "epochs", "batch_size", "backbone_lr", "head_lr", "weight_decay", "label_smoothing",
    "dropout", "crop_size", "rescale", "flip", "backbone_init", "checkpoint"))
_IRN_TRAIN = tuple(f"irn.{name}" for name in (
    "radius", "epochs", "batch_size", "lr", "weight_decay", "momentum", "poly_power",
    "crop_size", "rescale", "flip", "backbone_init", "checkpoint"))
_IRN_WALK = tuple(f"irn.{name}" for name in (
    "infer_pad_size", "walk_radius", "beta", "exp_times", "cam_power", "bg_threshold"))

STAGES: tuple[Stage, ...] = (
    Stage("cam", run_cam, ("seed", "data.kind", "data.root", "data.train_split", "backbone",
                           *_CAM_TRAIN), ("cam/cam.pt", "cam/last.pt", "cam/log.jsonl"),
          "train the CAM classifier"),
    Stage("cam_maps", run_cam_maps, (*_DATA, "cam.scales", "cam.flip"), ("cam/maps",),
          "multi-scale CAMs"),
    Stage("cam_seeds", _seeds_from("cam"),
          ("seeds.cam_fg_threshold", "seeds.cam_bg_threshold", *_CRF),
          ("seeds/cam",), "CRF seeds from CAMs"),
    Stage("amn", run_amn, ("backbone", *_AMN_TRAIN), ("amn/amn.pt", "amn/last.pt",
                                                      "amn/log.jsonl"), "train AMN"),
    Stage("amn_maps", run_amn_maps, ("amn.scales",), ("amn/maps",), "AMN maps"),
    Stage("amn_seeds", _seeds_from("amn"),
          ("seeds.amn_fg_threshold", "seeds.amn_bg_threshold", *_CRF),
          ("seeds/amn",), "CRF seeds from AMN maps"),
    Stage("irn", run_irn, ("backbone", *_IRN_TRAIN), ("irn/irn.pt", "irn/last.pt",
                                                      "irn/log.jsonl"), "train IRN"),
    Stage("masks", run_masks, _IRN_WALK, ("irn/masks",), "random walk -> pseudo masks"),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def load_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    return load_json(path) if path.is_file() else {"stages": {}}


def _clear_outputs(run_dir: Path, stage: Stage) -> None:
    for relative in stage.outputs:
        path = run_dir / relative
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_pipeline(
    config: Config,
    start: str | None = None,
    stop: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or skip) the stages from ``start`` to ``stop``; returns the manifest."""
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
            if index < first and not (same and record.get("status") == "done"):
                raise AmnsegError(
                    f"{run_dir}: stage {stage.name} is not done with this config; "
                    f"run without --from (or --from {stage.name}) first"
                )
            continue
        if same and record.get("status") == "done":
            progress(f"[skip] {stage.name}: up to date")
            continue
        if not same:
            _clear_outputs(run_dir, stage)
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
