"""Shared helpers of the benchmark scripts: machine description and RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )


def run_times(fn: Callable[[], object], repeats: int, warmups: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn``, after ``warmups`` calls that are not timed."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (after one warm-up call)."""
    return min(run_times(fn, repeats))


def card_name() -> str | None:
    """The GPU's model in a few characters ("H100" of "NVIDIA H100 80GB HBM3"), None without
    one."""
    if not torch.cuda.is_available():
        return None
    full = torch.cuda.get_device_name(0)
    model = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Za-z]?)\b", full)
    return model.group(1) if model else full


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``## name`` of RESULTS.md; on a machine with a GPU the
    name ends with the card's model, so that figures of different cards sit side by side."""
    card = card_name()
    if card and card not in name:
        name = f"{name} ({card})"
    module = f"benchmarks.{Path(sys.argv[0]).stem}"
    command = " ".join(["python -m", module, *sys.argv[1:]])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    section = (
        f"## {name}\n\n- machine: {machine()}\n- command: `{command}`\n"
        f"- commit: {commit or 'unknown'}, {time.strftime('%Y-%m-%d')}\n\n{body.strip()}\n"
    )
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
    print(section)
