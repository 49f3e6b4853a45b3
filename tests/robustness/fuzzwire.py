"""Request messages for the fuzz suite, generated from the services' protobuf descriptors and
written straight to wire bytes, so that they can also break the rules protobuf enforces
(invalid UTF-8 in a string field) or be no message at all.

What a field gets: nothing (missing), empty, huge or odd strings (combining marks,
right-to-left text, emoji, NUL, invalid UTF-8), numbers at their extremes (0, -1, max, min,
NaN, infinities), repeated fields empty or huge, unknown enum values, nested messages. Some
cases start from a valid `seed` request and override one of its fields with a generated value
(on the wire the last occurrence of a field wins), so that calls also get past validation and
reach the work behind it.
"""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor

F = FieldDescriptor
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
ODD_TEXT = [
    "",
    "a",
    "\u0301\u0302\u0303" * 40,  # combining marks with nothing to combine with
    "\u202eevil\u202c",  # right-to-left override
    "\U0001f600" * 100,
    "nul\x00inside",
    "line\n\nbreaks\n\n",
    "\\boxed{1/2}",
    "So \\boxed{\\frac{6}{4}}",
    "1 + 1 = 2\n\nSo \\boxed{2}",
    "\ufeff\ufffe\uffff",
]
INVALID_UTF8 = [b"\xff\xfe", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"ok\x80ok"]
INT_EXTREMES = {
    F.TYPE_INT32: [0, 1, -1, 2**31 - 1, -(2**31)],
    F.TYPE_SINT32: [0, -1, 2**31 - 1, -(2**31)],
    F.TYPE_INT64: [0, 1, -1, 2**63 - 1, -(2**63)],
    F.TYPE_SINT64: [0, -1, 2**63 - 1, -(2**63)],
    F.TYPE_UINT32: [0, 1, 2**32 - 1, 2**31],
    F.TYPE_UINT64: [0, 1, 2**64 - 1, 2**63, 2**53, 2**53 + 1],
    F.TYPE_FIXED32: [0, 2**32 - 1],
    F.TYPE_FIXED64: [0, 2**64 - 1],
    F.TYPE_BOOL: [0, 1, 2],
}
FLOATS = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38, 1e-45, 0.5]


@dataclass(frozen=True)
class Case:
    data: bytes
    well_formed: bool


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers: two's complement, as protobuf writes them
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def key(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


class Generator:
    """Seeded request generator for one message type."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.broken = False  # set when the current message holds invalid UTF-8

    def case(self, descriptor: Descriptor, seed: bytes = b"") -> Case:
        """One request: one in ten raw malformed bytes; else a generated message, or (a third
        of them, given a seed) the seed with one field overridden."""
        roll = self.rng.random()
        if roll < 0.1:
            return Case(self.malformed(), False)
        self.broken = False
        if seed and roll < 0.4:
            fields = [f for f in descriptor.fields if f.type != F.TYPE_MESSAGE or self.rng.random() < 0.5]
            if fields:
                return Case(seed + self.field(self.rng.choice(fields), depth=1), not self.broken)
            return Case(seed, True)
        data = self.message(descriptor, depth=0)
        return Case(data, not self.broken)

    def malformed(self) -> bytes:
        rng = self.rng
        choice = rng.randrange(5)
        if choice == 0:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        if choice == 1:
            return key(1, LEN) + varint(1000)  # a length past the end
        if choice == 2:
            return b"\xff" * 11  # an overlong varint
        if choice == 3:
            return key(rng.randrange(1, 20), 7)  # wire type 7 does not exist
        return key(1, LEN) + varint(5) + b"\x0a\x7f"  # a nested message cut short

    def message(self, descriptor: Descriptor, depth: int) -> bytes:
        out = bytearray()
        oneofs = {o.name: self.rng.choice([None, *o.fields]) for o in descriptor.oneofs}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and not oneof.name.startswith("_") and oneofs[oneof.name] is not field:
                continue
            if self.rng.random() < 0.3:
                continue  # missing
            out += self.field(field, depth)
        return bytes(out)

    def field(self, field: FieldDescriptor, depth: int) -> bytes:
        if field.is_repeated:
            count = self.rng.choice([0, 1, 3, 2000 if depth == 0 else 20])
            if field.type == F.TYPE_MESSAGE:
                count = min(count, 64 if depth == 0 else 4)
            return b"".join(self.single(field, depth) for _ in range(count))
        return self.single(field, depth)

    def single(self, field: FieldDescriptor, depth: int) -> bytes:
        number, kind, rng = field.number, field.type, self.rng
        if kind == F.TYPE_MESSAGE:
            body = self.message(field.message_type, depth + 1) if depth < 3 else b""
            return key(number, LEN) + varint(len(body)) + body
        if kind in (F.TYPE_STRING, F.TYPE_BYTES):
            body = (
                self.text()
                if kind == F.TYPE_STRING
                else bytes(rng.randrange(256) for _ in range(rng.randrange(9)))
            )
            return key(number, LEN) + varint(len(body)) + body
        if kind == F.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return key(number, VARINT) + varint(rng.choice([*values, 99, -1, 2**31 - 1]))
        if kind in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            value = rng.choice(FLOATS)
            if kind == F.TYPE_FLOAT:
                return key(number, FIXED32) + struct.pack("<f", value)
            return key(number, FIXED64) + struct.pack("<d", value)
        value = rng.choice([*INT_EXTREMES.get(kind, [0, 1]), rng.randrange(-1000, 100_000)])
        if kind in (F.TYPE_FIXED32, F.TYPE_SFIXED32):
            return key(number, FIXED32) + struct.pack("<I", value & 0xFFFFFFFF)
        if kind in (F.TYPE_FIXED64, F.TYPE_SFIXED64):
            return key(number, FIXED64) + struct.pack("<Q", value & (2**64 - 1))
        if kind in (F.TYPE_SINT32, F.TYPE_SINT64):
            value = zigzag(value)
        if kind in (F.TYPE_UINT32, F.TYPE_UINT64):
            value = abs(value)
        return key(number, VARINT) + varint(value)

    def text(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.08:
            self.broken = True
            return rng.choice(INVALID_UTF8)
        if roll < 0.15:
            return ("12 + 34 = 46\n\n" * rng.choice([100, 2000, 20_000])).encode()  # huge
        return rng.choice(ODD_TEXT).encode()
