"""tools/mutate.py's test selection: a mutant runs the tests that can see it, not the whole
suite, when its line runs at import only to define something."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "mutate.py"
SOURCE = '''SCALE = 3


def scaled(x, factor=2,
           offset=0):
    """Docstring."""
    return x * factor * SCALE + offset


def unused(y=1):
    return y
'''


def load_tool():
    spec = importlib.util.spec_from_file_location("mutate_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def mutant_at(tool, line: int):
    return tool.Mutant("pkg/m.py", line, 0, 1, "x", "number", "before", "after")


def test_defaults_run_the_tests_of_the_body_and_constants_those_that_read_them():
    tool = load_tool()
    layout = tool.file_layout(SOURCE)
    body_test = "test:tests/test_a.py::test_scaled"
    hits = {("pkg/m.py", line): {tool.ALL} for line in (1, 4, 5, 10)}  # run at import
    hits[("pkg/m.py", 7)] = {body_test}
    coverage = tool.Coverage(hits, {})
    references = {"SCALE": {("pkg/m.py", 7)}}  # name -> where it is read
    for header_line in (4, 5):  # both lines of the signature
        selection = tool.select_tests(mutant_at(tool, header_line), layout, coverage, references)
        assert selection["nodes"] == ["tests/test_a.py::test_scaled"], header_line
    constant = tool.select_tests(mutant_at(tool, 1), layout, coverage, references)
    assert constant["nodes"] == ["tests/test_a.py::test_scaled"]
    # A function no test calls: its defaults are seen by no test.
    assert tool.select_tests(mutant_at(tool, 10), layout, coverage, references) is None
    # A body line runs the tests that execute it, whatever the header does.
    assert tool.select_tests(mutant_at(tool, 7), layout, coverage, references)["nodes"] == [
        "tests/test_a.py::test_scaled"]
