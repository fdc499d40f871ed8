"""Redis memory per key: FLUSHALL, ``used_memory``, K decisions on K distinct keys, ``used_memory``
and DBSIZE again; then the TTL (PTTL) and MEMORY USAGE of a sample of the keys written."""

from __future__ import annotations

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
    stable = 0
    for _ in range(30):
        time.sleep(0.1)
        now = int(client.info("memory")["used_memory"])
        stable = stable + 1 if abs(now - last) < 1024 else 0
        last = now
        if stable == 3:
            break
    return last


def measure_memory(
    client: redis.Redis, fill: Callable[[KeyCursor, int], Sample], keys: int, prefix: str
) -> dict[str, Any]:
    """``fill(cursor, n)`` makes one decision per key of ``cursor`` (n distinct keys)."""
    client.execute_command("FLUSHALL", "SYNC")
    before = _used_memory(client)
    cursor = KeyCursor([f"{prefix}{i}" for i in range(keys)])
    client.config_resetstat()
    started = time.perf_counter()
    sample = fill(cursor, keys)
    fill_seconds = time.perf_counter() - started
    stats = client.info("commandstats")
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
        "server": _server_cost(stats, keys),
        "example_key": names[0].decode("utf-8", "replace") if names else None,
        "example_type": client.type(names[0]).decode() if names else None,
    }


def _server_cost(stats: dict[str, Any], decisions: int) -> dict[str, Any]:
    """What the server spent per decision (INFO commandstats, reset just before the fill): a
    script's time includes the commands it runs, which are also listed on their own."""
    commands = {
        name.removeprefix("cmdstat_"): value
        for name, value in stats.items()
        if isinstance(value, dict) and not name.startswith(("cmdstat_info", "cmdstat_config"))
    }
    scripts = [v for n, v in commands.items() if n.startswith(("eval", "fcall"))]
    top = scripts or list(commands.values())
    usec = sum(int(v["usec"]) for v in top)
    calls = sum(int(v["calls"]) for v in top)
    return {
        "calls_per_decision": calls / decisions if decisions else None,
        "usec_per_decision": usec / decisions if decisions else None,
        "commands": {name: int(v["calls"]) for name, v in commands.items()},
    }


def floor_cost(client: redis.Redis, decisions: int) -> dict[str, Any]:
    """The server's cost of the trivial script (``return 1``), for reference."""
    sha = client.script_load("return 1")
    client.config_resetstat()
    for i in range(decisions):
        client.evalsha(sha, 1, f"floor:{i}")
    return _server_cost(client.info("commandstats"), decisions)


def sync_fill(decide: Callable[[str], bool]) -> Callable[[KeyCursor, int], Sample]:
    def fill(cursor: KeyCursor, n: int) -> Sample:
        started = time.perf_counter()
        allowed = sum(1 for key in cursor.keys[:n] if decide(key))
        return Sample(n, allowed, time.perf_counter() - started)

    return fill
