"""`puremesh export --checkpoint DIR --out DIR`: a sharded learner checkpoint (trainer/checkpoint.py)
as one Hugging Face model directory (config, generation config, tokenizer, safetensors) that
transformers, vLLM and `puremesh eval` load.

DIR is a checkpoint (OUT/checkpoints/step-N) or a run's out_dir (its newest checkpoint). The
shards are read in this one process, whatever the rank count that wrote them (DCP reshards on
load), through trainer/safe_dcp.py: nothing is unpickled. Memory: one full copy of the model.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from puremesh.trainer import checkpoint
from puremesh.trainer.safe_dcp import UnsafeCheckpoint
from puremesh.trainer.settings import PolicyDtype

from .errors import CliError


def register(sub: argparse._SubParsersAction) -> None:
    helptext = "write a learner checkpoint as a Hugging Face model directory"
    parser = sub.add_parser("export", help=helptext, description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, or a run's out_dir (its newest)")
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument(
        "--dtype",
        choices=[str(d) for d in PolicyDtype],
        default=str(PolicyDtype.FLOAT32),
        help="dtype of the written weights (default: %(default)s, the master weights as trained)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = export(Path(args.checkpoint), Path(args.out), PolicyDtype(args.dtype))
    print(f"exported {out}")
    return 0


def resolve(path: Path) -> Path:
    """The checkpoint directory `path` names (itself, or the newest under a run's out_dir)."""
    if (path / checkpoint.STATE_FILE).exists():
        return path
    found = checkpoint.latest(path)
    if found is None:
        raise CliError(f"{path}: neither a checkpoint nor a run directory with checkpoints")
    return found


def export(source: Path, out: Path, dtype: PolicyDtype = PolicyDtype.FLOAT32) -> Path:
    """Write the checkpoint at `source` to `out` as a Hugging Face model directory; returns `out`."""
    found = resolve(source)
    try:
        checkpoint.read_state(found)
        model_dir = found / checkpoint.MODEL_DIR
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.to_empty(device="cpu")
        state = model.state_dict()
        checkpoint.load_shards({"model": state}, found, no_dist=True)
    except (checkpoint.CheckpointMismatch, UnsafeCheckpoint, OSError, ValueError) as error:
        raise CliError(f"{found}: cannot export ({error})", exit_code=1) from None
    model.load_state_dict(state, strict=False)  # the tensors were filled in place; ties stay tied
    model.to(getattr(torch, str(dtype)))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for item in model_dir.iterdir():  # tokenizer and generation config, as the policy had them
        if item.is_file() and item.name != "config.json":
            shutil.copy2(item, out / item.name)
    return out
