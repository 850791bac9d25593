"""benchmarks/run_gpu.sh picks its steps as asked (run with stand-ins for python3 and
nvidia-smi: no GPU needed, nothing is measured)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def steps_run(tmp_path: Path, *args: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("nvidia-smi", 'echo "GPU 0: stand-in"'), ("python3", 'echo "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), str(out), *args],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    log = (out / "steps.log").read_text().splitlines()
    return [line.split()[1].rstrip(":") for line in log
            if line.startswith("=== ") and "exit" not in line]


@pytest.mark.parametrize("args, expected", [
    (("open",), ["pipeline_bf16", "open_tests", "seg_convs"]),
    (("walk", "seg_best"), ["walk", "seg_best"]),
    (("seg_profile",), ["seg_profile"]),
    (("s2b",), ["pipeline_bf16", "s2b_tests", "dilated_conv", "seg_s2b"]),
])
def test_steps_are_those_asked_in_the_script_order(tmp_path, args, expected):
    assert steps_run(tmp_path, *args) == expected


def test_every_step_runs_by_default_but_not_the_repeat_of_seg_stage(tmp_path):
    steps = steps_run(tmp_path)
    assert steps[0] == "gpu_tests" and steps[-1] == "demo_bf16"
    assert "seg_stage" in steps and "seg_best" not in steps and len(steps) == len(set(steps))
