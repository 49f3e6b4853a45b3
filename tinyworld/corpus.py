"""The free-form arithmetic corpus: short questions with step-by-step solutions.

The default text the tiny tokenizer learns its merges from (`tokenizer.build_tokenizer`), also
tokenised by the PRM tests and benchmarks as realistic step-structured responses. The tiny
world's own task (task.py) is narrower; its tokenizer corpus (`task.task_corpus`) includes this
one. Everything here is deterministic in its seed.
"""

from __future__ import annotations

import random

from puremesh.contract.steps import STEP_SEPARATOR

NEWLINE = "\n"
CORPUS_SIZE = 2000
CORPUS_SEED = 0

NAMES = (
    "Tom", "Anna", "Lena", "Ravi", "Maya", "Omar", "Sara", "Ken", "Ines", "Paul",
    "Grace", "Hugo", "Priya", "Felix", "Chloe", "Mateo", "Yuki", "Nadia", "Oscar", "Zoe",
)  # fmt: skip
OBJECTS = (
    "apples", "pencils", "coins", "books", "marbles", "cookies", "stamps", "cards",
    "oranges", "stickers", "shells", "bottles", "flowers", "candies", "buttons", "tickets",
)  # fmt: skip
OPERATIONS = {  # op -> (story phrasings, step verb)
    "+": (("gets {c} more", "finds {c} more", "buys {c} more", "receives {c} more"), "add"),
    "-": (("gives away {c}", "loses {c}", "sells {c}", "eats {c}"), "subtract"),
    "*": (("ends up with {c} times as many", "multiplies the pile by {c}"), "multiply"),
}
PREAMBLES = ("", "Let's think step by step. ", "Solve carefully. ", "Show your work. ")
OPENERS = ("", "First, ", "Then ", "Next, ", "So ", "Now ")


def apply_op(value: int, op: str, c: int) -> int:
    """`value op c` for op in "+", "-", "*"."""
    return value + c if op == "+" else value - c if op == "-" else value * c


def arithmetic_solution(rng: random.Random) -> str:
    """One synthetic question with a step-by-step solution, steps separated by "\n\n".

    Two styles: a bare expression ("What is (3 + 4) * 2?") and a short word problem; the steps
    read "Step k: 7 * 2 = 14" or "Then we multiply: 7 * 2 = 14.", and the last line is
    "The answer is \\boxed{14}".
    """
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    ops = [("+", b)] + [(rng.choice("+-*"), rng.randint(2, 9)) for _ in range(rng.randint(1, 3))]
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    if rng.random() < 0.5:
        expression = f"{a} + {b}"
        for op, c in ops[1:]:
            expression = f"({expression}) {op} {c}"
        question = f"Question: What is {expression}?"
    else:
        story = [f"{name} has {a} {thing}."] + [
            f"{name} {rng.choice(OPERATIONS[op][0]).format(c=c)}." for op, c in ops
        ]
        question = "Question: " + " ".join(story) + f" How many {thing} does {name} have now?"
    steps, value = [], a
    for k, (op, c) in enumerate(ops, start=1):
        new = apply_op(value, op, c)
        if rng.random() < 0.5:
            steps.append(f"Step {k}: {value} {op} {c} = {new}")
        else:
            opener = rng.choice(OPENERS)
            verb = OPERATIONS[op][1]
            steps.append(f"{opener}we {verb}: {value} {op} {c} = {new}.".capitalize())
        value = new
    steps.append(f"The answer is \\boxed{{{value}}}")
    return rng.choice(PREAMBLES) + question + NEWLINE + STEP_SEPARATOR.join(steps)


def synthetic_corpus(size: int = CORPUS_SIZE, seed: int = CORPUS_SEED) -> list[str]:
    """`size` arithmetic solutions, deterministic in `seed`."""
    rng = random.Random(seed)
    return [arithmetic_solution(rng) for _ in range(size)]
