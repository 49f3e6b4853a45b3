"""The ledger of prompts and samples, OUT/ledger.jsonl: what happened to every prompt the learner
drew and every sample it received, so that a run can show that nothing was lost or used twice.

The collector (collector.py) appends one JSON line per event, each tagged with the step being
collected and the prompt's key (its draw position in the problem stream, [epoch, index]):

    drawn      a prompt taken from the stream
    generated  an attempt's samples arrived: [sample index, policy version, run id] each
    used       an attempt's samples went into the step's update, at the learner's version
    discarded  an attempt's samples were thrown away (a later call failed, another run, ...)
    abandoned  a prompt given up for good (attempts exhausted, stale, the run ended)

`--resume` continues from a checkpoint at step c: the records of later steps describe updates
that the checkpoint does not contain, so they move to OUT/ledger.rolled-back.jsonl and the run
redraws those prompts (the checkpoint's data position). A fresh run starts a new ledger (the old
one is kept as OUT/ledger.<n>.jsonl). With max_staleness > 0 the prompts in flight when the
learner dies are not redrawn on resume; `audit` counts them as lost.

`audit(path)` reads a ledger back: prompts and samples lost (drawn or generated, never used nor
dropped) or used twice, and the samples used with another run's or a wrong policy version (the
weights from disk, version 0 of no run, are every fresh run's starting policy).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEDGER_FILE = "ledger.jsonl"
ROLLED_BACK_FILE = "ledger.rolled-back.jsonl"
Key = tuple[int, int]


class Ledger:
    """Appends events to `path`; `step` is the step being collected (the collector moves it)."""

    def __init__(self, path: Path, step: int = 0) -> None:
        self.path = Path(path)
        self.step = step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    @classmethod
    def open(cls, out_dir: Path, resume_step: int | None) -> Ledger:
        """The run's ledger: a new one (`resume_step` None), or the existing one rolled back to
        the records of steps <= resume_step."""
        path = Path(out_dir) / LEDGER_FILE
        if resume_step is None:
            if path.exists():
                index = 1 + sum(1 for _ in path.parent.glob("ledger.[0-9]*.jsonl"))
                path.replace(path.with_name(f"ledger.{index}.jsonl"))
            return cls(path, 0)
        keep, later = [], []
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            if line.strip():
                (keep if json.loads(line)["step"] <= resume_step else later).append(line)
        if later:
            with path.with_name(ROLLED_BACK_FILE).open("a", encoding="utf-8") as handle:
                handle.write("".join(f"{line}\n" for line in later))
        partial = path.with_name(f".{LEDGER_FILE}.partial")
        partial.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
        partial.replace(path)
        return cls(path, resume_step)

    def write(self, event: str, key: Key, **fields: Any) -> None:
        record = {"event": event, "step": self.step, "prompt": list(key), **fields}
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()  # a killed learner loses no line the kernel has

    def close(self) -> None:
        self._handle.close()


@dataclass
class Audit:
    """What a ledger says (see `audit`)."""

    prompts_drawn: int = 0
    prompts_used: int = 0
    prompts_abandoned: int = 0
    prompts_lost: list[Key] = field(default_factory=list)
    prompts_used_twice: list[Key] = field(default_factory=list)
    samples_generated: int = 0
    samples_used: int = 0
    samples_dropped: int = 0
    samples_lost: int = 0
    samples_used_twice: int = 0
    wrong_versions: int = 0  # used samples of another run, newer than the learner, or too old
    groups_per_step: dict[int, int] = field(default_factory=dict)
    runs: set[str] = field(default_factory=set)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def audit(path: Path, run_id: str, max_staleness: int = 0) -> Audit:
    """Check a ledger: every drawn prompt used exactly once or abandoned, every generated sample
    used exactly once or discarded, every used sample of `run_id` at a version within
    `max_staleness` of the learner's and not newer."""
    result = Audit()
    generated: dict[tuple[Key, int], list[list]] = {}
    used: Counter[tuple[Key, int]] = Counter()
    discarded: Counter[tuple[Key, int]] = Counter()
    drawn: set[Key] = set()
    abandoned: set[Key] = set()
    groups: defaultdict[int, int] = defaultdict(int)
    for record in _records(path):
        key, event = (record["prompt"][0], record["prompt"][1]), record["event"]
        attempt = (key, record.get("attempt", 0))
        if event == "drawn":
            drawn.add(key)
        elif event == "generated":
            generated[attempt] = record["samples"]
            result.runs.update(run for _, _, run in record["samples"])
        elif event == "used":
            used[attempt] += 1
            groups[record["step"]] += 1
            result.wrong_versions += _wrong(generated.get(attempt, []), record, run_id, max_staleness)
        elif event == "discarded":
            discarded[attempt] += 1
        elif event == "abandoned":
            abandoned.add(key)
    _tally_samples(result, generated, used, discarded)
    _tally_prompts(result, drawn, abandoned, used)
    result.groups_per_step = dict(sorted(groups.items()))
    return result


def _wrong(samples: list[list], used: dict, run_id: str, max_staleness: int) -> int:
    version = used["version"]
    return sum(
        run not in (run_id, "") or (run == "" and held != 0) or not 0 <= version - held <= max_staleness
        for _, held, run in samples
    )


def _tally_samples(result: Audit, generated: dict, used: Counter, discarded: Counter) -> None:
    for attempt, samples in generated.items():
        n, outcomes = len(samples), used[attempt] + discarded[attempt]
        result.samples_generated += n
        if outcomes == 0:
            result.samples_lost += n
        elif used[attempt] and outcomes > 1:
            result.samples_used_twice += n
        elif used[attempt]:
            result.samples_used += n
        else:
            result.samples_dropped += n


def _tally_prompts(result: Audit, drawn: set[Key], abandoned: set[Key], used: Counter) -> None:
    uses: Counter[Key] = Counter()
    for (key, _), count in used.items():
        uses[key] += count
    result.prompts_drawn = len(drawn)
    result.prompts_used = sum(1 for key in drawn if uses[key])
    result.prompts_abandoned = len({key for key in abandoned if not uses[key]})
    result.prompts_used_twice = sorted(key for key, count in uses.items() if count > 1)
    result.prompts_lost = sorted(key for key in drawn if not uses[key] and key not in abandoned)
