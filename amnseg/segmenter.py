"""The trained segmentation network as a Python object and as ``amnseg predict``.

    from amnseg import Segmenter
    segmenter = Segmenter.from_checkpoint("runs/voc12/seg/seg.pt", device="cuda")
    mask = segmenter(image)   # (H, W) uint8 class indices, 0 = background

``image``: a PIL image of any mode (grayscale, RGBA, CMYK, 16-bit, ...), a numpy array
(H, W) / (H, W, 3) / (H, W, 4), uint8 or uint16, or an image file: its path, its bytes or an
open binary file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from amnseg import distributed
from amnseg.checkpoints import build_model, load_model_checkpoint, reference_kind
from amnseg.config import CrfConfig, DataConfig, deeplab_crf, validate_crf
from amnseg.data.base import read_rgb, rgb_array
from amnseg.data.check import check_pixels
from amnseg.data.folder import IMAGE_SUFFIXES
from amnseg.data.voc import VOC_CLASSES, voc_palette
from amnseg.errors import AmnsegError
from amnseg.io import (
    append_jsonl,
    atomic_path,
    file_sha256,
    folder_lock,
    load_checkpoint,
    output_file,
    save_label_png,
)
from amnseg.models.deeplab import MSC
from amnseg.progress import progress_bar
from amnseg.stages.seg import predict_labels, predict_probabilities
from amnseg.training import crf_device_of, resolve_device

VOC_SUBMISSION_DIR = Path("results/VOC2012/Segmentation/comp6_test_cls")
# One line per labelled image: its outputs' SHA-256, its own, and the checkpoint and options.
# A second run resumes into the files listed with its own checkpoint and options.
PREDICT_LOG = "amnseg-predict.jsonl"
PREDICT_LOCK = ".amnseg-predict.lock"


def as_rgb(image: Image.Image | np.ndarray | str | Path | bytes | BinaryIO,
           exif_orientation: bool = False) -> np.ndarray:
    """A PIL image, numpy array, image file (its path, or its bytes or an open binary file) as
    (H, W, 3) uint8 RGB (a file turned as its EXIF orientation tag says, with
    ``exif_orientation``)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise AmnsegError(f"{path}: " + ("a folder, not an image file" if path.is_dir()
                                             else "no such image file"))
        return read_rgb(path, exif_orientation)
    if isinstance(image, (bytes, bytearray, memoryview)) or hasattr(image, "read"):
        return _decoded(image, exif_orientation)
    if isinstance(image, Image.Image):
        return rgb_array(image)
    if image is None or not hasattr(image, "__array__") and not isinstance(image, (list, tuple)):
        raise AmnsegError(f"{type(image).__name__}: not an image (expected a PIL image, a numpy "
                          "array, a file path, or a file's bytes)")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]  # alpha dropped
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[2] != 3):
        raise AmnsegError(
            f"image array of shape {array.shape} and type {array.dtype}: expected (H, W), "
            "(H, W, 3) or (H, W, 4) of uint8 or uint16"
        )
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def _decoded(data: bytes | bytearray | memoryview | BinaryIO, exif_orientation: bool
             ) -> np.ndarray:
    """An image file's contents (bytes, or an open binary file) decoded as (H, W, 3) RGB."""
    stream = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with Image.open(stream) as image:
            if exif_orientation:
                image = ImageOps.exif_transpose(image)
            return rgb_array(image, "image data")
    except UnidentifiedImageError:
        raise AmnsegError("image data: not an image format PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise AmnsegError(f"image data: unreadable image ({exc})") from None


class Segmenter:
    """A trained segmentation network (MSC DeepLab-v2) that labels images.

    ``flip`` also averages the mirrored image's logits; ``crf`` refines the probabilities with
    the dense CRF (True: DeepLab's test-time parameters, or a ``CrfConfig``), which runs in
    pydensecrf (``crf_device="cpu"``) or as PyTorch's mean field on a GPU (``"cuda"``).
    ``exif_orientation``: image files are read turned as their EXIF orientation tag says (the
    masks then match the images as viewers show them). An image above ``max_pixels`` (0: no
    limit) is refused with a one-line error, as ``amnseg run`` refuses it: the network's
    activations and the CRF grow with the pixel count (a 12 MP photo's CRF takes minutes and
    ~8 GB), and a decoded numpy array has no PIL decompression-bomb guard.
    """

    def __init__(self, model: MSC, class_names: list[str], device: str | torch.device = "cpu",
                 flip: bool = False, crf: bool | CrfConfig = False, crf_device: str = "cpu",
                 exif_orientation: bool = False, max_pixels: int = DataConfig.max_pixels):
        self.device = resolve_device(str(device))
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        for name, value in (("flip", flip), ("exif_orientation", exif_orientation)):
            if not isinstance(value, bool):
                raise AmnsegError(f"{name}={value!r}: expected True or False")
        self.flip = flip
        self.exif_orientation = exif_orientation
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
            raise AmnsegError(f"max_pixels={max_pixels!r}: expected a whole number >= 0 (0: no "
                              "limit)")
        self.max_pixels = max_pixels
        if not isinstance(crf, (bool, CrfConfig)) and crf is not None:
            raise AmnsegError(f"crf={crf!r}: expected True (DeepLab's parameters), False or a "
                              "CrfConfig")
        self.crf = deeplab_crf() if crf is True else (validate_crf(crf) if crf else None)
        self.crf_device = crf_device_of(str(crf_device))
        # Set by from_checkpoint: what lets `amnseg predict` resume into its own outputs.
        self.checkpoint_sha256: str | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        flip: bool = False, crf: bool | CrfConfig = False,
                        crf_device: str = "cpu", exif_orientation: bool = False,
                        max_pixels: int = DataConfig.max_pixels) -> Segmenter:
        """A segmenter from an amnseg ``seg`` checkpoint (``amnseg train-seg`` or
        ``amnseg import-checkpoint seg``)."""
        if not isinstance(path, (str, os.PathLike)):
            raise AmnsegError(f"{path!r}: expected the path of a checkpoint file")
        path = Path(path)
        raw = load_checkpoint(path)
        if raw.get("format") == "amnseg" and raw.get("stage") != "seg":
            raise AmnsegError(f"{path}: an amnseg {raw.get('stage')} checkpoint, not a "
                              "segmentation network (a run's is <run_dir>/seg/seg.pt)")
        kind = reference_kind(raw) if raw.get("format") != "amnseg" else None
        if kind is not None:
            raise AmnsegError(f"{path}: the authors' {kind} network (res50_{kind}.pth), not a "
                              "segmentation network (predict takes one that amnseg train-seg "
                              "wrote, or a DeepLab-v2 file imported with amnseg "
                              "import-checkpoint seg)")
        if raw.get("format") != "amnseg" or raw.get("stage") != "seg":
            raise AmnsegError(
                f"{path}: not an amnseg segmentation checkpoint (import a DeepLab-v2 file "
                "first: amnseg import-checkpoint seg FILE OUT --classes voc)"
            )
        checkpoint = load_model_checkpoint(path, "seg", raw.get("class_names"))
        segmenter = cls(build_model(checkpoint, path), checkpoint["class_names"], device, flip,
                        crf, crf_device, exif_orientation, max_pixels)
        segmenter.checkpoint_sha256 = file_sha256(path)
        return segmenter

    def settings(self) -> dict:
        """What decides the labels it gives: the checkpoint (by content) and the options."""
        return {"checkpoint_sha256": self.checkpoint_sha256, "flip": self.flip,
                "crf": None if self.crf is None else asdict(self.crf),
                "crf_device": str(self.crf_device or "cpu"),
                "exif_orientation": self.exif_orientation}

    def check_size(self, height: int, width: int, what: str = "image",
                   limit: str = "max_pixels") -> None:
        """A one-line error naming ``what`` when an image of this size is too small for the
        network's smallest input scale (which would shrink a side to no pixel) or above
        ``max_pixels``; ``limit`` is how the error names that option."""
        smallest = min((1.0, *self.model.scales))
        if int(min(height, width) * smallest) < 1:
            raise AmnsegError(
                f"{what}: {width}x{height} pixels is too small to segment (at least "
                f"{math.ceil(1 / smallest)} pixels a side, for the input scale {smallest:g})")
        check_pixels(what, height, width, self.max_pixels, f"{limit}={self.max_pixels}",
                     f"downscale it, or raise {limit} (0: no limit)")

    def probabilities(self, image: Image.Image | np.ndarray | str | Path) -> np.ndarray:
        """(C + 1, H, W) float32 class probabilities (before any CRF)."""
        rgb = as_rgb(image, self.exif_orientation)
        self.check_size(*rgb.shape[:2])
        return predict_probabilities(self.model, rgb, self.device, self.flip).cpu().numpy()

    def __call__(self, image: Image.Image | np.ndarray | str | Path) -> np.ndarray:
        """(H, W) uint8 class indices: 0 background, i = ``class_names[i - 1]``."""
        rgb = as_rgb(image, self.exif_orientation)
        self.check_size(*rgb.shape[:2])
        return predict_labels(self.model, rgb, self.device, self.flip, self.crf,
                              self.crf_device)


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders as the image files inside (sorted); one-line errors."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir()
                           if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, ".tif",
                                                                    ".tiff", ".gif"))
            if not found:
                raise AmnsegError(f"{item}: no image files in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise AmnsegError(f"{item}: no such image file or folder")
    # A file given twice (by name and in its folder) is labelled once.
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    files = list(unique.values())
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems and stems[path.stem] != path:
            raise AmnsegError(f"{path}: same name as {stems[path.stem]} (outputs would collide)")
        stems[path.stem] = path
    return files


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with each labelled pixel blended with its class's VOC colour."""
    colours = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)[labels]
    blended = np.where(labels[..., None] > 0, (1 - alpha) * image + alpha * colours, image)
    return blended.round().astype(np.uint8)


