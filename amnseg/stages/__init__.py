"""The pipeline stages, one module each; every stage writes under ``<run_dir>/<stage>/``."""

from __future__ import annotations

from pathlib import Path


def stage_dir(config, stage: str) -> Path:
    """``<run_dir>/<stage>``: the folder a stage writes its checkpoint, logs and outputs to."""
    return Path(config.run_dir) / stage


def checkpoint_path(config, stage: str) -> Path:
    """``<run_dir>/<stage>/<stage>.pt``: the final checkpoint of a training stage."""
    return stage_dir(config, stage) / f"{stage}.pt"
