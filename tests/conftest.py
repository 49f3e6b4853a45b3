"""Shared fixtures. Tiny models are built locally once per session (rule 8: no downloads)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from pki import Pki, make_pki

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny tokenizer (puremesh.tinyworld.tokenizer.build_tokenizer)."""
    from puremesh.tinyworld.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A directory holding a random tiny Qwen2ForCausalLM (seed 0) with its tokenizer."""
    from transformers import AutoTokenizer

    from puremesh.tinyworld.models import build_policy

    out = tmp_path_factory.mktemp("tiny-policy")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    build_policy(out, tokenizer, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_prm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A directory holding a random tiny Qwen2ForTokenClassification PRM (seed 0) with its
    tokenizer."""
    from transformers import AutoTokenizer

    from puremesh.tinyworld.models import build_prm

    out = tmp_path_factory.mktemp("tiny-prm")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    build_prm(out, tokenizer, seed=0)
    return out


@pytest.fixture(scope="session")
def addition_problems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 one-step addition problems in PURE's JSONL layout; every fifth has no ground truth."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rng = random.Random(0)
    with path.open("w") as handle:
        for i in range(100):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            answer = str(a + b) if i % 5 else "null"
            handle.write(json.dumps({"question": f"What is {a} + {b}?", "answer": answer}) + "\n")
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates and tokens made by the README's openssl block (tests/pki.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, unrelated PKI: a wrong CA, and tokens no server of `pki` accepts."""
    return make_pki(tmp_path_factory.mktemp("other-pki"))
