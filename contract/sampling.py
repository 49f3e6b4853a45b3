"""Sampling parameters and finished samples: what the learner asks a rollout replica for, and what
comes back. One definition for the engines, the rollout servicer and client, and the learner;
services/rollout/wire.py is the only place that maps them onto the protobuf messages.

Semantics every engine backend follows (they follow vLLM where vLLM and transformers differ):
- temperature < GREEDY_TEMPERATURE is greedy (argmax; top_p and seed are ignored); a positive
  temperature below MIN_SAMPLING_TEMPERATURE is raised to it (vLLM does so to avoid inf/nan).
- with a seed, sample i draws from a generator seeded with seed + i (reproducible per engine,
  version and hardware; two backends do not draw the same samples from the same seed).
- stop strings: a sample stops at the token whose decoded text completes a stop string; that
  token is kept (token_ids and text include the stop string; text is decode(token_ids) and may
  run a few characters past the stop string when the stop string ends inside a token).
- end of sequence is the tokenizer's eos token; it is kept in token_ids (and skipped in text).
  Precedence when several apply at one token: eos, then a stop string (STOP), then the length
  limit (LENGTH).

Log-probabilities. `Sample.logprobs[i]` is the natural-log probability of `token_ids[i]` under
the distribution the token was drawn from: the model's logits divided by the temperature, then
restricted to the top-p nucleus and renormalised (tokens outside the nucleus have probability
0). For greedy decoding it is the model's plain log_softmax. This is vLLM's
`logprobs_mode="processed_logprobs"`; it is what the proto promises (GenerateResponse.logprobs).
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

# Sampling conventions (vLLM's, vllm/sampling_params.py: _SAMPLING_EPS and _MAX_TEMP).
GREEDY_TEMPERATURE = 1e-5
MIN_SAMPLING_TEMPERATURE = 1e-2
MAX_SEED = 2**63 - 1

# Default request limits of `SamplingSpec.validate`; a service passes its own from its settings.
DEFAULT_MAX_N = 64
DEFAULT_MAX_NEW_TOKENS = 4096
DEFAULT_MAX_STOP_STRINGS = 8
DEFAULT_MAX_STOP_LENGTH = 128


class FinishReason(enum.StrEnum):
    """Why a sample ended (see the precedence in the module docstring)."""

    STOP = "stop"  # eos or a stop string
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # cut short: the caller went away or the engine closed
    UNSPECIFIED = "unspecified"  # the wire carried no reason this side knows (a newer server)


def is_integer(value: object) -> bool:
    """An integral number that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample the responses to one prompt. `validate` checks the ranges."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(
        self,
        *,
        max_n: int = DEFAULT_MAX_N,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS,
        max_stop_length: int = DEFAULT_MAX_STOP_LENGTH,
    ) -> None:
        """Raise ValueError, naming the field, the allowed range and the value, if out of range."""
        self._check_numbers(max_n, max_new_tokens)
        self._check_stop(max_stop_strings, max_stop_length)

    @property
    def greedy(self) -> bool:
        """True when the temperature means greedy decoding (argmax; top_p and seed are ignored)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def sampling_temperature(self) -> float:
        """The temperature actually applied when sampling (see the module docstring)."""
        return max(float(self.temperature), MIN_SAMPLING_TEMPERATURE)

    def _check_numbers(self, max_n: int, max_new_tokens: int) -> None:
        if not is_integer(self.n) or not 1 <= self.n <= max_n:
            raise ValueError(f"n must be an integer in [1, {max_n}], got {self.n!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_integer(self.max_new_tokens) or not 1 <= self.max_new_tokens <= max_new_tokens:
            raise ValueError(
                f"max_new_tokens must be an integer in [1, {max_new_tokens}], got {self.max_new_tokens!r}"
            )
        if self.seed is not None and (
            not is_integer(self.seed) or self.seed < 0 or self.seed + self.n - 1 > MAX_SEED
        ):
            raise ValueError(f"seed must be None or an integer in [0, 2**63 - n], got {self.seed!r}")

    def _check_stop(self, max_stop_strings: int, max_stop_length: int) -> None:
        if isinstance(self.stop, str | bytes) or not isinstance(self.stop, Sequence):
            raise ValueError(f"stop must be a list of strings, got {type(self.stop).__name__}")
        if len(self.stop) > max_stop_strings:
            raise ValueError(f"at most {max_stop_strings} stop strings are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= max_stop_length:
                raise ValueError(
                    f"each stop string must be a non-empty str of at most {max_stop_length} chars, got {s!r}"
                )


@dataclass(frozen=True)
class Sample:
    """One finished response to a prompt, tagged with the policy version that produced it.

    token_ids: the generated tokens (eos included when generated); logprobs: one per token (see
    the module docstring); text: decode(token_ids), special tokens skipped; sample_index: which
    of the request's n samples, in [0, n); prompt_token_count: the prompt's length in tokens;
    run_id: the learner run of policy_version ("" = the weights from disk, version 0).
    """

    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int
    prompt_token_count: int
    text: str
    run_id: str = ""
