"""Where everything of a run lives: the one place that knows the run folder's layout.

    <run_dir>/config.json, manifest.json, report.html
    <run_dir>/<stage>/              a training stage: <stage>.pt, last.pt, log.jsonl, config.json
    <run_dir>/<source>/maps/        score maps (<stem>.npz) of cam or amn
    <run_dir>/seeds/<source>/       seed labels (<stem>.png) from those maps
    <run_dir>/irn/masks/            the final pseudo masks (<stem>.png)
    <run_dir>/eval/                 evaluation JSONs and plots
    <run_dir>/skipped_images.json   images left out (data.on_bad_image=skip) and why
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amnseg.errors import AmnsegError

MAP_SOURCES = ("cam", "amn")


def run_dir(config: Any) -> Path:
    return Path(config.run_dir)


def stage_dir(config: Any, stage: str) -> Path:
    """``<run_dir>/<stage>``: a training stage's checkpoint, logs and config."""
    return run_dir(config) / stage


def checkpoint_path(config: Any, stage: str) -> Path:
    """``<run_dir>/<stage>/<stage>.pt``: the final checkpoint of a training stage."""
    return stage_dir(config, stage) / f"{stage}.pt"


def training_state_path(config: Any, stage: str) -> Path:
    """``<run_dir>/<stage>/last.pt``: the per-epoch state a killed training resumes from."""
    return stage_dir(config, stage) / "last.pt"


def log_path(config: Any, stage: str) -> Path:
    """``<run_dir>/<stage>/log.jsonl``: one JSON line per training epoch."""
    return stage_dir(config, stage) / "log.jsonl"


def maps_dir(config: Any, source: str) -> Path:
    """``<run_dir>/<source>/maps``: score maps of ``cam`` or ``amn``."""
    _check_source(source)
    return run_dir(config) / source / "maps"


def seeds_dir(config: Any, source: str) -> Path:
    """``<run_dir>/seeds/<source>``: seed labels made from the ``source`` maps."""
    _check_source(source)
    return run_dir(config) / "seeds" / source


def masks_dir(config: Any) -> Path:
    """``<run_dir>/irn/masks``: the final pseudo masks."""
    return run_dir(config) / "irn" / "masks"


def eval_dir(config: Any) -> Path:
    return run_dir(config) / "eval"


def skipped_images_path(config: Any) -> Path:
    """``<run_dir>/skipped_images.json``: {stem: why} of the images the run leaves out."""
    return run_dir(config) / "skipped_images.json"


def _check_source(source: str) -> None:
    if source not in MAP_SOURCES:
        raise AmnsegError(f"map source {source!r}: expected one of {', '.join(MAP_SOURCES)}")
