"""Dilated 3x3 convolutions of DeepLab-v2's ResNet-101 at the seg stage's shapes: cuDNN's
dilated kernels against the same convolution as an undilated one over the d x d sub-grids
(``backbone.space_to_batch``), and an undilated convolution of the same size as the bound.

Each row times one convolution's forward and backward (input and weight gradients) at batch
``--batch`` (the recipe's 10 crops of 321: features of 41x41 at scale 1, 21x21 at 0.5, 31x31 at
0.75), channels_last, with cuDNN's algorithm search. The per-step column multiplies by the
number of such convolutions in one training step (layer3: 23 blocks at dilation 2, layer4: 3 at
dilation 4, each at the three MSC scales).

    python -m benchmarks.bench_dilated_conv [--batch 10] [--dtype bf16] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from amnseg.models.resnet import space_to_batch_conv
from benchmarks.common import run_times, write_section

# (layer, channels, dilation, blocks) of DeepLab-v2's ResNet-101 at output stride 8.
LAYERS = [("layer3", 256, 2, 23), ("layer4", 512, 4, 3)]
FEATURE_SIZES = {"1": 41, "0.5": 21, "0.75": 31}  # crop 321 at each MSC scale, stride 8


def time_fwd_bwd(conv, x: torch.Tensor, weight: torch.Tensor, repeats: int) -> float:
    """Median seconds of conv(x, weight) and its backward to both."""
    upstream = torch.randn_like(conv(x, weight))

    def once() -> None:
        out = conv(x, weight)
        torch.autograd.grad(out, (x, weight), upstream)
        if x.is_cuda:
            torch.cuda.synchronize()

    return statistics.median(run_times(once, repeats, warmups=3))  # warm-ups: cuDNN's search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda",
                        help="cuda (what is measured); cpu only checks that the script runs")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    totals = {"dilated": 0.0, "space_to_batch": 0.0, "undilated": 0.0}
    for layer, channels, dilation, blocks in LAYERS:
        for scale, size in FEATURE_SIZES.items():
            x = torch.randn(args.batch, channels, size, size, device=args.device, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            weight = torch.randn(channels, channels, 3, 3, device=args.device, dtype=dtype) / 48
            weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            ways = {
                "dilated": lambda x, w, d=dilation: F.conv2d(x, w, None, 1, d, d),
                "space_to_batch": lambda x, w, d=dilation: space_to_batch_conv(x, w, None, d),
                "undilated": lambda x, w: F.conv2d(x, w, None, 1, 1, 1),
            }
            seconds = {name: time_fwd_bwd(conv, x, weight, args.repeats)
                       for name, conv in ways.items()}
            # forward + two backward products, 2 FLOP per multiply-add
            tflops = 3 * 2 * args.batch * size * size * channels * channels * 9 / 1e12
            for name in totals:
                totals[name] += seconds[name] * blocks
            rows.append(
                f"| {layer} ({channels} ch, d={dilation}) | {scale} ({size}x{size}) | "
                + " | ".join(f"{seconds[n] * 1e3:.3f} ({tflops / seconds[n]:.1f})"
                             for n in ways)
                + f" | {seconds['dilated'] / seconds['space_to_batch']:.2f} |")
    body = "\n".join([
        f"DeepLab-v2 ResNet-101's dilated 3x3 convolutions at the seg stage's shapes: batch "
        f"{args.batch}, {args.dtype}, channels_last, cudnn.benchmark; forward + backward (input "
        f"and weight gradients), median of {args.repeats}. Milliseconds (TFLOP/s).", "",
        "| convolution | MSC scale (features) | dilated kernels | space to batch | "
        "undilated (the bound) | dilated / space to batch |",
        "|---|---|---|---|---|---|",
        *rows, "",
        "Per training step (23 layer3 and 3 layer4 blocks, three scales each): "
        + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in totals.items())
        + ".",
    ])
    write_section(f"Dilated convolutions: as dilated kernels and space to batch "
                  f"({args.dtype})", body)


if __name__ == "__main__":
    main()
