"""Stage "seeds": CRF-refined seed labels from score maps (METHOD.md section 3).

For each image: foreground labels = argmax over [t_fg, maps] refined by a dense CRF, background
labels = the same with t_bg; seed = the foreground class where the first says foreground, 0
where both say background, 255 (unsure) elsewhere. Works on any ``<stem>.npz`` score maps (CAM
or AMN). Images run in worker processes; each image's seed depends on that image alone, so the
output does not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from amnseg.config import Config
from amnseg.data import build_dataset
from amnseg.data.base import SegDataset
from amnseg.data.voc import voc_palette
from amnseg.errors import AmnsegError
from amnseg.io import load_score_maps, save_label_png
from amnseg.ops.crf import CRFParams, crf_refine_labels

UNSURE = 255


def threshold_argmax(scores: np.ndarray, threshold: float) -> np.ndarray:
    """(K, H, W) scores -> (H, W) channel index of argmax over [threshold, scores] (0 = bg)."""
    background = np.full((1, *scores.shape[1:]), threshold, dtype=scores.dtype)
    return np.argmax(np.concatenate([background, scores], axis=0), axis=0)


def make_seed(
    image: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    fg_threshold: float,
    bg_threshold: float,
    crf: CRFParams = CRFParams(),
) -> np.ndarray:
    """Seed labels of one image: (H, W) uint8 with 0 = bg, class ids, 255 = unsure.

    ``image`` (H, W, 3) uint8; ``scores`` (K, H, W) normalised maps of the image's classes;
    ``class_ids`` (K,) their ids 1..C.
    """
    keys = np.concatenate([[0], np.asarray(class_ids, dtype=np.int64)])
    fg = keys[crf_refine_labels(image, threshold_argmax(scores, fg_threshold), len(keys), crf)]
    bg = keys[crf_refine_labels(image, threshold_argmax(scores, bg_threshold), len(keys), crf)]
    seed = fg.astype(np.uint8)
    seed[fg == 0] = UNSURE
    seed[(fg == 0) & (bg == 0)] = 0
    return seed


@dataclass(frozen=True)
class SeedJob:
    dataset: SegDataset
    maps_dir: Path
    out_dir: Path
    fg_threshold: float
    bg_threshold: float
    crf: CRFParams


def _seed_one(job: SeedJob, stem: str) -> str:
    maps = load_score_maps(job.maps_dir / f"{stem}.npz")
    image = job.dataset.image(stem)
    if maps.full.shape[1:] != image.shape[:2]:
        raise AmnsegError(
            f"{job.maps_dir / (stem + '.npz')}: maps are {maps.full.shape[2]}x"
            f"{maps.full.shape[1]}, the image is {image.shape[1]}x{image.shape[0]}"
        )
    seed = make_seed(
        image, maps.full, maps.class_ids, job.fg_threshold, job.bg_threshold, job.crf
    )
    save_label_png(job.out_dir / f"{stem}.png", seed, voc_palette())
    return stem


def crf_params(config: Config) -> CRFParams:
    s = config.seeds
    return CRFParams(
        iterations=s.crf_iterations,
        gt_prob=s.crf_gt_prob,
        gaussian_sxy=s.crf_gaussian_sxy,
        gaussian_compat=s.crf_gaussian_compat,
        bilateral_sxy=s.crf_bilateral_sxy,
        bilateral_srgb=s.crf_bilateral_srgb,
        bilateral_compat=s.crf_bilateral_compat,
    )


def seed_settings(config: Config, source: str) -> tuple[float, float, Path, Path]:
    """(fg threshold, bg threshold, map folder, seed folder) for seeds from ``cam`` or ``amn``
    maps: the run's ``<source>/maps`` become ``seeds/<source>``."""
    if source not in ("cam", "amn"):
        raise AmnsegError(f"seed source {source!r}: expected cam or amn")
    fg = getattr(config.seeds, f"{source}_fg_threshold")
    bg = getattr(config.seeds, f"{source}_bg_threshold")
    run = Path(config.run_dir)
    return fg, bg, run / source / "maps", run / "seeds" / source


def make_seeds(
    config: Config,
    maps_dir: Path,
    out_dir: Path,
    fg_threshold: float,
    bg_threshold: float,
    workers: int | None = None,
) -> Path:
    """Write ``<out_dir>/<stem>.png`` seeds for every image of ``data.infer_split``.

    Existing seed files are kept (resume). ``workers``: processes (default: config, 0 = cores).
    """
    if not maps_dir.is_dir():
        raise AmnsegError(f"{maps_dir}: score map folder not found")
    dataset = build_dataset(config.data, config.data.infer_split)
    missing = [s for s in dataset.stems if not (maps_dir / f"{s}.npz").is_file()]
    if missing:
        raise AmnsegError(
            f"{maps_dir}: no maps for {len(missing)} of {len(dataset)} images "
            f"(first: {missing[0]}.npz); run the map stage first"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in dataset.stems if not (out_dir / f"{s}.png").is_file()]
    job = SeedJob(dataset, maps_dir, out_dir, fg_threshold, bg_threshold, crf_params(config))
    workers = config.seeds.workers if workers is None else workers
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    run_one = partial(_seed_one, job)
    bar = tqdm(total=len(todo), desc=f"seeds ({workers} workers)")
    if workers == 1:
        for stem in todo:
            run_one(stem)
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(run_one, todo, chunksize=4):
                bar.update()
    bar.close()
    return out_dir
