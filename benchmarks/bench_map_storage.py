"""Cost of writing and reading one image's map file, compressed (the default) or not.

Maps of ``--classes`` classes at VOC size (500x375, plus the stride-4 maps), smooth like real
CAMs (bilinearly upsampled low-resolution noise), written with ``amnseg.io.save_score_maps``
and read with ``load_score_maps``, as the map, seed, evaluation and walk stages do.

    python -m benchmarks.bench_map_storage [--classes 3] [--repeats 10]
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from amnseg.io import ScoreMaps, load_score_maps, save_score_maps
from benchmarks.common import best_time, write_section

WIDTH, HEIGHT = 500, 375


def smooth_maps(classes: int, seed: int = 0) -> ScoreMaps:
    rng = np.random.default_rng(seed)
    full = np.stack([
        np.asarray(Image.fromarray(rng.random((12, 16), dtype=np.float32)).resize(
            (WIDTH, HEIGHT), Image.BILINEAR))
        for _ in range(classes)
    ])
    return ScoreMaps(np.arange(1, classes + 1), np.ascontiguousarray(full[:, ::4, ::4]), full)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    maps = smooth_maps(args.classes)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for compress in (True, False):
            path = Path(folder) / f"maps_{compress}.npz"
            write = best_time(partial(save_score_maps, path, maps, compress), args.repeats)
            read = best_time(partial(load_score_maps, path), args.repeats)
            loaded = load_score_maps(path)
            same = all(np.array_equal(a, b) for a, b in
                       ((loaded.full, maps.full), (loaded.strided, maps.strided)))
            rows.append(f"| {str(compress).lower()} | {write * 1000:.1f} | {read * 1000:.1f} | "
                        f"{path.stat().st_size / 1e6:.2f} | {same} |")
    body = (
        f"{args.classes} classes, {WIDTH}x{HEIGHT} float32 maps + stride-4 maps, smooth values; "
        f"best of {args.repeats}. 10,582 VOC images make two such files each (CAM, AMN).\n\n"
        "| compress_maps | write ms | read ms | MB | values identical |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    write_section("Map file storage", body)


if __name__ == "__main__":
    main()
