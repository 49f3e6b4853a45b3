"""`puremesh eval`: PURE's evaluation protocol on a local model and one or more sets.

Protocol: greedy decoding, one sample per question, at most `--max-new-tokens` (3000) new tokens
(fewer when the prompt and the cap would exceed the model's context), the response graded by the
verify service's grader (services/verify/grading.py: the last \\boxed{} of the response against
the gold answer, math-verify equivalence), in its process pool with a hard time limit per item;
`--grader pure` grades with PURE's training-time check instead.
The model is a local Hugging Face directory (a trained policy or an export), served by the
rollout service's own engines (vLLM, or transformers with `--engine hf`).

Writes OUT/results.json (per set: n, correct, accuracy, stderr, answered, truncated, mean_tokens;
the protocol's settings) and OUT/<set>.jsonl (one line per item: question, answer, response,
extracted answer, verdict, correct, tokens, finish reason), and prints the accuracy table.
Inputs and templates: cli/eval_data.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from puremesh.contract.sampling import Sample, SamplingSpec
from puremesh.contract.verdict import Verdict
from puremesh.services.rollout.app import build_engine
from puremesh.services.rollout.settings import RolloutSettings
from puremesh.services.verify.grading import Grader, grade_pure
from puremesh.services.verify.pool import GradeResult, GradingPool
from puremesh.services.verify.settings import VerifySettings
from puremesh.trainer.data import TemplatePreset

from .errors import CliError
from .eval_data import EvalItem, ItemResult, load_items, set_names, summarize, table
from .prompt_flags import add_template_flags, prompt_template

DEFAULT_MAX_NEW_TOKENS = 3000  # PURE's evaluation cap
CONCURRENCY = 64  # questions generating at once
GRADING_WORKERS = 2
GRADE_TIMEOUT_S = VerifySettings().item_timeout_seconds


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="PURE's evaluation protocol on a local model", description=__doc__)
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--data", required=True, action="append", help="JSONL or parquet set (repeatable)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="generation engine")
    add_template_flags(parser, str(TemplatePreset.PURE), chat=True)
    parser.add_argument(
        "--grader",
        choices=[str(g) for g in Grader],
        default=str(Grader.MATH_VERIFY),
        help="the verify service's graders: math-verify, or PURE's check (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="token cap")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each set")
    parser.add_argument("--dtype", default="auto", help='model dtype ("auto", "float32", "bfloat16")')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(run=run)


def _load_sets(args: argparse.Namespace) -> dict[str, list[EvalItem]]:
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be at least 1, got {args.limit}")
    if not (Path(args.model) / "config.json").is_file():
        raise CliError(f"--model {args.model} is not a local model directory (no config.json)")
    sets = {}
    for name, path in zip(set_names(args.data), args.data, strict=True):
        try:
            sets[name] = load_items(path)[: args.limit]
        except OSError as error:
            raise CliError(f"cannot read {path}: {error.strerror or error}") from error
        except ValueError as error:
            raise CliError(str(error)) from error
    return sets


async def _generate(engine, prompt: str, cap: int) -> Sample | None:
    """The greedy response to `prompt`, or None when the prompt leaves no room in the context."""
    prompt_ids = engine.tokenize(prompt)
    room = min(cap, engine.max_model_len - len(prompt_ids))
    if room < 1:
        return None
    spec = SamplingSpec(n=1, temperature=0.0, max_new_tokens=room)
    async for sample in engine.generate(prompt_ids, spec):
        return sample
    return None


async def _evaluate_set(engine, pool: GradingPool, items: list[EvalItem], args, bar) -> list[ItemResult]:
    template, gate = args.prompt, asyncio.Semaphore(CONCURRENCY)

    async def one(index: int, item: EvalItem) -> ItemResult:
        async with gate:
            prompt = template.render(item.question, args.tokenizer)
            sample = await _generate(engine, prompt, args.max_new_tokens)
        if sample is None:
            bar.update(1)
            return ItemResult(index, item.question, item.answer, "", "", Verdict.ERROR, 0, "prompt_too_long")
        if args.grader == Grader.PURE:
            graded = GradeResult(*grade_pure(sample.text, item.answer))
        else:
            [graded] = await pool.grade_many([(sample.text, item.answer)], GRADE_TIMEOUT_S)
        bar.update(1)
        return ItemResult(
            index, item.question, item.answer, sample.text, graded.answer, graded.verdict,
            len(sample.token_ids), str(sample.finish_reason),
        )  # fmt: skip

    return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))


async def evaluate(args: argparse.Namespace, sets: dict[str, list[EvalItem]]) -> dict[str, list[ItemResult]]:
    settings = RolloutSettings(
        engine=args.engine, model_path=args.model, dtype=args.dtype, max_new_tokens=args.max_new_tokens
    )
    engine = build_engine(settings)
    await engine.start()
    results: dict[str, list[ItemResult]] = {}
    try:
        async with GradingPool(GRADING_WORKERS) as pool:
            total = sum(map(len, sets.values()))
            with tqdm(total=total, disable=args.no_progress, unit="item", dynamic_ncols=True) as bar:
                for name, items in sets.items():
                    bar.set_description(name)
                    results[name] = await _evaluate_set(engine, pool, items, args, bar)
    finally:
        await engine.close()
    return results


def _chat_tokenizer(args: argparse.Namespace):
    """The model's tokenizer when the chat template is asked for (None otherwise); CliError when
    it has no chat template."""
    if not args.prompt.chat:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise CliError(f"--chat-template: the tokenizer of {args.model} has no chat template")
    return tokenizer


def write_results(out: Path, args: argparse.Namespace, results: dict[str, list[ItemResult]]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(items) for name, items in results.items()}
    for name, items in results.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for item in items:
                handle.write(json.dumps(item.record()) + "\n")
    report = {
        "model": str(args.model),
        "engine": args.engine,
        "template": args.template,
        "grader": args.grader,
        "prompt": args.prompt.describe(),
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy, one sample",
        "sets": summaries,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return summaries


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    args.prompt = prompt_template(args)
    sets = _load_sets(args)
    args.tokenizer = _chat_tokenizer(args)
    if sets:
        first = next(iter(sets.values()))
        if first:
            logging.getLogger(__name__).info(
                "prompt template %s; the first prompt: %r",
                args.prompt.describe(),
                args.prompt.render(first[0].question, args.tokenizer),
            )
    try:
        results = asyncio.run(evaluate(args, sets))
    except (OSError, ValueError, RuntimeError) as error:
        raise CliError(f"evaluation failed: {type(error).__name__}: {error}", exit_code=1) from error
    summaries = write_results(Path(args.out), args, results)
    print(table(summaries))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0
