"""A dataset's signature: what tells ``amnseg run`` that its inputs changed since a stage ran.

It covers the class list, the image ids in order, and every file that defines a sample
(image, mask or annotation, label table, split list), each by its size and modification time
(``stat``, cheap: no file is read) or by its SHA-256 (``content``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from amnseg.data.base import SegDataset
from amnseg.errors import AmnsegError
from amnseg.io import file_sha256
from amnseg.progress import progress_bar

SIGNATURE_KINDS = ("stat", "content")


def file_token(path: Path, kind: str) -> str:
    """A file by its size and modification time (``stat``) or its SHA-256 (``content``)."""
    try:
        if kind == "content":
            return file_sha256(path)
        info = path.stat()
        return f"{info.st_size}:{info.st_mtime_ns}"
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise AmnsegError(f"{path}: cannot be read ({exc.strerror})") from None


def folder_token(folder: Path, kind: str) -> str:
    """A folder's files (names and :func:`file_token` of each, not below it) as one hash."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f"{path.name}\0{file_token(path, kind)}\n".encode())
    return digest.hexdigest()[:16]


def data_signature(dataset: SegDataset, kind: str = "stat") -> str:
    """A 16-hex-digit hash of ``dataset``'s inputs (see the module docstring); an image that is
    listed but missing is a one-line error."""
    if kind not in SIGNATURE_KINDS:
        raise AmnsegError(f"data.signature={kind!r}: expected one of {', '.join(SIGNATURE_KINDS)}")
    digest = hashlib.sha256(json.dumps(list(dataset.class_names)).encode())
    for path in dataset.shared_files():
        digest.update(f"{path}\0{file_token(path, kind)}\n".encode())
    for stem in progress_bar(dataset.stems, desc="checking the data", unit="img", leave=False,
                     disable=len(dataset.stems) < 2000):
        image, *others = dataset.source_files(stem)
        token = file_token(image, kind)
        if token == "missing":
            raise AmnsegError(f"{image}: image listed in the dataset but not found")
        digest.update(f"{stem}\0{token}".encode())
        for path in others:
            digest.update(f"\0{path.name}\0{file_token(path, kind)}".encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
