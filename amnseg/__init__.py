"""amnseg: weakly-supervised semantic segmentation with the Activation Manipulation Network."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Segmenter"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import amnseg` stays light (no torch).
    if name == "Segmenter":
        from amnseg.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'amnseg' has no attribute {name!r}")
