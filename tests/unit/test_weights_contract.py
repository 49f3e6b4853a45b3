"""The hand-written half of the weights contract (contract/weights.py, contract/bulk.py): the
layout and its manifest, the WeightChunk codec against protobuf's own encoding, and the bulk
framing against the byte layout written in weights.proto's file comment."""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import zlib

import pytest
import torch

from puremesh.contract import bulk
from puremesh.contract.bulk import BulkStatus
from puremesh.contract.weights import (
    ManifestError,
    TensorSpec,
    chunk_count,
    chunk_range,
    copy_into,
    encode_chunk,
    lay_out,
    parse_manifest,
    rebuild_tensors,
    split_chunk,
)
from puremesh.weights.v1 import weights_pb2
from puremesh.weightsync.bulk_receiver import target_host
from puremesh.weightsync.servicer import ChunkMessage


def parse(message: bytes) -> tuple[weights_pb2.WeightChunk, memoryview]:
    head, data = split_chunk(message)
    return weights_pb2.WeightChunk.FromString(head), data


def test_chunk_message_serialises_to_a_weight_chunk() -> None:
    spec = weights_pb2.TensorSpec(name="w", dtype="float32", shape=[2], offset=0, nbytes=8)
    data = bytes(range(200))
    chunk = ChunkMessage(7, 3, 9, 600, memoryview(data), "ab" * 32, [spec])
    expected = weights_pb2.WeightChunk(
        version=7, index=3, total_chunks=9, offset=600, data=data, sha256="ab" * 32, manifest=[spec]
    )
    wire = chunk.SerializeToString()
    assert weights_pb2.WeightChunk.FromString(wire) == expected
    header, view = parse(wire)
    assert bytes(view) == data and not header.data
    assert header.manifest[0] == spec and (header.version, header.index, header.offset) == (7, 3, 600)
    # split_chunk reads any field order, e.g. protobuf's own encoding
    header, view = parse(expected.SerializeToString())
    assert bytes(view) == data and header.sha256 == "ab" * 32
    empty = ChunkMessage(1, 0, 1, 0, b"", hashlib.sha256(b"").hexdigest())
    assert parse(empty.SerializeToString())[1].nbytes == 0


def test_encode_chunk_appends_the_data_field() -> None:
    head = weights_pb2.WeightChunk(version=1).SerializeToString()
    assert encode_chunk(head, b"") == head
    # field 5, wire type 2 (0x2a), the length 300 as a varint (0xac 0x02), the bytes
    assert encode_chunk(head, b"x" * 300) == head + b"\x2a\xac\x02" + b"x" * 300
    assert split_chunk(encode_chunk(head, b"x" * 300)) == (head, memoryview(b"x" * 300))


