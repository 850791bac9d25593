"""The ``amnseg`` command line.

Every command that works on a dataset takes a config (a name from ``configs/`` such as
``voc12``, or a YAML path) followed by ``key=value`` overrides, e.g.::

    amnseg train-cam voc12 data.root=/data/VOCdevkit/VOC2012 cam.epochs=3
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from amnseg.config import Config, config_to_dict, load_config
from amnseg.errors import AmnsegError
from amnseg.io import save_json

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="Weakly-supervised semantic segmentation with AMN: image-level tags in, pixel masks out.",
)
console = Console()

CONFIG_HELP = "Config name in configs/ (voc12, coco14, demo) or a YAML path."
OVERRIDES_HELP = "key=value overrides, e.g. cam.epochs=3 data.root=/data/voc."


def _load(config: str, overrides: list[str] | None) -> Config:
    loaded = load_config(config, overrides or [])
    Path(loaded.run_dir).mkdir(parents=True, exist_ok=True)
    save_json(Path(loaded.run_dir) / "config.json", config_to_dict(loaded))
    return loaded


@app.command("train-cam")
def train_cam_command(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Train the CAM classifier on image-level labels (resumes from the last epoch)."""
    from amnseg.stages.cam import train_cam

    path = train_cam(_load(config, overrides))
    console.print(f"CAM checkpoint: [bold]{path}[/bold]")


@app.command("make-cam")
def make_cam_command(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    checkpoint: Path = typer.Option(None, help="CAM checkpoint (default: <run_dir>/cam/cam.pt)."),
) -> None:
    """Write multi-scale + flip CAMs of the inference split (resumes per image)."""
    from amnseg.stages.cam import make_cams

    out_dir = make_cams(_load(config, overrides), checkpoint)
    console.print(f"CAM maps: [bold]{out_dir}[/bold]")


@app.command("eval")
def eval_command(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    maps: Path = typer.Option(..., help="Folder of <stem>.npz score maps (e.g. runs/x/cam/maps)."),
    threshold: float = typer.Option(None, help="Threshold (default: cam.eval_threshold)"),
    name: str = typer.Option("cam", help="Name of this map set in outputs."),
) -> None:
    """mIoU of score maps at one threshold, plus the threshold sweep and per-image optima."""
    loaded = _load(config, overrides)
    result = _evaluate(loaded, name, maps, threshold)
    console.print(
        f"{name}: mIoU {100 * result['miou_at_threshold']:.2f} at threshold "
        f"{result['threshold']:.2f}; best {100 * result['best_miou']:.2f} at "
        f"{result['best_threshold']:.2f}"
    )


@app.command("sweep")
def sweep_command(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    maps: list[str] = typer.Option(
        ..., help="NAME=FOLDER of score maps; repeat to overlay several (e.g. CAM=... AMN=...)."
    ),
) -> None:
    """Threshold sweep of one or more map sets: mIoU curves and per-image optimal thresholds."""
    loaded = _load(config, overrides)
    results = {}
    for item in maps:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise AmnsegError(f"--maps {item!r}: expected NAME=FOLDER")
        results[name] = _evaluate(loaded, name, Path(folder), None)
    paths = _plot(loaded, results)
    console.print(sweep_table(results))
    for path in paths:
        console.print(f"plot: {path}")


@app.command("generate-demo")
def generate_demo_command(
    root: Path = typer.Argument(Path("data/demo"), help="Where to write the demo dataset."),
    seed: int = typer.Option(0, help="Random seed (the data is a deterministic function of it)."),
) -> None:
    """Write the synthetic demo dataset (folder format) if it is not there yet."""
    from amnseg.data.demo import ensure_demo

    console.print(f"demo data: [bold]{ensure_demo(root, seed=seed)}[/bold]")


@app.command("demo")
def demo_command(
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Run the pipeline on the built-in demo data (generated on first use) and summarise."""
    from amnseg.data.demo import ensure_demo
    from amnseg.stages.cam import make_cams, train_cam

    loaded = _load("demo", overrides)
    ensure_demo(Path(loaded.data.root), seed=loaded.seed)
    train_cam(loaded)
    cam_maps = make_cams(loaded)
    results = {"CAM": _evaluate(loaded, "cam", cam_maps, None)}
    paths = _plot(loaded, results)
    console.print(sweep_table(results))
    for path in paths:
        console.print(f"plot: {path}")


def _evaluate(config: Config, name: str, maps: Path, threshold: float | None) -> dict:
    from amnseg.data import build_dataset
    from amnseg.stages.evaluate import evaluate_maps

    dataset = build_dataset(config.data, config.data.infer_split)
    return evaluate_maps(
        maps,
        dataset,
        config.eval.thresholds(),
        Path(config.run_dir) / "eval",
        name=name,
        threshold=config.cam.eval_threshold if threshold is None else threshold,
        robust_range=tuple(config.eval.robust_range),
    )


def _plot(config: Config, results: dict[str, dict]) -> list[Path]:
    from amnseg.report.plots import plot_optimal_threshold_histogram, plot_sweep

    out_dir = Path(config.run_dir) / "eval"
    sweep_png = out_dir / "sweep.png"
    hist_png = out_dir / "optimal_thresholds.png"
    plot_sweep(results, sweep_png)
    plot_optimal_threshold_histogram(results, hist_png)
    return [sweep_png, hist_png]


def sweep_table(results: dict[str, dict]) -> Table:
    """Rich table: best threshold/mIoU, oracle mIoU, spread of per-image optima, range."""
    table = Table(title="Threshold robustness (mIoU %)")
    for column in (
        "maps", "best t", "best mIoU", "per-image oracle", "opt. t mean +- std", "range 0.1-0.6",
        "FG-BG gap",
    ):
        table.add_column(column, justify="right")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['best_threshold']:.2f}",
            f"{100 * r['best_miou']:.1f}",
            f"{100 * r['oracle_miou']:.1f}",
            f"{r['optimal_threshold_mean']:.2f} +- {r['optimal_threshold_std']:.2f}",
            f"{100 * r['miou_range']:.1f}",
            f"{r['fg_bg_gap']:.3f}",
        )
    return table


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except AmnsegError as error:
        print(f"amnseg: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
