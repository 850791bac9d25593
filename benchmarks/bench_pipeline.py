"""The whole pipeline on a synthetic VOC-size dataset: each stage's images/s and the projected
time of a full VOC / COCO run at the reference epochs.

Makes ``--images`` images of 500x375 with 1-3 of the 20 VOC classes drawn as textured ellipses
(folder format, with masks, so every stage also evaluates), runs ``amnseg run voc12`` on them
with random weights (speed does not depend on them) and reads each stage's time from the run's
manifest. Training stages run one epoch (``seg``: ``--seg-steps`` iterations); the projection
scales each stage's per-image cost to the reference schedule:

    cam, amn: 5 epochs; irn: 3 epochs; seg: 20k (VOC) / 100k (COCO) iterations of 10 crops;
    maps, seeds, masks: once per training image (VOC train_aug 10,582; COCO train 82,783);
    the map stages' evaluation (threshold sweeps): once per image of the evaluation split
    (data.infer_split: VOC train 1,464; COCO train2014 82,783).

Every stage is projected as its fixed costs (model building, worker start-up; evaluation but a
map stage's) plus
the reference schedule's images at its steady rate: for training stages, the rate of their
epochs after each epoch's first step (from ``log.jsonl``); for the map, seed and mask stages, the
rate at which their output files appeared after the first 10 % of them (the files' modification
times). With the seeds made beside the maps, a map stage ends with its last seed, so its rate is
that of the seed files, and the seed stage's own (short) time counts as fixed.

    python -m benchmarks.bench_pipeline [--images 32] [--device auto] [--seg-steps 2]
        [--workers 4] [--bare] [KEY=VALUE ...]

``--bare`` also times the CAM and AMN map stages' network forwards alone on the same images
(trained networks of the run, same images per forward pass, inputs already on the device) and
reports the time each map stage took to make its maps (its evaluation excluded) against them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from amnseg.config import load_config
from amnseg.data.voc import VOC_CLASSES
from amnseg.layout import checkpoint_path, log_path, maps_dir, masks_dir, seeds_dir
from amnseg.ops.multiscale import network_batch
from amnseg.pipeline import STAGE_NAMES, run_pipeline
from amnseg.stages.common import MultiscaleInputs, start_inference
from amnseg.stages.seeds import overlap_seeds
from amnseg.training import resolve_device
from benchmarks.common import write_section

WIDTH, HEIGHT = 500, 375
VOC_TRAIN_AUG, COCO_TRAIN = 10_582, 82_783
# The map stages evaluate (threshold sweeps) on data.infer_split: VOC train, COCO train2014.
EVALUATED = {"voc": 1_464, "coco": COCO_TRAIN}
SCHEDULE = {"cam": 5, "amn": 5, "irn": 3}  # reference epochs of the training stages
VAL_IMAGES = 2
SEG_CROPS = {"voc": 20_000 * 10, "coco": 100_000 * 10}
# Random networks with fixed-statistics BatchNorm (the reference's) diverge within a few steps
# at the recipes' learning rates, and a NaN loss stops a stage. Speed does not depend on the
# learning rate, so the benchmarks train at 1e-9: the weights stay finite.
TINY_LEARNING_RATES = ("cam.lr=1e-9", "amn.backbone_lr=1e-9", "amn.head_lr=1e-9", "irn.lr=1e-9",
                       "seg.lr=1e-9")


def make_dataset(root: Path, count: int, seed: int = 0) -> None:
    """``count`` VOC-size images in the folder format, each with 1-3 classes and its mask."""
    rng = np.random.default_rng(seed)
    for name in ("images", "masks"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    rows = []
    for index in range(count):
        stem = f"img{index:05d}"
        image = rng.integers(60, 120, (HEIGHT, WIDTH, 3)).astype(np.float32)
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        classes = sorted(rng.choice(20, size=int(rng.integers(1, 4)), replace=False) + 1)
        for class_index in classes:
            cy, cx = rng.uniform(0.2, 0.8) * HEIGHT, rng.uniform(0.2, 0.8) * WIDTH
            ry, rx = rng.uniform(0.1, 0.3) * HEIGHT, rng.uniform(0.1, 0.3) * WIDTH
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            colour = 40.0 + 10.0 * np.array([class_index % 5, class_index % 7, class_index % 3])
            image[inside] = colour + rng.normal(0.0, 20.0, (int(inside.sum()), 3))
            mask[inside] = class_index
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            root / "images" / f"{stem}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        rows.append(f"{stem},{';'.join(VOC_CLASSES[c - 1] for c in classes)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    # The segmentation net's evaluation (MSC + CRF per image) is timed on a few images only.
    stems = [row.split(",")[0] for row in rows]
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / "train.txt").write_text("\n".join(stems) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(stems[:VAL_IMAGES]) + "\n")


def images_per_stage(config, count: int) -> dict[str, int]:
    """How many images (training: samples seen) each stage handles in this run."""
    def seen(batch_size: int, epochs: int) -> int:
        return count // batch_size * batch_size * epochs

    return {
        "cam": seen(config.cam.batch_size, config.cam.epochs),
        "amn": seen(config.amn.batch_size, config.amn.epochs),
        "irn": seen(config.irn.batch_size, config.irn.epochs),
        "seg": config.seg.iterations * config.seg.batch_size * config.seg.accumulation,
        **{stage: count for stage in ("cam_maps", "cam_seeds", "amn_maps", "amn_seeds",
                                      "masks")},
    }


def fixed_and_steady(config, stage: str, stage_seconds: float
                     ) -> tuple[float, float, float] | None:
    """(fixed seconds, steady images/s, fraction of the epochs spent waiting for data) of a
    training stage from its log: the stage's time outside its epochs, its epochs' rate after
    their first step, and their loader waits after the first batch (None: not a training
    stage, or too few steps to tell)."""
    path = log_path(config, stage)
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rates = [r["steady_images_per_s"] for r in records if r.get("steady_images_per_s")]
    if not rates:
        return None
    epochs_seconds = sum(r["seconds"] for r in records)
    waiting = sum(r.get("data_wait_s", 0.0) for r in records) / max(epochs_seconds, 1e-9)
    return stage_seconds - epochs_seconds, sum(rates) / len(rates), waiting


def steady_rate_from_files(folder: Path, pattern: str, skip: float = 0.1,
                           least_seconds: float = 0.0) -> float | None:
    """Files per second that ``folder`` gained after its first ``skip`` of files matching
    ``pattern`` (start-up: worker processes, the first batch, cuDNN's choices), from their
    modification times. None: fewer than 4 files to time, or less than ``least_seconds``
    between them (files written in a few bursts, e.g. all maps of one group at once, give no
    rate)."""
    times = sorted(path.stat().st_mtime for path in folder.glob(pattern))
    timed = times[max(1, int(len(times) * skip)) - 1:]  # from the last file left out
    if len(timed) < 4 or timed[-1] - timed[0] <= max(least_seconds, 0.0):
        return None
    return (len(timed) - 1) / (timed[-1] - timed[0])


def per_image_steady_rate(config, stage: str, beside: bool, seconds: float = 0.0
                          ) -> float | None:
    """Steady images/s of a map, seed or mask stage from its output files (None: another
    stage, or too few files, or files spread over less than a quarter of the stage's
    ``seconds``). With ``beside``, a map stage's is its seeds' (it waits for them) and a seed
    stage has none (its images were made during the map stage)."""
    source, _, kind = stage.partition("_")
    least = seconds / 4
    if stage == "masks":
        return steady_rate_from_files(masks_dir(config), "*.png", least_seconds=least)
    if kind == "maps" and not beside:
        return steady_rate_from_files(maps_dir(config, source), "*.npz", least_seconds=least)
    if (kind == "maps" and beside) or (kind == "seeds" and not beside):
        return steady_rate_from_files(seeds_dir(config, source), "*.png", least_seconds=least)
    return None


def projected_hours(seconds: float, handled: int, rate: float | None, images: int,
                    evaluation: float = 0.0, evaluated: int = 0) -> float:
    """A stage's projected hours for ``images``: without a steady rate, its measured seconds
    per image; with one, its fixed seconds (those not spent at that rate on the ``handled``
    images, at least 0) plus ``images`` at that rate. ``evaluation``: the part of ``seconds``
    that evaluated the ``handled`` images, projected apart at its own cost per image for the
    ``evaluated`` images of a full run (its evaluation split)."""
    making = seconds - evaluation
    if rate is None:
        hours = making / handled * images
    else:
        hours = max(making - handled / rate, 0.0) + images / rate
    return (hours + evaluation / handled * evaluated) / 3600


def projected_images(stage: str, dataset: str) -> int:
    """Images (training: samples seen) of ``stage`` in a full run on VOC or COCO."""
    train = VOC_TRAIN_AUG if dataset == "voc" else COCO_TRAIN
    if stage == "seg":
        return SEG_CROPS[dataset]
    return train * SCHEDULE.get(stage, 1)


def bare_forward_seconds(config, stage: str) -> float:
    """Seconds of the ``stage`` ("cam" or "amn") map stage's network forwards alone on this
    run's images: the trained network from the run, the stage's grouping of images per
    forward pass, every input already on the device (prepared before the clock starts)."""
    device = resolve_device(config.device)
    job = start_inference(config, stage, checkpoint_path(config, stage), Path(config.run_dir)
                          / "bare", ".none", group=config.map_batch_images)
    scales = list(config.cam.scales if stage == "cam" else config.amn.scales)
    inputs = MultiscaleInputs(job.dataset, list(job.todo), scales, True)
    prepared = [([network_batch(images, True, device) for images in group.scaled],
                 group.labels.to(device).repeat_interleave(2, dim=0))
                for group in inputs.loader(config.data.num_workers, job.groups)]

    @torch.no_grad()
    def forwards() -> None:
        for batches, row_labels in prepared:  # what make_cams and make_amn_maps run
            for rows in batches:
                if stage == "cam":
                    job.model.cam(rows)
                else:
                    job.model(rows, row_labels)
        if device.type == "cuda":
            torch.cuda.synchronize()

    forwards()  # warm-up (cuDNN's algorithm choice)
    started = time.perf_counter()
    forwards()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seg-steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4, help="loader and CRF workers")
    parser.add_argument("--keep", help="keep the data and run folder here")
    parser.add_argument("--bare", action="store_true",
                        help="also time the map stages' bare network forwards")
    parser.add_argument("overrides", nargs="*", help="extra KEY=VALUE config overrides")
    args = parser.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="amnseg-bench-"))
    data_root, run_dir = work / "data", work / "run"
    shutil.rmtree(work / "run", ignore_errors=True)
    if not (data_root / "labels.csv").is_file():
        make_dataset(data_root, args.images)
    overrides = [
        "data.kind=folder", f"data.root={data_root}", "data.train_split=train",
        "data.infer_split=train", "data.val_split=val", f"data.num_workers={args.workers}",
        f"run_dir={run_dir}", f"device={args.device}", "backbone.pretrained=null",
        "cam.epochs=1", "amn.epochs=1", "amn.eval_images=0", "irn.epochs=1", "seg.init=null",
        f"seg.iterations={args.seg_steps}", "seg.eval_images=1", f"seeds.workers={args.workers}",
        f"seg.crf_workers={args.workers}", *TINY_LEARNING_RATES, *args.overrides,
    ]
    config = load_config("voc12", overrides)
    largest = max(config.cam.batch_size, config.amn.batch_size, config.irn.batch_size)
    if args.images < largest:
        parser.error(f"--images {args.images}: the training stages need at least one batch "
                     f"of {largest} images")
    started = time.perf_counter()
    manifest = run_pipeline(config)
    wall = time.perf_counter() - started
    handled = images_per_stage(config, args.images)
    beside = overlap_seeds(config)

    lines = [
        f"{args.images} synthetic 500x375 images, 20 classes, `voc12` settings with random "
        f"weights, {args.workers} loader/CRF workers; training stages 1 epoch (seg "
        f"{args.seg_steps} iterations of {config.seg.batch_size}x{config.seg.accumulation} "
        f"crops, evaluated on {VAL_IMAGES} images); each stage's time includes its "
        f"evaluation. Whole run {wall:.0f} s. Training stages are projected as their fixed "
        "costs (the stage's time outside its epochs: model building, checkpoints, evaluation) "
        "plus the reference schedule's images at the steady rate (after each epoch's first "
        "step); the map, seed and mask stages likewise, their steady rate taken from their "
        "output files' times after the first 10 % of them, and a map stage's "
        "evaluation (its threshold sweep) apart, at its cost per image for the evaluation "
        "split (VOC train 1,464, COCO train2014 82,783 images)"
        + (" (a map stage's from its seeds', which it waits for; the seed stages' own time is "
           "counted as fixed)" if beside else "") + ". Waiting for data: the "
        "share of a training stage's epochs spent waiting for the loader after its first "
        "batch (near 0: the loader keeps up with the steps).",
        "",
        "| stage | images | seconds | images/s | steady images/s | waiting for data | "
        "projected VOC (10,582) h | projected COCO (82,783) h |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals = {"voc": 0.0, "coco": 0.0}
    for stage in STAGE_NAMES:
        record = manifest["stages"].get(stage, {})
        if stage not in handled or record.get("status") != "done":
            continue
        seconds = float(record["seconds"])
        per_image = seconds / handled[stage]
        steady = fixed_and_steady(config, stage, seconds)
        if steady is not None:
            fixed, rate, _ = steady
            projection = {name: (fixed + projected_images(stage, name) / rate) / 3600
                          for name in totals}
            steady_text = f"{rate:.1f} | {steady[2]:.0%}"
        else:
            # A map stage's threshold sweep runs on the evaluation split, not on every image.
            making = float(record.get("metrics", {}).get("make_seconds", seconds))
            rate = per_image_steady_rate(config, stage, beside, making)
            if stage.endswith("_seeds") and beside:  # its images were made beside the maps
                projection = {name: seconds / 3600 for name in totals}
            else:
                projection = {name: projected_hours(seconds, handled[stage], rate,
                                                    projected_images(stage, name),
                                                    seconds - making, EVALUATED[name])
                              for name in totals}
            steady_text = f"{rate:.1f} | " if rate else " | "
        for name in totals:
            totals[name] += projection[name]
        lines.append(f"| {stage} | {handled[stage]} | {seconds:.1f} | {1 / per_image:.2f} | "
                     f"{steady_text} | {projection['voc']:.2f} | {projection['coco']:.2f} |")
    lines.append(f"| **whole pipeline** | | | | | | **{totals['voc']:.1f}** | "
                 f"**{totals['coco']:.1f}** |")
    if args.bare:
        lines += ["", "| map stage | making the maps s | bare forwards s | maps / bare | "
                  "steady maps / bare |", "|---|---|---|---|---|"]
        for stage in ("cam", "amn"):
            bare = bare_forward_seconds(config, stage)
            made = float(manifest["stages"][f"{stage}_maps"]["metrics"]["make_seconds"])
            # At VOC's scale the start-up is paid once: the maps' own steady rate (from their
            # files' times) against the bare forwards, which are timed after a warm-up.
            rate = steady_rate_from_files(maps_dir(config, stage), "*.npz",
                                          least_seconds=made / 4)
            steady = f"{handled[f'{stage}_maps'] / (rate * bare):.2f}" if rate else ""
            lines.append(f"| {stage}_maps | {made:.1f} | {bare:.1f} | {made / bare:.2f} | "
                         f"{steady} |")
    if beside:
        lines += ["", "Seeds were made beside the map stages (`seeds.overlap`): a map stage's "
                  "seconds include its seeds up to the last one, the seed stage's only what "
                  "was left and its evaluation; their sum is the pair's time."]
    mode = ", ".join(([f"amp {config.amp}"] if config.amp != "off" else [])
                     + (["channels_last"] if config.channels_last else [])
                     + (["seeds beside maps"] if beside else [])
                     + ([f"CRFs on {config.seeds.crf_device}"]
                        if config.seeds.crf_device != "cpu" else []))
    write_section(f"Whole pipeline, {resolve_device(config.device).type}"
                  + (f", {mode}" if mode else ""), "\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
