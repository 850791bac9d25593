"""A training stage under torchrun on one GPU (NCCL, DistributedDataParallel around the model)
against the plain run: same weights, and what the process group costs.

Trains the CAM stage (ResNet-50, `voc12` settings, random weights, 1 epoch) on ``--images``
synthetic 500x375 images three times: plainly, plainly again (the run-to-run spread of the
GPU's non-deterministic kernels), and under ``torchrun --nproc_per_node=1``; compares the final
weights and the stage times.

    python -m benchmarks.bench_ddp [--images 128] [--device cuda] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from amnseg.io import load_checkpoint
from benchmarks.bench_pipeline import make_dataset
from benchmarks.common import write_section


def train(run_dir: Path, data_root: Path, device: str, torchrun: bool, overrides: list[str]
          ) -> float:
    """Wall seconds of one ``amnseg train-cam`` run."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                 "--nnodes=1", "--master_port=29533"] if torchrun else [sys.executable])
    command = [*launcher, "-m", "amnseg", "train-cam", "voc12", f"run_dir={run_dir}",
               "data.kind=folder", f"data.root={data_root}", "data.train_split=train",
               "data.infer_split=train", "data.num_workers=4", f"device={device}",
               "backbone.pretrained=null", "cam.epochs=1", *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - started


def max_difference(first: Path, second: Path) -> float:
    """Largest absolute difference between the two runs' final weights (NaN if any weight is
    not finite: a diverged run compares nothing)."""
    a = load_checkpoint(first / "cam" / "cam.pt")["model"]
    b = load_checkpoint(second / "cam" / "cam.pt")["model"]
    assert a.keys() == b.keys()
    floats = [k for k in a if a[k].is_floating_point()]
    if not all(torch.isfinite(a[k]).all() and torch.isfinite(b[k]).all() for k in floats):
        return float("nan")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in floats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="amnseg-ddp-"))
    make_dataset(work / "data", args.images)
    runs = {name: work / name for name in ("plain", "plain_again", "torchrun")}
    seconds = {name: train(run, work / "data", args.device, name == "torchrun", args.overrides)
               for name, run in runs.items()}
    spread = max_difference(runs["plain"], runs["plain_again"])
    ddp = max_difference(runs["plain"], runs["torchrun"])
    one_process = '"processes": 1' in (runs["torchrun"] / "cam" / "log.jsonl").read_text()
    body = (
        f"CAM stage, ResNet-50, `voc12` settings (batch 16, crop 512), random weights, 1 epoch "
        f"on {args.images} synthetic 500x375 images, device {args.device}"
        + (f", overrides {' '.join(args.overrides)}" if args.overrides else "")
        + ". Wall time of the whole command (start-up, model building and the checkpoint "
        "included).\n\n"
        "| run | wall s |\n|---|---|\n"
        + "".join(f"| {name.replace('_', ' ')} | {value:.1f} |\n" for name, value in
                  seconds.items())
        + f"\nMax abs. weight difference: torchrun vs plain {ddp:.2e}; plain vs plain again "
        f"{spread:.2e} (the device's own run-to-run spread). The torchrun run's log records "
        f"{'1 process' if one_process else 'another process count'}.\n"
    )
    write_section(f"torchrun on one GPU ({args.device})", body)


if __name__ == "__main__":
    main()
