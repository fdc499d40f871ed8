"""Redis memory per key: FLUSHALL, ``used_memory``, K decisions on K distinct keys, ``used_memory``
and DBSIZE again; then the TTL (PTTL) and MEMORY USAGE of a sample of the keys written."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import redis
from _measure import KeyCursor, Sample

SAMPLE = 1000


def _used_memory(client: redis.Redis) -> int:
    """``used_memory`` once it has settled: the server shrinks idle clients' buffers in its cron,
    which would otherwise show up as noise (even negative) in a small difference."""
    last = int(client.info("memory")["used_memory"])
    for _ in range(20):
        time.sleep(0.1)
        now = int(client.info("memory")["used_memory"])
        if abs(now - last) < 1024:
            return now
        last = now
    return last


def measure_memory(
    client: redis.Redis, fill: Callable[[KeyCursor, int], Sample], keys: int, prefix: str
) -> dict[str, Any]:
    """``fill(cursor, n)`` makes one decision per key of ``cursor`` (n distinct keys)."""
    client.execute_command("FLUSHALL", "SYNC")
    before = _used_memory(client)
    cursor = KeyCursor([f"{prefix}{i}" for i in range(keys)])
    started = time.perf_counter()
    sample = fill(cursor, keys)
    fill_seconds = time.perf_counter() - started
    after = _used_memory(client)
    dbsize = int(client.dbsize())
    names = []
    for name in client.scan_iter(count=1000):
        names.append(name)
        if len(names) >= SAMPLE:
            break
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.pttl(name)
    for name in names:
        pipe.memory_usage(name, samples=0)
    replies = pipe.execute()
    pttls = [int(v) for v in replies[: len(names)]]
    usage = [int(v) for v in replies[len(names) :] if v is not None]
    ttls = [v for v in pttls if v >= 0]
    delta = after - before
    return {
        "decisions": sample.calls,
        "allowed": sample.allowed,
        "fill_seconds": round(fill_seconds, 3),
        "used_memory_before": before,
        "used_memory_after": after,
        "dbsize": dbsize,
        "keys_per_decision": dbsize / keys if keys else None,
        "bytes_per_key": delta / dbsize if dbsize else None,
        "bytes_per_decision": delta / keys if keys else None,
        "memory_usage_median": statistics.median(usage) if usage else None,
        "sampled": len(names),
        "pttl_ms": {
            "min": min(ttls) if ttls else None,
            "median": statistics.median(ttls) if ttls else None,
            "max": max(ttls) if ttls else None,
        },
        "no_ttl": sum(1 for v in pttls if v == -1),
        "example_key": names[0].decode("utf-8", "replace") if names else None,
        "example_type": client.type(names[0]).decode() if names else None,
    }


def sync_fill(decide: Callable[[str], bool]) -> Callable[[KeyCursor, int], Sample]:
    def fill(cursor: KeyCursor, n: int) -> Sample:
        started = time.perf_counter()
        allowed = sum(1 for key in cursor.keys[:n] if decide(key))
        return Sample(n, allowed, time.perf_counter() - started)

    return fill


def async_fill(
    loop: asyncio.AbstractEventLoop, decide: Callable[[str], Any], tasks: int
) -> Callable[[KeyCursor, int], Sample]:
    def fill(cursor: KeyCursor, n: int) -> Sample:
        async def run() -> Sample:
            started = time.perf_counter()
            counts = [0]
            it = iter(cursor.keys[:n])

            async def worker() -> None:
                for key in it:  # the tasks share one iterator: each key exactly once
                    if await decide(key):
                        counts[0] += 1

            await asyncio.gather(*(worker() for _ in range(tasks)))
            return Sample(n, counts[0], time.perf_counter() - started)

        return loop.run_until_complete(run())

    return fill
