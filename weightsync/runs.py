"""The learner run's identity: a run id and the highest version it ever published.

A learner that starts fresh mints a new run id; `--resume` keeps the id of the checkpoint it
resumes from. Every announcement, sample and checkpoint carries the id (weights.proto,
rollout.proto), so that a replica that outlived an earlier run switches to the new one and the
learner never trains on another run's samples.

The run file, OUT/run.json, holds the id and the highest version published so far. The store
(store.py) writes it *before* it announces a version, so a resumed learner continues above every
version its lost predecessor announced, without trusting any version a client reports (a
spoofed one could push it past what an announcement carries). Each checkpoint gets a copy
(`stamp`), which names the run it belongs to.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from puremesh.contract.weights import MAX_VERSION

RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunRecord:
    """run_id: 16 hex digits; published: the highest version announced (0: none yet)."""

    run_id: str
    published: int = 0


def mint_run_id() -> str:
    return secrets.token_hex(8)


def read(path: Path) -> RunRecord | None:
    """The record at `path`; None if there is none. ValueError if it is malformed."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a run file: {error}") from error
    run_id, published = raw.get("run_id"), raw.get("published", 0)
    if not isinstance(run_id, str) or not run_id or not isinstance(published, int):
        raise ValueError(f"{path} is not a run file: {raw!r}")
    if not 0 <= published <= MAX_VERSION:
        raise ValueError(f"{path}: published version {published} is outside [0, {MAX_VERSION}]")
    return RunRecord(run_id, published)


def write(path: Path, record: RunRecord) -> None:
    """Write `record` atomically (and durably: it must survive the learner's death)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8") as handle:
        json.dump(asdict(record), handle)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def open_run(out_dir: Path, checkpoint: Path | None) -> RunRecord:
    """The run a learner continues: the run of `checkpoint` (its stamp, else OUT/run.json) with
    the highest version OUT/run.json says it published; a fresh run (new id, nothing published)
    without a checkpoint. Writes OUT/run.json."""
    current = read(out_dir / RUN_FILE)
    if checkpoint is None:
        record = RunRecord(mint_run_id())
    else:
        stamped = read(checkpoint / RUN_FILE) or current
        run_id = stamped.run_id if stamped is not None else mint_run_id()
        published = current.published if current is not None and current.run_id == run_id else 0
        record = RunRecord(run_id, max(published, stamped.published if stamped else 0))
    write(out_dir / RUN_FILE, record)
    return record


def stamp(checkpoint: Path, out_dir: Path) -> None:
    """Copy OUT/run.json into a checkpoint folder: the checkpoint names its run."""
    source = out_dir / RUN_FILE
    if source.exists():
        shutil.copyfile(source, checkpoint / RUN_FILE)
