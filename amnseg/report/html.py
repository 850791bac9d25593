"""``amnseg report RUN``: one self-contained HTML page (pictures embedded, no internet).

Sections: results per stage and per class, the threshold sweep and the per-image optimal
thresholds (CAM vs AMN), foreground/background activation histograms, a gallery of the best
and worst images (image, ground truth, CAM, AMN map, seed, pseudo mask), and the config.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from amnseg.config import Config, config_to_dict
from amnseg.data import run_dataset, skipped_images
from amnseg.data.base import SegDataset, read_index_png
from amnseg.errors import AmnsegError
from amnseg.io import atomic_path, load_json, load_score_maps
from amnseg.layout import eval_dir as layout_eval_dir
from amnseg.layout import maps_dir, masks_dir, seeds_dir
from amnseg.metrics import foreground_background_gap
from amnseg.pipeline import load_manifest, load_run_config, stage_status, stale_stages
from amnseg.report.figures import activation_histograms, colorize_labels, heatmap, png_bytes
from amnseg.report.plots import plot_optimal_threshold_histogram, plot_sweep

# Evaluation files the report shows (eval file stem, kind), in pipeline order.
EVAL_FILES = (("cam_sweep", "sweep"), ("cam_seeds", "labels"), ("amn_sweep", "sweep"),
              ("amn_seeds", "labels"), ("pseudo_masks", "labels"))
# The stage that writes each of them.
EVAL_STAGES = {"cam_sweep": "cam_maps", "cam_seeds": "cam_seeds", "amn_sweep": "amn_maps",
               "amn_seeds": "amn_seeds", "pseudo_masks": "masks", "seg": "seg",
               "seg_gt": "seg_gt"}
OUT_OF_DATE = " ⚠ out of date (the run's config has changed since: run it again)"


def _stage_labels(config: Config, records: dict[str, Any], stale: list[str]
                  ) -> dict[str, str]:
    """Row titles of the stage table: the seed thresholds each seed stage was made with (its
    manifest record's, else the config's), and a warning on the rows of stages that the run's
    config (that of its last command) would make differently."""

    def seed_thresholds(source: str) -> str:
        record = records.get(f"{source}_seeds")
        made_with = record.get("options") if isinstance(record, dict) else None
        values = []
        for which in ("fg", "bg"):
            key = f"{source}_{which}_threshold"
            value = (made_with or {}).get(f"seeds.{key}", getattr(config.seeds, key))
            values.append(f"{value:.2f}" if isinstance(value, (int, float)) else "?")
        return "/".join(values)

    labels = {
        "cam_sweep": "CAM maps (best threshold)",
        "cam_seeds": f"CAM seeds (CRF, {seed_thresholds('cam')})",
        "amn_sweep": "AMN maps (best threshold)",
        "amn_seeds": f"AMN seeds (CRF, {seed_thresholds('amn')})",
        "pseudo_masks": "Pseudo masks (IRN random walk)",
    }
    return {stem: label + (OUT_OF_DATE if EVAL_STAGES[stem] in stale else "")
            for stem, label in labels.items()}


def _gallery_columns(config: Config) -> tuple[tuple[str, Path, str], ...]:
    """(column title, folder, kind) of the gallery."""
    return (
        ("CAM", maps_dir(config, "cam"), "maps"),
        ("AMN", maps_dir(config, "amn"), "maps"),
        ("AMN seed", seeds_dir(config, "amn"), "labels"),
        ("pseudo mask", masks_dir(config), "labels"),
    )


def _img_tag(data: bytes, alt: str, width: int | None = None, css: str | None = None) -> str:
    encoded = base64.b64encode(data).decode()
    size = f' width="{width}"' if width else ""
    klass = f' class="{css}"' if css else ""
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}"{size}{klass}>'


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else (
        f"{100 * value:.1f}"
    )


# The fields the report reads from each kind of evaluation file, with the JSON type of each
# (a number may be null: no image with ground truth).
NUMBER, LIST, OBJECT, TEXT = "a number", "a list", "an object", "text"
REPORTED_FIELDS = {
    "sweep": {"thresholds": LIST, "miou": LIST, "best_miou": NUMBER, "best_threshold": NUMBER,
              "per_class_iou_at_best": OBJECT, "oracle_miou": NUMBER, "miou_range": NUMBER,
              "optimal_threshold_mean": NUMBER, "optimal_threshold_std": NUMBER,
              "fg_bg_gap": NUMBER},
    "labels": {"miou": NUMBER, "per_class_iou": OBJECT},
    "seg": {"images": NUMBER, "split": TEXT, "no_crf": OBJECT},
}
JSON_TYPES = {NUMBER: (int, float, type(None)), LIST: list, OBJECT: dict, TEXT: str}


def _number(value: float | None, digits: int = 2) -> str:
    """A value of an evaluation file, "–" where there is none (no image with ground truth)."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def _load_result(path: Path, kind: str) -> dict[str, Any]:
    """An evaluation file with the fields the report reads, or one line naming it."""
    result = load_json(path, dict)
    redo = "delete it and run the stage's evaluation again"
    for field, kind_of_value in REPORTED_FIELDS[kind].items():
        if field not in result:
            raise AmnsegError(f"{path}: no {field} (not an amnseg evaluation file, or damaged: "
                              f"{redo})")
        value = result[field]
        if not isinstance(value, JSON_TYPES[kind_of_value]) or isinstance(value, bool):
            raise AmnsegError(f"{path}: {field} is {json.dumps(value)[:40]}, not "
                              f"{kind_of_value} (damaged: {redo})")
    return result


