"""CLI clients: `puremesh verify`, `puremesh score`, `puremesh generate` against live services.

Each takes the client's security flags (`add_client_security_flags`, shared with `puremesh
probe`): --tls-ca, --tls-cert/--tls-key (mTLS), --tls-server-name, --tls, --token-file (default
$PUREMESH_TOKEN_FILE). A server error prints one line with its status code.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os

from pydantic import ValidationError

from puremesh.contract.sampling import SamplingSpec
from puremesh.contract.services import SERVICES, ServiceName
from puremesh.rpc.auth import SecurityError
from puremesh.rpc.client import RpcError
from puremesh.rpc.settings import ClientSecurity
from puremesh.services.prm.client import PrmClient
from puremesh.services.rollout.client import RolloutClient
from puremesh.services.verify.client import VerifyClient

from .errors import CliError
from .prompt_flags import add_template_flags, prompt_template


def _add_target(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--target", default=f"127.0.0.1:{default_port}", help="host:port of the service")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per attempt, seconds")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--application", default="", help="Ray Serve application name, when --target is a Ray Serve proxy"
    )
    add_client_security_flags(parser)


TOKEN_FILE_ENV = "PUREMESH_TOKEN_FILE"


def add_client_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (README, Security)")
    group.add_argument(
        "--tls-ca", metavar="FILE", default="", help="CA bundle the server's certificate chains to"
    )
    group.add_argument(
        "--tls-cert", metavar="FILE", default="", help="client certificate (servers with mTLS)"
    )
    group.add_argument("--tls-key", metavar="FILE", default="", help="private key of --tls-cert")
    group.add_argument(
        "--tls-server-name", default="", help="name on the server's certificate, if not the host"
    )
    group.add_argument("--tls", action="store_true", help="TLS with the system's CAs (implied by --tls-ca)")
    group.add_argument(
        "--token-file",
        metavar="FILE",
        default=os.environ.get(TOKEN_FILE_ENV, ""),
        help=f"file whose first line is the bearer token sent on every call (default ${TOKEN_FILE_ENV})",
    )


def client_security(args: argparse.Namespace) -> ClientSecurity:
    """The ClientSecurity of the flags; CliError for a bad combination."""
    try:
        return ClientSecurity(
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            token_file=args.token_file,
        )
    except ValidationError as error:
        raise CliError(error.errors()[0]["msg"].removeprefix("Value error, ")) from None


def register(sub: argparse._SubParsersAction) -> None:
    verify = sub.add_parser("verify", help="grade a response against a ground truth (VerifyService)")
    _add_target(verify, SERVICES[ServiceName.VERIFY].grpc_port)
    verify.add_argument("--response", required=True, help="the response text")
    verify.add_argument("--ground-truth", help="the reference answer; empty or 'null' means none")
    verify.set_defaults(run=run_verify)

    score = sub.add_parser("score", help="score each step of a response with the PRM (PrmService)")
    _add_target(score, SERVICES[ServiceName.PRM].grpc_port)
    score.add_argument("--question", required=True, help="the prompt the response answers")
    score.add_argument("--response", required=True, help='the response; steps are separated by "\n\n"')
    add_template_flags(score, None, chat=False)
    score.set_defaults(run=run_score)

    generate = sub.add_parser("generate", help="sample responses to a prompt (RolloutService)")
    _add_target(generate, SERVICES[ServiceName.ROLLOUT].grpc_port)
    generate.add_argument("--prompt", required=True, help="the prompt text (the question, with a template)")
    add_template_flags(generate, None, chat=False)
    generate.add_argument("-n", type=int, default=1, help="number of samples (default: %(default)s)")
    generate.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: %(default)s)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.set_defaults(run=run_generate)


def _run(coroutine):
    try:
        return asyncio.run(coroutine)
    except RpcError as error:
        raise CliError(f"{error.code.name} from {error.target}: {error.details}", exit_code=1) from error
    except SecurityError as error:
        raise CliError(str(error)) from None


def _options(args: argparse.Namespace) -> dict:
    """The client constructor's keyword arguments from the common flags."""
    return {"timeout": args.timeout, "application": args.application, "security": client_security(args)}


def run_verify(args: argparse.Namespace) -> int:
    async def call():
        async with VerifyClient(args.target, **_options(args)) as client:
            return (await client.verify([(args.response, args.ground_truth)]))[0]

    outcome = _run(call())
    if outcome.error is not None:
        raise CliError(f"the item could not be graded: {outcome.error}", exit_code=1)
    if args.json:
        print(json.dumps({"verdict": outcome.verdict.value, "answer": outcome.answer}))
    else:
        print(f"verdict  {outcome.verdict.value}\nanswer   {outcome.answer or '-'}")
    return 0


def _text(args: argparse.Namespace, text: str) -> str:
    """`text`, rendered with the template flags' prompt template when one is asked for."""
    template = prompt_template(args)
    return text if template is None else template.render(text)


def run_score(args: argparse.Namespace) -> int:
    prompt = _text(args, args.question)

    async def call():
        async with PrmClient(args.target, **_options(args)) as client:
            return (await client.score([(prompt, args.response)]))[0]

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


def run_generate(args: argparse.Namespace) -> int:
    sampling = SamplingSpec(args.n, args.temperature, args.top_p, args.max_new_tokens, args.seed, args.stop)
    prompt = _text(args, args.prompt)

    async def call():
        async with RolloutClient(args.target, **_options(args)) as client:
            return [sample async for sample in client.generate(prompt, sampling)]

    samples = sorted(_run(call()), key=lambda s: s.sample_index)
    if args.json:
        print(json.dumps({"samples": [dataclasses.asdict(s) for s in samples]}))
        return 0
    for sample in samples:
        print(
            f"--- sample {sample.sample_index}: {len(sample.token_ids)} tokens, "
            f"finish {sample.finish_reason.value}, policy version {sample.policy_version}"
        )
        print(sample.text)
    return 0
