#!/usr/bin/env python
"""Small, dependency-free mutation testing for amnseg.

Every mutant is the original source file with exactly one line changed (one token or one small
expression, found from the AST). Each mutant is written into a private copy of the repository
and the test suite runs there (``python -m pytest`` with cwd and ``PYTHONPATH`` = the copy, so
the copy's ``amnseg`` is imported, not the editable install). Killed = tests failed, errored or
timed out; survived = tests passed.

To be fast, the suite first runs once under a line tracer (a small pytest plugin written next
to the copy) that records which test executes each line of the targets. A mutant then runs
only the tests that execute its statement (the whole suite if that statement runs at import
time); a mutant whose statement no test executes is counted as survived without running.
``--no-select`` runs the whole suite for every mutant instead.

    python tools/mutate.py --list                      # show the mutants, run nothing
    python tools/mutate.py --only 'amnseg/ops/*' --out /tmp/mutation.json
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

DEFAULT_TARGETS = ("amnseg/stages", "amnseg/ops")
DEFAULT_PYTEST_ARGS = "-x -q -p no:cacheprovider tests"
# Slow end-to-end files: minutes per run, so they are left out of the per-mutant suite.
DEFAULT_EXCLUDED_TESTS = (
    "tests/test_pipeline.py",
    "tests/test_demo_data.py",
    "tests/test_demo_phenomenon.py",
    "tests/test_cli*",
)
COPY_IGNORE = ("__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", ".benchmarks")
# Only at the top of the repository: a run's outputs and data (tests/data must be copied).
TOP_LEVEL_IGNORE = (".git", "runs", "data", ".venv", "build")

# --- what gets mutated ------------------------------------------------------------------------

BINOP_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.Div,),
    ast.Div: (ast.Mult,),
    ast.Pow: (ast.Mult,),
    ast.FloorDiv: (ast.Div,),
}
CMPOP_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Lt: (ast.LtE,),
    ast.LtE: (ast.Lt,),
    ast.Gt: (ast.GtE,),
    ast.GtE: (ast.Gt,),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
}
OP_TEXT: dict[type, str] = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.FloorDiv: "//",
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
}
# String-valued keyword knobs of torch / numpy / PIL calls and what they become.
KEYWORD_STRINGS: dict[str, dict[str, str]] = {
    "mode": {"bilinear": "nearest", "nearest": "bilinear", "bicubic": "bilinear",
             "constant": "replicate", "reflect": "replicate", "replicate": "constant"},
    "reduction": {"mean": "sum", "sum": "mean", "none": "sum"},
    "padding_mode": {"zeros": "border", "border": "zeros", "reflection": "zeros"},
    "interpolation": {"bilinear": "nearest", "nearest": "bilinear", "bicubic": "bilinear"},
}
# PIL resampling constants (Image.NEAREST, Image.Resampling.BICUBIC, ...).
RESAMPLE_SWAPS = {"NEAREST": "BILINEAR", "BILINEAR": "NEAREST", "BICUBIC": "BILINEAR"}
# Methods whose removal from a chain keeps the program running (same kind of value back), so
# deleting one tests whether the result really depends on it.
DELETABLE_METHODS = frozenset({
    "flip", "fliplr", "flipud", "clamp", "clamp_min", "clamp_max", "clip", "abs", "sqrt", "exp",
    "log", "sigmoid", "softmax", "log_softmax", "relu", "pow", "t", "transpose", "permute",
    "squeeze", "unsqueeze", "float", "double", "long", "round", "floor", "ceil", "neg",
})
# Swapping the arguments of these is an equivalent mutant (or a guaranteed crash): skip.
NO_SWAP_CALLS = frozenset({
    "min", "max", "maximum", "minimum", "fmax", "fmin", "isinstance", "issubclass", "getattr",
    "setattr", "hasattr", "super", "print", "zip", "logical_and", "logical_or", "eq", "ne",
    "mul", "add",
})
# Calls whose arguments are messages, not behaviour.
MESSAGE_CALLS = frozenset({
    "print", "debug", "info", "warning", "warn", "error", "exception", "critical", "log",
    "echo", "secho", "write", "set_description", "set_postfix",
})
MESSAGE_OWNERS = frozenset({"logging", "logger", "log", "LOGGER", "warnings", "console",
                            "typer", "click", "sys", "bar", "tqdm"})
# Keyword flags that change bookkeeping, not results (a mutant there is noise).
COSMETIC_KEYWORDS = frozenset({"leave", "non_blocking", "exist_ok", "parents", "frozen",
                               "dynamic_ncols", "disable", "flush", "chunksize", "position"})
SNIPPET_MAX = 60


@dataclass(frozen=True)
class Mutant:
    """One single-line change of one file."""

    file: str  # relative to the repository root, with forward slashes
    line: int  # 1-based
    col: int  # 0-based start column of the replaced text
    end_col: int  # 0-based end column (exclusive)
    replacement: str
    operator: str  # short name of the mutation kind
    original: str  # human-readable context before ...
    mutated: str  # ... and after the change

    @property
    def id(self) -> str:
        """Stable identifier (position + kind + replacement)."""
        return f"{self.file}:{self.line}:{self.col}:{self.operator}:{self.replacement}"

    def describe(self) -> str:
        return f"{self.file}:{self.line}: {self.original} -> {self.mutated}"

    def apply(self, source: str) -> str:
        """The file's text with this mutant's line changed (line endings kept)."""
        lines = source.splitlines(keepends=True)
        text = lines[self.line - 1]
        lines[self.line - 1] = text[: self.col] + self.replacement + text[self.end_col :]
        return "".join(lines)


@dataclass
class Result:
    """Outcome of running the tests against one mutant."""

    id: str
    file: str
    line: int
    operator: str
    original: str
    mutated: str
    original_line: str
    mutated_line: str
    status: str  # killed | survived | timeout | error
    returncode: int | None
    seconds: float
    output_tail: str = ""
    extra: dict = field(default_factory=dict)


def _window(text: str, col: int, end_col: int, reach: int = 16) -> tuple[int, int]:
    """A few characters around ``[col, end_col)``, cut at spaces so words stay whole."""
    lo = max(col - reach, 0)
    while lo > 0 and text[lo - 1] != " ":
        lo -= 1
    if col - lo > 2 * reach:  # a long chain: cut it rather than show nothing before the change
        lo = max(col - reach, 0)
    hi = min(end_col + reach, len(text))
    while hi < len(text) and text[hi] != " ":
        hi += 1
    if hi - end_col > 2 * reach:
        hi = end_col
    return lo, hi


class _Generator(ast.NodeVisitor):
    """Walks one module and collects mutants; positions come from the AST and tokenize."""

    def __init__(self, rel: str, source: str):
        self.rel = rel
        self.lines = source.splitlines()
        self.tree = ast.parse(source)
        self.tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
                       if t.type == tokenize.OP]
        self.mutants: list[Mutant] = []
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(self.tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        self.skip_nodes: set[int] = set()
        # Names bound by imports: ``torch.sigmoid(x)`` is a module function, not a method.
        self.imported = {
            (alias.asname or alias.name).split(".")[0]
            for node in ast.walk(self.tree) if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        self.skip_lines = {i + 1 for i, text in enumerate(self.lines) if "raise" in text}
        self._mark_skipped()

    # -- skipping --------------------------------------------------------------------------

    def _skip_tree(self, node: ast.AST | None) -> None:
        if node is not None:
            self.skip_nodes.update(id(n) for n in ast.walk(node))

    def _mark_skipped(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                          ast.Constant):
                    self._skip_tree(body[0])  # docstring
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self._skip_tree(node.returns)
                args = node.args
                for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg,
                            args.kwarg]:
                    if arg is not None:
                        self._skip_tree(arg.annotation)
            elif isinstance(node, ast.AnnAssign):
                self._skip_tree(node.annotation)
            elif isinstance(node, ast.ImportFrom | ast.Import | ast.Raise):
                self._skip_tree(node)
            elif isinstance(node, ast.Assert):
                self._skip_tree(node.msg)
            elif isinstance(node, ast.JoinedStr):
                # f-strings are messages/paths; before 3.12 their inner nodes have no usable
                # positions either.
                self._skip_tree(node)
            elif isinstance(node, ast.Call) and self._is_message_call(node):
                self._skip_tree(node)

    @staticmethod
    def _is_message_call(call: ast.Call) -> bool:
        func = call.func
        if isinstance(func, ast.Name):
            return func.id in ("print", "warn")
        if isinstance(func, ast.Attribute) and func.attr in MESSAGE_CALLS:
            owner = func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            return name in MESSAGE_OWNERS or func.attr in ("print", "echo", "secho", "warn")
        return False

    def _skipped(self, node: ast.AST) -> bool:
        if id(node) in self.skip_nodes:
            return True
        start, end = node.lineno, node.end_lineno or node.lineno
        return any(line in self.skip_lines for line in range(start, end + 1))

    # -- helpers ---------------------------------------------------------------------------

    def _segment(self, node: ast.AST) -> str | None:
        """Source text of a node that sits on one line, else None."""
        if node.lineno != node.end_lineno:
            return None
        return self.lines[node.lineno - 1][node.col_offset : node.end_col_offset]

    def _context(self, node: ast.AST, levels: int = 2) -> ast.AST:
        """The node to show around a change: up to ``levels`` enclosing expressions (or a
        simple statement) on the same line, as long as they stay short."""
        best = node
        for _ in range(levels):
            parent = self.parents.get(best)
            if (parent is None or not isinstance(parent, ast.expr | ast.keyword | ast.Assign
                                                  | ast.AugAssign | ast.Return)
                    or parent.lineno != parent.end_lineno or parent.lineno != node.lineno
                    or parent.end_col_offset - parent.col_offset > SNIPPET_MAX):
                break
            best = parent
        return best

    def _add(self, node: ast.AST, line: int, col: int, end_col: int, replacement: str,
             operator: str, context: ast.AST | None = None) -> None:
        """Record a mutant replacing ``[col, end_col)`` of ``line`` by ``replacement``."""
        text = self.lines[line - 1]
        if text[col:end_col] == replacement:
            return
        shown = context or node
        if (shown.lineno == shown.end_lineno == line and shown.col_offset <= col
                and end_col <= shown.end_col_offset
                and shown.end_col_offset - shown.col_offset <= SNIPPET_MAX):
            lo, hi = shown.col_offset, shown.end_col_offset
        else:
            lo, hi = _window(text, col, end_col)
        before = text[lo:hi]
        after = text[lo:col] + replacement + text[end_col:hi]
        self.mutants.append(Mutant(self.rel, line, col, end_col, replacement, operator,
                                   before.strip(), after.strip()))

    def _op_token(self, after: ast.AST, before: ast.AST, text: str) -> tokenize.TokenInfo | None:
        """The operator token ``text`` between the end of ``after`` and the start of
        ``before`` (parentheses and line breaks may sit in between)."""
        start = (after.end_lineno, after.end_col_offset)
        stop = (before.lineno, before.col_offset)
        for tok in self.tokens:
            if start <= tok.start and tok.end <= stop and tok.string == text:
                return tok
        return None

    # -- visitors --------------------------------------------------------------------------

    def generic_visit(self, node: ast.AST) -> None:
        if id(node) in self.skip_nodes:
            return
        super().generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        parent = self.parents.get(node)
        if (self._skipped(node) or node.lineno != node.end_lineno
                or (isinstance(parent, ast.keyword) and parent.arg in COSMETIC_KEYWORDS)):
            return
        value = node.value
        line, col, end = node.lineno, node.col_offset, node.end_col_offset
        ctx = self._context(node)
        if isinstance(value, bool):
            self._add(node, line, col, end, str(not value), "bool", ctx)
        elif isinstance(value, int):
            news = {0: [1], 1: [0, 2]}.get(value, [value + 1])
            for new in news:
                self._add(node, line, col, end, repr(new), "number", ctx)
        elif isinstance(value, float):
            if value == 0.0:
                news = [0.1]
            elif value == 1.0:
                news = [0.0, 2.0]
            else:
                news = [value * 2, value / 2]
            for new in news:
                self._add(node, line, col, end, repr(new), "number", ctx)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        self.generic_visit(node)
        if self._skipped(node) or type(node.op) not in BINOP_SWAPS or self._stringy(node):
            return
        tok = self._op_token(node.left, node.right, OP_TEXT[type(node.op)])
        if tok is None:
            return
        for new in BINOP_SWAPS[type(node.op)]:
            self._add(node, tok.start[0], tok.start[1], tok.end[1], OP_TEXT[new], "binop",
                      self._context(node, 1))

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.generic_visit(node)
        if self._skipped(node) or type(node.op) not in BINOP_SWAPS:
            return
        tok = self._op_token(node.target, node.value, OP_TEXT[type(node.op)] + "=")
        if tok is None:
            return
        for new in BINOP_SWAPS[type(node.op)]:
            self._add(node, tok.start[0], tok.start[1], tok.end[1], OP_TEXT[new] + "=",
                      "binop")

    def _stringy(self, node: ast.AST) -> bool:
        """True for str concatenation and Path joins (``dir / "x.png"``): not arithmetic."""
        if isinstance(node, ast.JoinedStr):
            return True
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str | bytes)
        if isinstance(node, ast.BinOp):
            return self._stringy(node.left) or self._stringy(node.right)
        return False

    def visit_Compare(self, node: ast.Compare) -> None:
        self.generic_visit(node)
        if self._skipped(node):
            return
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            if type(op) in CMPOP_SWAPS:
                tok = self._op_token(left, right, OP_TEXT[type(op)])
                if tok is not None:
                    for new in CMPOP_SWAPS[type(op)]:
                        self._add(node, tok.start[0], tok.start[1], tok.end[1], OP_TEXT[new],
                                  "compare", self._context(node, 1))
            left = right

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        self.generic_visit(node)
        if self._skipped(node) or not isinstance(node.op, ast.USub):
            return
        if node.lineno == node.operand.lineno:
            self._add(node, node.lineno, node.col_offset, node.operand.col_offset, "",
                      "unary-minus", self._context(node))

    def visit_keyword(self, node: ast.keyword) -> None:
        self.generic_visit(node)
        value = node.value
        if (self._skipped(node) or node.arg not in KEYWORD_STRINGS
                or not isinstance(value, ast.Constant) or not isinstance(value.value, str)):
            return
        new = KEYWORD_STRINGS[node.arg].get(value.value)
        if new is not None and value.lineno == value.end_lineno:
            quote = self.lines[value.lineno - 1][value.col_offset]  # keep the quote style
            self._add(value, value.lineno, value.col_offset, value.end_col_offset,
                      quote + new + quote, "keyword", node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        if self._skipped(node) or node.attr not in RESAMPLE_SWAPS:
            return
        if node.end_lineno is not None and node.end_col_offset is not None:
            start = node.end_col_offset - len(node.attr)
            self._add(node, node.end_lineno, start, node.end_col_offset,
                      RESAMPLE_SWAPS[node.attr], "resample", self._context(node))

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        if self._skipped(node):
            return
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        args = node.args
        # Swap the first two positional arguments (both on one line, text differs).
        if (len(args) >= 2 and name not in NO_SWAP_CALLS
                and not any(isinstance(a, ast.Starred) for a in args[:2])):
            first, second = args[0], args[1]
            a, b = self._segment(first), self._segment(second)
            # A string literal swapped with an object is a guaranteed crash, not a test.
            literal = any(isinstance(x, ast.Constant) and isinstance(x.value, str)
                          for x in (first, second))
            if (a is not None and b is not None and a != b and not literal
                    and first.lineno == second.lineno):
                text = self.lines[first.lineno - 1]
                middle = text[first.end_col_offset : second.col_offset]
                self._add(node, first.lineno, first.col_offset, second.end_col_offset,
                          b + middle + a, "swap-args")
        # Delete a method call from a chain: x.flip(-1) -> x.
        if (isinstance(func, ast.Attribute) and func.attr in DELETABLE_METHODS
                and not (isinstance(func.value, ast.Name) and func.value.id in self.imported)
                and func.value.end_lineno == node.end_lineno):
            self._add(node, node.end_lineno, func.value.end_col_offset, node.end_col_offset,
                      "", "drop-call", self._context(node, 1))

    def visit_Slice(self, node: ast.Slice) -> None:
        self.generic_visit(node)
        if self._skipped(node) or node.lower is not None:
            return
        if node.upper is None and node.step is None:
            return  # a bare ':' (whole axis)
        # [::4] -> [1::4], [:n] -> [1:n]: the start is off by one.
        if node.lineno == node.end_lineno:
            self._add(node, node.lineno, node.col_offset, node.col_offset, "1", "slice-start",
                      self._context(node))


def generate_for_file(repo: Path, path: Path) -> list[Mutant]:
    """All mutants of one Python file, in a deterministic order."""
    rel = path.relative_to(repo).as_posix()
    source = path.read_text(encoding="utf-8")
    generator = _Generator(rel, source)
    generator.visit(generator.tree)
    # Every mutant must parse, and change exactly one line: anything else is a generator bug.
    unique: dict[str, Mutant] = {}
    for mutant in generator.mutants:
        mutated = mutant.apply(source)
        try:
            ast.parse(mutated)
        except SyntaxError:
            continue
        unique.setdefault(mutant.id, mutant)
    mutants = sorted(unique.values(), key=lambda m: (m.line, m.col, m.operator, m.replacement))
    # Two changes that read the same (``pad + dy`` twice on a line): name the column.
    seen = Counter(m.describe() for m in mutants)
    return [replace(m, mutated=f"{m.mutated}  (col {m.col + 1})") if seen[m.describe()] > 1
            else m for m in mutants]


def target_files(repo: Path, targets: Sequence[str]) -> list[Path]:
    """The ``.py`` files under the targets (files or folders), sorted."""
    files: set[Path] = set()
    for target in targets:
        path = repo / target
        if path.is_file() and path.suffix == ".py":
            files.add(path)
        elif path.is_dir():
            files.update(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        else:
            raise SystemExit(f"mutate.py: target {target!r} not found in {repo}")
    return sorted(files)


def matches(rel: str, patterns: Sequence[str]) -> bool:
    """``--only``: shell-style patterns on the relative path; a plain word is a substring."""
    if not patterns:
        return True
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            if fnmatch.fnmatch(rel, pattern):
                return True
        elif pattern in rel:
            return True
    return False


def generate(repo: Path, targets: Sequence[str], only: Sequence[str] = ()) -> list[Mutant]:
    """All mutants of the target files that match ``only``."""
    mutants: list[Mutant] = []
    for path in target_files(repo, targets):
        rel = path.relative_to(repo).as_posix()
        if matches(rel, only):
            mutants.extend(generate_for_file(repo, path))
    return mutants


# --- test selection by coverage ---------------------------------------------------------------

# A pytest plugin written next to the copy. With MUTATE_TRACE it records, for every line of the
# target files, which test executed it (``test:<nodeid>``; ``file:<module>`` for fixture
# setup/teardown, which a module's other tests may share; ``*`` for import time and anything
# outside a test, which every test may depend on). With MUTATE_SELECT it runs only the listed
# tests, skipping the import of the other test modules.
PLUGIN_SOURCE = '''\
"""pytest plugin of tools/mutate.py (per-test line coverage; test selection)."""
import json
import os
import sys
import threading

import pytest

_TRACE = os.environ.get("MUTATE_TRACE")
_SELECT = os.environ.get("MUTATE_SELECT")
_CO_NEWLOCALS = 0x2

if _TRACE:
    _roots = tuple(json.loads(os.environ["MUTATE_TRACE_ROOTS"]))
    _hits = {}
    _wanted = {}
    _state = {"key": "*", "sink": None}
    _durations = {}

    def _local(frame, event, arg):
        if event == "line":
            code = frame.f_code
            # Module and class bodies run once, when first imported: every test depends on them.
            key = _state["key"] if code.co_flags & _CO_NEWLOCALS else "*"
            seen = _hits.setdefault((code.co_filename, frame.f_lineno), set())
            if key not in seen:
                seen.add(key)
                if _state["sink"] is not None:  # forked child: its memory dies with it
                    _state["sink"].write(json.dumps([code.co_filename, frame.f_lineno, key]))
                    _state["sink"].write("\\n")
                    _state["sink"].flush()
        return _local

    def _global(frame, event, arg):
        filename = frame.f_code.co_filename
        wanted = _wanted.get(filename)
        if wanted is None:
            wanted = _wanted[filename] = filename.startswith(_roots)
        return _local if wanted else None

    def _after_fork():
        _state["sink"] = open(f"{_TRACE}.{os.getpid()}", "a")

    os.register_at_fork(after_in_child=_after_fork)
    sys.settrace(_global)
    threading.settrace(_global)

    def _phase(key):
        def wrapper(item):
            _state["key"] = key(item)
            try:
                return (yield)
            finally:
                _state["key"] = "*"
        return pytest.hookimpl(wrapper=True)(wrapper)

    def _module(item):
        # functools caches of the target modules would hide their lines from every test but
        # the first caller: start each test with empty caches.
        for module in list(sys.modules.values()):
            if str(getattr(module, "__file__", "")).startswith(_roots):
                for value in list(vars(module).values()):
                    if callable(getattr(value, "cache_clear", None)):
                        value.cache_clear()
        return "file:" + item.nodeid.split("::")[0]

    pytest_runtest_setup = _phase(_module)
    pytest_runtest_call = _phase(lambda item: "test:" + item.nodeid)
    pytest_runtest_teardown = _phase(_module)

    def pytest_runtest_logreport(report):
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(session, exitstatus):
        sys.settrace(None)
        threading.settrace(None)
        hits = [[f, line, sorted(keys)] for (f, line), keys in _hits.items()]
        with open(_TRACE, "w") as out:
            json.dump({"hits": hits, "durations": _durations, "exit": int(exitstatus)}, out)

if _SELECT:
    with open(_SELECT) as _file:
        _selection = json.load(_file)
    _files = set(_selection["files"])
    _nodes = set(_selection["nodes"])
    _order = {name: i for i, name in enumerate(_selection["order"])}
    _modules = _files | {node.split("::")[0] for node in _nodes}

    def pytest_ignore_collect(collection_path, config):
        if collection_path.suffix != ".py" or collection_path.name in ("conftest.py",
                                                                       "__init__.py"):
            return None
        try:
            rel = collection_path.relative_to(config.rootpath).as_posix()
        except ValueError:
            return None
        return True if rel not in _modules else None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(session, config, items):
        keep, drop = [], []
        for item in items:
            selected = item.nodeid.split("::")[0] in _files or item.nodeid in _nodes
            (keep if selected else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        # Quick modules first, so that -x stops early; a module's tests keep their order.
        keep.sort(key=lambda item: _order.get(item.nodeid.split("::")[0], len(_order)))
        items[:] = keep
'''
PLUGIN_NAME = "_mutate_plugin"
PACKAGE = "amnseg"
ALL = "*"


@dataclass
class Coverage:
    """Which tests execute each line of the target files (from one traced suite run)."""

    hits: dict[tuple[str, int], set[str]]  # (relative file, line) -> keys, see PLUGIN_SOURCE
    durations: dict[str, float]  # test node id -> seconds

    def module_seconds(self) -> dict[str, float]:
        seconds: dict[str, float] = {}
        for node, duration in self.durations.items():
            module = node.split("::")[0]
            seconds[module] = seconds.get(module, 0.0) + duration
        return seconds


@dataclass(frozen=True)
class Layout:
    """Per file: the lines of the statement around each line, memoized functions, the names
    that each module-level assignment binds (by line), and the body lines of the function
    whose header (signature, defaults) holds a line."""

    statement: dict[int, tuple[int, int]]
    memoized: frozenset[int]
    constants: dict[int, tuple[str, ...]] = field(default_factory=dict)
    bodies: dict[int, tuple[int, int]] = field(default_factory=dict)


def bound_names(node: ast.stmt) -> tuple[str, ...]:
    """The plain names a module-level ``NAME = ...`` (or ``A, B = ...``) binds."""
    targets = (node.targets if isinstance(node, ast.Assign)
               else [node.target] if isinstance(node, ast.AnnAssign) else [])
    names: list[str] = []
    for target in targets:
        elements = target.elts if isinstance(target, ast.Tuple) else [target]
        names += [e.id for e in elements if isinstance(e, ast.Name)]
    return tuple(name for name in names if not name.startswith("__"))


def name_references(root: Path, folders: Sequence[str]) -> dict[str, set[tuple[str, int]]]:
    """name -> the (file relative to ``root``, line) where a name or attribute of that name is
    read, in every .py file under ``folders``."""
    references: dict[str, set[tuple[str, int]]] = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                    references.setdefault(node.id, set()).add((rel, node.lineno))
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    references.setdefault(node.attr, set()).add((rel, node.lineno))
    return references


def file_layout(source: str) -> Layout:
    """Statement spans (a compound statement: its header only), and the lines of memoized
    functions whose caches the tracing plugin cannot clear (methods, nested functions): their
    body runs in the first calling test only, so coverage cannot tell who depends on it."""
    tree = ast.parse(source)
    statement: dict[int, tuple[int, int]] = {}
    memoized: set[int] = set()
    bodies: dict[int, tuple[int, int]] = {}
    spans = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt):
            continue
        end = node.end_lineno or node.lineno
        body = getattr(node, "body", None)
        if isinstance(body, list) and body:
            end = max(node.lineno, body[0].lineno - 1)
        spans.append((end - node.lineno, node.lineno, end))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for line in range(node.lineno, end + 1):
                bodies[line] = (node.body[0].lineno, node.end_lineno or node.lineno)
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                if name == "cached_property" or (name in ("cache", "lru_cache")
                                                 and id(node) not in top_level):
                    memoized.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    for _, start, end in sorted(spans, reverse=True):  # innermost statements win
        for line in range(start, end + 1):
            statement[line] = (start, end)
    constants = {}
    for node in tree.body:
        names = bound_names(node)
        if names:
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                constants[line] = names
    return Layout(statement, frozenset(memoized), constants, bodies)


def select_tests(mutant: Mutant, layout: Layout, coverage: Coverage,
                 references: dict[str, set[tuple[str, int]]] | None = None
                 ) -> dict | str | None:
    """The tests that can see ``mutant``: ``ALL``, None (no test executes its statement), or
    a selection {"files": [...], "nodes": [...], "order": [...]} for the plugin.

    A module-level assignment runs at import, for every test; with ``references`` (see
    :func:`name_references`, over the package and the tests) its mutants run only the tests
    that execute a line reading one of the names it binds, and the test files that read them
    (every test when such a line runs at import too, e.g. a constant made from another).
    Likewise a function's header runs at import, but its defaults act only when its body runs:
    its mutants run the tests that execute the body."""
    if mutant.line in layout.memoized:
        return ALL
    start, end = layout.statement.get(mutant.line, (mutant.line, mutant.line))
    keys: set[str] = set()
    for line in range(start, end + 1):
        keys |= coverage.hits.get((mutant.file, line), set())
    if ALL in keys and references is not None and mutant.line in layout.constants:
        keys = set()
        for name in layout.constants[mutant.line]:
            for file, line in references.get(name, ()):
                if file.startswith("tests/"):
                    keys.add("file:" + file)
                elif not (start <= line <= end and file == mutant.file):
                    keys |= coverage.hits.get((file, line), set())
    if ALL in keys and mutant.line in layout.bodies:
        body_start, body_end = layout.bodies[mutant.line]
        keys = set()
        for line in range(body_start, body_end + 1):
            keys |= coverage.hits.get((mutant.file, line), set())
    if not keys:
        return None
    if ALL in keys:
        return ALL
    files = sorted(k[len("file:"):] for k in keys if k.startswith("file:"))
    nodes = sorted(k[len("test:"):] for k in keys
                   if k.startswith("test:") and k[len("test:"):].split("::")[0] not in files)
    seconds = coverage.module_seconds()
    modules = {*files, *(node.split("::")[0] for node in nodes)}
    order = sorted(modules, key=lambda m: (seconds.get(m, 0.0), m))
    return {"files": files, "nodes": nodes, "order": order}


def describe_selection(selection: dict | str | None) -> str:
    if selection is None:
        return "none"
    if selection == ALL:
        return "all"
    return f"{len(selection['files'])} files + {len(selection['nodes'])} tests"


# --- running ----------------------------------------------------------------------------------


def default_test_args(repo: Path) -> list[str]:
    """The default pytest arguments: the fast suite (slow end-to-end files ignored)."""
    args = shlex.split(DEFAULT_PYTEST_ARGS)
    for pattern in DEFAULT_EXCLUDED_TESTS:
        for path in sorted(repo.glob(pattern)):
            args.append(f"--ignore={path.relative_to(repo).as_posix()}")
    return args


def copy_repo(repo: Path, workdir: Path, shared: Path | None) -> Path:
    """Copy the repository into ``workdir/<name>``; link ``shared`` beside it, because tests
    find the reference files at ``<repo>/../shared``."""
    copy = workdir / repo.name
    patterns = shutil.ignore_patterns(*COPY_IGNORE)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(patterns(folder, names))
        if Path(folder).resolve() == repo.resolve():
            skipped |= {name for name in names if name in TOP_LEVEL_IGNORE}
        return skipped

    shutil.copytree(repo, copy, ignore=ignore, symlinks=True)
    if shared is not None and shared.is_dir():
        (workdir / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    plugin_dir = workdir / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / f"{PLUGIN_NAME}.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    return copy


class Runner:
    """Runs pytest in the copy; one process at a time, killed as a group on timeout."""

    def __init__(self, copy: Path, test_args: Sequence[str], timeout: float):
        self.copy = copy
        self.timeout = timeout
        work = copy.parent
        self.command = [sys.executable, "-m", "pytest", "-p", PLUGIN_NAME, *test_args,
                        f"--basetemp={work / 'pytest-tmp'}"]
        self.selection_file = work / "selection.json"
        self.env = dict(os.environ)
        for name in ("MUTATE_TRACE", "MUTATE_TRACE_ROOTS", "MUTATE_SELECT"):
            self.env.pop(name, None)
        # The copy goes first on sys.path so it wins over the editable install of the original;
        # no bytecode is written, so a mutant never meets a stale .pyc with the same mtime/size.
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(copy), str(work / "plugin"), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"

    def run(self, selection: dict | None = None, extra_env: dict[str, str] | None = None,
            timeout: float | None = None) -> tuple[int | None, float, str]:
        """Run the tests (only ``selection`` if given): (returncode or None on timeout,
        seconds, output tail)."""
        env = dict(self.env, **(extra_env or {}))
        if selection is not None:
            self.selection_file.write_text(json.dumps(selection), encoding="utf-8")
            env["MUTATE_SELECT"] = str(self.selection_file)
        start = time.monotonic()
        with tempfile.TemporaryFile() as out:
            # A new session, so the whole group (pool workers included) dies on timeout.
            proc = subprocess.Popen(self.command, cwd=self.copy, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code: int | None = proc.wait(timeout=timeout or self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
            out.seek(0)
            tail = out.read()[-3000:].decode("utf-8", "replace")
        return code, time.monotonic() - start, tail

    def imported_from(self) -> str:
        """Where ``import amnseg`` resolves in the copy's environment."""
        code = "import amnseg, sys; sys.stdout.write(amnseg.__file__)"
        result = subprocess.run([sys.executable, "-c", code], cwd=self.copy, env=self.env,
                                capture_output=True, text=True, timeout=120)
        return result.stdout.strip()

    def coverage(self, targets: Sequence[str]) -> tuple[Coverage, float]:
        """Run the whole suite once under the tracing plugin."""
        trace = self.copy.parent / "trace.json"
        # The whole package: module-level constants of the targets are read elsewhere too.
        roots = [str(self.copy / t) + (os.sep if (self.copy / t).is_dir() else "")
                 for t in (PACKAGE, *targets)]
        env = {"MUTATE_TRACE": str(trace), "MUTATE_TRACE_ROOTS": json.dumps(roots)}
        # Tracing slows the suite down: give it more time than one mutant.
        code, seconds, tail = self.run(extra_env=env, timeout=max(self.timeout, 60.0) * 10)
        if code != 0 or not trace.is_file():
            raise SystemExit(f"mutate.py: the unmutated test suite fails under coverage "
                             f"(exit {code}):\n{tail}")
        data = json.loads(trace.read_text(encoding="utf-8"))
        rows = [tuple(row) for row in data["hits"]]
        for child in sorted(trace.parent.glob(trace.name + ".*")):  # forked workers
            for text in child.read_text(encoding="utf-8").splitlines():
                filename, line, key = json.loads(text)
                rows.append((filename, line, [key]))
        hits: dict[tuple[str, int], set[str]] = {}
        for filename, line, keys in rows:
            try:
                rel = Path(filename).relative_to(self.copy).as_posix()
            except ValueError:
                continue
            hits.setdefault((rel, int(line)), set()).update(keys)
        return Coverage(hits, data["durations"]), seconds


