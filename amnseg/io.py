"""Atomic file writing and the on-disk formats shared by the stages.

Every output is written to a temporary file in the destination folder and renamed into place,
so a killed run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import threading
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from amnseg.errors import AmnsegError

TEMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary file is created like any other output (mode 0666 minus the umask, unlike
    ``tempfile.mkstemp``'s 0600), so the final file gets the usual permissions.
    """
    path = Path(path)
    if path.is_dir():
        raise AmnsegError(f"{path}: is a folder; expected the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temporary_name(path.name)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    except OSError as error:
        # The temporary name means nothing to the user, and a full disk names no file: the
        # error names the file being written.
        if error.filename is None or error.filename in (str(tmp), tmp):
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


# The names temporary_name makes (and only those: a user's own ".draft.tmp" is no leftover).
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def temporary_name(name: str) -> str:
    """``.<name>.<12 hex digits>.tmp``, the name shortened when the whole would pass the file
    systems' 255 bytes (an output whose own name fits must not fail for its temporary one)."""
    tag = f".{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    room = 255 - 1 - len(tag)
    shortened = name.encode()[:room].decode(errors="ignore")
    return f".{shortened}{tag}"


@contextmanager
def folder_lock(folder: Path, name: str, holder: str, advice: str) -> Iterator[None]:
    """Hold ``<folder>/<name>`` (an advisory lock, released when the process ends in any way);
    while another process holds it: "<folder>: <holder> (pid N) <advice>"."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / name, "a+")  # noqa: SIM115 (held for the whole block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise AmnsegError(f"{folder}: {holder} (pid {owner}) {advice}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def output_file(folder: Path, stem: str, suffix: str) -> Path:
    """``<folder>/<stem><suffix>``, refused unless it lies directly inside ``folder`` (a stem from
    an input file must never write elsewhere)."""
    path = Path(folder) / f"{stem}{suffix}"
    if path.parent != Path(folder) or stem in ("", ".", "..") or "/" in stem or "\\" in stem:
        raise AmnsegError(f"{folder}: refusing to write {stem!r}{suffix} (not a plain name)")
    return path


class BackgroundWriter:
    """Runs file writes on ``threads`` threads beside the caller's work (0: at once, in the
    caller). Compressing one image's score maps takes ~60 ms (benchmarks/RESULTS.md), several
    times the GPU forwards that made them; zlib releases the GIL, so threads overlap it. At most
    2 x ``threads`` writes wait (bounded memory). A failed write is raised by the next
    ``submit`` or on leaving the ``with`` block, which waits for every write."""

    def __init__(self, threads: int):
        self.pool = (concurrent.futures.ThreadPoolExecutor(threads, "amnseg-writer")
                     if threads > 0 else None)
        self.slots = threading.BoundedSemaphore(max(2 * threads, 1))
        self.pending: list[concurrent.futures.Future] = []

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        if self.pool is None:
            write(*args)
            return
        self._collect(wait=False)
        self.slots.acquire()
        future = self.pool.submit(write, *args)
        future.add_done_callback(lambda _: self.slots.release())
        self.pending.append(future)

    def _collect(self, wait: bool) -> None:
        """Forget finished writes, raising the first failure (all of them when ``wait``)."""
        still = []
        for future in self.pending:
            if wait or future.done():
                future.result()
            else:
                still.append(future)
        self.pending = still

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if self.pool is None:
            return
        try:
            if kind is None:
                self._collect(wait=True)
        finally:
            # On an error, writes not started are dropped; started ones finish (atomically).
            self.pool.shutdown(wait=True, cancel_futures=True)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON record as one line, written in a single call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")


DAMAGED = "the file is damaged: restore it or delete it (amnseg remakes what it can)"


def load_json(path: str | Path, kind: type | None = None) -> Any:
    """A JSON file's value (of type ``kind`` when given); a file cut short, hand-edited into
    something else or not UTF-8 is a one-line AmnsegError naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AmnsegError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); "
                          f"{DAMAGED}") from None
    except UnicodeDecodeError:
        raise AmnsegError(f"{path}: not UTF-8 text; {DAMAGED}") from None
    except OSError as exc:
        raise AmnsegError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if kind is not None and not isinstance(value, kind):
        raise AmnsegError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}"
                          f", found {type(value).__name__}; {DAMAGED}")
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """``torch.save`` through memory: saved to a file, torch's zip names its inner folder after
    the (random) temporary file, so identical checkpoints would differ byte for byte."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


# The first bytes of a zip archive: torch.save's files and .npz files are zip archives.
ZIP_MAGIC = b"PK\x03\x04"


def load_tensors(path: Path, what: str) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers; nothing else is
    unpickled), on the CPU; any failure is one AmnsegError line naming ``path`` as ``what``."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; files of torch < 1.6 (and the authors' release) are
    # pickles, which start with the PROTO opcode. Anything else fails deep inside torch.load
    # with messages such as "KeyError: 101".
    if not (head == ZIP_MAGIC or head[:1] == b"\x80"):
        raise AmnsegError(f"{path}: not a readable {what} (not a PyTorch file: neither a zip "
                          "archive nor a pickle)")
    if head == ZIP_MAGIC:
        # torch.save's archive holds <name>/data.pkl; other zips (.npz, ...) and archives cut
        # short fail deep inside torch.load with C++ messages.
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            raise AmnsegError(f"{path}: not a readable {what} (a zip archive cut short or "
                              "damaged)") from None
        if not any(name.endswith("data.pkl") for name in names):
            raise AmnsegError(f"{path}: not a readable {what} (a zip archive, but not one "
                              "torch.save wrote: no data.pkl)")
    try:
        with warnings.catch_warnings():
            # Printed for every file saved with pickle protocol 4 or later (most .pth files),
            # before the load succeeds or fails: noise beside the one-line error.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise AmnsegError(
                f"{path}: not a readable {what} (it holds pickled Python objects besides "
                "tensors; they are never unpickled, as they could run code)"
            ) from exc
        raise AmnsegError(f"{path}: not a readable {what} ({_first_line(exc)})") from exc
    except Exception as exc:  # torch raises several types for corrupt files
        raise AmnsegError(f"{path}: not a readable {what} ({_first_line(exc)})") from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if path.is_dir():
        raise AmnsegError(f"{path}: is a folder; expected a checkpoint file (.pt or .pth)")
    if not path.is_file():
        raise AmnsegError(f"{path}: " + ("not a regular file (a device, a pipe?); expected a "
                                         "checkpoint file" if path.exists() else
                                         "checkpoint not found"))
    checkpoint = load_tensors(path, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise AmnsegError(f"{path}: not a checkpoint (it holds a {type(checkpoint).__name__}, "
                          "not a record of named tensors)")
    odd = next((key for key in checkpoint if not isinstance(key, str)), None)
    if odd is not None:
        raise AmnsegError(f"{path}: not a checkpoint (a key {odd!r} that is not a name)")
    return checkpoint


def check_tensors(state: dict, source: Path | str, what: str) -> None:
    """Every entry of ``state`` is a tensor under a name, with finite values where they are
    floats, or one line says which is not (weights with a NaN would train or predict nothing
    without a word)."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise AmnsegError(f"{source}: a key {key!r} that is not a name (not {what})")
        if not isinstance(value, torch.Tensor):
            raise AmnsegError(f"{source}: {key} is not a tensor but {type(value).__name__} "
                              f"(not {what})")
        if value.is_complex() or value.layout != torch.strided or value.is_meta:
            raise AmnsegError(f"{source}: {key} is a {value.dtype} {value.layout} tensor"
                              f"{' without data' if value.is_meta else ''}, not one of "
                              f"weights (not {what})")
    key = first_non_finite(state)
    if key is not None:
        raise AmnsegError(f"{source}: the weights hold NaN or infinite values (first in {key}): "
                          "a damaged file, or one of a training that diverged")


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The first key of ``state`` whose float tensor holds a NaN or an infinity, or None."""
    return next((key for key, value in state.items()
                 if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)


@dataclass
class ScoreMaps:
    """Per-image score maps of the image's classes.

    ``class_ids``: (K,) int64, class indices 1..C (0 is background, never stored here).
    ``strided``: (K, h4, w4) float32 maps at stride 4, h4 = (H - 1) // 4 + 1.
    ``full``: (K, H, W) float32 maps at image size.
    """

    class_ids: np.ndarray
    strided: np.ndarray
    full: np.ndarray


def save_score_maps(path: str | Path, maps: ScoreMaps, compress: bool = True) -> None:
    """Write maps as an ``.npz`` (plain arrays, readable without pickle), zip-compressed or
    not (the same values either way; ``load_score_maps`` reads both)."""
    save = np.savez_compressed if compress else np.savez
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        save(
            f,
            class_ids=np.asarray(maps.class_ids, dtype=np.int64),
            strided=np.asarray(maps.strided, dtype=np.float32),
            full=np.asarray(maps.full, dtype=np.float32),
        )


def load_score_maps(path: str | Path, num_classes: int | None = None) -> ScoreMaps:
    """The maps of one image, checked (class ids within 1..``num_classes`` when given)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != ZIP_MAGIC:  # np.load would take anything else for a pickle
                raise AmnsegError(f"{path}: not a valid score map file (not an .npz archive)")
        with np.load(path, allow_pickle=False) as data:
            maps = ScoreMaps(data["class_ids"], data["strided"], data["full"])
    except FileNotFoundError:
        raise AmnsegError(f"{path}: score map file not found") from None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise AmnsegError(f"{path}: not a valid score map file ({reason}); delete it and "
                          "the stage that wrote it makes it again") from None
    problem = _score_map_problem(maps, num_classes)
    if problem:
        raise AmnsegError(f"{path}: {problem}")
    return maps


