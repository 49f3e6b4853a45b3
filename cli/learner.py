"""The learner process: host the WeightService, connect to the services, train.

Shared by `puremesh train` (services already running), `puremesh up` (cli/process_mesh.py) and
`puremesh up --ray` (cli/ray_mesh.py), which start the services once the WeightService runs.
"""

from __future__ import annotations

import asyncio
import logging

from puremesh.rpc.server import ServiceDefinition, ServiceHost
from puremesh.rpc.settings import ServerSettings, log_settings
from puremesh.trainer.loop import Mesh, RunResult, train
from puremesh.trainer.settings import LearnerSettings
from puremesh.trainer.weights import WeightPublisher, WeightServicer, add_weight_service_to_server

from .adapters import MeshRollout, MeshScorer, MeshVerifier

log = logging.getLogger(__name__)


async def learn(
    learner: LearnerSettings,
    replicas: int,
    resume: bool,
    on_weights_ready=None,
    progress: bool = True,
    on_step=None,
) -> RunResult:
    """Host the WeightService, connect to the services, train."""
    weights = learner.weights
    publisher = WeightPublisher(
        retain=weights.retain_versions,
        chunk_bytes=weights.chunk_bytes,
        bulk_chunk_bytes=weights.bulk_chunk_bytes,
        bulk_host=weights.host if weights.bulk else None,
        bulk_port=weights.bulk_port,
        bulk_advertise_host=weights.bulk_advertise_host,
    )
    host = ServiceHost(
        [
            ServiceDefinition(
                "weights",
                "puremesh.weights.v1.WeightService",
                WeightServicer(publisher),
                add_weight_service_to_server,
            )
        ],
        ServerSettings(
            host=learner.weights.host, port=learner.weights.port, metrics_port=learner.metrics_port
        ),
    )
    try:
        await host.start()
    except BaseException:
        publisher.close()  # stops the bulk data plane's threads
        raise
    log_settings("learner", learner)
    if publisher.bulk is not None:
        log.info("weights: gRPC on %s, bulk data plane on port %d", host.target, publisher.bulk_port)
    try:
        if on_weights_ready is not None:
            learner = await on_weights_ready(host.target, learner)
        timeout = learner.endpoints.call_timeout_seconds
        apps = learner.endpoints.applications
        mesh = Mesh(
            MeshRollout(learner.endpoints.rollout, timeout, apps.get("rollout", "")),
            MeshScorer(learner.endpoints.prm, timeout, apps.get("prm", "")),
            MeshVerifier(learner.endpoints.verify, timeout, apps.get("verify", "")),
            publisher,
            replicas=replicas,
        )
        try:
            return await train(learner, mesh, resume=resume, progress=progress, on_step=on_step)
        finally:
            await asyncio.gather(
                mesh.rollout.pool.close(), mesh.scorer.pool.close(), mesh.verifier.pool.close()
            )
    finally:
        publisher.close()
        await host.drain(grace=1)
