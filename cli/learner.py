"""The learner process: host the WeightService, connect to the services, train.

Shared by `puremesh train` (services already running), `puremesh up` (cli/process_mesh.py) and
`puremesh up --ray` (cli/ray_mesh.py), which start the services once the WeightService runs.
"""

from __future__ import annotations

import asyncio
import logging

from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ServerSettings, log_settings
from puremesh.trainer.loop import Mesh, RunResult, train
from puremesh.trainer.settings import LearnerSettings, WeightServerSettings
from puremesh.weightsync.bulk_server import BulkServer
from puremesh.weightsync.servicer import WeightServicer, weight_service
from puremesh.weightsync.store import WeightStore

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
    store, bulk = weight_store(learner.weights)
    host = ServiceHost(
        [weight_service(WeightServicer(store))],
        ServerSettings(
            host=learner.weights.host, port=learner.weights.port, metrics_port=learner.metrics_port
        ),
    )
    try:
        await host.start()
    except BaseException:
        close_weights(store, bulk)
        raise
    log_settings("learner", learner)
    if bulk is not None:
        log.info("weights: gRPC on %s, bulk data plane on port %d", host.target, bulk.port)
    try:
        if on_weights_ready is not None:
            learner = await on_weights_ready(host.target, learner)
        timeout = learner.endpoints.call_timeout_seconds
        apps = learner.endpoints.applications
        mesh = Mesh(
            MeshRollout(learner.endpoints.rollout, timeout, apps.get("rollout", "")),
            MeshScorer(learner.endpoints.prm, timeout, apps.get("prm", "")),
            MeshVerifier(learner.endpoints.verify, timeout, apps.get("verify", "")),
            store,
            replicas=replicas,
        )
        try:
            return await train(learner, mesh, resume=resume, progress=progress, on_step=on_step)
        finally:
            await asyncio.gather(
                mesh.rollout.pool.close(), mesh.scorer.pool.close(), mesh.verifier.pool.close()
            )
    finally:
        close_weights(store, bulk)  # ends the WatchVersions streams, so the drain need not wait
        await host.drain(grace=1)


def weight_store(weights: WeightServerSettings) -> tuple[WeightStore, BulkServer | None]:
    """The learner's version store and, when `weights.bulk`, its bulk data plane (bound now),
    announced with every version."""
    store = WeightStore(
        retain=weights.retain_versions,
        chunk_bytes=weights.chunk_bytes,
        bulk_chunk_bytes=weights.bulk_chunk_bytes,
    )
    if not weights.bulk:
        return store, None
    bulk = BulkServer(store, weights.host, weights.bulk_port)
    store.offer_bulk(bulk.port, weights.bulk_advertise_host)
    return store, bulk


def close_weights(store: WeightStore, bulk: BulkServer | None) -> None:
    """Stop serving weights: the store's streams end, the bulk port and its connections close."""
    store.close()
    if bulk is not None:
        bulk.close()
