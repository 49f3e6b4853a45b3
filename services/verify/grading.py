"""Answer grading: extract the final answer of a response and compare it with the ground truth.

A pure module (rule 1 of ARCHITECTURE.md): stdlib, math-verify/sympy and the contract's `Verdict`
(contract/verdict.py) only, plain values in and out, no I/O, no config objects.

The grading is split in two so that a caller can keep the cheap part in-process and isolate the
expensive one:

- `classify` is pure string work, linear in the length of the response. It decides every verdict
  that needs no mathematics (NO_GROUND_TRUTH, NO_ANSWER) and extracts the answer.
- `answers_match` runs math-verify. It can take unbounded time on pathological answers (sympy
  happily starts computing ``9^(9^9)`` in full), and math-verify's own signal-based timeouts only
  work in the main thread, so they are switched off here: the caller must bound the time, e.g.
  by running it in a process that it can kill (see `pool.GradingPool`).

`grade` composes the two and is what a single-threaded caller (a test, a notebook) uses.

`Grader.PURE` is the other grader the verify service offers (`grader: pure`): PURE's
training-time check, stricter than math-verify. The last ``\\boxed{}`` of the response (no box:
no answer) is compared with the gold answer by string after the standard MATH answer
normalisation (`normalize_answer`: the rules of the MATH benchmark's equivalence check, written
here). Pure string work, linear time, so it needs no process of its own (`grade_pure`).
"""

from __future__ import annotations

import re
from enum import StrEnum

from math_verify import parse, verify

from puremesh.contract.verdict import Verdict

__all__ = [
    "Grader",
    "answers_match",
    "classify",
    "extract_final_answer",
    "gold_answer",
    "grade",
    "grade_pure",
    "has_ground_truth",
    "normalize_answer",
]


class Grader(StrEnum):
    """The answer check of the verify service: math-verify equivalence (the default), or PURE's
    training-time check (the last box, compared by string after MATH's normalisation)."""

    MATH_VERIFY = "math-verify"
    PURE = "pure"


# --------------------------------------------------------------------------------------------
# Extraction (pure string work)
# --------------------------------------------------------------------------------------------

# `\boxed{...}` / `\fbox{...}`, and MATH's brace-less form `\boxed 5`.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BOX_BARE_ARG_RE = re.compile(r"[ \t]+([^\s$]+)")

# Final-answer phrasings, used only when the response has no box. The LAST marker wins:
# "The answer is X", "The final answer is X", "Final answer: X", "**Answer:** X", "#### X".
_ANSWER_MARKER_RE = re.compile(
    r"\b(?:the|final)\s+answer\s*\**\s*is\b\s*:?"
    r"|\banswer\s*\**\s*:"
    r"|^[ \t]*####",
    re.IGNORECASE | re.MULTILINE,
)
# Inline math around an answer: $$...$$, $...$, \(...\), \[...\].
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
_TRAILING_JUNK = " \t.,;:!*"
_LEADING_JUNK = " \t:*"

_NO_GROUND_TRUTH_WORDS = frozenset({"", "null", "none"})


