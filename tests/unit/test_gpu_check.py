"""benchmarks/gpu_check.py on a machine without CUDA: it parses its arguments and stops with one
clear line (exit 2); bad arguments are argparse's one error line (exit 2). Its GPU checks
themselves run only where CUDA is (README "GPU paths")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_it_parses_its_arguments() -> None:
    shown = run("--help")
    assert shown.returncode == 0 and "--size {large,tiny}" in shown.stdout and "--only" in shown.stdout
    refused = run("--only", "learner,nope")
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith("--only: unknown checks ['nope'] (choose from learner,weights,rollout,prm)")
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_says_so_in_one_line() -> None:
    for args in ((), ("--size", "large", "--only", "prm")):
        result = run(*args)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            "gpu_check: no CUDA device here (torch.cuda.is_available() is false); nothing was run"
        ]
