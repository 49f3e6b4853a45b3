"""TLS and tokens on the real servers (issue 13): rollout, prm, verify and the WeightService,
each in its own ServiceHost on port 0 with its own token file, TLS and required client
certificates (mTLS), certificates made by the README's openssl block (tests/pki.py).

For each server: no token, a wrong token and another server's token are UNAUTHENTICATED; the
right one passes through the Python clients; a client that trusts another CA, or brings no
client certificate, does not get through TLS; reflection needs the token; grpc.health.v1 does
not, and the plaintext health port serves it alone. Tokens appear in no error, log or metric,
and a rotated token file takes effect without a restart.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import ssl
import threading
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY, generate_latest

from puremesh.contract.services import SERVICES, WEIGHT_SERVICE
from puremesh.prm.v1 import prm_pb2, prm_pb2_grpc
from puremesh.rollout.v1 import rollout_pb2, rollout_pb2_grpc
from puremesh.rpc import auth
from puremesh.rpc.client import RpcError, open_channel
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ClientSecurity, ServerSettings
from puremesh.services.prm.app import prm_service
from puremesh.services.prm.client import PrmClient
from puremesh.services.prm.settings import PrmSettings
from puremesh.services.rollout.app import rollout_service
from puremesh.services.rollout.client import RolloutClient
from puremesh.services.rollout.settings import RolloutSettings
from puremesh.services.verify.app import verify_service
from puremesh.services.verify.client import VerifyClient
from puremesh.services.verify.settings import VerifySettings
from puremesh.verify.v1 import verify_pb2, verify_pb2_grpc
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc
from puremesh.weightsync.servicer import WeightServicer, weight_service
from puremesh.weightsync.store import WeightStore

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVERS = ("rollout", "prm", "verify", "weights")
FULL_NAMES = {**{str(name): info.proto_service for name, info in SERVICES.items()}, "weights": WEIGHT_SERVICE}
WEIGHTS = [("w", torch.arange(64, dtype=torch.float32))]


def definition(name: str, server: ServerSettings, policy: Path, prm: Path, store: WeightStore):
    if name == "rollout":
        return rollout_service(RolloutSettings(model_path=str(policy), max_new_tokens=4, server=server))
    if name == "prm":
        return prm_service(PrmSettings(model_path=str(prm), server=server))
    if name == "verify":
        return verify_service(VerifySettings(workers=1, server=server))
    return weight_service(WeightServicer(store))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hosts(pki, tiny_policy_dir, tiny_prm_dir, tmp_path_factory):
    """The four servers, each with TLS, mTLS, its own token file and a plaintext health port.
    The token files are copies, so that rotating one touches no other test's PKI."""
    tokens = tmp_path_factory.mktemp("tokens")
    store = WeightStore(chunk_bytes=1024, bulk_chunk_bytes=1024, run_id="run-a")
    store.publish(1, WEIGHTS)
    started: dict[str, ServiceHost] = {}
    for name in SERVERS:
        token_file = tokens / f"{name}.token"
        shutil.copy(pki.token_file(name), token_file)
        security = {**pki.server_security(name), "auth_tokens": str(token_file)}
        server = ServerSettings(metrics_port=None, health_port=0, **security)
        host = ServiceHost([definition(name, server, tiny_policy_dir, tiny_prm_dir, store)], server)
        await host.start()
        started[name] = host
    yield started
    store.close()
    for host in started.values():
        await host.drain(grace=0)


def channel(pki, host: ServiceHost, **overrides) -> grpc.aio.Channel:
    """A TLS channel with the client certificate (no token: calls pass metadata themselves)."""
    fields = {**pki.client_security("rollout"), "token_file": "", **overrides}
    return open_channel(host.target, security=ClientSecurity(**fields))


