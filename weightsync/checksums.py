"""The checksums of a version, computed once when it is published (store.py): the SHA-256 of the
whole buffer, the SHA-256 of every FetchWeights chunk and the CRC-32 of every bulk chunk, spread
over a few threads (hashlib and the CRC-32 release the GIL)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from puremesh.contract.bulk import crc32
from puremesh.contract.weights import chunk_count, chunk_range


def checksums(
    pool: ThreadPoolExecutor, threads: int, data: memoryview, chunk_bytes: int, bulk_chunk_bytes: int
) -> tuple[str, list[str], list[int]]:
    """(SHA-256 of the whole `data` (this thread), SHA-256 of every chunk at `chunk_bytes`,
    CRC-32 of every chunk at `bulk_chunk_bytes` (the pool)), at the same time."""
    total = len(data)
    sha = _spread(pool, threads, _chunk_sha256, data, chunk_bytes, total)
    crc = _spread(pool, threads, _chunk_crc32, data, bulk_chunk_bytes, total)
    whole = hashlib.sha256(data).hexdigest()
    return whole, [d for task in sha for d in task.result()], [d for task in crc for d in task.result()]


def _spread(
    pool: ThreadPoolExecutor,
    threads: int,
    function: Callable[..., list],
    data: memoryview,
    size: int,
    total: int,
) -> list[Future]:
    """`function` over the chunks of `size`, in one task per pool thread."""
    count = chunk_count(total, size)
    per_task = max(1, math.ceil(count / threads))
    return [
        pool.submit(function, data, size, first, min(first + per_task, count), total)
        for first in range(0, count, per_task)
    ]


def _chunk_sha256(data: memoryview, size: int, first: int, stop: int, total: int) -> list[str]:
    return [hashlib.sha256(data[slice(*chunk_range(i, size, total))]).hexdigest() for i in range(first, stop)]


def _chunk_crc32(data: memoryview, size: int, first: int, stop: int, total: int) -> list[int]:
    return [crc32(data[slice(*chunk_range(i, size, total))]) for i in range(first, stop)]
