"""Where the CAM map stage's time goes beyond the network forwards: `make_cams` on synthetic
VOC-size images under torch.profiler (CPU and CUDA activities) and cProfile (the main
thread's Python), each table written to ``OUT_DIR``.

A random ResNet-50 CAM network (``voc12`` settings) makes the maps of ``--images`` images
(as benchmarks/bench_pipeline.py draws them), after a warm-up run on the first 8. The
tables: torch.profiler's operators by self CPU time and by self device time; the main
thread's functions by own time; with ``--trace`` also a Chrome trace (large).

    python -m benchmarks.profile_map_stage [--images 96] [--workers 16] [--trace] OUT_DIR
        [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import torch

from amnseg.checkpoints import save_model
from amnseg.config import load_config
from amnseg.data import build_dataset
from amnseg.layout import checkpoint_path, maps_dir
from amnseg.models import CAMNet, build_backbone
from amnseg.stages.cam import make_cams
from benchmarks.bench_pipeline import make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--trace", action="store_true", help="also write map_trace.json")
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="amnseg-mapprof-"))
    make_dataset(work / "data", args.images)
    config = load_config("voc12", [
        "data.kind=folder", f"data.root={work / 'data'}", "data.train_split=train",
        "data.infer_split=train", "data.val_split=''", f"data.num_workers={args.workers}",
        f"run_dir={work / 'run'}", "backbone.pretrained=null", *args.overrides,
    ])
    dataset = build_dataset(config.data, "train")
    torch.manual_seed(0)
    model = CAMNet(build_backbone(config.backbone), dataset.num_classes)
    torch.nn.init.normal_(model.classifier.weight)
    save_model(checkpoint_path(config, "cam"), "cam", model, dataset.class_names,
               config.backbone)

    make_cams(config)  # warm-up: cuDNN's choices, worker start-up paths, allocations
    shutil.rmtree(maps_dir(config, "cam"))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    python_profile = cProfile.Profile()
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profile:
        python_profile.enable()
        make_cams(config)
        python_profile.disable()
    wall = time.perf_counter() - started

    averages = profile.key_averages()
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = io.StringIO()
    pstats.Stats(python_profile, stream=text).sort_stats("tottime").print_stats(40)
    report = [
        f"make_cams on {args.images} images: {wall:.2f} s wall "
        f"({wall / args.images * 1000:.1f} ms/image), {args.workers} loader workers",
        "", "## torch.profiler, by self CPU time", "",
        averages.table(sort_by="self_cpu_time_total", row_limit=30),
        "", f"## torch.profiler, by {device_key}", "",
        averages.table(sort_by=device_key, row_limit=30),
        "", "## cProfile of the main thread, by own time", "", text.getvalue(),
    ]
    (args.out_dir / "map_profile.txt").write_text("\n".join(report))
    if args.trace:
        profile.export_chrome_trace(str(args.out_dir / "map_trace.json"))
    print(report[0])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