MAP_RANGE_SLACK = 1e-3  # above 1: float rounding of a normalised maximum, never more


def _score_map_problem(maps: ScoreMaps, num_classes: int | None) -> str | None:
    """What is wrong with the arrays of a map file (as ``save_score_maps`` writes them), or
    None."""
    ids = maps.class_ids
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        return f"class ids of shape {ids.shape} and type {ids.dtype}, not a list of integers"
    if len(np.unique(ids)) != len(ids):
        return f"class ids {ids.tolist()} name a class twice"
    highest = num_classes if num_classes is not None else np.inf
    if ids.size and (ids.min() < 1 or ids.max() > highest):
        return f"class ids {ids.tolist()} outside 1..{num_classes or 'C'}"
    for name in ("full", "strided"):
        scores = getattr(maps, name)
        if (scores.ndim != 3 or len(scores) != len(ids)
                or not np.issubdtype(scores.dtype, np.floating)):
            return (f"{name} maps of shape {scores.shape} and type {scores.dtype} do not match "
                    f"{len(ids)} class ids")
        if not np.isfinite(scores).all():
            return ("the maps hold NaN or infinite values (did the network that made them "
                    "diverge?)")
        # Thresholds in [0, 1] are what seeds and evaluations apply; maps from elsewhere (0-255
        # heat maps, logits) would give meaningless results without a word.
        if scores.size and (scores.min() < 0 or scores.max() > 1 + MAP_RANGE_SLACK):
            return (f"{name} maps range over [{scores.min():.4g}, {scores.max():.4g}]; score "
                    "maps lie in [0, 1] (each class's map normalised by its maximum)")
    height, width = maps.full.shape[1:]
    expected = ((height - 1) // 4 + 1, (width - 1) // 4 + 1)
    if maps.strided.shape[1:] != expected:
        return (f"stride-4 maps of {maps.strided.shape[2]}x{maps.strided.shape[1]} for full "
                f"maps of {width}x{height} (expected {expected[1]}x{expected[0]})")
    return None


def save_label_png(path: str | Path, labels: np.ndarray, palette: list[int] | None = None) -> None:
    """Write a uint8 label map as a PNG (palette mode when a palette is given)."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L")
    if palette is not None:
        image = image.convert("P")
        image.putpalette(palette)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
