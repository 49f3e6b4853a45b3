"""`puremesh demo`: the README's run command.

The training mesh (issue 4) is not built yet, so the demo runs the most complete piece that
exists: the credit-assignment explainer on the bundled worked example, min-form next to sum-form.
"""

from __future__ import annotations

import argparse

from . import credit


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the demo (today: the credit explainer on the bundled example)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(
        "puremesh demo: the training mesh is not built yet; showing PURE credit assignment on the\n"
        "bundled worked example (pure-algorithm.md section 6), min-form next to sum-form.\n"
    )
    example = argparse.Namespace(example=True, file=None, format="table", **vars(credit.CreditSettings()))
    return credit.run(example)