async def call(name: str, chan: grpc.aio.Channel, token: str | None):
    """One light, real call of server `name` with `token` (None: no authorization metadata)."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    if name == "rollout":
        stub = rollout_pb2_grpc.RolloutServiceStub(chan)
        return await stub.GetStatus(rollout_pb2.GetStatusRequest(), metadata=metadata, timeout=10)
    if name == "prm":
        stub = prm_pb2_grpc.PrmServiceStub(chan)
        request = prm_pb2.ScoreStepsRequest(items=[prm_pb2.ScoreItem(prompt_text="1+1?", response_text="2")])
        return await stub.ScoreSteps(request, metadata=metadata, timeout=30)
    if name == "verify":
        stub = verify_pb2_grpc.VerifyServiceStub(chan)
        request = verify_pb2.VerifyRequest(
            items=[verify_pb2.VerifyItem(response="\\boxed{2}", ground_truth="2")]
        )
        return await stub.Verify(request, metadata=metadata, timeout=30)
    stub = weights_pb2_grpc.WeightServiceStub(chan)
    request = weights_pb2.DescribeVersionRequest(version=1, replica_id="auth-test")
    return await stub.DescribeVersion(request, metadata=metadata, timeout=10)


def other_server(name: str) -> str:
    return SERVERS[(SERVERS.index(name) + 1) % len(SERVERS)]


@pytest.mark.parametrize("name", SERVERS)
async def test_missing_wrong_and_foreign_tokens_are_unauthenticated(hosts, pki, name, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = secrets.token_hex(32)
    foreign = pki.token(other_server(name))
    async with channel(pki, hosts[name]) as chan:
        for token in (None, "", wrong, foreign):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(name, chan, token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
            details = refused.value.details()
            assert ("missing" if not token else "invalid") in details
            assert (token or "-") not in details and pki.token(name) not in details
    exposed = generate_latest(REGISTRY).decode()
    for secret in (wrong, foreign, pki.token(name)):
        assert secret not in caplog.text and secret not in exposed
    assert 'puremesh_rpc_auth_failures_total{reason="invalid"}' in exposed


async def test_the_right_token_passes_through_the_python_clients(hosts, pki):
    clients = {"rollout": RolloutClient, "prm": PrmClient, "verify": VerifyClient}
    for name, client_class in clients.items():
        security = ClientSecurity(**pki.client_security(name))
        async with client_class(hosts[name].target, timeout=30, security=security) as client:
            assert await client.probe() == "SERVING"
            if name == "rollout":
                assert (await client.status()).ready
            elif name == "prm":
                assert len((await client.score([("1+1?", "2")]))[0].steps) == 1
            else:
                assert (await client.verify([("\\boxed{2}", "2")]))[0].verdict.value == "correct"
        # the same client without its token: one RpcError with the code
        async with client_class(hosts[name].target, timeout=30, security=security.model_copy(
            update={"token_file": pki.token_file(other_server(name))}
        )) as client:  # fmt: skip
            with pytest.raises(RpcError) as refused:
                await client._probe_application()
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with channel(pki, hosts["weights"]) as chan:
        layout = await call("weights", chan, pki.token("weights"))
        assert layout.version == 1 and layout.run_id == "run-a"


@pytest.mark.parametrize("name", SERVERS)
async def test_tls_with_the_wrong_ca_or_without_a_client_certificate_fails(hosts, pki, other_pki, name):
    token = pki.token(name)
    async with channel(pki, hosts[name]) as chan:
        await call(name, chan, token)  # the same call passes with the right CA and certificate
    async with channel(pki, hosts[name], tls_ca=other_pki.ca) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as wrong_ca:
            await call(name, chan, token)
    assert wrong_ca.value.code() == grpc.StatusCode.UNAVAILABLE
    async with channel(pki, hosts[name], tls_cert="", tls_key="") as chan:
        with pytest.raises(grpc.aio.AioRpcError) as no_certificate:
            await call(name, chan, token)
    assert no_certificate.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(hosts[name].target) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as cleartext:
            await call(name, plaintext, token)
    assert cleartext.value.code() == grpc.StatusCode.UNAVAILABLE


async def list_services(chan: grpc.aio.Channel, token: str | None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(chan)
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10
    )
    return [service.name async for reply in replies for service in reply.list_services_response.service]


@pytest.mark.parametrize("name", SERVERS)
async def test_reflection_needs_the_token_and_health_does_not(hosts, pki, name):
    host = hosts[name]
    async with channel(pki, host) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await list_services(chan, None)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert FULL_NAMES[name] in await list_services(chan, pki.token(name))
        health = health_pb2_grpc.HealthStub(chan)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=FULL_NAMES[name]), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # The health port: plaintext, no metadata (as Kubernetes' gRPC probes), health only.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.health_port}") as probe:
        reply = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
            await call(name, probe, pki.token(name))
        assert elsewhere.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_rotated_token_file_takes_effect_without_a_restart(hosts, pki, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_INTERVAL_S", 0.0)
    host = hosts["verify"]
    token_file = Path(host.settings.auth_tokens)
    old, new = pki.token("verify"), secrets.token_hex(32)
    async with channel(pki, host) as chan:
        await call("verify", chan, old)
        token_file.write_text(f"# rotated\n{new}\n")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call("verify", chan, old)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await call("verify", chan, new)
        token_file.write_text(f"{old}\n{new}\n")  # both during a rotation
        await call("verify", chan, old)
        await call("verify", chan, new)


async def test_a_renewed_certificate_is_served_without_a_restart(pki, other_pki, tmp_path, monkeypatch):
    """cert-manager renews certificates in place: new connections get the new one, on gRPC
    (server_credentials) and on the bulk port (server_ssl_context)."""
    monkeypatch.setattr(auth, "RELOAD_INTERVAL_S", 0.0)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.path("server.crt"), cert)
    shutil.copy(pki.path("server.key"), key)
    store = WeightStore(chunk_bytes=1024, bulk_chunk_bytes=1024, run_id="run-b")
    store.publish(1, WEIGHTS)
    server = ServerSettings(metrics_port=None, tls_cert=str(cert), tls_key=str(key))
    host = ServiceHost([weight_service(WeightServicer(store))], server)
    await host.start()
    contexts = auth.server_ssl_context(server)
    try:
        old, new = ClientSecurity(tls_ca=pki.ca), ClientSecurity(tls_ca=other_pki.ca)
        async with open_channel(host.target, security=old) as chan:
            await call("weights", chan, None)
        first = contexts()
        shutil.copy(other_pki.path("server.crt"), cert)
        shutil.copy(other_pki.path("server.key"), key)
        async with open_channel(host.target, security=new) as chan:
            assert (await call("weights", chan, None)).version == 1
        async with open_channel(host.target, security=old) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as stale:
                await call("weights", chan, None)
        assert stale.value.code() == grpc.StatusCode.UNAVAILABLE
        assert contexts() is not first
        assert handshake(contexts(), other_pki.ca) and not handshake(contexts(), pki.ca)
    finally:
        store.close()
        await host.drain(grace=0)


def handshake(server: ssl.SSLContext, ca: str) -> bool:
    """Whether a client that trusts `ca` completes a TLS handshake with `server`."""
    ours, theirs = socket.socketpair()
    client = ssl.create_default_context(cafile=ca)
    client.check_hostname = False
    done: dict[str, bool] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(ours, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(theirs) as tls:
            tls.sendall(b"x")
            done["ok"] = True
    except ssl.SSLError:
        done["ok"] = False
    thread.join(5)
    return done["ok"]
