#!/usr/bin/env python
"""The README's demo tables from finished demo runs: each figure's mean over the runs with the
spread (max - min) in brackets, and the per-run values.

    python tools/demo_table.py runs/demo runs/demo_s1 runs/demo_s2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read(run: Path, name: str) -> dict:
    return json.loads((run / "eval" / f"{name}.json").read_text())


def cell(values: list[float], digits: int = 1) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.{digits}f} ({max(values) - min(values):.{digits}f})"


def main(runs: list[Path]) -> None:
    sweeps = {kind: [read(run, f"{kind}_sweep") for run in runs] for kind in ("cam", "amn")}
    print("| maps | best threshold | best mIoU | per-image oracle mIoU | per-image optimal t "
          "(mean ± std) | mIoU range over t = 0.10-0.60 | FG-BG activation gap |")
    print("|---|---|---|---|---|---|---|")
    for kind, results in sweeps.items():
        thresholds = "/".join(sorted({f"{r['best_threshold']:.2f}" for r in results}))
        mean_t = sum(r["optimal_threshold_mean"] for r in results) / len(results)
        std_t = sum(r["optimal_threshold_std"] for r in results) / len(results)
        print(f"| {kind.upper()} | {thresholds} | {cell([100 * r['best_miou'] for r in results])}"
              f" | {cell([100 * r['oracle_miou'] for r in results])} | {mean_t:.2f} ± "
              f"{std_t:.2f} | {cell([100 * r['miou_range'] for r in results])} | "
              f"{cell([r['fg_bg_gap'] for r in results], 3)} |")
    seeds = {kind: [100 * read(run, f"{kind}_seeds")["miou"] for run in runs]
             for kind in ("cam", "amn")}
    masks = [100 * read(run, "pseudo_masks")["miou"] for run in runs]
    seg = {name: [read(run, name) for run in runs] for name in ("seg", "seg_gt")}

    def seg_cell(name: str) -> str:
        plain = [100 * r["no_crf"]["miou"] for r in seg[name]]
        crf = [100 * r["crf"]["miou"] for r in seg[name]]
        return f"{cell(plain)} ({cell(crf)} with CRF)"

    ratio = [p["no_crf"]["miou"] / g["no_crf"]["miou"] * 100
             for p, g in zip(seg["seg"], seg["seg_gt"], strict=True)]
    ratio_crf = [p["crf"]["miou"] / g["crf"]["miou"] * 100
                 for p, g in zip(seg["seg"], seg["seg_gt"], strict=True)]
    print()
    print("| stage output | mIoU (%) |\n|---|---|")
    best = {kind: [100 * r["best_miou"] for r in results] for kind, results in sweeps.items()}
    print(f"| CAM maps, best global threshold | {cell(best['cam'])} |")
    print(f"| CAM seeds | {cell(seeds['cam'])} |")
    print(f"| AMN maps, best global threshold | {cell(best['amn'])} |")
    print(f"| AMN seeds | {cell(seeds['amn'])} |")
    print(f"| pseudo masks (IRN random walk) | {cell(masks)} |")
    print(f"| segmentation net trained on the pseudo masks, val (+ CRF) | {seg_cell('seg')} |")
    print(f"| the same net trained on the ground truth, val (+ CRF) | {seg_cell('seg_gt')} |")
    print(f"| pseudo-mask net / ground-truth net | {cell(ratio, 0)} % ({cell(ratio_crf, 0)} % "
          "with CRF) |")
    print()
    per_run = {
        "CAM": best["cam"],
        "AMN": best["amn"],
        "AMN seeds": seeds["amn"],
        "pseudo masks": masks,
        "seg": [100 * r["no_crf"]["miou"] for r in seg["seg"]],
        "seg_gt": [100 * r["no_crf"]["miou"] for r in seg["seg_gt"]],
    }
    print("Per run: " + ", ".join(
        f"{name} {' / '.join(f'{v:.1f}' for v in values)}" for name, values in per_run.items()))


if __name__ == "__main__":
    main([Path(arg) for arg in sys.argv[1:]])
