"""The weight plane with TLS and subscriber tokens (issue 13), built as cli/learner.py builds it
(weight_store, learner_server, the WeightService in a ServiceHost) from LearnerSettings.weights.

Every WeightService RPC needs the token; a replica with the token syncs over the bulk port,
which speaks TLS and authenticates every connection with protocol 2's handshake before it sends
a byte of weights. Raw connections check the refusals: no handshake, a wrong token, a replayed
hello, another replica id after the handshake, plaintext against TLS. Only the authenticated
replica leaves a record with the learner.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
import torch

from puremesh.cli.learner import close_weights, learner_server, weight_servicer, weight_store
from puremesh.contract import bulk
from puremesh.contract.bulk import BulkStatus
from puremesh.rpc.client import open_channel
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ClientSecurity
from puremesh.trainer.settings import LearnerSettings
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc
from puremesh.weightsync import tcp_bulk
from puremesh.weightsync.bulk_server import BulkServer
from puremesh.weightsync.fetcher import WeightFetcher
from puremesh.weightsync.servicer import weight_service
from puremesh.weightsync.store import WeightStore
from puremesh.weightsync.transport import Announcement, FetchOptions

pytestmark = pytest.mark.asyncio(loop_scope="module")

WEIGHTS = [("a", torch.arange(50_000, dtype=torch.float32)), ("b", torch.ones(3, 7))]
REPLICA = "replica-0"


@dataclass
class Learner:
    host: ServiceHost
    store: WeightStore
    bulk: BulkServer


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=[True, False], ids=["tls", "hmac-only"])
async def learner(request, pki):
    """The learner's weight side with TLS, mTLS and tokens; the bulk port with TLS, or without
    (weights.bulk_tls false: authenticated, bytes in the clear)."""
    weights = {"bulk_chunk_bytes": 16 << 10, "bulk_tls": request.param, **pki.server_security("weights")}
    settings = LearnerSettings(policy_path="-", train_path="-", weights=weights)
    store, bulk_server = weight_store(settings.weights)
    host = ServiceHost([weight_service(weight_servicer(store, settings.weights))], learner_server(settings))
    await host.start()
    store.publish(1, WEIGHTS)
    yield Learner(host, store, bulk_server)
    close_weights(store, bulk_server)
    await host.drain(grace=0)


def security(pki, **overrides) -> ClientSecurity:
    return ClientSecurity(**{**pki.client_security("weights"), **overrides})


async def test_every_rpc_needs_the_subscriber_token(learner, pki):
    stub_security = security(pki, token_file="")
    async with open_channel(learner.host.target, security=stub_security) as channel:
        stub = weights_pb2_grpc.WeightServiceStub(channel)
        calls = {
            "WatchVersions": lambda md: stub.WatchVersions(
                weights_pb2.WatchVersionsRequest(replica_id="x"), metadata=md, timeout=5
            ).read(),
            "FetchWeights": lambda md: stub.FetchWeights(
                weights_pb2.FetchWeightsRequest(version=1, replica_id="x"), metadata=md, timeout=5
            ).read(),
            "DescribeVersion": lambda md: stub.DescribeVersion(
                weights_pb2.DescribeVersionRequest(version=1, replica_id="x"), metadata=md, timeout=5
            ),
            "ConfirmVersion": lambda md: stub.ConfirmVersion(
                weights_pb2.ConfirmVersionRequest(replica_id="x", version=1), metadata=md, timeout=5
            ),
        }
        for name, call in calls.items():
            for metadata in (None, (("authorization", f"Bearer {pki.token('prm')}"),)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    assert "x" not in learner.store.replicas


async def test_a_replica_with_the_token_syncs_over_the_authenticated_bulk_port(learner, pki):
    info = learner.store.current
    assert info is not None and info.bulk_protocol == bulk.PROTOCOL_AUTH
    assert info.bulk_tls == (learner.bulk.tls is not None)
    fallbacks = sum(tcp_bulk.BULK_FALLBACKS.labels(r)._value.get() for r in ("tls", "unauthenticated"))
    async with WeightFetcher(learner.host.target, REPLICA, FetchOptions(), security(pki)) as fetcher:
        call = fetcher.watch(0)
        announcement = Announcement.from_proto(await call.read())
        call.cancel()
        assert (announcement.bulk_protocol, announcement.bulk_tls) == (2, info.bulk_tls)
        assert fetcher.transport_for(announcement) is fetcher.transports[weights_pb2.TRANSPORT_TCP_BULK]
        fetched = await fetcher.download(announcement)
        assert [(n, t.tolist()) for n, t in fetched.tensors()] == [(n, t.tolist()) for n, t in WEIGHTS]
        await fetcher.confirm(fetched)
    after = sum(tcp_bulk.BULK_FALLBACKS.labels(r)._value.get() for r in ("tls", "unauthenticated"))
    assert after == fallbacks, "the bytes came over the bulk port, not FetchWeights"
    assert learner.store.replicas[REPLICA].version == 1


def raw(learner, pki, tls: bool = True) -> socket.socket:
    """A connection to the bulk port: TLS with the client certificate when the port has TLS."""
    sock = socket.create_connection(("127.0.0.1", learner.bulk.port), timeout=5)
    if learner.bulk.tls is None or not tls:
        return sock
    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(pki.path("client.crt"), pki.path("client.key"))
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset ends it too)."""
    chunks = []
    try:
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def challenge(sock: socket.socket) -> bytes:
    head = bulk.unpack_reply(bulk.recv_exact(sock, bulk.REPLY.size))
    assert (head.magic, head.status, head.length) == (bulk.MAGIC, BulkStatus.CHALLENGE, bulk.NONCE_BYTES)
    return bulk.recv_exact(sock, bulk.NONCE_BYTES)


