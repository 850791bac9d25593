"""The map stages' evaluation (threshold sweep, per-image optima, FG/BG gap) per VOC-size
image, by worker processes.

``--images`` images of 500x375 with 1-3 classes and their masks (``bench_pipeline``'s data),
smooth maps of their classes (``bench_map_storage``'s) written as the map stages write them
(compressed unless ``--uncompressed``); then ``evaluate_maps`` on the VOC sweep grid
(0.00-0.95) for each ``--workers`` count. Reported: milliseconds per image (best of
``--repeats``) and whether every result equals the first row's.

    python -m benchmarks.bench_eval_maps [--images 64] [--workers 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from amnseg.config import DataConfig, EvalConfig
from amnseg.data import build_dataset
from amnseg.data.base import SegDataset
from amnseg.io import ScoreMaps, save_score_maps
from amnseg.stages.evaluate import evaluate_maps
from benchmarks.bench_map_storage import HEIGHT, WIDTH, smooth_maps
from benchmarks.bench_pipeline import make_dataset
from benchmarks.common import write_section


def make_maps(root: Path, count: int, compress: bool) -> SegDataset:
    """A folder dataset of ``count`` images with masks (``bench_pipeline``'s) in ``root`` and a
    map file of each image's classes in ``root / "maps"``."""
    make_dataset(root, count)
    dataset = build_dataset(DataConfig(kind="folder", root=str(root), train_split="train",
                                       infer_split="train"), "train")
    for index, stem in enumerate(dataset.stems):
        classes = np.flatnonzero(dataset.label(stem)) + 1
        maps = smooth_maps(len(classes), seed=index)
        save_score_maps(root / "maps" / f"{stem}.npz",
                        ScoreMaps(classes, maps.strided, maps.full), compress)
    return dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--uncompressed", action="store_true")
    args = parser.parse_args()
    grid = EvalConfig().thresholds()
    rows, first = [], None
    with tempfile.TemporaryDirectory() as folder:
        dataset = make_maps(Path(folder), args.images, not args.uncompressed)
        for workers in args.workers:
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                result = evaluate_maps(Path(folder) / "maps", dataset, grid,
                                       Path(folder) / "eval", workers=workers)
                best = min(best, time.perf_counter() - started)
            first = first or result
            rows.append(f"| {workers} | {best / args.images * 1000:.1f} | "
                        f"{args.images / best:.1f} | {result == first} |")
    body = (
        f"{args.images} synthetic {WIDTH}x{HEIGHT} images with 1-3 of the 20 VOC classes, smooth "
        f"maps ({'un' if args.uncompressed else ''}compressed files), the sweep grid "
        f"{grid[0]:.2f}-{grid[-1]:.2f} ({len(grid)} thresholds) plus the eval threshold 0.15; "
        f"best of {args.repeats}, worker start-up included.\n\n"
        "| workers | ms per image | images/s | result equal to the first row's |\n"
        "|---|---|---|---|\n" + "\n".join(rows)
    )
    write_section("Map evaluation (threshold sweep) by worker processes", body)


if __name__ == "__main__":
    main()
