"""Seed generation throughput (two thresholds + dense CRF) on VOC-sized images, by worker count.

Synthetic 500x375 images with 2 classes and smooth score maps, written as a folder dataset
with score maps; then ``amnseg.stages.seeds.make_seeds`` with 1 and 2 worker processes. With
``--crf-device cuda`` the CRFs run on the GPU (``seeds.crf_device``; the worker counts are then
loader workers), after one pydensecrf run with the first worker count that their seeds are
compared with, pixel by pixel.

    python -m benchmarks.bench_seeds [--images 24] [--workers 1 2] [--crf-device cpu]
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
from amnseg.data.base import read_index_png
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


def equal_pixels(first: Path, second: Path) -> float:
    """Fraction of the seed pixels of folder ``second`` equal to those of ``first``."""
    equal = total = 0
    for path in sorted(first.glob("*.png")):
        expected, got = read_index_png(path), read_index_png(second / path.name)
        equal += int((expected == got).sum())
        total += expected.size
    return equal / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts to time (the first one's seeds are the reference)")
    parser.add_argument("--crf-device", default="cpu",
                        help="cpu (pydensecrf), or cuda: the PyTorch CRF on the GPU")
    args = parser.parse_args()
    runs = [("cpu", workers) for workers in args.workers]
    if args.crf_device != "cpu":
        runs = [runs[0], *((args.crf_device, workers) for workers in args.workers)]
    root = Path(tempfile.mkdtemp(prefix="amnseg_bench_seeds_"))
    try:
        data, maps = write_inputs(root, args.images)
        rows, outputs = [], []
        for crf_device, workers in runs:
            config = load_config("voc12", ["data.kind=folder", f"data.root={data}",
                                           "data.infer_split=all",
                                           f"seeds.crf_device={crf_device}"])
            out = root / f"seeds_{len(outputs)}"
            start = time.perf_counter()
            make_seeds(config, "cam", maps, out, workers=workers)
            seconds = time.perf_counter() - start
            outputs.append(out)
            crf = "pydensecrf" if crf_device == "cpu" else f"PyTorch, {crf_device}"
            rows.append(f"| {crf} | {workers} | {args.images} | {seconds:.1f} | "
                        f"{args.images / seconds:.2f} | {equal_pixels(outputs[0], out):.6f} |")
        same = all((outputs[0] / p.name).read_bytes() == p.read_bytes()
                   for out in outputs[1:] for p in out.glob("*.png"))
        body = (
            f"{args.images} synthetic {WIDTH}x{HEIGHT} images, 2 classes, thresholds 0.30/0.05, "
            "CRF 10 iterations (two CRFs per image), PNG output.\n\n"
            "| CRF | workers | images | seconds | images/s | pixels equal to the first row's |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nOutputs identical for all rows: {same}.\n"
        )
        cores = os.cpu_count() or 1
        title = "Seed generation (CRF) throughput" + (f", {cores} cores" if cores > 2 else "")
        if args.crf_device != "cpu":
            title = "Seed generation with the CRFs on the GPU"
        write_section(title, body)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
