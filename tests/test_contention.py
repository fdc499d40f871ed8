"""Exact admission under contention: many processes, threads of control and asyncio tasks race
for one bucket and the server admits exactly its burst, on standalone servers and clusters.

8 processes make 200 sync decisions each and one more process runs 1,600 concurrent asyncio
tasks (3,200 decisions in all, every one on the server: the local refusal cache is off), on one
key with a burst of 100 and a refill of one token per 10,000 s: exactly 100 are admitted.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from typing import Any

import pytest
import redis
from conftest import Target

import workers
from tokenlimit import Limit, RateLimiter

BURST = 100
RATE = 1e-4  # one token per 10,000 s: nothing refills during the race
SYNC_PROCESSES, SYNC_CALLS, ASYNC_TASKS = 8, 200, 1600


def _context() -> Any:
    """``forkserver`` where there is one (children fork from a server that imported tokenlimit
    and redis once: ~10x faster to start than ``spawn``), else ``spawn``. Never plain ``fork``
    of the test process, whose threads and sockets a child must not inherit."""
    try:
        ctx = multiprocessing.get_context("forkserver")
    except ValueError:  # pragma: no cover - no forkserver on this platform
        return multiprocessing.get_context("spawn")
    ctx.set_forkserver_preload(["workers", "tokenlimit", "redis", "redis.asyncio"])
    return ctx


def _evalsha_calls(target: Target) -> int:
    """Script calls the server(s) ran, EVALSHA and EVAL, from ``INFO commandstats``."""
    total = 0
    for host, port in target.host_ports():
        with redis.Redis(host=host, port=port) as node:
            stats = node.info("commandstats")
        for name in ("cmdstat_evalsha", "cmdstat_eval"):
            entry = stats.get(name, {})
            total += int(entry.get("calls", 0)) - int(entry.get("failed_calls", 0))
    return total


@pytest.mark.slow
def test_processes_and_tasks_admit_exactly_the_burst(target: Target) -> None:
    ctx = _context()
    key = f"contention:{uuid.uuid4().hex}"
    barrier = ctx.Barrier(SYNC_PROCESSES + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=workers.admit_many,
            args=(target.url, key, RATE, BURST, SYNC_CALLS, barrier, results, False),
        )
        for _ in range(SYNC_PROCESSES)
    ]
    procs.append(
        ctx.Process(
            target=workers.admit_many_async,
            args=(target.url, key, RATE, BURST, ASYNC_TASKS, barrier, results, False),
        )
    )
    before = _evalsha_calls(target)
    started = time.monotonic()
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    elapsed = time.monotonic() - started
    assert [status for status, _ in outcomes] == ["ok"] * len(procs), [
        o for o in outcomes if o[0] != "ok"
    ]
    admitted = sum(count for _, count in outcomes)
    ran = _evalsha_calls(target) - before
    print(
        f"\n{target.flavour}-{target.kind}: {admitted} admitted of "
        f"{SYNC_PROCESSES * SYNC_CALLS + ASYNC_TASKS} decisions by {len(procs)} processes "
        f"({ran} script runs on the server) in {elapsed:.2f}s"
    )
    assert admitted == BURST
    # every call was a decision on the server (one peek per process to connect first)
    assert ran >= SYNC_PROCESSES * SYNC_CALLS + ASYNC_TASKS
    with RateLimiter.from_url(target.url, timeout=5, local_cache=False) as limiter:
        after = limiter.peek(key, Limit(RATE, BURST))
    assert after.remaining == 0
    assert after.retry_after > 9_000  # still ~10,000 s from the next token: nothing refilled
    assert elapsed < 20


LEASE = 10


@pytest.mark.slow
def test_leased_processes_and_tasks_never_admit_above_the_burst(target: Target) -> None:
    """The same race with ``lease=10`` (issue 18): every process hands out tokens it took
    from the server first, so the fleet admits at most the burst; every process closes, giving
    its unused tokens back, so the bucket then holds exactly what was not admitted."""
    ctx = _context()
    key = f"contention:{uuid.uuid4().hex}"
    barrier = ctx.Barrier(SYNC_PROCESSES + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=workers.admit_many,
            args=(target.url, key, RATE, BURST, SYNC_CALLS, barrier, results, True, LEASE),
        )
        for _ in range(SYNC_PROCESSES)
    ]
    procs.append(
        ctx.Process(
            target=workers.admit_many_async,
            args=(target.url, key, RATE, BURST, ASYNC_TASKS, barrier, results, True, LEASE),
        )
    )
    before = _evalsha_calls(target)
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert [status for status, _ in outcomes] == ["ok"] * len(procs), outcomes
    admitted = sum(count for _, count in outcomes)
    ran = _evalsha_calls(target) - before
    with RateLimiter.from_url(target.url, timeout=5, local_cache=False) as limiter:
        left = limiter.peek(key, Limit(RATE, BURST)).remaining
    print(f"\n{target.flavour}-{target.kind}: leased, {admitted} admitted, {left} left, {ran} runs")
    assert admitted <= BURST
    assert admitted + left == BURST  # nothing over, nothing lost: every lease went back
    assert admitted >= BURST - SYNC_PROCESSES * LEASE  # what can be held at the end of a race


def test_a_killed_process_loses_at_most_its_lease(target: Target) -> None:
    """SIGKILL while holding leased tokens: those (at most ``lease``) are gone until they
    refill; everything else it took was admitted."""
    ctx = _context()
    key = f"killed:{uuid.uuid4().hex}"
    results = ctx.Queue()
    proc = ctx.Process(
        target=workers.lease_then_hang, args=(target.url, key, RATE, BURST, LEASE, results)
    )
    proc.start()
    try:
        status, admitted, held = results.get(timeout=60)
        assert status == "ok", admitted
    finally:
        proc.kill()
        proc.join()
    with RateLimiter.from_url(target.url, timeout=5, local_cache=False) as limiter:
        left = limiter.peek(key, Limit(RATE, BURST)).remaining
    lost = BURST - admitted - left
    assert 0 < held <= LEASE
    assert lost == held  # exactly what it held, no more


def test_async_cluster_waits_for_a_node_connection(cluster: Target) -> None:
    """More concurrent decisions than a node has connections: they wait for one (within the
    deadline) instead of failing as storage errors. redis-py's async cluster raises
    MaxConnectionsError at once when a node's ``max_connections`` are all in use."""
    import asyncio

    import redis.asyncio.cluster
    from redis.asyncio.cluster import ClusterNode

    from tokenlimit import AsyncRateLimiter

    limit = Limit(RATE, 20)

    async def main() -> list[bool]:
        nodes = [ClusterNode(h, p) for h, p in cluster.host_ports()]
        client = redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, max_connections=3)
        try:
            limiter = AsyncRateLimiter(client, timeout=5.0, local_cache=False)
            decisions = await asyncio.gather(
                *(limiter.try_acquire("few-connections", limit) for _ in range(200))
            )
            return [d.allowed for d in decisions]
        finally:
            await client.aclose()

    assert sum(asyncio.run(main())) == 20
