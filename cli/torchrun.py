"""`--nproc-per-node N` of `puremesh up`, `train` and `demo`: the learner's ranks on this node,
spawned by torch.distributed's own launcher (torch.distributed.run, the engine of `torchrun`).

The command runs again under the launcher as N processes (`--standalone`: a rendezvous on a
free local port). Rank 0 does what the single-process command does (it starts the services for
`up`, hosts the WeightService, trains and prints the result); the other ranks follow it
(trainer/controller.py). On a cluster, run torchrun yourself (README, "Training on many GPUs").
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import yaml
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser
from torch.distributed.run import run as torch_distributed_run

from puremesh.trainer.loop import RunResult, read_result

from .errors import CliError
from .process_mesh import run_mesh
from .run_settings import RunSettings

MODULE = "puremesh.cli.main"


def add_nproc_flag(parser) -> None:
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="learner ranks on this node (torch.distributed; default 1: one process, as before)",
    )


def launch(nproc: int, argv: list[str]) -> None:
    """Run `puremesh ARGV` as `nproc` ranks under torch.distributed.run; CliError, one line, when
    a rank fails (its own error is in the output above)."""
    if nproc < 1:
        raise CliError(f"--nproc-per-node must be >= 1, got {nproc}")
    # torchrun would pin every rank to one thread; share the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module", MODULE, *argv]
    )
    try:
        torch_distributed_run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        raise CliError(
            f"learner rank {rank} of {nproc} failed (exit code {failure.exitcode}); its error is above",
            exit_code=1,
        ) from None


def run_ranks(settings: RunSettings, nproc: int, command: str = "up", resume: bool = False) -> RunResult:
    """`puremesh COMMAND` with these settings on `nproc` ranks; the run's RunResult (rank 0
    writes it to the learner's out_dir)."""
    out = Path(settings.learner.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "run-settings.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    launch(nproc, [command, "--config", str(config), *(["--resume"] if resume else [])])
    return read_result(out)


def run_local_mesh(settings: RunSettings, nproc: int = 1) -> RunResult:
    """`puremesh up` with these settings: in this process for one rank, else on `nproc` ranks."""
    if nproc == 1:
        return asyncio.run(run_mesh(settings))
    return run_ranks(settings, nproc)
