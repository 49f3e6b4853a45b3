"""Rule of the house 1: trainer/algo is a pure core (stdlib, numpy, torch only).

Checked twice: dynamically, by importing every module of the package in a fresh interpreter
where grpc, ray, vllm, prometheus_client, transformers, pydantic and yaml cannot be imported;
and statically, by reading every import statement of every file under trainer/algo.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ALGO = Path(__file__).resolve().parents[2] / "trainer" / "algo"
BLOCKED = ("grpc", "ray", "vllm", "prometheus_client", "transformers", "pydantic", "yaml")
ALLOWED_THIRD_PARTY = {"torch", "numpy"}

PROBE = textwrap.dedent(
    """
    import importlib
    import importlib.abc
    import pkgutil
    import sys

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked by the import-boundary test: {{name}}")
            return None

    for loaded in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[loaded]
    sys.meta_path.insert(0, Blocker())

    import puremesh.trainer.algo as algo

    names = [info.name for info in pkgutil.walk_packages(algo.__path__, algo.__name__ + ".")]
    for name in names:
        importlib.import_module(name)

    import torch

    ends = torch.tensor([[False, True, True], [True, False, True]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = algo.pure_advantages(
        torch.tensor([[0.5, -0.5], [0.2, 0.1]]), ends, mask, torch.tensor([0, 0]),
        solved=torch.tensor([True, False]), has_ground_truth=torch.tensor([True, True]),
        kl=torch.zeros(2, 3),
    )
    assert torch.isfinite(out.normalized).all()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("modules:", ",".join(names))
    """
).format(blocked=set(BLOCKED))


def test_algo_imports_with_service_dependencies_blocked() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    modules = result.stdout.strip().removeprefix("modules: ").split(",")
    # walk_packages really visited the package's modules
    expected = {f"puremesh.trainer.algo.{path.stem}" for path in ALGO.glob("*.py") if path.stem != "__init__"}
    assert expected <= set(modules)


def imported_modules(path: Path) -> list[tuple[int, str | None, int]]:
    """(line, top-level module or None for relative imports, level) of every import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            top = node.module.split(".")[0] if node.module and node.level == 0 else None
            found.append((node.lineno, top, node.level))
    return found


def test_algo_files_import_only_stdlib_torch_numpy_and_relative() -> None:
    allowed = set(sys.stdlib_module_names) | ALLOWED_THIRD_PARTY | {"__future__"}
    files = sorted(ALGO.rglob("*.py"))
    assert files
    offending = [
        f"{path.relative_to(ALGO)}:{line}: {top}"
        for path in files
        for line, top, level in imported_modules(path)
        if level == 0 and top not in allowed
    ]
    assert not offending, offending