def predict_files(segmenter: Segmenter, inputs: Iterable[str | Path], out_dir: Path,
                  with_overlay: bool = False, voc_submission: bool = False,
                  overwrite: bool = False) -> list[Path]:
    """Label every image of ``inputs``; returns the mask files.

    Default: ``<out>/<stem>.png`` palette PNGs (pixel value = class index, VOC colours).
    ``voc_submission``: ``<out>/results/VOC2012/Segmentation/comp6_test_cls/<stem>.png`` raw
    class indices, the layout the VOC evaluation server takes (tar the ``results`` folder).
    ``with_overlay``: also ``<out>/overlay/<stem>.png`` blends. Every input is decoded
    first, and no output may replace an input: a bad input stops the run before it writes.
    An image above the segmenter's ``max_pixels`` is refused before anything is written.

    A file already at an output's place is replaced only with ``overwrite`` (it could be a
    ground-truth mask), unless ``<out>/amnseg-predict.jsonl`` lists it as written by this
    checkpoint with these options. A run into such a folder resumes: an image whose outputs
    it lists, unchanged and made from the same image content, is not labelled again.
    """
    if voc_submission and list(segmenter.class_names) != list(VOC_CLASSES):
        raise AmnsegError(
            "--voc-submission: the checkpoint's classes are not VOC's 20 "
            f"({', '.join(segmenter.class_names[:3])}, ...); the server would read its class "
            "indices as VOC classes")
    files = image_files(inputs)
    masks_dir = out_dir / VOC_SUBMISSION_DIR if voc_submission else out_dir
    inputs_resolved = {path.resolve() for path in files}
    overlay_dir = out_dir / "overlay"
    if with_overlay and overlay_dir.exists() and not overlay_dir.is_dir():
        raise AmnsegError(f"{overlay_dir}: exists and is not a folder (--overlay writes there)")
    targets = {path: [output_file(masks_dir, path.stem, ".png"),
                      *([output_file(overlay_dir, path.stem, ".png")] if with_overlay else [])]
               for path in files}
    for path in files:
        # Decoded in full, not only its header: a file cut short shows only then.
        height, width = read_rgb(path, segmenter.exif_orientation).shape[:2]
        segmenter.check_size(height, width, str(path), "--max-pixels")
        for target in targets[path]:
            if target.resolve() in inputs_resolved:
                raise AmnsegError(f"{target}: the output would replace this input image; "
                                  "choose an output folder that holds no input image")
    settings = _settings_key(segmenter)
    if not overwrite:  # refused before the folder is touched (it may be a dataset's)
        _own_outputs_only(settings, targets, out_dir)
    # One command at a time per folder: two would both find it free of foreign files, then
    # write each other's masks (rank 0 holds it for a torchrun job).
    with folder_lock(out_dir, PREDICT_LOCK, "another amnseg predict", "is writing into this "
                     "folder; wait for it to finish or choose another --out"
                     ) if distributed.is_main() else nullcontext():
        log_file = out_dir / PREDICT_LOG
        if overwrite:
            log_file.unlink(missing_ok=True)
        own = {} if overwrite else _own_outputs_only(settings, targets, out_dir)
        image_sha = {path: file_sha256(path) for path in files}
        # Under torchrun each process labels its share, once every process has checked the
        # folder (a file another one writes meanwhile is its own, not a foreign one).
        distributed.barrier()
        for path in progress_bar(distributed.shard(files), desc="predict", unit="img"):
            if all(target.exists() and own.get(target, ("",))[0] == image_sha[path]
                   for target in targets[path]):
                continue  # done by an earlier run of this command, from this very image
            image = read_rgb(path, segmenter.exif_orientation)
            labels = segmenter(image)
            save_label_png(targets[path][0], labels, None if voc_submission else voc_palette())
            if with_overlay:
                with atomic_path(targets[path][1]) as tmp:
                    Image.fromarray(overlay(image, labels)).save(tmp, format="PNG")
            if settings is not None:
                append_jsonl(log_file, {
                    "image_sha256": image_sha[path], "settings": settings,
                    "files": {str(target.relative_to(out_dir)): file_sha256(target)
                              for target in targets[path]}})
    return [paths[0] for paths in targets.values()]


