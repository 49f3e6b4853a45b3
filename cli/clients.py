"""CLI clients: `puremesh verify`, `puremesh score`, `puremesh generate` against live services."""

from __future__ import annotations

import argparse
import asyncio
import json

from .errors import CliError


def _add_target(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--target", default=f"127.0.0.1:{default_port}", help="host:port of the service")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per attempt, seconds")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(sub: argparse._SubParsersAction) -> None:
    verify = sub.add_parser("verify", help="grade a response against a ground truth (VerifyService)")
    _add_target(verify, 50053)
    verify.add_argument("--response", required=True, help="the response text")
    verify.add_argument("--ground-truth", help="the reference answer; empty or 'null' means none")
    verify.set_defaults(run=run_verify)

    score = sub.add_parser("score", help="score each step of a response with the PRM (PrmService)")
    _add_target(score, 50052)
    score.add_argument("--question", required=True, help="the prompt the response answers")
    score.add_argument("--response", required=True, help='the response; steps are separated by "\n\n"')
    score.set_defaults(run=run_score)


def _run(coroutine):
    from puremesh.services.common.client import RpcError

    try:
        return asyncio.run(coroutine)
    except RpcError as error:
        raise CliError(f"{error.code.name} from {error.target}: {error.details}", exit_code=1) from error


def run_verify(args: argparse.Namespace) -> int:
    from puremesh.services.verify.client import VerifyClient

    async def call():
        async with VerifyClient(args.target, timeout=args.timeout) as client:
            return (await client.verify([(args.response, args.ground_truth)]))[0]

    outcome = _run(call())
    if outcome.error is not None:
        raise CliError(f"the item could not be graded: {outcome.error}", exit_code=1)
    if args.json:
        print(json.dumps({"verdict": outcome.verdict, "answer": outcome.answer}))
    else:
        print(f"verdict  {outcome.verdict}\nanswer   {outcome.answer or '-'}")
    return 0


def run_score(args: argparse.Namespace) -> int:
    from puremesh.services.prm.client import PrmClient

    async def call():
        async with PrmClient(args.target, timeout=args.timeout) as client:
            return (await client.score([(args.question, args.response)]))[0]

    scored = _run(call())
    if scored.error is not None:
        raise CliError(f"the response could not be scored: {scored.error}", exit_code=1)
    if args.json:
        print(json.dumps({"steps": [{"text": s.text, "score": s.score} for s in scored.steps]}))
        return 0
    print(f"{'step':>4}  {'score':>7}  text")
    for number, step in enumerate(scored.steps, 1):
        text = step.text.replace("\n", "\\n")
        print(f"{number:>4}  {step.score:>+7.4f}  {text[:80] + ('...' if len(text) > 80 else '')}")
    return 0
