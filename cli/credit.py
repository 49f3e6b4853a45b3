"""`puremesh credit FILE.json`: explain PURE credit assignment for one prompt group."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import textwrap
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError

from puremesh.rpc.settings import FrozenSettings
from puremesh.trainer.algo import (
    DEFAULT_BASELINE,
    DEFAULT_CREDIT,
    DEFAULT_REWARD_MODE,
    DEFAULT_TEMPERATURE,
    DEFAULT_VR_COEF,
    BaselineKind,
    CreditMethod,
    PureAdvantages,
    RewardMode,
    pure_advantages,
    step_end_mask_from_lengths,
)

from .errors import CliError

RESPONSE_KEYS = {"step_tokens", "step_scores", "solved", "has_ground_truth", "kl"}
TABLE_WIDTH = 100
FLAGS = {
    "credit": "--credit",
    "temperature": "--temperature",
    "mode": "--mode",
    "baseline": "--baseline",
    "kl_coef": "--kl-coef",
    "vr_coef": "--vr-coef",
}


class CreditSettings(FrozenSettings):
    """The options of one explanation; the algorithm's defaults (trainer/algo/options.py),
    except the KL penalty, which an explanation leaves out unless asked for."""

    credit: CreditMethod = DEFAULT_CREDIT
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0, allow_inf_nan=False)
    mode: RewardMode = DEFAULT_REWARD_MODE
    baseline: BaselineKind = DEFAULT_BASELINE
    kl_coef: float = Field(0.0, allow_inf_nan=False, description="beta; 0 = the worked example's")
    vr_coef: float = Field(DEFAULT_VR_COEF, allow_inf_nan=False)


@dataclass(frozen=True)
class ResponseInput:
    step_tokens: list[int]
    step_scores: list[float]
    solved: bool
    has_ground_truth: bool
    kl: list[float] | None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "credit",
        help="explain credit assignment for one prompt group (JSON file)",
        description=(
            "Explain PURE credit assignment for one group of responses. FILE is JSON: "
            '{"responses": [{"step_tokens": [5, 4, 3], "step_scores": [0.9, 0.2, 0.8], '
            '"solved": false, "has_ground_truth": true, "kl": [...]}, ...]}. '
            "step_tokens counts each step's tokens including its end token; solved, "
            "has_ground_truth and kl (one value per token, logp_old - logp_ref) are optional."
        ),
    )
    parser.add_argument("file", nargs="?", help="group JSON file ('-' for stdin)")
    parser.add_argument("--example", action="store_true", help="use the bundled worked example")
    add_credit_flags(parser)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(run=run)


def _values(kind: type[StrEnum]) -> list[str]:
    """The flag's choices as plain strings (argparse prints them in usage and errors)."""
    return [member.value for member in kind]


def add_credit_flags(parser: argparse.ArgumentParser) -> None:
    defaults = CreditSettings()
    parser.add_argument("--credit", choices=_values(CreditMethod), default=defaults.credit.value)
    parser.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        help="softmin temperature T of min-form credit (default: %(default)s)",
    )
    parser.add_argument("--mode", choices=_values(RewardMode), default=defaults.mode.value)
    parser.add_argument("--baseline", choices=_values(BaselineKind), default=defaults.baseline.value)
    parser.add_argument(
        "--kl-coef",
        type=float,
        default=defaults.kl_coef,
        help="KL penalty coefficient beta (default: %(default)s)",
    )
    parser.add_argument(
        "--vr-coef",
        type=float,
        default=defaults.vr_coef,
        help="verifiable-reward coefficient (default: %(default)s)",
    )


def settings_from_args(args: argparse.Namespace) -> CreditSettings:
    values = {field: getattr(args, field) for field in FLAGS}
    try:
        return CreditSettings(**values)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0])
        raise CliError(f"{FLAGS[field]} {values[field]}: {first['msg']}") from None


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.example:
        text = resources.files("puremesh.cli").joinpath("examples/worked_example.json").read_text()
        source = "bundled worked example"
    elif args.file is None:
        raise CliError("give a group JSON file (or --example for the bundled one)")
    else:
        text, source = read_source(args.file)
    group = parse_group(text, source)
    print(render_json(group, settings) if args.format == "json" else render_table(group, settings))
    return 0