def _load_results(eval_dir: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for stem, kind in EVAL_FILES:
        path = eval_dir / f"{stem}.json"
        if path.is_file():
            results[stem] = _load_result(path, kind)
    return results


def _class_names_in(results: dict[str, dict]) -> list[str]:
    """The foreground class names of the evaluation results, in their order."""
    for stem, kind in EVAL_FILES:
        if stem in results:
            field = "per_class_iou_at_best" if kind == "sweep" else "per_class_iou"
            return [name for name in results[stem][field] if name != "background"]
    return []


def _stage_table(results: dict[str, dict], class_names: list[str], labels: dict[str, str]) -> str:
    header = "".join(f"<th>{html.escape(n)}</th>" for n in ["background", *class_names])
    rows = []
    for stem, kind in EVAL_FILES:
        label = labels[stem]
        result = results.get(stem)
        if result is None:
            continue
        if kind == "sweep":
            score = result["best_miou"]
            per_class = result["per_class_iou_at_best"]
            label = f"{label} t={result['best_threshold']:.2f}"
        else:
            score, per_class = result["miou"], result["per_class_iou"]
        cells = "".join(f"<td>{_pct(per_class.get(n))}</td>"
                        for n in ["background", *class_names])
        rows.append(f"<tr><th>{html.escape(label)}</th><td class='key'>{_pct(score)}</td>"
                    f"{cells}</tr>")
    if not rows:
        return "<p>No evaluation results yet (the dataset may have no ground truth).</p>"
    return (f"<table><tr><th>stage</th><th>mIoU</th>{header}</tr>{''.join(rows)}</table>")


def _robustness_table(results: dict[str, dict]) -> str:
    rows = []
    for name, stem in (("CAM", "cam_sweep"), ("AMN", "amn_sweep")):
        r = results.get(stem)
        if r is None:
            continue
        best = f"{r['best_threshold']:.2f}"
        if r["best_threshold"] <= min(r["thresholds"]):
            # Nothing above background beats "everything is foreground": suspicious maps.
            best += " <span class='warn'>⚠ lowest threshold of the sweep</span>"
        rows.append(
            f"<tr><th>{name}</th><td>{best}</td><td>{_pct(r['best_miou'])}</td>"
            f"<td>{_pct(r['oracle_miou'])}</td><td>{_pct(r['miou_range'])}</td>"
            f"<td>{_number(r['optimal_threshold_mean'])} ± "
            f"{_number(r['optimal_threshold_std'])}</td>"
            f"<td>{_number(r['fg_bg_gap'], 3)}</td></tr>"
        )
    if not rows:
        return ""
    lo, hi = next(r for r in results.values() if "robust_range" in r)["robust_range"]
    return ("<table><tr><th>maps</th><th>best t</th><th>best mIoU</th>"
            "<th>per-image oracle mIoU</th>"
            f"<th>mIoU range {lo:.2f}–{hi:.2f}</th><th>optimal t mean ± std</th>"
            f"<th>FG−BG gap</th></tr>{''.join(rows)}</table>")


def _segmentation_table(eval_dir: Path, stale: list[str]) -> str:
    """The segmentation networks on the val split: what they learnt from, their init (it moves
    VOC results by 2-3 points), mIoU without and with the CRF, and pseudo vs ground truth."""
    rows, found = [], {}
    for stem, title in (("seg", "trained on the pseudo masks"),
                        ("seg_gt", "trained on the ground truth (upper bound)")):
        path = eval_dir / f"{stem}.json"
        if not path.is_file():
            continue
        if EVAL_STAGES[stem] in stale:
            title += OUT_OF_DATE
        r = found[stem] = _load_result(path, "seg")
        crf = r["crf"]["miou"] if r.get("crf") else None
        rows.append(
            f"<tr><th>{html.escape(title)}</th><td>{html.escape(str(r.get('init')))}</td>"
            f"<td>{r['images']} {html.escape(str(r['split']))}</td>"
            f"<td class='key'>{_pct(r['no_crf']['miou'])}</td><td>{_pct(crf)}</td></tr>"
        )
    if not rows:
        return "<p>No segmentation network evaluated yet.</p>"
    ratio = ""
    if len(found) == 2:
        value = found["seg"]["no_crf"]["miou"] / max(found["seg_gt"]["no_crf"]["miou"], 1e-9)
        ratio = f"<p>Pseudo-mask network / ground-truth network: {100 * value:.1f} %.</p>"
    return ("<table><tr><th>network</th><th>init</th><th>evaluated on</th><th>mIoU</th>"
            f"<th>mIoU with CRF</th></tr>{''.join(rows)}</table>{ratio}")


def _skipped_table(config: Config) -> str:
    skipped = skipped_images(config)
    if not skipped:
        return ""
    rows = "".join(f"<tr><th>{html.escape(stem)}</th><td>{html.escape(why)}</td></tr>"
                   for stem, why in sorted(skipped.items()))
    return (f"<h2>Skipped images ({len(skipped)})</h2><p>Left out of every stage "
            f"(data.on_bad_image=skip):</p><table><tr><th>image</th><th>why</th></tr>{rows}"
            "</table>")


def _activation_samples(config: Config, dataset: SegDataset, limit: int = 150):
    samples = {}
    for name, folder, kind in _gallery_columns(config):
        if kind != "maps" or not folder.is_dir():
            continue
        fg_parts, bg_parts = [], []
        for stem in dataset.stems[:limit]:
            path = folder / f"{stem}.npz"
            gt = dataset.mask(stem)
            if not path.is_file() or gt is None:
                continue
            fg, bg = foreground_background_gap(load_score_maps(path).full, gt)
            fg_parts.append(fg[::7])  # a subsample keeps the histogram cheap
            bg_parts.append(bg[::7])
        if fg_parts:
            samples[name] = (np.concatenate(fg_parts), np.concatenate(bg_parts))
    return samples


def _gallery(config: Config, dataset: SegDataset, results: dict[str, dict], count: int) -> str:
    ranking_source = next(
        (results[s] for s in ("pseudo_masks", "amn_seeds", "cam_seeds") if s in results), None
    )
    if ranking_source is None:
        return "<p>No label maps to rank images by yet.</p>"
    scores = ranking_source["per_image_miou"]
    ordered = sorted(scores, key=scores.get)
    picks = [("best", s) for s in reversed(ordered[-count:])] + [("worst", s)
                                                                 for s in ordered[:count]]
    columns = _gallery_columns(config)
    header = "".join(f"<th>{h}</th>" for h in
                     ["", "image", "ground truth", *[n for n, _, _ in columns]])
    rows = []
    for group, stem in picks:
        image = dataset.image(stem)
        gt = dataset.mask(stem)
        cells = [_img_tag(png_bytes(image), stem, 160),
                 _img_tag(png_bytes(colorize_labels(gt)), "ground truth", 160)
                 if gt is not None else "–"]
        for name, folder, kind in columns:
            path = folder / (f"{stem}.npz" if kind == "maps" else f"{stem}.png")
            if not path.is_file():
                cells.append("–")
            elif kind == "maps":
                cells.append(_img_tag(png_bytes(heatmap(load_score_maps(path).full, image)),
                                      name, 160))
            else:
                cells.append(_img_tag(png_bytes(colorize_labels(read_index_png(path))), name, 160))
        label = f"{group}<br><small>{html.escape(stem)}<br>mIoU {_pct(scores[stem])}</small>"
        rows.append(f"<tr><th>{label}</th>{''.join(f'<td>{c}</td>' for c in cells)}</tr>")
    return f"<table class='gallery'><tr>{header}</tr>{''.join(rows)}</table>"


STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
td, th { border: 1px solid #ddd; padding: 4px 7px; text-align: right; }
th { background: #f6f6f6; } td.key { font-weight: bold; background: #fff8e1; }
.gallery td { padding: 2px; } .gallery img { display: block; image-rendering: pixelated; }
.warn { color: #b00; }
.figures { display: flex; flex-wrap: wrap; gap: 1%; align-items: flex-start; }
.figures img { width: 49%; } .figures img.wide { width: 80%; } .muted { color: #777; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


# Records on <body> how many pictures failed to load and how tall the page is (read by
# `amnseg report --png` and the tests, through amnseg.report.screenshot).
CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0);
  document.body.setAttribute("data-broken-images", broken.length);
  document.body.setAttribute("data-page-height", document.documentElement.scrollHeight);
});
</script>"""


def build_report(run_dir: Path, gallery_count: int = 4) -> Path:
    """Write ``<run_dir>/report.html`` and return its path."""
    try:
        return _build_report(Path(run_dir), gallery_count)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # A result file edited into other fields or types (each file's fields are checked when
        # read; what they hold is not).
        raise AmnsegError(f"{run_dir}: a result file of the run does not fit its dataset "
                          f"({type(exc).__name__}: {exc}): the dataset changed since the run "
                          "(`amnseg status` shows the stages out of date; `amnseg run` makes "
                          "them again), or the file was edited (rerun the stage that wrote "
                          "it)") from None


def _build_report(run_dir: Path, gallery_count: int) -> Path:
    config = load_run_config(run_dir)
    config_dict = config_to_dict(config)
    eval_dir = layout_eval_dir(config)
    results = _load_results(eval_dir)
    try:
        dataset: SegDataset | None = run_dataset(config, config.data.infer_split)
    except AmnsegError:
        if Path(config.data.root).exists():
            raise  # there, but unreadable: the error says what to mend
        dataset = None  # moved or deleted since the run: the results still make a report
    sweeps = {name: results[stem] for name, stem in (("CAM", "cam_sweep"), ("AMN", "amn_sweep"))
              if stem in results}
    figures = []
    if sweeps:
        figures.append(plot_sweep(sweeps, eval_dir / "sweep.png"))
        histogram = eval_dir / "optimal_thresholds.png"
        figures.append(plot_optimal_threshold_histogram(sweeps, histogram))
    samples = _activation_samples(config, dataset) if dataset is not None else {}
    if samples:
        figures.append(activation_histograms(samples, eval_dir / "activations.png"))
    figure_tags = "".join(
        _img_tag(p.read_bytes(), p.stem, css="wide" if p.stem == "activations" else None)
        for p in figures
    )
    manifest = load_manifest(run_dir)
    records = manifest.get("stages", {})
    stale = stale_stages(config, manifest)
    timings = ""
    if records:
        timings = "<table><tr><th>stage</th><th>status</th><th>seconds</th></tr>" + "".join(
            f"<tr><th>{html.escape(n)}</th><td>{html.escape(stage_status(r, n in stale))}</td>"
            f"<td>{_number(r.get('seconds') if isinstance(r, dict) else None, 1)}</td></tr>"
            for n, r in records.items()
        ) + "</table>"
    if dataset is not None:
        images, class_names = f"{len(dataset)} images", list(dataset.class_names)
        gallery = _gallery(config, dataset, results, gallery_count)
    else:
        images, class_names = "not found", _class_names_in(results)
        gallery = (f"<p>The dataset is not at {html.escape(config.data.root)} any more: the "
                   "gallery and the activation histograms are left out.</p>")
    body = f"""
<h1>amnseg run report</h1>
<p class="muted">{html.escape(str(run_dir))} · dataset {html.escape(config.data.kind)}
 {html.escape(config.data.root)} ({html.escape(config.data.infer_split)}, {images})</p>
<h2>mIoU per stage and class (%)</h2>
{_stage_table(results, class_names, _stage_labels(config, records, stale))}
<h2>Segmentation network (DeepLab-v2)</h2>
{_segmentation_table(eval_dir, stale)}
<h2>Robustness to the threshold</h2>
{_robustness_table(results)}
<div class="figures">{figure_tags}</div>
<h2>Best and worst images</h2>
{gallery}
<h2>Stages</h2>
{timings}
{_skipped_table(config)}
<h2>Config</h2>
<pre>{html.escape(json.dumps(config_dict, indent=2))}</pre>
"""
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>amnseg report</title>"
            f"<style>{STYLE}</style></head><body>{body}{CHECK_IMAGES}</body></html>")
    out = run_dir / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
