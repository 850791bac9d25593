"""Seed generation throughput (two thresholds + dense CRF) on VOC-sized images, by worker count.

Synthetic 500x375 images with 2 classes and smooth score maps, written as a folder dataset
with score maps; then ``amnseg.stages.seeds.make_seeds`` with 1 and 2 worker processes.

    python -m benchmarks.bench_seeds [--images 24] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from amnseg.config import load_config
from amnseg.io import ScoreMaps, save_score_maps
from amnseg.stages.seeds import make_seeds
from benchmarks.common import write_section

WIDTH, HEIGHT = 500, 375


def write_inputs(root: Path, count: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    data, maps = root / "data", root / "maps"
    (data / "images").mkdir(parents=True)
    maps.mkdir()
    (data / "classes.txt").write_text("a\nb\n")
    rows = ["stem,classes"]
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for i in range(count):
        image = rng.integers(0, 40, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        scores = []
        for _ in range(2):
            cy, cx, r = rng.integers(80, 300), rng.integers(80, 420), rng.integers(40, 120)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)).astype(np.float32)
            image[blob > 0.3] = rng.integers(80, 255, 3)
            scores.append(blob)
        Image.fromarray(image).save(data / "images" / f"img{i:03d}.jpg")
        rows.append(f"img{i:03d},a;b")
        full = np.stack(scores)
        save_score_maps(maps / f"img{i:03d}.npz",
                        ScoreMaps(np.array([1, 2]), full[:, ::4, ::4], full))
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    return data, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts to time (the first one's seeds are the reference)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="amnseg_bench_seeds_"))
    try:
        data, maps = write_inputs(root, args.images)
        config = load_config("voc12", ["data.kind=folder", f"data.root={data}",
                                       "data.infer_split=all"])
        rows = []
        for workers in args.workers:
            out = root / f"seeds_{workers}"
            start = time.perf_counter()
            make_seeds(config, "cam", maps, out, workers=workers)
            seconds = time.perf_counter() - start
            rows.append(f"| {workers} | {args.images} | {seconds:.1f} | "
                        f"{args.images / seconds:.2f} |")
        first = root / f"seeds_{args.workers[0]}"
        same = all((first / p.name).read_bytes() == p.read_bytes()
                   for workers in args.workers[1:]
                   for p in (root / f"seeds_{workers}").glob("*.png"))
        body = (
            f"{args.images} synthetic {WIDTH}x{HEIGHT} images, 2 classes, thresholds 0.30/0.05, "
            "CRF 10 iterations (two CRFs per image), PNG output.\n\n"
            "| workers | images | seconds | images/s |\n|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nOutputs identical for all worker counts: {same}.\n"
        )
        cores = os.cpu_count() or 1
        write_section("Seed generation (CRF) throughput"
                      + (f", {cores} cores" if cores > 2 else ""), body)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
