"""Random walk on a GPU, per VOC-size image (94x125 / 125x94 stride-4 maps, radius 5, beta 10,
2^8 steps): the CUDA C++ kernel (amnseg.ops.random_walk_cuda) and the Triton kernel
(amnseg.ops.random_walk_triton) in their variants, amnseg's stencil walk in plain PyTorch,
and the reference's dense walk (float32 and TF32), all in the same process on the same GPU.

    python -m benchmarks.bench_random_walk_gpu [--classes 3] [--batches 16 64 128 264]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from amnseg.ops import cuda_rtc, random_walk_cuda, random_walk_triton
from amnseg.ops.random_walk import random_walk
from benchmarks.bench_random_walk import dense_random_walk
from benchmarks.common import write_section


def inputs(count: int, classes: int, device: str, size: tuple[int, int] = (94, 125)
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``count`` random maps and boundary maps, alternately ``size`` and transposed."""
    generator = torch.Generator().manual_seed(0)
    maps, boundaries = [], []
    for index in range(count):
        height, width = size if index % 2 == 0 else size[::-1]
        maps.append(torch.rand((classes, height, width), generator=generator).to(device))
        boundaries.append((torch.rand((height, width), generator=generator) ** 4).to(device))
    return maps, boundaries


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` synchronised runs after one warm-up (compilation) run."""
    fn()
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128, 264])
    parser.add_argument("--dense-images", type=int, default=2)
    # A dry run of this script on the CPU: TRITON_INTERPRET=1 ... --device cpu --exp-times 1
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--exp-times", type=int, default=8)
    parser.add_argument("--size", default="94x125", help="HEIGHTxWIDTH of the stride-4 maps")
    args = parser.parse_args()
    walk = {"exp_times": args.exp_times}
    rows = []

    def row(method: str, batch: int, total: float) -> None:
        rows.append((method, batch, 1000 * total / batch))
        print(f"{method:55s} batch {batch:4d}: {1000 * total / batch:9.3f} ms/image", flush=True)

    size = tuple(int(v) for v in args.size.split("x"))
    maps, boundaries = inputs(max(args.batches), args.classes, args.device, size)
    kernels = {
        f"cuda, tile {tile_rows}x{tile_cols}, {lanes} lanes": partial(
            random_walk_cuda.random_walk_batch, tile=(tile_rows, tile_cols), lanes=lanes)
        for tile_rows, tile_cols, lanes in ((8, 32, 4), (16, 32, 4), (32, 32, 3), (16, 16, 4))
    }
    if random_walk_cuda.available(torch.device(args.device)):
        print(f"NVRTC: {cuda_rtc.nvrtc()._name}", flush=True)
    else:
        kernels = {}
    kernels |= {
        f"triton, tile {tile}, {warps} warps": partial(
            random_walk_triton.random_walk_batch, tile=tile, num_warps=warps)
        for tile, warps in ((64, 2), (128, 4))
    }
    # Correctness at VOC size against the float64 CPU walk, before any timing.
    expected = [random_walk(m.double().cpu(), b.double().cpu(), **walk)
                for m, b in zip(maps[:4], boundaries[:4], strict=True)]
    errors = {}
    for method, kernel in kernels.items():
        walked = kernel([m.double() for m in maps[:4]], boundaries[:4], **walk)
        errors[method] = max(((w.double().cpu() - e).abs().max() / e.abs().max()).item()
                             for w, e in zip(walked, expected, strict=True))
        print(f"{method}: max relative difference to the float64 CPU walk "
              f"{errors[method]:.1e}", flush=True)
    worst = max(errors.values())

    for batch in args.batches:
        for method, kernel in kernels.items():
            row(method, batch, seconds(lambda k=kernel, n=batch: k(maps[:n], boundaries[:n],
                                                                   **walk)))
    row("amnseg stencil in PyTorch (float64), one image at a time", 4,
        seconds(lambda: [random_walk(m, b, **walk) for m, b in zip(maps[:4], boundaries[:4],
                                                                       strict=True)], 1))
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        count = args.dense_images
        pairs = list(zip(maps[:count], boundaries[:count], strict=True))
        row(f"reference dense walk, float32{' TF32' if tf32 else ''}", count,
            seconds(lambda pairs=pairs: [dense_random_walk(m, b, exp_times=args.exp_times)
                                         for m, b in pairs], 1))
    torch.backends.cuda.matmul.allow_tf32 = False

    best_kernel = min(ms for method, _, ms in rows if method.startswith(("triton", "cuda")))
    dense_tf32 = next(ms for method, _, ms in rows if method.endswith("TF32"))
    dense_fp32 = next(ms for method, _, ms in rows if method.endswith("float32"))
    table = "\n".join(f"| {method} | {batch} | {ms:.3f} |" for method, batch, ms in rows)
    body = (
        f"{args.classes} classes per image, stride-4 maps alternating {size[0]}x{size[1]} and "
        f"{size[1]}x{size[0]} (a {4 * size[1]}x{4 * size[0]} image), radius 5, beta 10, "
        f"2^{args.exp_times} steps, float64 "
        f"state. Best of 3 runs after a warm-up. Max relative difference of a kernel to the "
        f"float64 CPU walk: {worst:.1e}.\n\n| method | images per call | ms per image |\n"
        f"|---|---|---|\n{table}\n\nBest kernel: {best_kernel:.3f} ms/image, "
        f"{dense_fp32 / best_kernel:.0f}x the reference's dense walk in float32 (its default), "
        f"{dense_tf32 / best_kernel:.0f}x in TF32.\n"
    )
    write_section("Random walk on the GPU", body)


if __name__ == "__main__":
    main()
