"""The verdict on one graded answer, from the verify service's grading to the learner's rewards.

One definition for both ends: the grader produces a `Verdict`, the verify servicer and client
map it onto the wire enum (services/verify/wire.py, the only place that knows the protobuf), and
the learner compares verdicts, never bare strings. A `Verdict` is a `str` (StrEnum), so JSON
output and metric labels carry its value unchanged ("correct", "no_answer", ...).

Only CORRECT counts as solved: every other verdict, ERROR included, earns no verifiable reward.
"""

from __future__ import annotations

import enum


class Verdict(enum.StrEnum):
    """The grade of one (response, ground truth) item."""

    CORRECT = "correct"  # the final answer equals the ground truth
    INCORRECT = "incorrect"  # a final answer that differs from it
    NO_ANSWER = "no_answer"  # the response states no final answer
    NO_GROUND_TRUTH = "no_ground_truth"  # nothing to compare with (empty, "null", "none")
    TIMEOUT = "timeout"  # grading ran past its hard time limit
    ERROR = "error"  # the item could not be graded (malformed, too long, a grader failure)

    @property
    def solved(self) -> bool:
        """True for CORRECT only: the `solved_i` of pure-algorithm.md section 4."""
        return self is Verdict.CORRECT