def _own_outputs_only(settings: str | None, targets: dict[Path, list[Path]], out_dir: Path
                      ) -> dict[Path, tuple[str, str]]:
    """The outputs this command wrote with ``settings`` (see :func:`_own_outputs`); a
    one-line error when any other file is at an output's place."""
    log_file = out_dir / PREDICT_LOG
    own = _own_outputs(log_file, settings, out_dir)
    foreign = [target for paths in targets.values() for target in paths
               if target.exists() and not (target in own
                                           and own[target][1] == file_sha256(target))]
    if foreign:
        origin = (", not written with this checkpoint and these options"
                  if log_file.exists() else "")
        raise AmnsegError(
            f"{foreign[0]}: already exists ({len(foreign)} of the outputs do{origin}); pass "
            "--overwrite to replace them, or choose another --out")
    return own


def _settings_key(segmenter: Segmenter) -> str | None:
    """A hash of what decides the labels (checkpoint and options); None when the weights have
    no file to name them by."""
    settings = segmenter.settings()
    if settings["checkpoint_sha256"] is None:
        return None
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _own_outputs(log_file: Path, settings: str | None, out_dir: Path
                 ) -> dict[Path, tuple[str, str]]:
    """The files of ``out_dir`` that ``log_file`` says this command wrote with ``settings``:
    {file: (its input image's SHA-256, its own SHA-256)}, the latest line of each file. A
    damaged line (a run killed while writing it) counts for nothing."""
    own: dict[Path, tuple[str, str]] = {}
    if settings is None or not log_file.is_file():
        return own
    try:
        lines = log_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return own  # unreadable: every file there is of unknown origin
    for line in lines:
        try:
            entry = json.loads(line)
            files = entry["files"].items()
            image, made_with = str(entry["image_sha256"]), entry["settings"]
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        for name, digest in files:
            target = out_dir / str(name)
            if made_with == settings:
                own[target] = (image, str(digest))
            else:
                own.pop(target, None)
    return own