def sanity_checks(runner: Runner, package_init: Path, first_target: Path) -> None:
    """The copy's package is the one imported, and a broken target file fails the tests."""
    where = runner.imported_from()
    if not where or Path(where).resolve() != package_init.resolve():
        raise SystemExit(f"mutate.py: `import amnseg` in the copy gives {where!r}, "
                         f"expected {package_init}")
    print(f"import check: amnseg imported from {where}", flush=True)
    original = first_target.read_text(encoding="utf-8")
    try:
        first_target.write_text("raise RuntimeError('mutate.py canary')\n" + original,
                                encoding="utf-8")
        code, _, tail = runner.run()
    finally:
        first_target.write_text(original, encoding="utf-8")
    if code == 0:
        raise SystemExit("mutate.py: a deliberately broken file did not fail the tests: the "
                         f"copy is not what the tests import (or no test imports it):\n{tail}")
    print(f"canary: a broken {first_target.name} fails the tests (exit {code})", flush=True)


def run_mutants(mutants: Sequence[Mutant], copy: Path, runner: Runner,
                coverage: Coverage | None, done: dict[str, Result],
                save: Callable[[list[Result]], None]) -> list[Result]:
    """Test every mutant (reusing ``done`` results of identical mutants); ``save`` gets the
    results so far after each one."""
    results: list[Result] = []
    sources: dict[str, str] = {}
    layouts: dict[str, Layout] = {}
    references: dict[str, set[tuple[str, int]]] | None = None
    started = time.monotonic()
    ran = 0
    for index, mutant in enumerate(mutants, 1):
        path = copy / mutant.file
        source = sources.setdefault(mutant.file, path.read_text(encoding="utf-8"))
        layout = layouts.setdefault(mutant.file, file_layout(source))
        if references is None:
            references = name_references(copy, (PACKAGE, "tests"))
        original_line = source.splitlines()[mutant.line - 1]
        mutated_source = mutant.apply(source)
        mutated_line = mutated_source.splitlines()[mutant.line - 1]
        previous = done.get(mutant.id)
        if previous is not None and (previous.original_line, previous.mutated_line) == (
                original_line, mutated_line):
            results.append(previous)
            continue
        selection = (select_tests(mutant, layout, coverage, references) if coverage is not None
                     else ALL)
        fields = (mutant.id, mutant.file, mutant.line, mutant.operator, mutant.original,
                  mutant.mutated, original_line, mutated_line)
        if selection is None:
            # No test executes this statement: the mutant cannot be killed; nothing to run.
            results.append(Result(*fields, "survived", None, 0.0, "",
                                  {"tests": "none", "covered": False}))
            print(f"[{index}/{len(mutants)}] survived  (no test runs this line)  "
                  f"{mutant.describe()}", flush=True)
            save(results)
            continue
        path.write_text(mutated_source, encoding="utf-8")
        try:
            code, seconds, tail = runner.run(None if selection == ALL else selection)
            if code == 5 and selection != ALL:  # the selection matched nothing: run all
                selection = ALL
                code, seconds, tail = runner.run()
        finally:
            path.write_text(source, encoding="utf-8")
        ran += 1
        status = "timeout" if code is None else "survived" if code == 0 else "killed"
        results.append(Result(*fields, status, code, round(seconds, 2),
                              tail[-1500:] if status == "survived" else tail[-600:],
                              {"tests": describe_selection(selection), "covered": True}))
        elapsed = time.monotonic() - started
        eta = elapsed / ran * (len(mutants) - index)
        print(f"[{index}/{len(mutants)}] {status:8s} {seconds:5.1f}s "
              f"({describe_selection(selection)})  {mutant.describe()}  (eta {eta / 60:.0f} min)",
              flush=True)
        save(results)
    return results


