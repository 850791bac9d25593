"""Progress bars (tqdm, with ETA) that only the main process shows: under torchrun every rank
runs the same loops, and one bar per rank would garble the terminal."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from amnseg.distributed import is_main


def progress_bar(iterable: Any = None, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, disabled on ranks other than 0."""
    options["disable"] = bool(options.get("disable", False)) or not is_main()
    return tqdm(iterable, **options)


def say(message: str) -> None:
    """Print a line (between progress bars) from the main process."""
    if is_main():
        tqdm.write(message)
