"""The ``amnseg`` command line.

Every command that works on a dataset takes a config (a name from ``configs/`` such as
``voc12``, or a YAML path) followed by ``key=value`` overrides, e.g.::

    amnseg train-cam voc12 data.root=/data/VOCdevkit/VOC2012 cam.epochs=3
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from amnseg import distributed
from amnseg.config import Config, DataConfig, config_to_dict, load_config
from amnseg.errors import AmnsegError
from amnseg.io import load_checkpoint, save_json
from amnseg.layout import MAP_SOURCES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="Weakly-supervised semantic segmentation with AMN: image-level tags in, pixel masks out.",
)
# Markup off: paths, class and map names are the user's and may hold brackets.
console = Console(markup=False)

CONFIG_HELP = "Config name in configs/ (voc12, coco14, demo) or a YAML path."
OVERRIDES_HELP = ("key=value overrides, e.g. cam.epochs=3 data.root=/data/voc (all options: "
                  "amnseg config show CONFIG).")


def _print_plain(line: str) -> None:
    """One line as it is: unwrapped (a path stays whole when the output goes to a file)."""
    console.print(line, highlight=False, soft_wrap=True)


def _print_path(label: str, path: object) -> None:
    """``label: path``, the path in bold and whole."""
    console.print(Text.assemble(f"{label}: ", (str(path), "bold")), soft_wrap=True)


def _print_main(line: str) -> None:
    """Print from rank 0 only (under torchrun every rank runs the command)."""

    if distributed.is_main():
        _print_plain(line)


# Run folders this command made. One that still holds nothing but what a run writes before its
# first stage (its config, lock and data check's list of skipped images) when the command fails
# is removed: a command that could not start leaves no run behind.
_new_run_dirs: list[Path] = []
UNSTARTED_RUN_FILES = {"config.json", ".amnseg.lock", "skipped_images.json"}


def _remove_unstarted_run_dirs() -> None:
    for run_dir in _new_run_dirs:
        try:
            if {path.name for path in run_dir.iterdir()} <= UNSTARTED_RUN_FILES:
                for name in UNSTARTED_RUN_FILES:
                    (run_dir / name).unlink(missing_ok=True)
                run_dir.rmdir()
        except OSError:
            pass  # it is only tidying: the error being reported matters more


def _other_process() -> bool:
    """Under torchrun, whether this process is not the first: a command that runs in one
    process (evaluation, report, checkpoints) runs in the first alone, and the others end at
    once (they would repeat its work and print its lines again)."""
    rank = os.environ.get("RANK", "0").strip()
    other = distributed.launched_by_torchrun() and rank.isdigit() and int(rank) > 0
    if other and "TORCHELASTIC_RUN_ID" not in os.environ:
        # Not torchrun's: perhaps a shell's leftover variables, so say why nothing happens.
        print(f"amnseg: RANK={rank}: this command runs in the process of RANK=0 alone; unset "
              "RANK, WORLD_SIZE and MASTER_ADDR to run it here", file=sys.stderr)
    return other


def _load(config: str, overrides: list[str] | None, data_exists: bool = True,
          single_process: bool = False) -> Config:
    """The config, with the run folder made (by rank 0 under torchrun, whose process group
    this joins) and its config.json written if it has none: a run's own config.json is
    written by the pipeline under the run folder's lock, so that a second command refused on
    a busy folder leaves it alone. A missing dataset folder is said first (unless the command
    makes it: ``data_exists=False``), so that no run folder is left for a command that
    cannot run."""

    loaded = load_config(config, overrides or [])
    if data_exists and not Path(loaded.data.root).is_dir():
        from amnseg.data import build_dataset

        build_dataset(loaded.data, loaded.data.train_split)  # names what is missing
    if not single_process:
        distributed.setup(loaded.device)
    if distributed.is_main():
        if not Path(loaded.run_dir).exists():
            _new_run_dirs.append(Path(loaded.run_dir))
        Path(loaded.run_dir).mkdir(parents=True, exist_ok=True)
        if not (Path(loaded.run_dir) / "config.json").exists():
            save_json(Path(loaded.run_dir) / "config.json", config_to_dict(loaded))
    distributed.barrier()
    return loaded


@app.command("demo")
def demo_command(
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Run the whole pipeline on the built-in demo data (generated on first use), write the
    report and print a summary."""
    import time

    from amnseg.data.demo import ensure_demo
    from amnseg.pipeline import run_pipeline
    from amnseg.report.html import build_report


    started = time.perf_counter()
    loaded = _load("demo", overrides, data_exists=False)
    root = distributed.run_on_main(ensure_demo, Path(loaded.data.root), seed=loaded.seed)
    _print_main(f"demo data: {root}")
    manifest = run_pipeline(loaded, progress=_print_plain)
    if not distributed.is_main():
        return
    report = build_report(Path(loaded.run_dir))
    console.print(manifest_table(manifest))
    _print_skipped(loaded)
    console.print(summary_table(Path(loaded.run_dir)))
    _print_path("report", report)
    console.print(f"total time: {time.perf_counter() - started:.0f} s")


