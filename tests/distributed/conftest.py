"""Distributed tests: real torch.distributed (gloo) ranks on this machine, spawned by
torch.distributed's elastic launcher (the engine under torchrun). Kept small: tiny models, a few
updates, 2 ranks."""

from __future__ import annotations

import uuid

import pytest
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def launch(function, nproc: int, *args):
    """Run `function(*args)` on `nproc` local ranks; {rank: return value}."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"test-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    return elastic_launch(config, function)(*args)


@pytest.fixture
def launcher():
    return launch
