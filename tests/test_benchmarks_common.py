"""benchmarks/common.py: RESULTS.md sections are replaced by name, and a GPU machine's figures
carry the card's model in the name, so that two cards' figures do not overwrite each other."""

from __future__ import annotations

import torch

from benchmarks import common


def test_sections_are_replaced_by_name_and_named_after_the_card(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    common.write_section("Walk", "cpu figures")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    common.write_section("Walk", "first H100 figures")
    common.write_section("Walk", "second H100 figures")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    common.write_section("Walk (H200)", "H200 figures")  # a name that has the card already
    text = (tmp_path / "RESULTS.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Walk", "## Walk (H100)", "## Walk (H200)"]
    assert "cpu figures" in text and "second H100 figures" in text and "H200 figures" in text
    assert "first H100 figures" not in text


def test_card_name_is_the_model_or_the_whole_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for full, short in [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100"),
                        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090")]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0, full=full: full)
        assert common.card_name() == short
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.card_name() is None