def read_source(name: str) -> tuple[str, str]:
    if name == "-":
        return sys.stdin.read(), "stdin"
    try:
        return Path(name).read_text(encoding="utf-8"), name
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {name}: {getattr(error, 'strerror', None) or error}") from error


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_group(text: str, source: str = "input") -> list[ResponseInput]:
    """Validate a group document; every problem raises CliError with the exact location."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(f"{source} is not valid JSON: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("responses"), list):
        raise CliError(f'{source}: expected an object with a "responses" list')
    responses = document["responses"]
    if len(responses) < 2:
        raise CliError(f"{source}: a group needs at least 2 responses, got {len(responses)}")
    return [_parse_response(item, f"responses[{i}]") for i, item in enumerate(responses)]


def _number_list(item: dict, key: str, where: str) -> list[float]:
    values = item[key]
    if not isinstance(values, list) or not values:
        raise CliError(f"{where}.{key} must be a non-empty list of numbers")
    for j, value in enumerate(values):
        if not _is_number(value) or not math.isfinite(value):
            raise CliError(f"{where}.{key}[{j}] must be a finite number, got {json.dumps(value)}")
    return [float(v) for v in values]


def _parse_response(item: Any, where: str) -> ResponseInput:
    """One response of the group document: known fields, steps, scores, labels and KL."""
    if not isinstance(item, dict):
        raise CliError(f"{where} must be an object")
    unknown = sorted(set(item) - RESPONSE_KEYS)
    if unknown:
        raise CliError(f"{where} has unknown field(s) {', '.join(unknown)}")
    for key in ("step_tokens", "step_scores"):
        if key not in item:
            raise CliError(f"{where} is missing {key!r}")
    tokens = _step_tokens(item, where)
    scores = _step_scores(item, where, len(tokens))
    solved, has_ground_truth = _labels(item, where)
    kl = None
    if "kl" in item:
        kl = _number_list(item, "kl", where)
        if len(kl) != sum(tokens):
            raise CliError(f"{where}: kl has {len(kl)} values but the steps have {sum(tokens)} tokens")
    return ResponseInput(tokens, scores, solved, has_ground_truth, kl)


def _step_tokens(item: dict, where: str) -> list[int]:
    tokens = item["step_tokens"]
    if not isinstance(tokens, list) or not tokens:
        raise CliError(f"{where}.step_tokens must be a non-empty list of positive integers")
    for j, n in enumerate(tokens):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise CliError(f"{where}.step_tokens[{j}] must be a positive integer, got {json.dumps(n)}")
    return tokens


def _step_scores(item: dict, where: str, steps: int) -> list[float]:
    scores = _number_list(item, "step_scores", where)
    if len(scores) != steps:
        raise CliError(f"{where}: {steps} step_tokens but {len(scores)} step_scores")
    for j, score in enumerate(scores):
        if not -1.0 <= score <= 1.0:
            raise CliError(f"{where}.step_scores[{j}] = {score} is outside [-1, 1]")
    return scores


def _labels(item: dict, where: str) -> tuple[bool, bool]:
    """(solved, has_ground_truth): a response without `solved` has no ground truth."""
    for key in ("solved", "has_ground_truth"):
        if key in item and not isinstance(item[key], bool):
            raise CliError(f"{where}.{key} must be true or false")
    solved = item.get("solved")
    if item.get("has_ground_truth") is True and solved is None:
        raise CliError(f"{where}: has_ground_truth is true but solved is missing")
    return bool(solved), solved is not None and item.get("has_ground_truth", True)


def compute(
    group: list[ResponseInput], settings: CreditSettings, credit: CreditMethod | None = None
) -> PureAdvantages:
    token_mask, step_end_mask = step_end_mask_from_lengths([r.step_tokens for r in group])
    width = max(len(r.step_scores) for r in group)
    scores = torch.zeros(len(group), width, dtype=torch.float64)
    kl = torch.zeros(token_mask.shape, dtype=torch.float64)
    for i, response in enumerate(group):
        scores[i, : len(response.step_scores)] = torch.tensor(response.step_scores, dtype=torch.float64)
        if response.kl is not None:
            kl[i, : len(response.kl)] = torch.tensor(response.kl, dtype=torch.float64)
    return pure_advantages(
        scores,
        step_end_mask,
        token_mask,
        torch.zeros(len(group), dtype=torch.long),
        solved=torch.tensor([r.solved for r in group]),
        has_ground_truth=torch.tensor([r.has_ground_truth for r in group]),
        kl=kl,
        credit=credit or settings.credit,
        temperature=settings.temperature,
        reward_mode=settings.mode,
        baseline=settings.baseline,
        kl_coef=settings.kl_coef,
        vr_coef=settings.vr_coef,
    )


def render_json(group: list[ResponseInput], settings: CreditSettings) -> str:
    result = compute(group, settings)
    responses = []
    for i, response in enumerate(group):
        steps, length = len(response.step_tokens), sum(response.step_tokens)
        responses.append(
            {
                "step_weights": result.step_weights[i, :steps].tolist(),
                "transformed_rewards": result.transformed[i, :steps].tolist(),
                "step_rewards": result.step_rewards[i, :steps].tolist(),
                "outcome_reward": float(result.outcome[i]),
                "baseline": float(result.baseline[i]),
                "vr_advantage": float(result.vr_advantage[i]),
                "advantages": result.advantages[i, :length].tolist(),
                "normalized_advantages": result.normalized[i, :length].tolist(),
            }
        )
    return json.dumps({"settings": settings.model_dump(mode="json"), "responses": responses}, indent=2)


def _run_length(values: list[float]) -> str:
    """'0.0521x4 0 0.0601x3' : equal neighbours collapsed, exact zeros printed as 0."""
    parts: list[str] = []
    j = 0
    while j < len(values):
        k = j
        while k + 1 < len(values) and values[k + 1] == values[j]:
            k += 1
        text = "0" if values[j] == 0 else f"{values[j]:+.4f}"
        parts.append(text if k == j else f"{text}x{k - j + 1}")
        j = k + 1
    return " ".join(parts)


def _wrapped(label: str, body: str, width: int) -> list[str]:
    return textwrap.wrap(body, width=width, initial_indent=label, subsequent_indent=" " * len(label)) or [
        label
    ]


def render_table(group: list[ResponseInput], settings: CreditSettings) -> str:
    width = min(TABLE_WIDTH, shutil.get_terminal_size((TABLE_WIDTH, 24)).columns)
    width = max(width, 80)
    result = compute(group, settings)
    min_form = compute(group, settings, credit=CreditMethod.MIN)
    sum_form = compute(group, settings, credit=CreditMethod.SUM)
    baseline_name = "abar (per token)" if settings.baseline is BaselineKind.TOKEN else "b (per step)"
    lines = [
        f"PURE credit assignment: credit={settings.credit} T={settings.temperature:g} "
        f"mode={settings.mode} baseline={settings.baseline} kl_coef={settings.kl_coef:g} "
        f"vr_coef={settings.vr_coef:g}",
        f"{len(group)} responses, {sum(sum(r.step_tokens) for r in group)} tokens. Token rewards sit on"
        " step-end tokens; step-end tokens get advantage 0.",
    ]
    header = (
        f"{'step':>4} {'tokens':>6} {'score':>8} {'weight':>8} {'r*':>9} {'baseline':>9} "
        f"{'VR':>8} {'step rwd':>9} {'return':>9}"
    )
    for i, response in enumerate(group):
        steps = len(response.step_tokens)
        truth = (
            ("solved" if response.solved else "not solved")
            if response.has_ground_truth
            else "no ground truth"
        )
        lines += [
            "",
            f"Response {i + 1}: {steps} steps, {sum(response.step_tokens)} tokens, {truth}; "
            f"outcome O = {float(result.outcome[i]):+.6f}; "
            f"{baseline_name} = {float(result.baseline[i]):+.6f}",
            header,
        ]
        start = 0
        for k in range(steps):
            vr = float(result.vr_advantage[i]) * settings.vr_coef if k == steps - 1 else 0.0
            lines.append(
                f"{k + 1:>4} {response.step_tokens[k]:>6} {response.step_scores[k]:>+8.4f} "
                f"{float(result.step_weights[i, k]):>8.4f} {float(result.transformed[i, k]):>+9.5f} "
                f"{-float(result.baseline_share[i, k]):>+9.5f} {vr:>+8.4f} "
                f"{float(result.step_rewards[i, k]):>+9.5f} {float(result.returns[i, start]):>+9.5f}"
            )
            start += response.step_tokens[k]
        length = sum(response.step_tokens)
        for label, form in (("min-form advantages: ", min_form), ("sum-form advantages: ", sum_form)):
            values = form.advantages[i, :length].tolist()
            lines += _wrapped(label, _run_length([round(v, 6) for v in values]), width)
    lines += [
        "",
        "Columns: weight = share of the outcome the credit transform gives the step; r* = weight x",
        "score; baseline = the RLOO baseline's share of the step (abar x content tokens); VR = the",
        "leave-one-out verifiable reward on the last step; return = the return at the step's first token.",
    ]
    return "\n".join(lines)