@app.command("run")
def run_command(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    start: str = typer.Option(None, "--from", help="First stage to (re)consider."),
    stop: str = typer.Option(None, "--to", help="Last stage to run."),
    on_bad_image: str = typer.Option(
        None, "--on-bad-image", help="error (stop, naming the file; the default) or skip (leave "
        "bad images out and list them): data.on_bad_image."),
) -> None:
    """Run the whole pipeline; unchanged stages are skipped, interrupted ones resume.

    Every option of the config can be overridden as key=value; `amnseg config show CONFIG`
    prints them all, resolved, with their values.
    """
    from amnseg.pipeline import run_pipeline, stage_range, stale_stages

    stage_range(start, stop)  # said before anything is read or written
    extra = [f"data.on_bad_image={on_bad_image}"] if on_bad_image else []
    loaded = _load(config, [*(overrides or []), *extra])
    manifest = run_pipeline(loaded, start, stop, progress=_print_plain)

    if distributed.is_main():
        # Stages after --to made with other options are out of date (they run next time).
        console.print(manifest_table(manifest, stale_stages(loaded, manifest)))
        _print_skipped(loaded)


def _print_skipped(config: Config) -> None:
    from amnseg.data import skipped_images

    for stem, why in sorted(skipped_images(config).items()):
        _print_plain(f"skipped {stem}: {why}")


config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show_command(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Print the resolved config (defaults + file + overrides) as YAML: every option there is."""
    from omegaconf import OmegaConf

    loaded = load_config(config, overrides or [])
    _print_plain(OmegaConf.to_yaml(OmegaConf.structured(loaded)).rstrip())


@app.command("status")
def status_command(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Print a run folder's manifest: stages, status, timings, metrics."""
    if _other_process():
        return
    from amnseg.pipeline import (
        MANIFEST,
        RUN_CONFIG,
        data_signatures,
        load_manifest,
        load_run_config,
        missing_outputs,
        run_in_progress,
        stale_stages,
    )

    if not run_dir.is_dir():
        raise AmnsegError(f"{run_dir}: run folder not found")
    if not (run_dir / MANIFEST).is_file():
        raise AmnsegError(f"{run_dir}: no {MANIFEST} (not a run folder made by `amnseg run`)")
    manifest = load_manifest(run_dir)
    stale: list[str] = []
    notes: dict[str, str] = {}
    unknown = ""
    if (run_dir / RUN_CONFIG).is_file():
        # Which stages the run's config (that of its last command) would make differently.
        try:
            config = load_run_config(run_dir)
            stale = stale_stages(config, manifest)
            notes = {name: f"{count} output files missing"
                     for name, count in missing_outputs(config, manifest).items()}
            if Path(config.data.root).is_dir():
                # The data as it is now (an edited label, a replaced image) against the
                # signatures the run recorded.
                current = data_signatures(config)
                if isinstance(manifest.get("data"), dict) and current != manifest["data"]:
                    changed = [name for name in stale_stages(config, manifest, current)
                               if name not in stale]
                    notes.update({name: "its data changed" for name in changed})
                    stale += changed
        except AmnsegError as error:  # the manifest is still worth showing
            unknown = f"which stages are out of date is unknown: {one_line(error)}"
    if not run_in_progress(run_dir):
        notes.update({name: "interrupted: `amnseg run` resumes it"
                      for name, record in manifest.get("stages", {}).items()
                      if isinstance(record, dict) and record.get("status") == "running"})
    console.print(manifest_table(manifest, stale, notes))
    if stale:
        _print_plain(f"out of date: {', '.join(stale)} (made with other options or data than "
                     "the run's config.json and its dataset now; `amnseg run` makes them again)")
    if unknown:
        _print_plain(unknown)


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    png: Path = typer.Option(None, help="Also render the page to this PNG (needs Chromium)."),
) -> None:
    """Write <run>/report.html: results, threshold curves, histograms, gallery, config."""
    if _other_process():
        return
    from amnseg.report.html import build_report

    if not run_dir.is_dir():
        raise AmnsegError(f"{run_dir}: run folder not found")
    if png is not None and (png.is_dir() or png.suffix.lower() != ".png"):
        raise AmnsegError(f"--png {png}: " + ("is a folder; give a file name ending in .png"
                                              if png.is_dir() else "the file name must end in "
                                              ".png (Chromium writes PNG only)"))
    page = build_report(run_dir)
    _print_path("report", page)
    if png is not None:
        from amnseg.report.screenshot import broken_images, screenshot

        broken = broken_images(page)
        if broken:
            raise AmnsegError(f"{page}: {broken} pictures failed to load")
        _print_path("screenshot", screenshot(page, png))


