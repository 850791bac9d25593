"""The segmentation stage's sustained training rate, data loading included: `amnseg train-seg`
on synthetic VOC-size images with their masks, for each speed option in turn.

Makes ``--images`` 500x375 images with masks (as benchmarks/bench_pipeline.py), then runs the
real stage (``voc12`` settings: DeepLab-v2 ResNet-101 MSC, crop 321, batch 5 x accumulation
2, random weights, learning rate 1e-9 so that they stay finite) for ``--iterations`` steps
per variant and reads the crops/s after each epoch's first step from the stage's
``log.jsonl``. The first step carries cuDNN's algorithm search and torch.compile's
compilation; the stage's wall time includes them.

    python -m benchmarks.bench_seg_stage [--images 200] [--iterations 40] [--workers 16]
        [--variants fp32 bf16 ... (see VARIANTS)] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from amnseg.config import load_config
from amnseg.layout import log_path
from amnseg.stages.seg import train_seg
from benchmarks.bench_pipeline import TINY_LEARNING_RATES, make_dataset
from benchmarks.common import write_section

# Name -> (description, config overrides).
BF16 = ["amp=bf16", "channels_last=true"]
TUNED = [*BF16, "cudnn_benchmark=true"]
FUSED = [*TUNED, "seg.fused_accumulation=true"]
FOLDED = [*FUSED, "seg.backbone.fold_norm=true"]
VARIANTS = {
    "fp32": ("fp32 (TF32 convolutions, PyTorch's default)", []),
    "bf16": ("bf16 autocast + channels_last", BF16),
    "bf16_tuned": ("bf16 + channels_last + cudnn_benchmark", TUNED),
    "bf16_compiled": ("bf16 + channels_last + cudnn_benchmark + compile_training=default",
                      [*TUNED, "compile_training=default"]),
    "bf16_graphs": ("bf16 + channels_last + cudnn_benchmark + compile_training=reduce-overhead",
                    [*TUNED, "compile_training=reduce-overhead"]),
    "bf16_fused": ("bf16 + channels_last + cudnn_benchmark + seg.fused_accumulation", FUSED),
    "bf16_fused_compiled": ("bf16 + channels_last + cudnn_benchmark + seg.fused_accumulation"
                            " + compile_training=default", [*FUSED, "compile_training=default"]),
    "bf16_fused_folded": ("bf16 + channels_last + cudnn_benchmark + seg.fused_accumulation + "
                          "seg.backbone.fold_norm", FOLDED),
    "bf16_fused_folded_compiled": ("bf16 + channels_last + cudnn_benchmark + "
                                   "seg.fused_accumulation + seg.backbone.fold_norm + "
                                   "compile_training=default",
                                   [*FOLDED, "compile_training=default"]),
    "bf16_fused_folded_graphs": ("bf16 + channels_last + cudnn_benchmark + "
                                 "seg.fused_accumulation + seg.backbone.fold_norm + "
                                 "compile_training=reduce-overhead",
                                 [*FOLDED, "compile_training=reduce-overhead"]),
    "bf16_fused_folded_s2b_compiled": ("bf16 + channels_last + cudnn_benchmark + "
                                       "seg.fused_accumulation + seg.backbone.fold_norm + "
                                       "seg.backbone.space_to_batch + compile_training=default",
                                       [*FOLDED, "seg.backbone.space_to_batch=true",
                                        "compile_training=default"]),
    # Not the recipe: one batch of 10 instead of 2 x 5 accumulated (the loss is then averaged
    # over the 10 crops' pixels, not over each 5's), for what the batch size costs.
    "bf16_batch10": ("bf16 + channels_last + cudnn_benchmark, batch 10 x 1 (not the recipe)",
                     [*TUNED, "seg.batch_size=10", "seg.accumulation=1"]),
}
VOC_CROPS = 20_000 * 10
# One training crop of 321x321, MSC (3 scales and their max), forward + backward:
# torch.utils.flop_counter on DeepLab-v2 R101 (benchmarks/RESULTS.md).
GFLOP_PER_CROP = 826


def run_variant(data_root: Path, run_dir: Path, iterations: int, workers: int,
                overrides: list[str]) -> dict:
    config = load_config("voc12", [
        "data.kind=folder", f"data.root={data_root}", "data.train_split=train",
        "data.infer_split=train", "data.val_split=''", f"data.num_workers={workers}",
        f"run_dir={run_dir}", "seg.init=null", f"seg.iterations={iterations}",
        "seg.eval_images=0", "seg.masks=gt", *TINY_LEARNING_RATES, *overrides,
    ])
    started = time.perf_counter()
    train_seg(config, "seg", "gt")
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in log_path(config, "seg").read_text().splitlines()]
    steady = [r["steady_images_per_s"] for r in records if r.get("steady_images_per_s")]
    return {"wall": wall, "steady": sum(steady) / len(steady) if steady else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=list(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="amnseg-segstage-"))
    make_dataset(work / "data", args.images)
    lines = [
        f"`amnseg train-seg` (the stage itself: loader workers, augmentation, MSC loss, "
        f"optimiser) on {args.images} synthetic 500x375 images with masks, `voc12` settings "
        f"(DeepLab-v2 R101 MSC, crop 321, batch 5 x accumulation 2), random weights, "
        f"{args.workers} loader workers, {args.iterations} iterations per variant. Steady "
        "crops/s: after the first step (data loading included); fraction of peak at "
        f"{GFLOP_PER_CROP} GFLOP per crop against 790 TFLOP/s (H100/H200 dense bf16).",
        "",
        "| variant | steady crops/s | TFLOP/s | VOC recipe (200k crops) min | stage wall s |",
        "|---|---|---|---|---|",
    ]
    for name in args.variants:
        description, overrides = VARIANTS[name]
        result = run_variant(work / "data", work / name, args.iterations, args.workers,
                             [*overrides, *args.overrides])
        rate = result["steady"]
        if rate is None:
            lines.append(f"| {description} | (too few steps) | | | {result['wall']:.1f} |")
            continue
        tflops = rate * GFLOP_PER_CROP / 1000
        lines.append(f"| {description} | {rate:.1f} | {tflops:.0f} ({tflops / 790:.1%}) | "
                     f"{VOC_CROPS / rate / 60:.1f} | {result['wall']:.1f} |")
        print(lines[-1], flush=True)
        write_section("Segmentation stage: sustained training rate", "\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