# --- reporting --------------------------------------------------------------------------------


def summarize(results: Sequence[Result]) -> dict:
    """Counts and score; timeouts count as killed."""
    killed = sum(r.status in ("killed", "timeout") for r in results)
    survived = sum(r.status == "survived" for r in results)
    total = killed + survived
    return {
        "total": total,
        "killed": killed,
        "survived": survived,
        "timeouts": sum(r.status == "timeout" for r in results),
        "not_covered": sum(not r.extra.get("covered", True) for r in results),
        "score_percent": round(100.0 * killed / total, 1) if total else None,
    }


def write_report(out: Path, meta: dict, results: Sequence[Result]) -> None:
    payload = {**meta, "summary": summarize(results), "mutants": [asdict(r) for r in results]}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)  # a reader never sees half a file


def load_previous(out: Path) -> dict[str, Result]:
    """Results of an earlier run of the same output file (``--resume``)."""
    if not out.is_file():
        return {}
    data = json.loads(out.read_text(encoding="utf-8"))
    return {m["id"]: Result(**m) for m in data.get("mutants", [])}


def print_summary(results: Sequence[Result], wall: float) -> None:
    summary = summarize(results)
    print()
    print(f"mutants: {summary['total']}  killed: {summary['killed']} "
          f"(timeouts: {summary['timeouts']})  survived: {summary['survived']} "
          f"(not covered by any test: {summary['not_covered']})  "
          f"score: {summary['score_percent']}%  wall: {wall / 60:.1f} min")
    survivors = [r for r in results if r.status == "survived"]
    current = None
    for r in survivors:
        if r.file != current:
            current = r.file
            print(f"survivors in {r.file}:")
        note = "" if r.extra.get("covered", True) else "  [not covered]"
        print(f"  {r.file}:{r.line}: {r.original} -> {r.mutated}{note}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="repository to mutate (default: the one holding this script)")
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                        help="files/folders (relative to the repo) to mutate")
    parser.add_argument("--tests", default=None,
                        help=f"pytest arguments (default: {DEFAULT_PYTEST_ARGS!r} plus --ignore "
                             f"of the slow files {', '.join(DEFAULT_EXCLUDED_TESTS)})")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant")
    parser.add_argument("--out", type=Path, default=Path("mutation.json"), help="JSON report")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N mutants")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="mutate only matching files (glob on the relative path, or a "
                             "substring); repeatable")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-select", action="store_true",
                        help="run the whole test selection for every mutant (slow) instead of "
                             "only the tests that execute the mutated statement")
    parser.add_argument("--shared", type=Path, default=None,
                        help="folder linked as <copy>/../shared, where tests look for reference "
                             "files (default: <repo>/../shared)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse results of identical mutants from an existing --out file")
    parser.add_argument("--no-checks", action="store_true",
                        help="skip the import and canary checks")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    repo = args.repo.resolve()
    mutants = generate(repo, args.targets, args.only)
    if args.limit is not None:
        mutants = mutants[: args.limit]
    if args.list:
        for mutant in mutants:
            print(mutant.describe())
        print(f"{len(mutants)} mutants", file=sys.stderr)
        return 0
    if not mutants:
        print("mutate.py: no mutants (check --targets/--only)", file=sys.stderr)
        return 1
    test_args = shlex.split(args.tests) if args.tests is not None else default_test_args(repo)
    shared = args.shared if args.shared is not None else repo.parent / "shared"
    out = args.out.resolve()
    wall_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="amnseg-mutate-") as tmp:
        copy = copy_repo(repo, Path(tmp), shared)
        runner = Runner(copy, test_args, args.timeout)
        linked = (Path(tmp) / "shared").is_dir()
        print(f"{len(mutants)} mutants; copy: {copy} (shared/ linked: {linked})\n"
              f"tests: {shlex.join(runner.command[1:])}", flush=True)
        if not args.no_checks:
            sanity_checks(runner, copy / "amnseg" / "__init__.py", copy / mutants[0].file)
        coverage = None
        if args.no_select:
            code, baseline, tail = runner.run()
            if code != 0:
                raise SystemExit(f"mutate.py: the unmutated suite fails (exit {code}):\n{tail}")
        else:
            coverage, baseline = runner.coverage(args.targets)
        print(f"baseline: the unmutated suite passes ({baseline:.1f}s"
              f"{'' if args.no_select else ', traced'})", flush=True)
        meta = {
            "repo": str(repo),
            "targets": args.targets,
            "only": args.only,
            "tests": test_args,
            "shared_linked": linked,
            "select_by_coverage": not args.no_select,
            "timeout_s": args.timeout,
            "baseline_suite_s": round(baseline, 2),
        }
        done = load_previous(out) if args.resume else {}

        def save(results: list[Result]) -> None:
            write_report(out, {**meta, "wall_s": round(time.monotonic() - wall_start, 1)},
                         results)

        results = run_mutants(mutants, copy, runner, coverage, done, save)
        save(results)
    print_summary(results, time.monotonic() - wall_start)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
