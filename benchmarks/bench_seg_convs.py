"""Every convolution of one seg training step, timed alone: a lower bound for the step.

The convolutions of DeepLab-v2 ResNet-101 MSC (the recipe's crop and scales, folded BatchNorm
so that each carries its bias as in the fastest setting) are recorded from one forward pass
on the CPU: their input shapes and parameters, and how often each occurs. Each distinct one
then runs forward and backward (weight gradient; input gradient except for the image's own
convolution) at batch ``--batch`` on ``--device``, bf16 channels_last with cuDNN's algorithm
search, and the sum over the step is what the convolutions alone cost: no fusion or overlap
of the other work can make a step faster than that (torch.compile leaves convolutions to
cuDNN).

    python -m benchmarks.bench_seg_convs [--batch 10] [--crop 321] [--repeats 10]
    python -m benchmarks.bench_seg_convs --arithmetic   # no timing: FLOP per kind, any machine
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from unittest import mock

import torch
import torch.nn.functional as F

from amnseg.config import deeplab_backbone
from amnseg.models.deeplab import MSC, DeepLabV2
from amnseg.models.resnet import resnet_from_config
from benchmarks.common import run_times, write_section

# (input channels, height, width, output channels, kh, kw, stride, padding, dilation, bias,
# the input needs a gradient)
Signature = tuple[int, int, int, int, int, int, tuple, tuple, tuple, bool, bool]


def step_convolutions(crop: int) -> Counter[Signature]:
    """The convolutions of one MSC training forward of a ``crop`` x ``crop`` image, counted."""
    backbone = deeplab_backbone()
    backbone.pretrained = None
    backbone.fold_norm = True
    model = MSC(DeepLabV2(resnet_from_config(backbone), 21)).train()
    seen: Counter[Signature] = Counter()
    conv2d = F.conv2d

    def record(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        pair = torch.nn.modules.utils._pair
        seen[(x.shape[1], x.shape[2], x.shape[3], weight.shape[0], weight.shape[2],
              weight.shape[3], pair(stride), pair(padding), pair(dilation), bias is not None,
              x.shape[1] != 3)] += 1
        return conv2d(x, weight, bias, stride, padding, dilation, groups)

    with torch.no_grad(), mock.patch.object(F, "conv2d", record):
        model(torch.zeros(1, 3, crop, crop))
    return seen


def time_convolution(signature: Signature, batch: int, device: torch.device, dtype,
                     repeats: int) -> tuple[float, float]:
    """(median seconds, FLOP) of one convolution's forward and backward at ``batch``: the
    forward, the weight gradient and, where needed, the input gradient, each 2 FLOP per
    multiply-add."""
    (channels, height, width, out_channels, kh, kw, stride, padding, dilation, bias,
     input_grad) = signature
    x = torch.randn(batch, channels, height, width, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(input_grad)
    weight = torch.randn(out_channels, channels, kh, kw, device=device, dtype=dtype) / 32
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    bias_value = (torch.zeros(out_channels, device=device, dtype=dtype, requires_grad=True)
                  if bias else None)
    wanted = [t for t in (x, weight, bias_value) if t is not None and t.requires_grad]
    upstream = torch.randn_like(F.conv2d(x, weight, bias_value, stride, padding, dilation))

    def once() -> None:
        out = F.conv2d(x, weight, bias_value, stride, padding, dilation)
        torch.autograd.grad(out, wanted, upstream)
        if device.type == "cuda":
            torch.cuda.synchronize()

    flop = convolution_flop(signature, batch)
    return statistics.median(run_times(once, repeats, warmups=3)), flop  # warm-ups: cuDNN


def convolution_flop(signature: Signature, batch: int) -> int:
    """FLOP of one convolution's forward and backward at ``batch``: the forward, the weight
    gradient and, where needed, the input gradient, each 2 FLOP per multiply-add."""
    (channels, height, width, out_channels, kh, kw, stride, padding, dilation, _,
     input_grad) = signature
    rows = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    cols = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    products = 2 + input_grad
    return products * 2 * batch * out_channels * rows * cols * channels * kh * kw


def kind_of(signature: Signature) -> str:
    """A convolution's kind for the tables: kernel, dilation, ASPP or input size."""
    out_channels, kh, kw = signature[3:6]
    kind = f"{kh}x{kw}" + (f" dilation {signature[8][0]}" if signature[8][0] > 1 else "")
    return kind + (" (ASPP)" if out_channels == 21 else f", {signature[1]}x{signature[2]} in")


def write_arithmetic(crop: int) -> None:
    """The step's arithmetic per convolution kind (no timing): what a GPU has to run."""
    convolutions = step_convolutions(crop)
    by_kind: dict[str, int] = {}
    for signature, count in convolutions.items():
        kind = kind_of(signature)
        by_kind[kind] = by_kind.get(kind, 0) + count * convolution_flop(signature, 1)
    total = sum(by_kind.values())
    rows = [f"| {kind} | {flop / 1e9:.1f} | {100 * flop / total:.1f} % |"
            for kind, flop in sorted(by_kind.items(), key=lambda item: -item[1])]
    body = "\n".join([
        f"The convolutions of one DeepLab-v2 ResNet-101 MSC training crop ({crop}x{crop}, "
        "scales 1, 0.5, 0.75), forward + backward (weight gradients; input gradients except "
        "for the image's own convolution), 2 FLOP per multiply-add; counted, not timed.", "",
        "| convolutions | GFLOP per crop | share |", "|---|---|---|", *rows, "",
        f"All convolutions: **{total / 1e9:.1f} GFLOP per crop**.",
    ])
    write_section("Seg training step: arithmetic by convolution", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda",
                        help="cuda (what is measured); cpu only checks that the script runs")
    parser.add_argument("--arithmetic", action="store_true",
                        help="count each kind's FLOP instead of timing (any machine)")
    args = parser.parse_args()
    if args.arithmetic:
        write_arithmetic(args.crop)
        return
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    convolutions = step_convolutions(args.crop)
    by_kind: dict[str, list[float]] = {}
    total = flops = 0.0
    for signature, count in convolutions.items():
        seconds, flop = time_convolution(signature, args.batch, device, dtype, args.repeats)
        flops += count * flop
        total += count * seconds
        kind = kind_of(signature)
        by_kind.setdefault(kind, [0.0, 0])
        by_kind[kind][0] += count * seconds
        by_kind[kind][1] += count
    rows = [f"| {kind} | {count} | {seconds * 1e3:.1f} |"
            for kind, (seconds, count) in sorted(by_kind.items(), key=lambda i: -i[1][0])]
    body = "\n".join([
        f"Every convolution of one DeepLab-v2 ResNet-101 MSC training step (crop {args.crop}, "
        f"scales 1, 0.5, 0.75, folded BatchNorm), timed alone at batch {args.batch}: "
        f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}, channels_last, cudnn.benchmark, "
        f"forward + backward, median of {args.repeats}; {len(convolutions)} distinct "
        f"convolutions, {sum(convolutions.values())} in a step.", "",
        "| convolutions | in a step | ms per step |", "|---|---|---|", *rows, "",
        f"All convolutions: **{total * 1e3:.1f} ms per step of {args.batch} crops**, "
        f"{flops / total / 1e12:.1f} TFLOP/s: at most {args.batch / total:.1f} crops/s from "
        "the convolutions alone.",
    ])
    write_section("Seg training step: its convolutions alone", body)


if __name__ == "__main__":
    main()
