"""Stage "seeds": CRF-refined seed labels from score maps (METHOD.md section 3).

For each image: foreground labels = argmax over [t_fg, maps] refined by a dense CRF, background
labels = the same with t_bg; seed = the foreground class where the first says foreground, 0
where both say background, 255 (unsure) elsewhere. Works on any ``<stem>.npz`` score maps (CAM
or AMN). Images run in worker processes; each image's seed depends on that image alone, so the
output does not depend on the number of workers. With ``seeds.crf_device`` on a GPU, the CRFs
run there instead (PyTorch's mean field, a batch of images per call), fed by loader workers.
Seeds are made for every image of the run (``processed_images``): the training split's seeds
train AMN (from CAMs) and IRN (from AMN maps).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from amnseg import distributed
from amnseg.config import Config, CrfConfig
from amnseg.data.base import SegDataset
from amnseg.data.voc import voc_palette
from amnseg.errors import AmnsegError
from amnseg.io import BackgroundWriter, ScoreMaps, load_score_maps, output_file, save_label_png
from amnseg.layout import maps_dir, seeds_dir
from amnseg.ops.crf import crf_refine_labels_batch, crf_refine_labels_many
from amnseg.progress import progress_bar
from amnseg.stages.common import processed_images
from amnseg.training import crf_device_of, crf_on_gpu, resolve_device
from amnseg.workers import call_with_job, set_job, worker_pool

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
    crf: CrfConfig,
) -> np.ndarray:
    """Seed labels of one image: (H, W) uint8 with 0 = bg, class ids, 255 = unsure.

    ``image`` (H, W, 3) uint8; ``scores`` (K, H, W) normalised maps of the image's classes;
    ``class_ids`` (K,) their ids 1..C. The CRFs run in pydensecrf.
    """
    # Both CRFs share the image's kernels (built once): each result is what it is alone.
    refined = crf_refine_labels_many(image, threshold_pair(scores, fg_threshold, bg_threshold),
                                     len(class_ids) + 1, crf)
    return _seed_from(class_ids, refined)


def seeds_from_thresholded(
    images: Sequence[np.ndarray],
    label_pairs: Sequence[Sequence[np.ndarray]],
    class_ids: Sequence[np.ndarray],
    crf: CrfConfig,
    device: torch.device,
) -> list[np.ndarray]:
    """:func:`make_seed` of each image from its :func:`threshold_pair`, the CRFs of all of them
    run at once by the PyTorch mean field on ``device`` (``crf_refine_labels_batch``)."""
    refined = crf_refine_labels_batch(images, label_pairs, [len(ids) + 1 for ids in class_ids],
                                      crf, device)
    return [_seed_from(ids, pair) for ids, pair in zip(class_ids, refined, strict=True)]


def threshold_pair(scores: np.ndarray, fg_threshold: float, bg_threshold: float
                   ) -> list[np.ndarray]:
    """[threshold_argmax(scores, fg_threshold), threshold_argmax(scores, bg_threshold)] from one
    max and argmax over the channels (a fifth of the time at VOC size): the threshold channel
    comes first, so it wins ties, and a channel wins where its score exceeds it."""
    if len(scores) == 0:
        return [np.zeros(scores.shape[1:], dtype=np.int64) for _ in range(2)]
    best = scores.argmax(axis=0) + 1
    top = scores.max(axis=0)
    # In the scores' precision, as threshold_argmax's threshold channel.
    return [np.where(top > scores.dtype.type(threshold), best, 0)
            for threshold in (fg_threshold, bg_threshold)]


def _seed_from(class_ids: np.ndarray, refined: Sequence[np.ndarray]) -> np.ndarray:
    """The seed from the refined (foreground, background) channel maps (0 = bg, k = class k)."""
    keys = np.concatenate([[0], np.asarray(class_ids, dtype=np.int64)])
    fg, bg = (keys[channels] for channels in refined)
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
    crf: CrfConfig


def _seed_inputs(job: SeedJob, stem: str) -> tuple[str, np.ndarray, ScoreMaps]:
    """(stem, image, its score maps), checked to be of one size."""
    maps = load_score_maps(job.maps_dir / f"{stem}.npz", job.dataset.num_classes)
    image = job.dataset.image(stem)
    if maps.full.shape[1:] != image.shape[:2]:
        raise AmnsegError(
            f"{job.maps_dir / (stem + '.npz')}: maps are {maps.full.shape[2]}x"
            f"{maps.full.shape[1]}, the image is {image.shape[1]}x{image.shape[0]}"
        )
    return stem, image, maps


def _save_seed(job: SeedJob, stem: str, seed: np.ndarray) -> str:
    save_label_png(output_file(job.out_dir, stem, ".png"), seed, voc_palette())
    return stem


def _seed_one(job: SeedJob, stem: str) -> str:
    _, image, maps = _seed_inputs(job, stem)
    return _save_seed(job, stem, make_seed(image, maps.full, maps.class_ids, job.fg_threshold,
                                           job.bg_threshold, job.crf))


class _ThresholdedInputs(torch.utils.data.Dataset):
    """Loader-side reading and thresholding of each image's maps, for CRFs run in the main
    process. Items: (stem, image, class ids, its threshold_pair as uint8 label maps)."""

    def __init__(self, job: SeedJob, stems: list[str]):
        self.job, self.stems = job, stems

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray, np.ndarray, list[np.ndarray]]:
        stem, image, maps = _seed_inputs(self.job, self.stems[index])
        pair = threshold_pair(maps.full, self.job.fg_threshold, self.job.bg_threshold)
        # At most 1 + 255 labels (COCO has 81): uint8 sends an eighth of int64's bytes.
        return stem, image, maps.class_ids, [labels.astype(np.uint8) for labels in pair]


def _seeds_on_device(job: SeedJob, stems: list[str], crf_device: torch.device, workers: int,
                     batch_images: int, bar: Any) -> None:
    """The seeds of ``stems`` with the PyTorch CRF on ``crf_device``, ``batch_images`` images
    per call, in this process; loader workers read and threshold the maps and read the images,
    threads write the PNGs."""
    inputs = torch.utils.data.DataLoader(
        _ThresholdedInputs(job, stems), batch_size=batch_images, collate_fn=list,
        num_workers=workers, multiprocessing_context="fork" if workers else None)
    with BackgroundWriter(min(workers, 4)) as writer:
        for batch in inputs:
            stems_of, images, class_ids, label_pairs = zip(*batch, strict=True)
            seeds = seeds_from_thresholded(images, label_pairs, class_ids, job.crf, crf_device)
            for stem, seed in zip(stems_of, seeds, strict=True):
                writer.submit(_save_seed, job, stem, seed)
            bar.update(len(batch))


def _start_follower_worker(job: SeedJob, niceness: int) -> None:
    # Below the map stage's loader workers: they keep the GPU busy, the CRFs take what is left.
    os.nice(niceness)
    set_job(job)


def overlap_seeds(config: Config) -> bool:
    """Whether seeds are made while the map stage runs (``seeds.overlap``): ``auto`` does it
    when the maps are made on a GPU, whose stage leaves the CPU cores mostly idle; on the CPU
    the network needs every core itself. Never with the CRFs on a GPU (``seeds.crf_device``):
    they are made after the maps, in the seed stage's process."""
    if crf_on_gpu(config.seeds.crf_device):
        return False  # the CRFs run on a GPU, in the seed stage's own process
    if config.seeds.overlap == "auto":
        return resolve_device(config.device).type == "cuda"
    return config.seeds.overlap == "true"


