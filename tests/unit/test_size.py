"""Size rules of docs/LAYOUT.md: no hand-written module over 400 lines, no function over 60,
and every module opens with a docstring that says what it is for."""

from __future__ import annotations

import ast
from pathlib import Path

from test_layout import ROOT, modules

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def hand_written() -> list[Path]:
    """The package modules plus the scripts beside them (benchmarks, chart and proto tools)."""
    scripts = [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("deploy/helm/*.py"), ROOT / "protos" / "generate.py"]
    return sorted({*modules().values(), *scripts})


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in hand_written():
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def test_every_module_opens_with_a_docstring() -> None:
    missing = [
        str(path.relative_to(ROOT))
        for path in hand_written()
        if path.stat().st_size and ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert missing == []
