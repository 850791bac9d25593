"""CAM inference per image (4 scales + flip) against the bare backbone forwards it needs.

"bare" runs only ``model.cam`` on ready-made inputs (the unavoidable cost); "maps" adds what
``amnseg.ops.multiscale`` does around them (flip merge, resizes, crop, sum, normalisation);
"maps + input prep" also rescales (PIL bicubic) and normalises the image in the same process,
which the stage does in loader workers.

    python -m benchmarks.bench_cam_inference [--depth 50] [--size 500x375] [--repeats 3]
        [--device cuda] [--amp] [--channels-last]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from amnseg.models import CAMNet, ResNet
from amnseg.ops.multiscale import max_normalize, multiscale_cam, multiscale_inputs
from amnseg.precision import MixedPrecision
from benchmarks.common import best_time, write_section

SCALES = [1.0, 0.5, 1.5, 2.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the test image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (amp=bf16)")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CAMNet(ResNet(depth=args.depth), 20).to(device).eval()
    if args.amp or args.channels_last:  # what the amp / channels_last options do
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = MixedPrecision(model, device.type, args.amp, args.channels_last)
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    inputs = [batch.to(device) for batch in multiscale_inputs(image, SCALES)]
    keep = torch.tensor([3, 11], device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare() -> None:
        for batch in inputs:
            model.cam(batch)
        sync()

    @torch.no_grad()
    def maps() -> None:
        strided, full = multiscale_cam(model.cam, inputs, (height, width), 16, device)
        max_normalize(strided[keep]).cpu(), max_normalize(full[keep]).cpu()
        sync()

    @torch.no_grad()
    def maps_with_prep() -> None:
        batches = multiscale_inputs(image, SCALES)
        strided, full = multiscale_cam(model.cam, batches, (height, width), 16, device)
        max_normalize(strided[keep]).cpu(), max_normalize(full[keep]).cpu()
        sync()

    mode = (", bf16 autocast" if args.amp else "") + (", channels_last" if args.channels_last
                                                        else "")
    t_bare = best_time(bare, args.repeats)
    t_maps = best_time(maps, args.repeats)
    t_prep = best_time(maps_with_prep, args.repeats)
    body = (
        f"ResNet-{args.depth}, one {width}x{height} image, scales {SCALES} with flip, "
        f"device {device}{mode}; best of {args.repeats} after a warm-up.\n\n"
        "| what | s / image | vs bare forwards |\n|---|---|---|\n"
        f"| bare backbone + classifier forwards | {t_bare:.3f} | 1.00 |\n"
        f"| CAM maps (ours, inputs ready) | {t_maps:.3f} | {t_maps / t_bare:.3f} |\n"
        f"| CAM maps + input prep in-process | {t_prep:.3f} | {t_prep / t_bare:.3f} |\n"
    )
    write_section("CAM inference overhead" + ("" if device.type == "cpu" else
                                              f" ({device.type}{mode})"), body)


if __name__ == "__main__":
    main()