class SeedFollower:
    """The seed stage's work started during the map stage: ``submit(stem)``, called once
    ``<stem>.npz`` is in place, queues that image's seed in worker processes (started when the
    follower is, niced by ``niceness``). The files are those :func:`make_seeds` writes (an
    image's seed depends on its own maps alone). Best effort: the first failed image stops the
    follower, and the seed stage, which runs next, makes what is missing and reports the error
    itself. Leaving the ``with`` block waits for the queued seeds (or, on an error, drops them:
    every file is written atomically)."""

    def __init__(self, config: Config, source: str, workers: int | None = None,
                 niceness: int = 5):
        fg_threshold, bg_threshold = seed_thresholds(config, source)
        self.out_dir = seeds_dir(config, source)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        job = SeedJob(processed_images(config), maps_dir(config, source), self.out_dir,
                      fg_threshold, bg_threshold, config.seeds.crf)
        workers = config.seeds.workers if workers is None else workers
        self.workers = workers or distributed.cores_per_process()
        self._pool = worker_pool(self.workers, _start_follower_worker, (job, niceness))
        self.made = 0
        self.failure: str | None = None
        self._count = threading.Lock()

    def submit(self, stem: str) -> None:
        """Queue ``stem``'s seed (a no-op once one has failed, or if its file exists). Safe to
        call from the map writer's threads."""
        if self.failure is None and not output_file(self.out_dir, stem, ".png").is_file():
            self.executor.submit(call_with_job, _seed_one, stem).add_done_callback(self._finished)

    def _finished(self, seed: Future) -> None:
        if seed.cancelled():
            return
        error = seed.exception()
        if error is None:
            with self._count:  # callbacks run on the pool's thread or a submitting one
                self.made += 1
        elif self.failure is None:
            self.failure = str(error).strip().splitlines()[-1] if str(error) else repr(error)

    def __enter__(self) -> SeedFollower:
        self.executor = self._pool.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        # Without an error the queued seeds are made; with one, those not started are dropped.
        self._pool.__exit__(kind, error, trace)


