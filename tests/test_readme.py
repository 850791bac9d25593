"""The README's Python example runs as written (with a test checkpoint, image and device)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    text = README.read_text()
    found = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert found, "the README's marked Python example is missing"
    return found.group(1)


def test_readme_quick_start_has_the_two_commands():
    text = README.read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]" && amnseg demo' in text
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest' in text


def test_readme_python_example_runs(tmp_path, capsys):
    from test_seg import save_tiny_seg_checkpoint

    checkpoint = save_tiny_seg_checkpoint(tmp_path / "seg.pt")
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(
        photo)
    code = api_example()
    assert code.count("\n") <= 6  # short enough to read at a glance
    code = (code.replace("runs/voc12/seg/seg.pt", str(checkpoint))
            .replace('"photo.jpg"', repr(str(photo))).replace('device="cuda"', 'device="cpu"'))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    mask = namespace["mask"]
    assert mask.shape == (40, 52) and mask.dtype == np.uint8
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("[") and all(n in ("cat", "dog") for n in eval(printed))  # noqa: S307


@pytest.mark.parametrize("name", ["voc12", "coco14", "demo", "voc12_published"])
def test_every_config_named_in_the_readme_loads(name):
    from amnseg.config import load_config

    assert name in README.read_text()
    load_config(name, [])
