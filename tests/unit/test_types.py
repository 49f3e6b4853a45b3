"""mypy over the pure core, the contract modules and the RPC layer (docs/LAYOUT.md), passing.

The folders map onto one `puremesh` package only through setup.py's ROOTS, which mypy cannot
follow (the editable install is an import hook), so the check runs over a tree of symbolic
links laid out like the installed package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_layout import ROOT, package_roots

CHECKED = ("trainer.algo", "contract", "rpc")


def link_tree(into: Path) -> Path:
    package = into / "puremesh"
    package.mkdir(parents=True)
    protos = ROOT / "protos" / "puremesh"
    for entry in protos.iterdir():
        (package / entry.name).symlink_to(entry)
    for name, folder in package_roots().items():
        (package / name).symlink_to(folder)
    return into


def test_mypy_passes_on_the_typed_packages(tmp_path: Path) -> None:
    tree = link_tree(tmp_path / "tree")
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    command += ["--cache-dir", str(ROOT / ".mypy_cache")]
    for package in CHECKED:
        command += ["-p", f"puremesh.{package}"]
    result = subprocess.run(
        command, cwd=tree, env={"MYPYPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
