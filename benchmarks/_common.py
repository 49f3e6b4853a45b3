"""Shared helpers of the benchmark scripts: tiny local models and served subprocesses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
os.environ.update({k: os.environ.get(k, v) for k, v in ENV.items()})

# After the environment above: the hub reads it when transformers is first imported.
from puremesh.tinyworld.tokenizer import build_tokenizer  # noqa: E402


def build_models(out: Path, hidden: int, layers: int, heads: int) -> tuple[Path, Path]:
    """A tokenizer plus a policy and a PRM of the given size, random, in `out` (policy, prm)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification

    tokenizer = build_tokenizer(out / "tokenizer")
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    policy_dir, prm_dir = out / "policy", out / "prm"
    policy = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.save_pretrained(policy_dir)
    Qwen2ForTokenClassification(Qwen2Config(**config, num_labels=2)).eval().save_pretrained(prm_dir)
    for folder in (policy_dir, prm_dir):
        tokenizer.save_pretrained(folder)
    return policy_dir, prm_dir


class Served:
    """`puremesh serve SERVICE` as a subprocess on a free port."""

    def __init__(self, service: str, env: dict[str, str], ready_timeout: float = 300) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "puremesh.cli.main",
                "serve",
                service,
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"puremesh serve {service} exited with {self.process.returncode}")
            match = re.search(r"serving on (\S+)", line)
            if match:
                self.target = match.group(1)
                return
        self.close()
        raise RuntimeError(f"puremesh serve {service} not ready after {ready_timeout} s")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ratio_line(name: str, measured: float, baseline: float, target: str) -> str:
    return f"{name}: {measured / baseline:6.2f}x   (target {target})"


def tiny_world(cache: str | None, quick: bool):
    """The bootstrapped tiny world a demo benchmark trains in (built on first use): `cache`, or
    the demo's default cache; for the quick world, its "-quick" sibling."""
    from puremesh.tinyworld.world import bootstrap, default_cache_dir

    root = Path(cache or default_cache_dir())
    if quick:
        root = root.with_name(root.name + "-quick")
    return bootstrap(root, log=print, quick=quick)
