"""The dependency rules of docs/LAYOUT.md, from one table.

Every hand-written module of the distribution is read (its import statements, at any depth) and
held to the rule of the most specific package that contains it: which project packages it may
import, and for the pure packages, which third-party modules. The pure packages are also
imported in a fresh interpreter where the service-side dependencies cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = "protos"  # the generated code: puremesh.<svc>.v1
ANY = "*"


@dataclass(frozen=True)
class Rule:
    may_import: tuple[str, ...]  # project packages (dotted, under puremesh), PROTOS, or ANY
    pure: bool = False  # third-party imports limited to PURE_THIRD_PARTY (+ extra)
    extra: tuple[str, ...] = ()


PURE_THIRD_PARTY = ("torch", "numpy")
# package -> rule; a module follows the most specific package that contains it.
RULES: dict[str, Rule] = {
    "contract": Rule((), pure=True, extra=("isal",)),  # isal: the fast CRC-32 (zlib's otherwise)
    "trainer.algo": Rule(("contract",), pure=True),
    "services.verify.grading": Rule(("contract",), pure=True, extra=("math_verify", "sympy")),
    "rpc": Rule(("contract", PROTOS)),
    "weightsync": Rule(("contract", "rpc", PROTOS)),
    "services": Rule(("contract", "rpc", "weightsync", PROTOS)),
    "trainer": Rule(("contract", "rpc", "weightsync", PROTOS)),
    "supervised": Rule(("contract",)),
    "tinyworld": Rule(("contract", "supervised", "trainer", "services")),
    "cli": Rule((ANY,)),
}
# Imported by none of the pure packages, directly or not.
SERVICE_SIDE = ("grpc", "ray", "vllm", "prometheus_client", "transformers", "pydantic", "yaml")


def package_roots() -> dict[str, Path]:
    """setup.py's ROOTS: puremesh.<package> -> folder (the generated protos are skipped)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ROOTS":
            roots = ast.literal_eval(node.value)
            return {
                name.removeprefix("puremesh."): ROOT / folder
                for name, folder in roots.items()
                if name != "puremesh"
            }
    raise AssertionError("setup.py has no ROOTS")


def modules() -> dict[str, Path]:
    """Dotted name under puremesh -> file, for every hand-written module."""
    found = {}
    for package, folder in package_roots().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def rule_of(module: str) -> tuple[str, Rule]:
    matches = [p for p in RULES if module == p or module.startswith(p + ".")]
    assert matches, f"{module} is in no package of the table: add it to RULES and docs/LAYOUT.md"
    package = max(matches, key=len)
    return package, RULES[package]


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(["puremesh", *base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


PROTO_PACKAGES = {p.name for p in (ROOT / "protos" / "puremesh").iterdir() if (p / "v1").is_dir()}


def project_package(name: str) -> str | None:
    """The project package an absolute import names (PROTOS for generated code), None if third party."""
    parts = name.split(".")
    if parts[0] != "puremesh" or len(parts) == 1:
        return None if parts[0] != "puremesh" else ""
    if parts[1] in PROTO_PACKAGES:
        return PROTOS
    return ".".join(parts[1:])


def allowed(target: str, own: str, rule: Rule) -> bool:
    """May `own` (following `rule`) import project package `target` ("" = puremesh itself)?"""
    if target and (target == own or target.startswith(own + ".")):
        return True
    return any(
        entry == ANY or (target and (target == entry or target.startswith(entry + ".")))
        for entry in rule.may_import
    )


def violations() -> list[str]:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    out = []
    for module, path in sorted(modules().items()):
        own, rule = rule_of(module)
        for line, name in imports_of(module, path):
            where = f"{path.relative_to(ROOT)}:{line}"
            target = project_package(name)
            if target is None:
                top = name.split(".")[0]
                if rule.pure and top not in stdlib and top not in (*PURE_THIRD_PARTY, *rule.extra):
                    out.append(f"{where}: pure package {own} imports {name}")
            elif not allowed(target, own, rule):
                out.append(f"{where}: {own} may not import puremesh.{target or ''}")
    return out


def test_every_module_follows_its_package_rule() -> None:
    assert len(modules()) > 50  # the walk really saw the tree
    assert violations() == []


def nested_project_imports(module: str, path: Path) -> list[str]:
    """Project imports that are not at the top level of the module (nor under `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    top |= {
        id(inner)
        for node in tree.body
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in node.body
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            relative = isinstance(node, ast.ImportFrom) and node.level > 0
            if relative or any(name.split(".")[0] == "puremesh" for name in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_project_imports_are_at_the_top_of_each_module() -> None:
    """Only heavy third-party modules (vllm, ray) are imported where they are used."""
    nested = [
        line for module, path in sorted(modules().items()) for line in nested_project_imports(module, path)
    ]
    assert nested == []


def test_the_table_covers_every_package() -> None:
    for package in package_roots():
        assert package in RULES, f"puremesh.{package} has no rule"


@pytest.mark.parametrize("package", [p for p, r in RULES.items() if r.pure])
def test_pure_packages_import_without_service_dependencies(package: str) -> None:
    probe = textwrap.dedent(
        f"""
        import importlib, importlib.abc, pkgutil, sys
        BLOCKED = {set(SERVICE_SIDE)!r}
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked by the layout test: {{name}}")
        sys.meta_path.insert(0, Blocker())
        root = importlib.import_module("puremesh.{package}")
        names = [root.__name__]
        if hasattr(root, "__path__"):
            names += [i.name for i in pkgutil.walk_packages(root.__path__, root.__name__ + ".")]
        for name in names:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print(len(names))
        """
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 1


def test_test_modules_have_unique_basenames():
    """pytest imports test modules by basename (rootdir, no packages): two files of one name in
    different folders stop the whole collection on a clean checkout ("import file mismatch")."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen.setdefault(path.name, path)
    assert not clashes, "test modules share a basename: " + "; ".join(clashes)
