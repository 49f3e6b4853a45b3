"""The learner process: host the WeightService, connect to the services, train.

Shared by `puremesh train` (services already running), `puremesh up` (cli/process_mesh.py) and
`puremesh up --ray` (cli/ray_mesh.py), which start the services once the WeightService runs.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from puremesh.rpc.auth import SecurityError, TokenFile, check_exposure, server_ssl_context
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ServerSecurity, ServerSettings, log_settings
from puremesh.trainer import checkpoint
from puremesh.trainer.backends import BackendError
from puremesh.trainer.failover import ServiceUnreachable
from puremesh.trainer.loop import Mesh, RunResult, train
from puremesh.trainer.settings import LearnerSettings, WeightServerSettings
from puremesh.weightsync import runs
from puremesh.weightsync.bulk_server import BulkServer
from puremesh.weightsync.nccl_group import VllmNccl
from puremesh.weightsync.nccl_sender import NcclSender
from puremesh.weightsync.servicer import WeightServicer, weight_service
from puremesh.weightsync.store import WeightStore

from .adapters import MeshRollout, MeshScorer, MeshVerifier
from .errors import CliError
from .prm_tokens import PolicySteps

log = logging.getLogger(__name__)


async def learn(
    learner: LearnerSettings,
    replicas: int,
    resume: bool,
    on_weights_ready=None,
    progress: bool = True,
    on_step=None,
) -> RunResult:
    """Host the WeightService, connect to the services, train. A service that stays
    unreachable (trainer/failover.py) ends the run with one line naming it (CliError)."""
    out = Path(learner.out_dir)
    run = runs.open_run(out, checkpoint.latest(out) if resume else None)
    store, bulk, host = await serve_weights(learner, run, out / runs.RUN_FILE)
    log_settings("learner", learner)
    if bulk is not None:
        log.info("weights: gRPC on %s, bulk data plane on port %d", host.target, bulk.port)
    try:
        if on_weights_ready is not None:
            learner = await on_weights_ready(host.target, learner)
        mesh = connect(learner, store, run.run_id, replicas)
        try:
            await check_tokenizer(mesh.scorer, learner.policy_path)
            return await train(learner, mesh, resume=resume, progress=progress, on_step=on_step)
        except ServiceUnreachable as error:
            raise CliError(f"training stopped: {error}", exit_code=1) from None
        finally:
            await asyncio.gather(
                mesh.rollout.pool.close(), mesh.scorer.pool.close(), mesh.verifier.pool.close()
            )
    finally:
        close_weights(store, bulk)  # ends the WatchVersions streams, so the drain need not wait
        await host.drain(grace=1)


async def check_tokenizer(scorer: MeshScorer, policy_path: str) -> None:
    """The PRM tokenizer check at start (cli/prm_tokens.py); a PRM that cannot say which
    tokenizer it has is one CliError line."""
    from transformers import AutoTokenizer

    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, policy_path, local_files_only=True)
    try:
        await scorer.check_tokenizer(await asyncio.to_thread(PolicySteps, tokenizer))
    except BackendError as error:
        raise CliError(f"cannot ask the PRM for its tokenizer: {error}", exit_code=1) from None


def connect(learner: LearnerSettings, store: WeightStore, run_id: str, replicas: int) -> Mesh:
    """The clients of the services at learner.endpoints, each with its TLS and token file
    (endpoints.security); an unreadable token file is one CliError line."""
    endpoints = learner.endpoints
    timeout, apps, policy = endpoints.call_timeout_seconds, endpoints.applications, endpoints.failover
    security = endpoints.security
    try:
        return Mesh(
            MeshRollout(
                endpoints.rollout, timeout, apps.get("rollout", ""), policy, run_id, security.get("rollout")
            ),
            MeshScorer(endpoints.prm, timeout, apps.get("prm", ""), policy, security.get("prm")),
            MeshVerifier(endpoints.verify, timeout, apps.get("verify", ""), policy, security.get("verify")),
            store,
            replicas=replicas,
        )
    except SecurityError as error:
        raise CliError(f"learner.endpoints.security: {error}") from None


async def serve_weights(
    learner: LearnerSettings, run: runs.RunRecord, run_file: Path
) -> tuple[WeightStore, BulkServer | None, ServiceHost]:
    """The version store, its bulk port and the started WeightService; a security setting that
    cannot be applied (a missing certificate or token file, an exposed plaintext bind) is one
    CliError line."""
    try:
        store, bulk = weight_store(learner.weights, run, run_file)
    except SecurityError as error:
        raise CliError(f"learner.weights: {error}") from None
    try:
        host = ServiceHost([weight_service(weight_servicer(store, learner.weights))], learner_server(learner))
        await host.start()
    except BaseException as error:
        close_weights(store, bulk)
        if isinstance(error, SecurityError):
            raise CliError(f"learner.weights: {error}") from None
        raise
    return store, bulk, host


def learner_server(learner: LearnerSettings) -> ServerSettings:
    """The learner's server: the WeightService on weights.host:port with the weights' TLS and
    subscriber tokens, /metrics on metrics_port (bound on weights.host too: the address
    replicas and the ServiceMonitor both reach)."""
    weights = learner.weights
    security = weights.model_dump(include=set(ServerSecurity.model_fields))
    return ServerSettings(host=weights.host, port=weights.port, metrics_port=learner.metrics_port, **security)


def weight_store(
    weights: WeightServerSettings, run: runs.RunRecord | None = None, run_file: Path | None = None
) -> tuple[WeightStore, BulkServer | None]:
    """The learner's version store of `run` (whose highest version goes to `run_file` before each
    announcement) and, when `weights.bulk`, its bulk data plane (bound now), announced with every
    version; both within `weights.limits`. The bulk port takes the WeightService's TLS (unless
    weights.bulk_tls is false) and authenticates every connection with its tokens (rpc/auth.py);
    a non-loopback host without TLS and tokens is refused (SecurityError) unless insecure."""
    check_exposure(weights.host, weights, "the weight plane")
    limits = weights.limits
    store = WeightStore(
        retain=weights.retain_versions,
        chunk_bytes=weights.chunk_bytes,
        bulk_chunk_bytes=weights.bulk_chunk_bytes,
        run_id=run.run_id if run else "",
        run_file=run_file,
        published=run.published if run else 0,
        max_buffers=limits.max_buffers or None,
        revoke_wait_s=limits.revoke_wait_seconds,
        replica_ttl_s=limits.replica_ttl_seconds,
        max_replica_records=limits.max_replica_records,
    )
    if not weights.bulk:
        return store, None
    bulk = BulkServer(
        store,
        weights.host,
        weights.bulk_port,
        max_connections=limits.max_bulk_connections,
        max_connections_per_peer=limits.max_bulk_connections_per_peer,
        header_timeout_s=limits.bulk_header_timeout_seconds,
        idle_timeout_s=limits.bulk_idle_timeout_seconds,
        transfer_grace_s=limits.transfer_grace_seconds,
        min_bytes_per_second=limits.min_transfer_bytes_per_second,
        tls=server_ssl_context(weights) if weights.bulk_tls else None,
        keys=TokenFile(weights.auth_tokens).keys if weights.auth_tokens else None,
    )
    store.offer_bulk(bulk.port, weights.bulk_advertise_host, bulk.protocol, bulk.tls is not None)
    return store, bulk


def nccl_sender(store: WeightStore, weights: WeightServerSettings) -> NcclSender | None:
    """The learner's NCCL groups when weights.nccl is on and this process can run NCCL (then the
    store announces TRANSPORT_NCCL); otherwise None, warned once when it was asked for."""
    if not weights.nccl:
        return None
    backend = VllmNccl()
    reason = backend.unavailable()
    if reason is not None:
        log.warning("learner.weights.nccl: %s; replicas receive over the bulk port or FetchWeights", reason)
        return None
    limits = weights.limits
    sender = NcclSender(
        store,
        backend,
        weights.nccl_device,
        setup_timeout_s=limits.nccl_setup_timeout_seconds,
        max_groups=limits.max_nccl_groups,
        chunk_bytes=weights.nccl_chunk_bytes,
        min_bytes_per_second=limits.nccl_min_bytes_per_second,
    )
    store.offer_nccl()
    return sender


def weight_servicer(store: WeightStore, weights: WeightServerSettings) -> WeightServicer:
    limits = weights.limits
    return WeightServicer(
        store,
        limits.max_watchers,
        limits.max_fetches,
        transfer_grace_s=limits.transfer_grace_seconds,
        min_bytes_per_second=limits.min_transfer_bytes_per_second,
        nccl=nccl_sender(store, weights),
    )


def close_weights(store: WeightStore, bulk: BulkServer | None) -> None:
    """Stop serving weights: the store's streams end, the bulk port and its connections close."""
    store.close()
    if bulk is not None:
        bulk.close()