def _balanced_group(text: str, open_idx: int, limit: int) -> tuple[str | None, bool]:
    """The content of the brace group opening at ``text[open_idx] == "{"``.

    Escaped characters (``\\{``, ``\\}``, ``\\\\``) do not count as braces. Returns
    ``(content, True)`` when the group closes before ``limit``; ``(None, True)`` when the scan
    reached ``limit`` (the group may still close later, but the caller knows it does not);
    ``(None, False)`` when it never closes.
    """
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        if i >= limit:
            return None, True
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i], True
        i += 1
    return None, False


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{}``/``\\fbox{}`` (or ``\\boxed X``), else None.

    Runs in linear time: an unclosed box (a truncated response) can only be preceded by a
    complete box that closes before it starts, so earlier scans stop at the earliest unclosed one.
    """
    limit = len(text) + 1
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            content, _ = _balanced_group(text, j, limit)
            if content is None:
                limit = m.start()
                continue
            content = content.strip()
            if content:
                return content
            continue
        bare = _BOX_BARE_ARG_RE.match(text, m.end())
        if bare:
            return bare.group(1)
    return None


def _strip_math_delimiters(answer: str) -> str:
    s = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


def _answer_after_marker(rest: str) -> str | None:
    rest = rest.lstrip().lstrip(_LEADING_JUNK)
    line = rest.split("\n", 1)[0].strip()
    math = _MATH_SPAN_RE.search(line)
    if math:
        line = next(g for g in math.groups() if g is not None)
    else:
        end = _SENTENCE_END_RE.search(line)
        if end:
            line = line[: end.start()]
    line = line.strip(_TRAILING_JUNK)
    return line or None


def extract_final_answer(response: str) -> str | None:
    """The final answer of a response, or None when there is none.

    The content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces balanced);
    without a box, the text after the last final-answer phrase ("The answer is X",
    "Final answer: X", "Answer: X", a GSM8K-style "#### X" line), cut at the end of its line or
    sentence, with inline math delimiters removed.
    """
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    markers = list(_ANSWER_MARKER_RE.finditer(response))
    if not markers:
        return None
    return _answer_after_marker(response[markers[-1].end() :])


def has_ground_truth(ground_truth: str | None) -> bool:
    """False for None, blank strings and the placeholders "null" / "None" (any case)."""
    if ground_truth is None:
        return False
    return ground_truth.strip().lower() not in _NO_GROUND_TRUTH_WORDS


def gold_answer(ground_truth: str) -> str:
    """The answer to compare against: the last box of a worked solution, else the whole string."""
    boxed = _last_boxed(ground_truth)
    return _strip_math_delimiters(boxed if boxed is not None else ground_truth)


def classify(response: str, ground_truth: str | None) -> tuple[Verdict | None, str]:
    """The verdict that needs no mathematics, and the extracted answer ("" when none).

    Returns ``(Verdict.NO_GROUND_TRUTH, answer)`` without a ground truth (the answer is still
    reported), ``(Verdict.NO_ANSWER, "")`` when the response has no final answer, and
    ``(None, answer)`` when `answers_match` must decide. Pure string work, linear time.
    """
    answer = extract_final_answer(response)
    if not has_ground_truth(ground_truth):
        return Verdict.NO_GROUND_TRUTH, answer or ""
    if answer is None:
        return Verdict.NO_ANSWER, ""
    return None, answer


# --------------------------------------------------------------------------------------------
# Comparison (math-verify; unbounded time on pathological input)
# --------------------------------------------------------------------------------------------


def _parse(answer: str) -> list:
    # Wrapping in \boxed{} makes math-verify take the whole string as one LaTeX expression, so
    # plain "42", "1/2", "0.5", "x^2+1" and LaTeX "\frac{1}{2}" all parse. parsing_timeout=None
    # disables math-verify's SIGALRM timeout (main thread only); the caller bounds the time.
    return parse("\\boxed{" + answer + "}", parsing_timeout=None)


def _normalized(answer: str) -> str:
    return "".join(answer.split())


def answers_match(answer: str, ground_truth: str) -> bool:
    """Whether an extracted answer equals the ground truth mathematically (math-verify).

    Equivalent forms match: "1/2" = "\\frac{1}{2}" = "0.5", "3" = "3.0", "(x+1)^2" = "x^2+2x+1",
    "\\text{(B)}" = "B". May run for an unbounded time on pathological input: run it where it
    can be killed.
    """
    gold = gold_answer(ground_truth)
    pred = _strip_math_delimiters(answer)
    if _normalized(gold) == _normalized(pred):
        return True
    # timeout_seconds=None: no SIGALRM inside math-verify (see _parse).
    return bool(verify(_parse(gold), _parse(pred), timeout_seconds=None))


def grade(response: str, ground_truth: str | None) -> tuple[Verdict, str]:
    """Grade one response: (verdict, extracted answer or "").

    Never returns TIMEOUT itself: it has no time bound (see `answers_match`).
    """
    verdict, answer = classify(response, ground_truth)
    if verdict is None:
        # classify leaves the verdict open only when there is a ground truth and an answer.
        verdict = Verdict.CORRECT if answers_match(answer, ground_truth or "") else Verdict.INCORRECT
    return verdict, answer


# --------------------------------------------------------------------------------------------
# PURE's check: the last box against the gold answer, by string after MATH's normalisation
# --------------------------------------------------------------------------------------------

_REMOVED = ("\n", "\\!", "\\left", "\\right", "^{\\circ}", "^\\circ", "\\$", "$", "\\%", "%")
_SQRT_BARE_RE = re.compile(r"\\sqrt(\w)")
_FRAC_BARE_RE = re.compile(r"\\frac(?![{\\])(\S)(?:(?![{\\])(\S)|(?=\{))")
_SLASH_RE = re.compile(r"^(-?\d+)/(\d+)$")


def _fix_fracs(text: str) -> str:
    """\\frac12 -> \\frac{1}{2} and \\frac1{72} -> \\frac{1}{72}: bare one-character arguments braced."""

    def brace(match: re.Match[str]) -> str:
        first, second = match.group(1), match.group(2)
        return "\\frac{" + first + "}" + ("{" + second + "}" if second is not None else "")

    return _FRAC_BARE_RE.sub(brace, text)


def normalize_answer(answer: str) -> str:
    """An answer in the canonical form of the MATH benchmark's equivalence check.

    Line breaks, thin spaces (``\\!``), ``\\left``/``\\right``, degree marks, dollar and percent
    signs go; ``\\tfrac``/``\\dfrac`` become ``\\frac``; a trailing unit in ``\\text{ ...}`` goes;
    a leading decimal point gets its 0 (".5" -> "0.5"); a short left-hand side ("x = 5") goes;
    ``\\sqrt3`` and ``\\frac12`` get their braces; spaces go; "0.5" becomes ``\\frac{1}{2}`` and an
    integer ratio "a/b" becomes ``\\frac{a}{b}``.
    """
    text = answer.replace("\\\\", "\\")
    for token in _REMOVED:
        text = text.replace(token, "")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    if "\\text{ " in text:
        text = text.split("\\text{ ")[0]
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        text = sides[1]
    text = _SQRT_BARE_RE.sub(r"\\sqrt{\1}", text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _SLASH_RE.sub(r"\\frac{\1}{\2}", text)


def grade_pure(response: str, ground_truth: str | None) -> tuple[Verdict, str]:
    """PURE's training-time check: (verdict, the last box's content or ""). Only a box counts
    as an answer; it is CORRECT iff its normalised text equals the normalised gold answer."""
    answer = _last_boxed(response)
    if not has_ground_truth(ground_truth):
        return Verdict.NO_GROUND_TRUTH, answer or ""
    if answer is None:
        return Verdict.NO_ANSWER, ""
    same = normalize_answer(answer) == normalize_answer(gold_answer(ground_truth or ""))
    return (Verdict.CORRECT if same else Verdict.INCORRECT), answer