def _stage_command(stage_name: str):
    """The command that runs one pipeline stage (recorded in the run's manifest like
    ``amnseg run``; the stages whose outputs it reads must be done with this config)."""

    def command(
        config: str = typer.Argument(..., help=CONFIG_HELP),
        overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    ) -> None:
        from amnseg.pipeline import STAGES, run_pipeline

        stage = next(stage for stage in STAGES if stage.name == stage_name)
        if not stage.enabled(load_config(config, overrides or [])):  # before any run folder
            raise AmnsegError(f"{stage.command}: stage {stage_name} is off in this config "
                              "(seg.upper_bound=true turns it on)")
        manifest = run_pipeline(_load(config, overrides), stage_name, stage_name,
                                progress=_print_plain)
        if distributed.is_main():
            console.print(manifest_table(manifest))

    return command


def _register_stage_commands() -> None:
    from amnseg.pipeline import STAGES

    for stage in STAGES:
        app.command(stage.command, help=f"Stage {stage.name}: {stage.description} (resumable; "
                    "`amnseg run --from/--to` runs several).")(_stage_command(stage.name))


_register_stage_commands()


@app.command("eval")
def eval_command(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    maps: Path = typer.Option(..., help="Folder of <stem>.npz score maps (e.g. runs/x/cam/maps)."),
    kind: str = typer.Option(None, help="cam or amn: which eval_threshold is the default "
                             "(default: from the folder, <run>/<kind>/maps)."),
    threshold: float = typer.Option(None, help="Threshold (default: <kind>.eval_threshold)."),
    name: str = typer.Option(None, help="Name of this map set in outputs: "
                             "<run>/eval/commands/<name>_sweep.json (default: kind)."),
) -> None:
    """mIoU of score maps at one threshold, plus the threshold sweep and per-image optima."""
    if _other_process():
        return
    loaded = _load(config, overrides, single_process=True)
    kind = map_kind(maps, kind)
    name = _output_name(name or kind, f"--name {name}")
    result = _evaluate(loaded, name, maps, _threshold(loaded, kind, threshold))
    from amnseg.data import build_dataset

    total = len(build_dataset(loaded.data, loaded.data.infer_split))
    subset = "" if result["images"] == total else (
        f" (on the {result['images']} of the {total} images that have maps in {maps})")
    _print_plain(
        f"{name}: mIoU {100 * result['miou_at_threshold']:.2f} at threshold "
        f"{result['threshold']:.2f}; best {100 * result['best_miou']:.2f} at "
        f"{result['best_threshold']:.2f}{subset}"
    )
    _print_path("written", commands_eval_dir(loaded) / f"{name}_sweep.json")


@app.command("sweep")
def sweep_command(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    maps: list[str] = typer.Option(
        ..., help="NAME=FOLDER of score maps; repeat to overlay several (e.g. CAM=... AMN=...)."
    ),
) -> None:
    """Threshold sweep of one or more map sets: mIoU curves and per-image optimal thresholds."""
    if _other_process():
        return
    loaded = _load(config, overrides, single_process=True)
    folders: dict[str, Path] = {}
    for item in maps:  # every name checked before any evaluation
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise AmnsegError(f"--maps {item!r}: expected NAME=FOLDER")
        _output_name(name, f"--maps {item}")
        if name in folders:
            raise AmnsegError(f"--maps {item}: the name {name} is given twice")
        folders[name] = Path(folder)
    results = {}
    for name, folder in folders.items():
        kind = map_kind(folder, name.lower() if name.lower() in MAP_SOURCES else None)
        results[name] = _evaluate(loaded, name, folder, _threshold(loaded, kind, None))
    paths = _plot(loaded, results)
    console.print(sweep_table(results))
    for path in paths:
        _print_path("plot", path)


