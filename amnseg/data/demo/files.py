"""Writing the demo to disk: ``generate_demo`` / ``ensure_demo`` and the atomic folder swap.

The dataset is written into a hidden ``.<root>.partial-<pid>-*`` folder beside ``root`` and
renamed into place at the end; folders left by killed generations are cleaned up.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from amnseg.data.demo.params import DemoParams, all_stems
from amnseg.data.demo.scene import render_sample
from amnseg.errors import AmnsegError

# What a demo folder holds (see the package docstring).
DEMO_ENTRIES = frozenset({"images", "masks", "splits", "classes.txt", "labels.csv", "demo.json"})


def generate_demo(
    root: str | Path,
    seed: int = DemoParams.seed,
    num_train: int = DemoParams.num_train,
    num_val: int = DemoParams.num_val,
    size: int = DemoParams.size,
    num_classes: int = DemoParams.num_classes,
    max_objects: int = DemoParams.max_objects,
    body_range: tuple[float, float] = DemoParams.body_range,
    mark_range: tuple[float, float] = DemoParams.mark_range,
    marks_per_object: tuple[int, int] = DemoParams.marks_per_object,
    ignore_border: int = DemoParams.ignore_border,
    force: bool = False,
) -> Path:
    """Write the demo dataset to ``root`` (folder format) and return ``root``.

    Skipped when ``root`` already holds a complete demo with the same parameters (unless
    ``force``). The data is generated into a hidden folder beside ``root`` and renamed into
    place at the end, so an interrupted generation never leaves a half-written ``root``. An
    existing ``root`` is replaced only if it is empty or an older demo (it has ``demo.json``);
    any other non-empty folder is left alone and an ``AmnsegError`` is raised.
    """
    root = Path(root)
    if not 0 <= int(seed) < 2**32:
        raise AmnsegError(f"demo seed {seed}: must be an integer in 0 .. 2^32 - 1")
    if str(root) in ("", ".") or Path.cwd().resolve().is_relative_to(root.resolve()):
        # The demo is renamed into place as a whole: it needs a folder of its own.
        raise AmnsegError(f"{root or '.'}: the current folder (or one holding it) cannot be "
                          "the demo data folder; name a folder of its own, e.g. data/demo")
    params = DemoParams(
        seed=int(seed),
        num_train=int(num_train),
        num_val=int(num_val),
        size=int(size),
        num_classes=int(num_classes),
        max_objects=int(max_objects),
        body_range=(float(body_range[0]), float(body_range[1])),
        mark_range=(float(mark_range[0]), float(mark_range[1])),
        marks_per_object=(int(marks_per_object[0]), int(marks_per_object[1])),
        ignore_border=int(ignore_border),
    )
    params.validate()
    if not force and is_complete_demo(root, params):
        return root
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-{os.getpid()}-", dir=root.parent))
    try:
        _write_demo(tmp, params)
        if not force and is_complete_demo(root, params):
            # Another process finished the same demo meanwhile: keep theirs.
            shutil.rmtree(tmp)
            return root
        _replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_demo(root: str | Path, **params: Any) -> Path:
    """Generate the demo at ``root`` unless a complete one with these parameters is there.

    ``params`` are those of ``generate_demo`` (seed, num_train, ...); returns ``root``.
    """
    return generate_demo(Path(root), **params)


def is_complete_demo(root: str | Path, params: DemoParams) -> bool:
    """True when ``root/demo.json`` matches ``params`` and every file it implies exists."""
    root = Path(root)
    try:
        stored = json.loads((root / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    if stored != params.to_json():
        return False
    fixed = ["classes.txt", "labels.csv", "splits/train.txt", "splits/val.txt"]
    if not all((root / name).is_file() for name in fixed):
        return False
    for stem in all_stems(params):
        if not (root / "images" / f"{stem}.png").is_file():
            return False
        if not (root / "masks" / f"{stem}.png").is_file():
            return False
    return True


def _write_demo(folder: Path, params: DemoParams) -> None:
    """Write a complete demo into ``folder`` (an empty temporary folder); demo.json last."""
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    (folder / "splits").mkdir()
    names = params.class_names
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    rows: list[tuple[str, str]] = []
    for split, count in (("train", params.num_train), ("val", params.num_val)):
        stems = []
        for index in range(count):
            sample = render_sample(params, split, index)
            _save_png(folder / "images" / f"{sample.stem}.png", sample.image)
            _save_png(folder / "masks" / f"{sample.stem}.png", sample.mask)
            rows.append((sample.stem, ";".join(names[c - 1] for c in sample.classes)))
            stems.append(sample.stem)
        (folder / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("stem", "classes"))
    writer.writerows(rows)
    (folder / "labels.csv").write_text(buffer.getvalue())
    (folder / "demo.json").write_text(json.dumps(params.to_json(), indent=2) + "\n")


def _save_png(path: Path, array: np.ndarray) -> None:
    # Plain PIL PNGs carry no timestamp, so equal arrays give byte-identical files.
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def _check_replaceable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise AmnsegError(f"{root}: exists and is not a folder; cannot write the demo there")
    if root.is_dir() and any(root.iterdir()) and not (root / "demo.json").is_file():
        raise AmnsegError(
            f"{root}: folder exists, is not empty and holds no demo.json; refusing to "
            "overwrite it with the demo data (choose another folder or empty it)"
        )
    # An older demo is replaced as a whole: only if it holds nothing else (a run folder kept
    # inside it, say).
    others = sorted(path.name for path in root.iterdir()) if root.is_dir() else []
    others = [name for name in others if name not in DEMO_ENTRIES]
    if others:
        raise AmnsegError(
            f"{root}: holds other files besides an older demo ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); move them, or choose another folder for "
            "the demo data")


def _replace_dir(new: Path, root: Path) -> None:
    """Move ``new`` to ``root``; an existing (empty or demo) ``root`` is set aside first."""
    if not root.exists():
        os.rename(new, root)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-{os.getpid()}-", dir=root.parent))
    os.rename(root, old / "data")
    try:
        os.rename(new, root)
    except BaseException:
        os.rename(old / "data", root)  # put the previous demo back rather than lose it
        raise
    finally:
        if root.exists():
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(root: Path) -> None:
    """Delete temporary folders left beside ``root`` by generations that were killed."""
    for prefix in (f".{root.name}.partial-", f".{root.name}.old-"):
        for path in root.parent.glob(f"{prefix}*"):
            pid_text = path.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (when unsure: yes)."""
    if pid == os.getpid() or os.name == "nt":
        return True  # on Windows os.kill(pid, 0) would terminate the process: never probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (owned by someone else) or unknown: leave its folder alone
    return True
