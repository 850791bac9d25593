"""Training steps of the demo's four networks, NCHW against channels_last, on this machine.

Each network of ``configs/demo.yaml`` (CAM classifier, AMN, IRN boundary net, the demo-sized
DeepLab-v2) with 20 classes, random weights and random inputs at the demo's batch and crop
sizes; one step = forward, a mean of the outputs as the loss, backward, SGD step. The time is
the best of ``--repeats`` runs of ``--steps`` steps after two warm-up steps. The networks with an
ASPP head (AMN, DeepLab) are also timed with every ASPP tap computed, as before
``amnseg.models.aspp.dilated_conv`` skipped the taps that read only padding. With ``--run``
(a finished demo run folder) each training stage's images/s from its ``log.jsonl`` (loader,
augmentation and the real loss included; per-epoch evaluation not) stand beside the bare
steps: how much of the compute rate the data loading leaves.

    python -m benchmarks.bench_demo_steps [--steps 10] [--repeats 3] [--run runs/demo]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from amnseg.checkpoints import new_model
from amnseg.config import load_config
from amnseg.models import aspp, build_backbone
from amnseg.models.resnet import resnet_from_config
from benchmarks.common import best_time, write_section

CLASSES = 20


def demo_networks() -> dict[str, tuple[nn.Module, int, int, Callable[..., torch.Tensor]]]:
    """name -> (network, batch size, crop size, loss(network, images, labels))."""
    config = load_config("demo")
    return {
        "cam": (new_model("cam", build_backbone(config.backbone), CLASSES),
                config.cam.batch_size, config.cam.crop_size, lambda m, x, y: m(x).mean()),
        "amn": (new_model("amn", build_backbone(config.backbone), CLASSES),
                config.amn.batch_size, config.amn.crop_size, lambda m, x, y: m(x, y).mean()),
        "irn": (new_model("irn", build_backbone(config.backbone), CLASSES),
                config.irn.batch_size, config.irn.crop_size, lambda m, x, y: m(x).mean()),
        "seg": (new_model("seg", resnet_from_config(config.seg.backbone), CLASSES,
                          msc_scales=list(config.seg.msc_scales), input_kind="imagenet"),
                config.seg.batch_size, config.seg.crop_size,
                lambda m, x, y: sum(out.mean() for out in m(x))),
    }


def step_seconds(net: nn.Module, batch: int, crop: int, loss_fn, channels_last: bool,
                 steps: int, repeats: int) -> float:
    torch.manual_seed(0)
    images = torch.randn(batch, 3, crop, crop)
    labels = (torch.rand(batch, CLASSES) > 0.8).float()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    net.train()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-6)

    def run() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net, images, labels).backward()
            optimizer.step()

    return best_time(run, repeats) / steps


@contextlib.contextmanager
def every_aspp_tap() -> Iterator[None]:
    """ASPP as it was: each dilated conv over its whole padded kernel, whatever the map size."""
    skipping = aspp.dilated_conv
    aspp.dilated_conv = lambda conv, x: conv(x)
    try:
        yield
    finally:
        aspp.dilated_conv = skipping


def stage_rate(run: Path, stage: str) -> float:
    """Images (or crops) per second of a finished training stage: all epochs together."""
    records = [json.loads(line) for line in (run / stage / "log.jsonl").read_text().splitlines()
               if line.strip()]
    images = sum(r["images_per_s"] * r["seconds"] for r in records)
    return images / sum(r["seconds"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", type=Path, help="a finished demo run folder")
    args = parser.parse_args()
    rows = []
    for name, (net, batch, crop, loss_fn) in demo_networks().items():
        plain = step_seconds(net, batch, crop, loss_fn, False, args.steps, args.repeats)
        nhwc = step_seconds(net, batch, crop, loss_fn, True, args.steps, args.repeats)
        every_tap = "-"
        if any(isinstance(module, aspp.ASPP) for module in net.modules()):
            with every_aspp_tap():
                all_taps = step_seconds(net, batch, crop, loss_fn, True, args.steps,
                                        args.repeats)
            every_tap = f"{all_taps * 1000:.0f} ({all_taps / nhwc:.2f}x)"
        row = (f"| {name} | {batch} x {crop}x{crop} | {plain * 1000:.0f} | "
               f"{nhwc * 1000:.0f} | {every_tap} | {batch / plain:.0f} | {batch / nhwc:.0f} | "
               f"{plain / nhwc:.2f} |")
        if args.run:
            rate = stage_rate(args.run, name)
            row += f" {rate:.0f} ({rate / (batch / nhwc):.0%}) |"
        rows.append(row)
    in_run = " images/s in the run (of the bare channels_last rate) |" if args.run else ""
    body = (
        "The demo's networks (configs/demo.yaml, 20 classes, random weights and inputs): one "
        "training step (forward, mean loss, backward, SGD), best of "
        f"{args.repeats} x {args.steps} steps."
        + (f" The run: `{args.run}` (its stages' log.jsonl, all epochs)." if args.run else "")
        + " The ASPP column: channels_last with every ASPP tap computed (before the padding-only "
        "taps were skipped), and its time against the column before it."
        + "\n\n| network | batch | ms/step NCHW | ms/step channels_last | ms/step every ASPP "
        "tap | images/s NCHW | images/s channels_last | speed-up |" + in_run
        + "\n|---|---|---|---|---|---|---|---|"
        + ("---|" if args.run else "") + "\n" + "\n".join(rows) + "\n"
    )
    write_section("Demo networks: training step, NCHW vs channels_last (cpu)", body)


if __name__ == "__main__":
    main()