@app.command("eval-seg")
def eval_seg_command(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    checkpoint: Path = typer.Option(None, help="Segmentation checkpoint (default: the run's "
                                    "seg/seg.pt)."),
) -> None:
    """mIoU of the segmentation network on data.val_split: MSC (seg.eval_flip adds the mirror),
    without and with the dense CRF (seg.eval_crf, parameters seg.crf.*); written to
    <run>/eval/commands/seg.json."""
    if _other_process():
        return
    from amnseg.layout import checkpoint_path
    from amnseg.stages.seg import evaluate_seg

    if checkpoint is None:  # said before the run folder is made
        trained = checkpoint_path(load_config(config, overrides or []), "seg")
        if not trained.is_file():
            raise AmnsegError(f"{trained}: no trained segmentation network in this run (train "
                              "it with amnseg train-seg, or give --checkpoint)")
    loaded = _load(config, overrides, single_process=True)
    # A network trained on the ground truth (the upper bound) is filed under its own name.
    upper_bound = checkpoint is not None and load_checkpoint(checkpoint).get("masks") == "gt"
    result = evaluate_seg(loaded, "seg_gt" if upper_bound else "seg", checkpoint,
                          commands_eval_dir(loaded))
    line = f"{result['name']}: mIoU {100 * result['no_crf']['miou']:.2f}"
    if result["crf"] is not None:
        line += f", with CRF {100 * result['crf']['miou']:.2f}"
    _print_plain(f"{line} on {result['images']} {result['split']} images")
    _print_path("written", commands_eval_dir(loaded) / "seg.json")


@app.command("predict")
def predict_command(
    checkpoint: Path = typer.Argument(..., help="An amnseg segmentation checkpoint."),
    images: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write colour blends "
                                 "(<out>/overlay/<stem>.png)."),
    voc_submission: bool = typer.Option(
        False, "--voc-submission", help="Write results/VOC2012/Segmentation/comp6_test_cls/"
        "<id>.png (raw class indices) for the VOC evaluation server."),
    crf: bool = typer.Option(True, "--crf/--no-crf", help="Dense CRF on the probabilities."),
    flip: bool = typer.Option(False, "--flip", help="Also average the mirrored image."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    crf_device: str = typer.Option(
        "cpu", help="cpu: pydensecrf (the reference); cuda or cuda:N: the same CRF in PyTorch "
        "on that GPU (marginals equal to ~1e-6, at most 5e-4)."),
    exif_orientation: bool = typer.Option(
        False, "--exif-orientation", help="Read images turned as their EXIF orientation tag "
        "says (masks as the photos show in a viewer)."),
    max_pixels: int = typer.Option(
        DataConfig.max_pixels, "--max-pixels", min=0, help="Refuse larger images (0: no "
        "limit); the CRF of a 12 MP photo takes minutes and ~8 GB."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace files already at the outputs' places. Without it, "
        "only files this command wrote with the same checkpoint and options are (the run "
        "resumes: images whose masks are there, from the same image content, are skipped)."),
) -> None:
    """Label images with a trained segmentation network: <out>/<stem>.png palette PNGs whose
    pixel values are class indices (0 background; VOC colours)."""
    from amnseg.segmenter import Segmenter, predict_files

    distributed.setup(device)
    segmenter = Segmenter.from_checkpoint(checkpoint, device=device, flip=flip, crf=crf,
                                          crf_device=crf_device,
                                          exif_orientation=exif_orientation,
                                          max_pixels=max_pixels)
    written = predict_files(segmenter, images, out, overlay, voc_submission, overwrite)
    distributed.barrier()  # every share written
    if distributed.is_main():
        _print_path(f"{len(written)} masks", written[0].parent if written else out)


