"""A learner's weight side on port 0 for the weight-sync tests, wired as cli/learner.py wires it:
the version store, the WeightService in a ServiceHost (whose interceptor maps the servicer's
domain errors), and optionally the bulk data plane announced with every version.

Every FetchWeights chunk the servicer produces is recorded in `fetched_chunks`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from puremesh.rpc.server import ServiceDefinition, ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.weightsync.bulk_server import BulkServer
from puremesh.weightsync.servicer import SERVICE_NAME, WeightServicer, add_weight_service_to_server
from puremesh.weightsync.store import DEFAULT_BULK_CHUNK_BYTES, WeightStore


@dataclasses.dataclass
class Learner:
    host: ServiceHost
    store: WeightStore
    servicer: WeightServicer
    bulk: BulkServer | None
    nccl: Any = None  # an NcclSender, when the learner has an NCCL plane
    fetched_chunks: list[int] = dataclasses.field(default_factory=list)  # FetchWeights chunk indices

    @property
    def target(self) -> str:
        return self.host.target

    @property
    def port(self) -> int:
        assert self.host.port is not None
        return self.host.port

    async def stop(self) -> None:
        self.store.close()  # ends the WatchVersions streams, so the drain need not wait
        if self.bulk is not None:
            self.bulk.close()
        if self.nccl is not None:
            self.nccl.close()
        await self.host.drain(grace=1)


async def start_learner(
    *,
    port: int = 0,
    chunk_bytes: int,
    bulk: bool = False,
    bulk_chunk_bytes: int = DEFAULT_BULK_CHUNK_BYTES,
    add_to_server: Callable = add_weight_service_to_server,
    nccl: Callable[[WeightStore], Any] | None = None,
) -> Learner:
    """A started learner; `add_to_server` may be the generated function (chunks then go out as
    WeightChunk messages rather than pre-encoded bytes); `nccl(store)` makes its NcclSender
    (the versions are then announced with TRANSPORT_NCCL)."""
    store = WeightStore(retain=2, chunk_bytes=chunk_bytes, bulk_chunk_bytes=bulk_chunk_bytes)
    bulk_server = None
    if bulk:
        bulk_server = BulkServer(store, "127.0.0.1")
        store.offer_bulk(bulk_server.port)
    sender = nccl(store) if nccl is not None else None
    if sender is not None:
        store.offer_nccl()
    servicer = WeightServicer(store, nccl=sender)
    definition = ServiceDefinition("weights", SERVICE_NAME, servicer, add_to_server)
    host = ServiceHost([definition], ServerSettings(port=port, metrics_port=None))
    await host.start()
    learner = Learner(host, store, servicer, bulk_server, sender)
    produce = servicer.chunk

    def record(stored, index, chunk_bytes, with_manifest):
        learner.fetched_chunks.append(index)
        return produce(stored, index, chunk_bytes, with_manifest)

    servicer.chunk = record
    return learner