def key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def refusal(data: bytes) -> tuple[int, str]:
    head = bulk.unpack_reply(data[: bulk.REPLY.size])
    return head.status, data[bulk.REPLY.size : bulk.REPLY.size + head.length].decode()


async def test_a_connection_without_the_handshake_gets_nothing_but_the_challenge(learner, pki):
    version = learner.store.get(1)
    with raw(learner, pki) as sock:
        sock.sendall(bulk.pack_request(1, 0, len(version.data), REPLICA.encode()))  # protocol 1
        received = read_all(sock)
    nonce, rest = received[16:48], received[48:]
    assert bulk.unpack_reply(received[:16]).status == BulkStatus.CHALLENGE and len(nonce) == 32
    status, message = refusal(rest)
    assert status == BulkStatus.UNAUTHENTICATED and "hello" in message
    assert len(rest) == bulk.REPLY.size + len(message.encode()), "not a byte of weights"
    assert bytes(version.data[:64]) not in received


async def test_a_wrong_token_and_a_replayed_hello_are_refused(learner, pki):
    with raw(learner, pki) as sock:
        sock.sendall(bulk.pack_hello(key(pki.token("prm")), challenge(sock), REPLICA.encode()))
        assert refusal(read_all(sock)) == (
            BulkStatus.UNAUTHENTICATED,
            "the hello's MAC matches no accepted token",
        )
    with raw(learner, pki) as first:
        hello = bulk.pack_hello(key(pki.token("weights")), challenge(first), REPLICA.encode())
        first.sendall(hello)
        assert bulk.unpack_reply(bulk.recv_exact(first, bulk.REPLY.size)).status == BulkStatus.OK
    with raw(learner, pki) as replay:
        assert challenge(replay) != hello[8:40]
        replay.sendall(hello)  # recorded on the first connection
        status, _ = refusal(read_all(replay))
        assert status == BulkStatus.UNAUTHENTICATED


async def test_requests_must_carry_the_authenticated_replica_id(learner, pki):
    learner.store.subscribed("someone-else", 0)  # a known id, but not this connection's
    with raw(learner, pki) as sock:
        sock.sendall(bulk.pack_hello(key(pki.token("weights")), challenge(sock), REPLICA.encode()))
        assert bulk.unpack_reply(bulk.recv_exact(sock, bulk.REPLY.size)).status == BulkStatus.OK
        sock.sendall(bulk.pack_request(1, 0, 8, b"someone-else", bulk.PROTOCOL_AUTH))
        status, message = refusal(read_all(sock))
    assert status == BulkStatus.BAD_REQUEST and "authenticated" in message
    assert learner.store.book._records["someone-else"].sent == {}
    learner.store.unsubscribed("someone-else")


async def test_plaintext_against_the_tls_bulk_port_fails(learner, pki):
    if learner.bulk.tls is None:
        pytest.skip("this bulk port is plaintext (bulk_tls false)")
    with raw(learner, pki, tls=False) as sock:
        sock.sendall(bulk.pack_hello(key(pki.token("weights")), bytes(32), REPLICA.encode()))
        assert b"PMWB" not in read_all(sock)
    context = ssl.create_default_context(cafile=pki.ca)  # no client certificate: mTLS refuses
    sock = socket.create_connection(("127.0.0.1", learner.bulk.port), timeout=5)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        challenge(tls)