@app.command("import-checkpoint")
def import_checkpoint_command(
    kind: str = typer.Argument(..., help="cam, amn, irn or seg."),
    source: Path = typer.Argument(..., help="The authors' file (res50_cam.pth, ...) or, for "
                                  "seg, a trained DeepLab-v2 file (kazuto1011's layout)."),
    destination: Path = typer.Argument(..., help="Where to write the amnseg checkpoint."),
    classes: str = typer.Option("voc", help="voc, coco, or a classes.txt path."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the destination if it exists."),
) -> None:
    """Convert an authors' checkpoint (res50_{cam,amn,irn}.pth) or a DeepLab-v2 file into an
    amnseg checkpoint."""
    if _other_process():
        return
    from amnseg.checkpoints import import_deeplab, import_reference

    if kind not in ("cam", "amn", "irn", "seg"):
        raise AmnsegError(f"unknown checkpoint kind {kind!r}: expected cam, amn, irn or seg")
    if destination.resolve() == source.resolve():
        raise AmnsegError(f"{destination}: the destination is the file to import; write the "
                          "amnseg checkpoint elsewhere (the original stays as it is)")
    _check_destination(destination, overwrite)
    if kind == "seg":
        import_deeplab(source, _class_names(classes), destination)
    else:
        import_reference(kind, source, _class_names(classes), destination)
    _print_path(f"imported {kind} checkpoint", destination)


@app.command("export-checkpoint")
def export_checkpoint_command(
    source: Path = typer.Argument(..., help="An amnseg checkpoint."),
    destination: Path = typer.Argument(..., help="Where to write the reference-layout file."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the destination if it exists."),
) -> None:
    """Write an amnseg checkpoint's weights under the reference's key names."""
    if _other_process():
        return
    from amnseg.checkpoints import export_reference
    from amnseg.io import save_checkpoint

    if destination.resolve() == source.resolve():
        raise AmnsegError(f"{destination}: the destination is the checkpoint to export; write "
                          "the reference-layout file elsewhere")
    _check_destination(destination, overwrite)
    checkpoint = load_checkpoint(source)
    try:
        exported = export_reference(checkpoint)
    except AmnsegError as error:
        raise AmnsegError(f"{source}: {error}") from None
    save_checkpoint(destination, exported)
    _print_path("exported", destination)


@app.command("generate-demo")
def generate_demo_command(
    root: Path = typer.Argument(Path("data/demo"), help="Where to write the demo dataset."),
    seed: int = typer.Option(0, help="Random seed (the data is a deterministic function of it)."),
) -> None:
    """Write the synthetic demo dataset (folder format) if it is not there yet."""
    if _other_process():
        return
    from amnseg.data.demo import ensure_demo

    _print_path("demo data", ensure_demo(root, seed=seed))


def _check_destination(destination: Path, overwrite: bool) -> None:
    """A checkpoint command writes no file over another (a trained network, a class list)
    unless told to."""
    if destination.is_dir():
        raise AmnsegError(f"{destination}: is a folder; expected the path of a file to write")
    if destination.exists() and not overwrite:
        raise AmnsegError(f"{destination}: already exists; pass --overwrite to replace it, or "
                          "choose another destination")


def _class_names(spec: str) -> list[str]:
    if spec == "voc":
        from amnseg.data.voc import VOC_CLASSES

        return list(VOC_CLASSES)
    if spec == "coco":
        from amnseg.data.coco import COCO_CLASSES

        return list(COCO_CLASSES)
    path = Path(spec)
    if path.is_dir():
        raise AmnsegError(f"--classes {spec}: is a folder; expected voc, coco or a classes.txt "
                          "path")
    if not path.is_file():
        raise AmnsegError(f"--classes {spec}: no such file; expected voc, coco or a classes.txt "
                          "path")
    from amnseg.data.folder import read_class_names

    return read_class_names(path)  # the rules of a dataset's classes.txt


def manifest_table(manifest: dict, stale: list[str] = (), notes: dict[str, str] | None = None
                   ) -> Table:
    """The manifest's stages: status ("out of date" for those in ``stale``, and the stage's
    ``notes``), seconds and metrics."""
    from amnseg.pipeline import stage_status

    table = Table(title="Pipeline")
    for column in ("stage", "status", "seconds", "metrics"):
        table.add_column(column)
    for name, record in manifest.get("stages", {}).items():
        if not isinstance(record, dict):
            table.add_row(name, "?", "", "")  # a hand-edited manifest: show what can be shown
            continue
        given = record.get("metrics")
        metrics = ", ".join(
            f"{key} {100 * value:.1f}" if "miou" in key else f"{key} {value:.2f}"
            for key, value in (given if isinstance(given, dict) else {}).items()
            if isinstance(value, (int, float))
        )
        seconds = record.get("seconds", 0)
        status = stage_status(record, name in stale)
        if notes and name in notes:
            status = f"{status} ({notes[name]})"
        table.add_row(name, status,
                      f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "?", metrics)
    return table


def summary_table(run_dir: Path) -> Table:
    """CAM vs AMN robustness and the mIoU of every stage's output, from the run's eval JSONs."""
    from amnseg.io import load_json

    eval_dir = run_dir / "eval"
    sweeps = {name: load_json(eval_dir / f"{stem}_sweep.json", dict)
              for name, stem in (("CAM", "cam"), ("AMN", "amn"))
              if (eval_dir / f"{stem}_sweep.json").is_file()}
    table = sweep_table(sweeps) if sweeps else Table()
    for name, stem in (("CAM seeds (CRF)", "cam_seeds"), ("AMN seeds (CRF)", "amn_seeds"),
                       ("pseudo masks", "pseudo_masks")):
        path = eval_dir / f"{stem}.json"
        if path.is_file():
            table.add_row(name, "", f"{100 * load_json(path, dict)['miou']:.1f}", "", "", "", "")
    segmentation = {stem: load_json(eval_dir / f"{stem}.json", dict) for stem in ("seg", "seg_gt")
                    if (eval_dir / f"{stem}.json").is_file()}
    for stem, name in (("seg", "seg net on pseudo masks, val"), ("seg_gt", "seg net on GT, val")):
        if stem in segmentation:
            result = segmentation[stem]
            crf = f" ({100 * result['crf']['miou']:.1f} CRF)" if result.get("crf") else ""
            table.add_row(name, "", f"{100 * result['no_crf']['miou']:.1f}{crf}", "", "", "", "")
    if len(segmentation) == 2:
        ratio = segmentation["seg"]["no_crf"]["miou"] / segmentation["seg_gt"]["no_crf"]["miou"]
        table.add_row("pseudo / GT", "", f"{100 * ratio:.0f} %", "", "", "", "")
    return table


def map_kind(folder: Path, given: str | None) -> str:
    """``cam`` or ``amn``: ``given``, else the folder's kind when it is ``<run>/<kind>/maps``,
    else ``cam``."""
    if given is not None:
        if given not in MAP_SOURCES:
            raise AmnsegError(f"--kind {given}: expected one of {', '.join(MAP_SOURCES)}")
        return given
    parent = Path(folder).resolve().parent.name
    return parent if parent in MAP_SOURCES else "cam"


def _output_name(name: str, where: str) -> str:
    """A map set's name, which names its files in the eval folder: a plain name only."""
    from amnseg.data.base import check_stem

    return check_stem(name, where)


def commands_eval_dir(config: Config) -> Path:
    """Where ``amnseg eval`` and ``amnseg sweep`` write: beside, never over, the evaluations
    ``amnseg run`` keeps in ``<run>/eval`` (its report reads those)."""
    return Path(config.run_dir) / "eval" / "commands"


def _threshold(config: Config, kind: str, given: float | None) -> float:
    if given is not None and not 0 <= given <= 1:
        raise AmnsegError(f"--threshold {given:g}: must lie in [0, 1] (maps are normalised to "
                          "their maximum)")
    return getattr(config, kind).eval_threshold if given is None else given


def _evaluate(config: Config, name: str, maps: Path, threshold: float) -> dict:
    from amnseg.data import build_dataset
    from amnseg.stages.evaluate import evaluate_maps

    dataset = build_dataset(config.data, config.data.infer_split)
    return evaluate_maps(
        maps,
        dataset,
        config.eval.thresholds(),
        commands_eval_dir(config),
        name=name,
        threshold=threshold,
        robust_range=tuple(config.eval.robust_range),
        workers=config.data.num_workers,
    )


def _plot(config: Config, results: dict[str, dict]) -> list[Path]:
    from amnseg.report.plots import plot_optimal_threshold_histogram, plot_sweep

    out_dir = commands_eval_dir(config)
    sweep_png = out_dir / "sweep.png"
    hist_png = out_dir / "optimal_thresholds.png"
    plot_sweep(results, sweep_png)
    plot_optimal_threshold_histogram(results, hist_png)
    return [sweep_png, hist_png]


def _shown(value: float | None, form: str, times: float = 1.0) -> str:
    """``value * times`` in ``form``; "n/a" for an undefined value (JSON null)."""
    return "n/a" if value is None else format(times * value, form)


def sweep_table(results: dict[str, dict]) -> Table:
    """Rich table: best threshold/mIoU, oracle mIoU, spread of per-image optima, range."""
    table = Table(title="Threshold robustness (mIoU %)")
    ranges = {tuple(r["robust_range"]) for r in results.values()}
    span = "-".join(f"{v:g}" for v in ranges.pop()) if len(ranges) == 1 else "robust"
    for column in (
        "maps", "images", "best t", "best mIoU", "per-image oracle", "opt. t mean +- std",
        f"range {span}", "FG-BG gap",
    ):
        table.add_column(column, justify="right")
    if len({r["images"] for r in results.values()}) > 1:
        # Sets of other images are not comparable row by row: say so under the table.
        table.caption = "the map sets cover different numbers of images"
    for name, r in results.items():
        table.add_row(
            name,
            str(r["images"]),
            f"{r['best_threshold']:.2f}",
            f"{100 * r['best_miou']:.1f}",
            _shown(r["oracle_miou"], ".1f", 100),
            f"{_shown(r['optimal_threshold_mean'], '.2f')} +- "
            f"{_shown(r['optimal_threshold_std'], '.2f')}",
            _shown(r["miou_range"], ".1f", 100),
            _shown(r["fg_bg_gap"], ".3f"),
        )
    return table


# Errors of the file system that a user fixes (not bugs): one line, exit status 2.
USER_OS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                  errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST,
                  errno.ELOOP, errno.ENOTEMPTY, errno.EBUSY, errno.EIO)
# Clearer than the system's words where an output folder is asked for: mkdir of an existing
# file says "File exists".
OS_ERROR_WORDS = {errno.EEXIST: "exists and is not a folder",
                  errno.ENOTDIR: "a part of this path is a file, not a folder",
                  errno.ELOOP: "too many levels of symbolic links (a link that points back "
                               "into itself?)"}


def one_line(error: BaseException) -> str:
    """The message of a user error as one line. An error raised in a data-loader worker comes
    back wrapped in the worker's traceback; its last line is the original message."""
    text = str(error).strip()
    if "Traceback (most recent call last)" in text and "AmnsegError: " in text:
        text = text.rsplit("AmnsegError: ", 1)[-1].strip()
    # A newline or control character inside a file name or a line of a file is shown escaped,
    # so that the one line still names the file and the problem.
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _fail(message: str, status: int = 2) -> None:
    # A progress bar may hold the current line (redrawn with carriage returns): on a terminal
    # start a fresh line, in a log return to the line's start.
    start = "\n" if sys.stderr.isatty() else "\r"
    print(f"{start}amnseg: error: {message}", file=sys.stderr)
    distributed.record_error(f"amnseg: error: {message}")
    sys.exit(status)


INTERRUPTED = "interrupted; the same command resumes where it stopped"


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    finished = False
    _new_run_dirs.clear()
    try:
        _main()
        finished = True
    finally:
        if not finished:
            _remove_unstarted_run_dirs()


def _main() -> None:
    try:
        # standalone_mode=False: usage errors (unknown option or command, missing argument)
        # reach us as exceptions, to be one line like every other error instead of a box;
        # --help and a normal end return an exit status.
        status = app(standalone_mode=False)
    except AmnsegError as error:
        _fail(one_line(error))
    except OSError as error:
        if error.errno not in USER_OS_ERRORS:
            raise
        words = OS_ERROR_WORDS.get(error.errno, str(error.strerror))
        _fail((f"{error.filename}: " if error.filename else "") + words)
    except Exception as error:
        # click's UsageError and Abort (Ctrl-C); typer may carry its own copy of click, so they
        # are matched by their API and name.
        if type(error).__name__ == "Abort":
            _fail(INTERRUPTED)
        if distributed.peer_stopped(error):
            _fail(distributed.PEER_STOPPED)
        if not (hasattr(error, "format_message") and getattr(error, "exit_code", None) == 2):
            raise
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "amnseg"
        message = " ".join(error.format_message().split())
        if not message:  # no command given: the help was printed instead
            sys.exit(2)
        _fail(f"{message} (`{command} --help` lists them)")
    if status == 130:  # typer's answer to Ctrl-C (128 + SIGINT)
        _fail(INTERRUPTED, 130)
    if isinstance(status, int) and status:
        sys.exit(status)


if __name__ == "__main__":
    main()
