"""DeepLab-v2 (ResNet-101, MSC) training throughput and inference time per image.

Training: crops of ``--crop`` in batches of ``--batch``, the recipe's optimiser, MSC loss over
the three scales and their max; optional bf16 autocast and channels_last on CUDA. Inference:
one ``--size`` image at its own size, MSC max, softmax, with and without the dense CRF.
Random weights (speed does not depend on them).

    python -m benchmarks.bench_seg [--depth 101] [--crop 321] [--batch 10] [--steps 3]
        [--size 500x375] [--amp] [--channels-last]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from amnseg.config import SegConfig, deeplab_backbone, deeplab_crf
from amnseg.models.deeplab import MSC, DeepLabV2
from amnseg.models.resnet import resnet_from_config
from amnseg.ops.crf import crf_refine_probabilities
from amnseg.stages.seg import freeze_batchnorm, msc_loss, predict_probabilities, seg_optimizer
from benchmarks.common import best_time, write_section


def profile_steps(step, sync, args: argparse.Namespace, per_step: float) -> None:
    """Three training steps under torch.profiler: operators by their own device time, and how
    much of the steps' wall time the device was busy (what a faster kernel could win)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    steps = 3
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            step()
        sync()
    averages = profile.key_averages()
    key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    # On CUDA an operator's row repeats the time of its kernels' rows: count the kernels only.
    cpu = torch.autograd.DeviceType.CPU
    busy_us = sum(getattr(row, key) for row in averages if not on_cuda or row.device_type != cpu)
    busy = busy_us / 1e6 / steps
    lines = [
        f"batch {args.batch}, crop {args.crop}, amp={args.amp}, channels_last="
        f"{args.channels_last}, cudnn.benchmark={args.cudnn_benchmark}, compile={args.compile}, "
        f"fold_norm={args.fold_norm}, space_to_batch={args.space_to_batch}",
        f"step {per_step * 1000:.1f} ms unprofiled; {'kernels' if on_cuda else 'operators'} "
        f"busy {busy * 1000:.1f} ms "
        f"per step ({busy / per_step:.0%} of the step)", "",
        averages.table(sort_by=key, row_limit=45),
    ]
    args.profile.mkdir(parents=True, exist_ok=True)
    (args.profile / f"seg_profile_b{args.batch}.txt").write_text("\n".join(lines))
    print(lines[1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the test image")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its algorithms for each shape (CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training network (inductor; minutes to compile)")
    parser.add_argument("--fold-norm", action="store_true",
                        help="apply the frozen BatchNorm inside the convolutions (fold_norm)")
    parser.add_argument("--space-to-batch", action="store_true",
                        help="dilated convs as undilated ones over sub-grids (space_to_batch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", type=Path, metavar="OUT_DIR",
                        help="also profile 3 training steps: seg_profile_b<batch>.txt in OUT_DIR")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    backbone = deeplab_backbone()
    backbone.depth = args.depth
    backbone.fold_norm = args.fold_norm
    backbone.space_to_batch = args.space_to_batch
    model = MSC(DeepLabV2(resnet_from_config(backbone), 21)).to(device)
    freeze_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = seg_optimizer(model, SegConfig())
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model.train()
    with torch.no_grad():
        sizes = [o.shape[-2:] for o in model(images[:1])[:-1]]
    targets = [torch.randint(0, 21, (args.batch, *s), device=device) for s in sizes]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    train_model = torch.compile(model) if args.compile else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = msc_loss(train_model(images), *targets)
        loss.backward()
        optimizer.step()
        scheduler.step()

    start = time.perf_counter()
    step()  # warm-up (and compilation)
    sync()
    print(f"first step (warm-up): {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    per_step = (time.perf_counter() - start) / args.steps
    print(f"training: {per_step:.3f} s per step, {args.batch / per_step:.1f} crops/s", flush=True)
    if args.profile:
        profile_steps(step, sync, args, per_step)

    width, height = (int(v) for v in args.size.split("x"))
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    model.eval()

    def infer() -> np.ndarray:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            probs = predict_probabilities(model, image, device)
        return probs.float().cpu().numpy()

    t_plain = best_time(infer, args.repeats)
    probs = infer()
    t_crf = best_time(lambda: crf_refine_probabilities(image, probs, deeplab_crf()), args.repeats)
    mode = ("bf16 autocast" if args.amp else "fp32") + (
        ", channels_last" if args.channels_last else "") + (
        ", cudnn.benchmark" if args.cudnn_benchmark else "") + (
        ", torch.compile" if args.compile else "") + (
        ", fold_norm" if args.fold_norm else "") + (
        ", space_to_batch" if args.space_to_batch else "")
    body = (
        f"DeepLab-v2 ResNet-{args.depth} MSC (scales 1, 0.5, 0.75), 21 classes, device "
        f"{device}, {mode}. Training: batch {args.batch} of {args.crop}x{args.crop} crops, "
        f"{args.steps} timed steps after a warm-up (data loading not included). Inference: one "
        f"{width}x{height} image, best of {args.repeats}.\n\n"
        "| what | value |\n|---|---|\n"
        f"| training step (batch {args.batch}) | {per_step:.2f} s |\n"
        f"| training throughput | {args.batch / per_step:.2f} crops/s |\n"
        f"| 20k iterations of batch 10 at this rate | "
        f"{20000 * 10 / (args.batch / per_step) / 3600:.1f} h |\n"
        f"| inference, MSC, no CRF | {t_plain:.2f} s / image |\n"
        f"| dense CRF (10 iterations, one process) | {t_crf:.2f} s / image |\n"
        f"| inference + CRF | {t_plain + t_crf:.2f} s / image |\n"
    )
    write_section(f"DeepLab-v2 training and inference ({device.type}, {mode})", body)


if __name__ == "__main__":
    main()