@pytest.mark.parametrize(
    "message, error",
    [
        (b"\x08", "truncated or overlong varint"),  # field 1 without its value
        (b"\x2a\x05abc", "truncated WeightChunk"),  # data announces 5 bytes, 3 follow
        (b"\x0b", "unsupported wire type 3"),  # a group start
        (b"\x09abc", "truncated WeightChunk"),  # a fixed64 cut short
    ],
)
def test_split_chunk_rejects_malformed_messages(message: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        split_chunk(message)


def test_layout_round_trip_and_alignment() -> None:
    tensors = [
        ("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
        ("b", torch.tensor([1, 2, 3], dtype=torch.int8)),  # the next offset (27) is misaligned
        ("c", torch.tensor([0.5, -1.5], dtype=torch.float64).t()),
        ("d", torch.empty(0, 2, dtype=torch.bfloat16)),
    ]
    manifest, detached = lay_out(tensors)
    assert manifest == (
        TensorSpec("a", "float32", (2, 3), 0, 24),
        TensorSpec("b", "int8", (3,), 24, 3),
        TensorSpec("c", "float64", (2,), 27, 16),
        TensorSpec("d", "bfloat16", (0, 2), 43, 0),
    )
    storage = torch.empty(43, dtype=torch.uint8)
    copy_into(storage, manifest, detached)
    assert parse_manifest(manifest, 43) == manifest
    rebuilt = dict(rebuild_tensors(storage, manifest))
    for name, tensor in tensors:
        assert torch.equal(rebuilt[name], tensor) and rebuilt[name].dtype == tensor.dtype
    # aligned tensors are views of the buffer, misaligned ones copies
    assert rebuilt["a"].data_ptr() == storage.data_ptr()
    assert rebuilt["c"].data_ptr() != storage.data_ptr() + 27


@pytest.mark.parametrize(
    "specs, total, error",
    [
        ([TensorSpec("a", "float32", (2,), 4, 8)], 12, "inconsistent manifest entry"),  # a gap
        ([TensorSpec("a", "float32", (2,), 0, 4)], 4, "inconsistent manifest entry"),  # wrong size
        ([TensorSpec("a", "float32", (-1,), 0, 0)], 0, "inconsistent manifest entry"),
        ([TensorSpec("a", "complex7", (1,), 0, 1)], 1, "unknown tensor dtype 'complex7'"),
        ([TensorSpec("a", "float32", (2,), 0, 8)], 9, "covers 8 bytes, the version has 9"),
    ],
)
def test_parse_manifest_rejects_inconsistent_entries(specs, total: int, error: str) -> None:
    with pytest.raises(ManifestError, match=error):
        parse_manifest(specs, total)


def test_chunks_of_a_version() -> None:
    assert [chunk_count(t, 10) for t in (0, 1, 10, 11)] == [1, 1, 1, 2]  # 0 bytes: one empty chunk
    assert [chunk_range(i, 10, 25) for i in range(3)] == [(0, 10), (10, 20), (20, 25)]
    assert bulk.chunk_ranges([5, 1, 2, 7], 10, 75) == [(10, 30), (50, 60), (70, 75)]


def test_bulk_framing_matches_the_proto_comment() -> None:
    # request: "PMWB", protocol 1, id_length, version, offset, length (little-endian), the id
    wire = bulk.pack_request(7, 1 << 40, 300, b"r-1")
    assert wire == b"PMWB" + struct.pack("<HHQQQ", 1, 3, 7, 1 << 40, 300) + b"r-1"
    assert bulk.REQUEST.size == 32 and bulk.REPLY.size == 16
    request = bulk.unpack_request(wire[:32])
    assert request == (b"PMWB", 1, 3, 7, 1 << 40, 300) and request.well_formed
    assert not bulk.unpack_request(b"HTTP" + wire[4:32]).well_formed
    assert not bulk.unpack_request(struct.pack("<4sHHQQQ", b"PMWB", 1, 1025, 0, 0, 0)).well_formed
    with pytest.raises(ValueError, match="at most 1024"):
        bulk.pack_request(1, 0, 0, b"x" * 1025)
    # reply: "PMWB", status, reserved 0, length, then the bytes or the message
    assert bulk.pack_reply(BulkStatus.OK, 9) == b"PMWB" + struct.pack("<HHQ", 0, 0, 9)
    error = bulk.pack_error(BulkStatus.NOT_FOUND, "gone é")
    assert error == b"PMWB" + struct.pack("<HHQ", 1, 0, 7) + "gone é".encode()
    assert bulk.unpack_reply(error[:16]) == (b"PMWB", 1, 7)
    assert {s.value: s.label for s in BulkStatus} == {
        0: "ok",
        1: "not_found",
        2: "out_of_range",
        3: "bad_request",
        4: "unavailable",
        5: "challenge",
        6: "unauthenticated",
    }
    assert bulk.crc32(b"weights") == zlib.crc32(b"weights") and bulk.crc32(b"") == 0


def test_bulk_handshake_framing_matches_the_proto_comment() -> None:
    # challenge: a reply header (status 5, reserved 2, length 32) and the 32-byte nonce
    nonce = bytes(range(32))
    challenge = bulk.pack_challenge(nonce)
    assert challenge == b"PMWB" + struct.pack("<HHQ", 5, 2, 32) + nonce and len(challenge) == 48
    # hello: "PMWB", protocol 2, id_length, HMAC-SHA256(SHA-256(token), context || nonce || id), id
    key = hashlib.sha256(b"a token").digest()
    mac = hmac.new(key, b"puremesh-bulk-v2" + nonce + b"r-1", hashlib.sha256).digest()
    hello = bulk.pack_hello(key, nonce, b"r-1")
    assert hello == b"PMWB" + struct.pack("<HH", 2, 3) + mac + b"r-1" and bulk.HELLO.size == 40
    parsed = bulk.unpack_hello(hello[:40])
    assert parsed.well_formed and parsed.mac == mac and parsed.id_length == 3
    assert not bulk.unpack_hello(b"PMWB" + struct.pack("<HH", 1, 3) + mac).well_formed
    assert bulk.hello_mac(key, bytes(32), b"r-1") != mac, "another nonce, another MAC"
    # requests after the handshake carry protocol 2
    request = bulk.unpack_request(bulk.pack_request(7, 0, 1, b"r-1", bulk.PROTOCOL_AUTH)[:32])
    assert request.conforms(2) and not request.conforms(1) and not request.well_formed


def test_recv_exact() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"abcdef")
        assert bulk.recv_exact(left, 4) == b"abcd"
        right.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError, match="in the middle"):
            bulk.recv_exact(left, 4)  # 2 bytes, then EOF
    left, right = socket.socketpair()
    with left, right:
        right.close()
        assert bulk.recv_exact(left, 4, eof_ok=True) is None  # EOF before the first byte


def test_target_host() -> None:
    cases = {
        "127.0.0.1:50060": "127.0.0.1",
        "learner:50060": "learner",
        "pm-learner.ns.svc.cluster.local:50060": "pm-learner.ns.svc.cluster.local",
        "dns:///learner:50060": "learner",
        "dns://8.8.8.8/learner:50060": "learner",
        "dns:learner:50060": "learner",
        "ipv4:10.0.0.1:50060,10.0.0.2:50060": "10.0.0.1",
        "[::1]:50060": "::1",
        "ipv6:[fe80::1]:50060": "fe80::1",
        "learner": "learner",
        "unix:/tmp/learner.sock": None,
        "unix-abstract:learner": None,
    }
    assert {target: target_host(target) for target in cases} == cases
