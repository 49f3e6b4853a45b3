"""`puremesh prm-train`: train a process reward model on step-labelled data.

A thin shell over puremesh.supervised: the data format and the layout are described in
supervised/prm_data.py, the training in supervised/prm.py. This module parses the flags, turns
bad input into one clear line (CliError), and prints progress on stderr and the result on stdout.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from puremesh.contract.steps import DEFAULT_STEP_TAG, Readout, StepLayout
from puremesh.supervised import prm
from puremesh.supervised.prm_data import EncodedRecord, PrmLayout, StepRecord, load_records

from .errors import CliError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prm-train",
        help="train a process reward model on step-labelled JSONL",
        description=(
            'Train a PRM (token classification, 2 labels, label 1 = "step is correct") on a JSONL '
            'file of {"prompt": str, "steps": [str, ...], "labels": [0|1, ...]} rows, in the exact '
            "layout the PRM service scores: the prompt, then each step followed by one step tag "
            "token (\\n by default), the label read at that tag. The layout is written into --out, "
            "where the PRM service picks it up."
        ),
    )
    parser.add_argument("--data", required=True, help="training JSONL (prompt, steps, labels)")
    parser.add_argument(
        "--base", required=True, help="local model dir: a Qwen2-style causal LM or PRM + its tokenizer"
    )
    parser.add_argument("--out", required=True, help="where to save the trained PRM")
    parser.add_argument("--eval", dest="eval_data", help="held-out JSONL to report step accuracy and AUC on")
    parser.add_argument(
        "--epochs", type=float, default=prm.EPOCHS, help="passes over the data (default: %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=prm.LR, help="peak learning rate (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=prm.BATCH_SIZE, help="solutions per step (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=prm.SEED, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--step-tag",
        default=DEFAULT_STEP_TAG,
        help="the token after each step, one token of the base's tokenizer (default: %(default)r)",
    )
    parser.add_argument(
        "--readout",
        choices=[str(r) for r in Readout],
        default=str(Readout.DIFFERENCE),
        help="how scores are read at the tag: softmax difference or 2p - 1 (default: %(default)s)",
    )
    parser.set_defaults(run=run)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_flags(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise CliError(f"--epochs must be a positive number, got {args.epochs}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CliError(f"--lr must be a positive number, got {args.lr}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    records = _records(args.data)
    held_out = _records(args.eval_data) if args.eval_data else None
    if not Path(args.base, "config.json").is_file():
        raise CliError(f"--base {args.base} is not a model directory (no config.json)")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model, tokenizer = prm.load_base(args.base)
        layout = PrmLayout(tokenizer, StepLayout(args.step_tag, Readout(args.readout)))
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load a model from {args.base}: {str(error).splitlines()[0]}") from error
    rows = _encode(layout, records, args.data, model)
    eval_rows = _encode(layout, held_out, args.eval_data, model) if held_out else None
    steps = sum(len(r.labels) for r in rows)
    positive = sum(sum(r.labels) for r in rows)
    _log(
        f"prm-train: {len(rows)} solutions, {steps} steps ({positive / steps:.0%} labelled correct), "
        f"base {args.base}, {args.epochs:g} epoch(s), lr {args.lr:g}, batch {args.batch_size}"
    )
    began = time.perf_counter()
    prm.train_prm(
        model, rows, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, log=_log
    )
    _log(f"prm-train: trained in {time.perf_counter() - began:.1f} s")
    if eval_rows:
        _log(f"prm-train: held-out {prm.evaluate_prm(model, eval_rows, layout.step.readout).line()}")
    try:
        prm.save_prm(model, tokenizer, args.out, layout.step)
    except OSError as error:
        raise CliError(f"cannot write {args.out}: {error.strerror or error}", exit_code=1) from error
    print(f"prm-train: saved the PRM to {args.out} (step tag {args.step_tag!r}, readout {args.readout})")
    return 0


def _records(path: str) -> list[StepRecord]:
    try:
        return load_records(path)
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error}") from error
    except ValueError as error:
        raise CliError(str(error)) from error


def _encode(layout: PrmLayout, records: list[StepRecord], source: str, model: Any) -> list[EncodedRecord]:
    """Every record in the PRM layout; CliError naming the record if one does not fit the model."""
    limit = getattr(model.config, "max_position_embeddings", None)
    rows = []
    for index, record in enumerate(records, start=1):
        try:
            row = layout.encode(record)
        except ValueError as error:
            raise CliError(f"{source}: record {index}: {error}") from error
        if limit and len(row.input_ids) > limit:
            raise CliError(
                f"{source}: record {index}: {len(row.input_ids)} tokens exceed the model's context of {limit}"
            )
        rows.append(row)
    return rows