def seed_thresholds(config: Config, source: str) -> tuple[float, float]:
    """(foreground, background) thresholds of seeds from ``cam`` or ``amn`` maps."""
    if source not in ("cam", "amn"):
        raise AmnsegError(f"seed source {source!r}: expected cam or amn")
    return (getattr(config.seeds, f"{source}_fg_threshold"),
            getattr(config.seeds, f"{source}_bg_threshold"))


def make_seeds(
    config: Config,
    source: str,
    source_maps: Path | None = None,
    out_dir: Path | None = None,
    workers: int | None = None,
) -> Path:
    """Write ``<out_dir>/<stem>.png`` seeds from the ``source`` (cam or amn) maps of every image
    of the run, with that source's thresholds.

    Defaults: the run's ``<source>/maps`` -> ``seeds/<source>``. Existing seed files are kept
    (resume). ``workers``: processes (default: ``seeds.workers``, 0 = one per core): CRF
    workers, or with ``seeds.crf_device`` a GPU, loader workers.
    """
    fg_threshold, bg_threshold = seed_thresholds(config, source)
    source_maps = source_maps or maps_dir(config, source)
    out_dir = out_dir or seeds_dir(config, source)
    if not source_maps.is_dir():
        raise AmnsegError(f"{source_maps}: score map folder not found")
    dataset = processed_images(config)
    missing = [s for s in dataset.stems if not (source_maps / f"{s}.npz").is_file()]
    if missing:
        raise AmnsegError(
            f"{source_maps}: no maps for {len(missing)} of {len(dataset)} images "
            f"(first: {missing[0]}.npz); run the map stage first"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = distributed.shard(
        [s for s in dataset.stems if not output_file(out_dir, s, ".png").is_file()])
    job = SeedJob(dataset, source_maps, out_dir, fg_threshold, bg_threshold, config.seeds.crf)
    workers = config.seeds.workers if workers is None else workers
    workers = min(workers or distributed.cores_per_process(), max(len(todo), 1))
    crf_device = crf_device_of(config.seeds.crf_device, "seeds.crf_device")
    where = f"CRFs on {crf_device}" if crf_device else f"{workers} workers"
    bar = progress_bar(total=len(todo), desc=f"seeds ({where})")
    if crf_device is not None:
        _seeds_on_device(job, todo, crf_device, workers if workers > 1 else 0,
                         config.seeds.crf_batch_images, bar)
    elif workers == 1:
        for stem in todo:
            _seed_one(job, stem)
            bar.update()
    else:
        with worker_pool(workers, set_job, (job,)) as pool:
            # One image per task: the job is already in every worker, a task is a stem, and
            # single images balance the last round (4-image chunks left workers idle).
            seeds = [pool.submit(call_with_job, _seed_one, stem) for stem in todo]
            for done in as_completed(seeds):
                done.result()  # a failed image's error, here
                bar.update()
    bar.close()
    distributed.barrier()  # every rank's share is written
    return out_dir
