"""The seed CRF alone, per VOC-size image: pydensecrf (one CPU core, the reference) against
amnseg's PyTorch mean field on the CPU and, where there is one, on the GPU, by images per call.

Each image (500x375 or 375x500, blocks of colour with noise, 3 labels) has the seed stage's two
CRFs (foreground and background label maps) of METHOD.md section 3: 10 iterations, Gaussian
sxy 3 / compat 3, bilateral sxy 50 / srgb 5 / compat 10. Reported: milliseconds per image
(best of 3 after a warm-up) and the fraction of label pixels equal to pydensecrf's.

    python -m benchmarks.bench_crf [--images 16] [--batches 1 8 16] [--cpu-images 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from amnseg.config import CrfConfig
from amnseg.ops.crf import crf_refine_labels_batch, crf_refine_labels_many
from benchmarks.common import write_section


def inputs(count: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """``count`` images, alternately 375x500 and 500x375, each with two 3-label maps."""
    rng = np.random.default_rng(0)
    images, maps = [], []
    for index in range(count):
        height, width = (375, 500) if index % 2 == 0 else (500, 375)
        blocks = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3)).astype(np.float32)
        image = np.kron(blocks, np.ones((25, 25, 1)))[:height, :width]
        images.append(np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8))
        coarse = rng.integers(0, 3, (2, height // 40 + 1, width // 40 + 1))
        maps.append([m.repeat(40, 0).repeat(40, 1)[:height, :width] for m in coarse])
    return images, maps


def timed(run, repeats: int = 3) -> tuple[float, object]:
    """(best seconds of ``repeats`` after a warm-up, the last result)."""
    result = run()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16],
                        help="images per call of the PyTorch CRF on the GPU")
    parser.add_argument("--cpu-images", type=int, default=2,
                        help="images for pydensecrf and the PyTorch CRF on the CPU")
    args = parser.parse_args()
    params = CrfConfig()
    images, maps = inputs(args.images)
    counts = [3] * args.images

    def reference(index: int) -> list[np.ndarray]:
        return crf_refine_labels_many(images[index], maps[index], 3, params)

    few = range(args.cpu_images)
    seconds, expected = timed(lambda: [reference(k) for k in few], repeats=1)
    rows = [f"| pydensecrf, 1 CPU core | 1 | {1000 * seconds / len(few):.1f} | 1.000000 |"]

    def agreement(got: list[list[np.ndarray]]) -> float:
        """Fraction of the first images' label pixels equal to pydensecrf's."""
        equal = sum(int((ours == theirs).sum()) for k in few
                    for ours, theirs in zip(got[k], expected[k], strict=True))
        return equal / sum(m.size for k in few for m in maps[k])

    threads = torch.get_num_threads()
    seconds, got = timed(lambda: crf_refine_labels_batch(
        [images[k] for k in few], [maps[k] for k in few], counts[:len(few)], params, "cpu"),
        repeats=1)
    rows.append(f"| PyTorch, CPU ({threads} threads) | {len(few)} | "
                f"{1000 * seconds / len(few):.1f} | {agreement(got):.6f} |")
    if torch.cuda.is_available():
        for batch in args.batches:
            def on_gpu(batch=batch) -> list[list[np.ndarray]]:
                out = []
                for start in range(0, args.images, batch):
                    part = range(start, min(start + batch, args.images))
                    out += crf_refine_labels_batch([images[k] for k in part],
                                                   [maps[k] for k in part], [3] * len(part),
                                                   params, "cuda")
                return out

            seconds, got = timed(on_gpu)
            rows.append(f"| PyTorch, {torch.cuda.get_device_name(0)} | {batch} | "
                        f"{1000 * seconds / args.images:.2f} | {agreement(got):.6f} |")
    body = (
        "VOC-size images (375x500 and 500x375), the seed stage's two CRFs per image (3 labels, "
        "10 iterations, METHOD.md section 3's kernels); labels from the marginals' argmax "
        "compared pixel by pixel with pydensecrf's (on the first --cpu-images images).\n\n"
        "| CRF | images per call | ms per image | pixels equal to pydensecrf's |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    write_section("Dense CRF: pydensecrf and the PyTorch mean field", body)


if __name__ == "__main__":
    main()
