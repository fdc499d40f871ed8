"""RateLimiter and AsyncRateLimiter against every backend: exact admission under contention,
acquire's waiting rules, several limits, cost, peek/reset, the script cache vanishing, storage
failures and deadlines, at-most-once execution, clients passed directly, and URLs."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import RedisCluster

import workers
from servers import Server, available_binaries, free_port
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    ConfigError,
    Decision,
    Limit,
    RateLimiter,
    RateLimitExceeded,
)

FLAVOURS = sorted(available_binaries())
SLOW = 0.001  # tokens per second: no refill worth speaking of during a test
T = TypeVar("T")


# -- helpers ----------------------------------------------------------------------------------
def run_async(url: str, body: Callable[[AsyncRateLimiter], Awaitable[T]], **options: Any) -> T:
    """Run ``body`` with an ``AsyncRateLimiter.from_url(url)`` in a fresh event loop."""
    options.setdefault("timeout", 5.0)

    async def main() -> T:
        limiter = AsyncRateLimiter.from_url(url, **options)
        try:
            return await body(limiter)
        finally:
            await limiter.aclose()

    return asyncio.run(main())


def primaries(target: Any) -> list[redis.Redis]:
    """A sync client per primary of the target (one for standalone); the caller closes them."""
    if target.kind != "cluster":
        return [redis.Redis.from_url(target.url)]
    return [redis.Redis(host=h, port=p) for h, p in target.host_ports()]


def script_flush(target: Any) -> None:
    for client in primaries(target):
        with client:
            assert client.script_flush()


def script_runs(client: redis.Redis) -> dict[str, int]:
    """Script executions that ran (``ran``), EVALSHA refused with NOSCRIPT, and EVAL calls."""
    stats = client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    eval_ = stats.get("cmdstat_eval", {})
    sha_failed = int(evalsha.get("failed_calls", 0))
    ran = int(evalsha.get("calls", 0)) - sha_failed
    ran += int(eval_.get("calls", 0)) - int(eval_.get("failed_calls", 0))
    return {"ran": ran, "noscript": sha_failed, "eval": int(eval_.get("calls", 0))}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after}


def wait_until_serving(server: Server) -> None:
    """After SIGCONT: let the server drain what was queued while it was paused."""
    time.sleep(0.1)
    with server.client(socket_timeout=5) as client:
        assert client.ping()


def closed_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# -- exact admission under contention ---------------------------------------------------------
def test_processes_admit_exactly_burst(target: Any) -> None:
    burst, processes, calls = 20, 8, 50
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    key = f"race:{target.kind}"
    procs = [
        ctx.Process(
            target=workers.admit_many,
            args=(target.url, key, SLOW, burst, calls, barrier, results),
        )
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert [status for status, _ in outcomes] == ["ok"] * processes, outcomes
    assert sum(count for _, count in outcomes) == burst
    with RateLimiter.from_url(target.url, timeout=5) as limiter:
        assert limiter.peek(key, Limit(SLOW, burst)).remaining == 0


def test_threads_admit_exactly_burst(limiter: RateLimiter) -> None:
    burst, threads, calls = 20, 8, 50
    limit = Limit(SLOW, burst)
    barrier = threading.Barrier(threads)
    counts: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait(timeout=30)
            counts.append(sum(limiter.try_acquire("threads", limit).allowed for _ in range(calls)))
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(60)
    assert errors == []
    assert len(counts) == threads
    assert sum(counts) == burst
    assert limiter.peek("threads", limit).remaining == 0


def test_async_tasks_admit_exactly_burst(url: str) -> None:
    burst, tasks, calls = 20, 64, 3
    limit = Limit(SLOW, burst)

    async def body(limiter: AsyncRateLimiter) -> tuple[list[int], int]:
        start = asyncio.Event()

        async def task() -> int:
            await start.wait()
            admitted = 0
            for _ in range(calls):
                if (await limiter.try_acquire("tasks", limit)).allowed:
                    admitted += 1
            return admitted

        running = [asyncio.create_task(task()) for _ in range(tasks)]
        await asyncio.sleep(0)
        start.set()
        counts = await asyncio.gather(*running)
        return counts, (await limiter.peek("tasks", limit)).remaining

    counts, remaining = run_async(url, body)
    assert sum(counts) == burst
    assert remaining == 0


# -- acquire(timeout=...) ---------------------------------------------------------------------
def test_acquire_refuses_at_once_when_the_wait_is_too_long(limiter: RateLimiter) -> None:
    limit = Limit(0.1, 3)  # one token per 10 s
    assert limiter.try_acquire("long", limit, cost=2).remaining == 1
    before = limiter.peek("long", limit)
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded) as info:
        limiter.acquire("long", limit, cost=2, timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5
    exc = info.value
    assert isinstance(exc.decision, Decision)
    assert exc.decision.allowed is False
    assert exc.retry_after == exc.decision.retry_after
    assert 9.0 < exc.retry_after <= 10.0
    assert exc.decision.remaining == 1
    after = limiter.peek("long", limit)
    assert after.remaining == before.remaining == 1
    # Had the refused call taken 2 tokens, cost 2 would now need ~30 s, not ~10 s.
    assert 9.0 < limiter.peek("long", limit, cost=2).retry_after <= exc.retry_after
    last = limiter.try_acquire("long", limit)
    assert last.allowed
    assert last.remaining == 0


def test_acquire_waits_when_the_wait_fits(limiter: RateLimiter) -> None:
    limit = Limit(20, 1)  # one token per 50 ms
    assert limiter.try_acquire("short", limit).allowed
    assert not limiter.peek("short", limit).allowed
    started = time.monotonic()
    decision = limiter.acquire("short", limit, timeout=1.0)
    elapsed = time.monotonic() - started
    assert decision.allowed
    assert decision.retry_after == 0.0
    assert 0.03 <= elapsed < 1.0
    started = time.monotonic()
    assert limiter.acquire("short", limit, timeout=None).allowed
    assert time.monotonic() - started >= 0.03


def test_acquire_with_timeout_zero_never_waits(limiter: RateLimiter) -> None:
    limit = Limit(2, 1)  # one token per 500 ms
    assert limiter.acquire("zero", limit, timeout=0).allowed
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded) as info:
        limiter.acquire("zero", limit, timeout=0)
    assert time.monotonic() - started < 0.25
    assert 0.2 < info.value.retry_after <= 0.5
    assert info.value.decision.allowed is False


def test_async_acquire_timeouts(url: str) -> None:
    async def body(limiter: AsyncRateLimiter) -> None:
        long = Limit(0.1, 3)
        assert (await limiter.try_acquire("long", long, cost=2)).remaining == 1
        started = time.monotonic()
        with pytest.raises(RateLimitExceeded) as info:
            await limiter.acquire("long", long, cost=2, timeout=1.0)
        assert time.monotonic() - started < 0.5
        assert 9.0 < info.value.retry_after <= 10.0
        assert info.value.decision.allowed is False
        assert info.value.retry_after == info.value.decision.retry_after
        assert (await limiter.peek("long", long)).remaining == 1
        peeked = await limiter.peek("long", long, cost=2)
        assert 9.0 < peeked.retry_after <= info.value.retry_after
        assert (await limiter.try_acquire("long", long)).remaining == 0

        short = Limit(20, 1)
        assert (await limiter.try_acquire("short", short)).allowed
        started = time.monotonic()
        decision = await limiter.acquire("short", short, timeout=1.0)
        elapsed = time.monotonic() - started
        assert decision.allowed
        assert 0.03 <= elapsed < 1.0

        zero = Limit(2, 1)
        assert (await limiter.acquire("zero", zero, timeout=0)).allowed
        started = time.monotonic()
        with pytest.raises(RateLimitExceeded) as info:
            await limiter.acquire("zero", zero, timeout=0)
        assert time.monotonic() - started < 0.25
        assert 0.2 < info.value.retry_after <= 0.5

    run_async(url, body)


# -- several limits ---------------------------------------------------------------------------
def test_several_limits_are_all_or_nothing(limiter: RateLimiter) -> None:
    wide = Limit(0.01, 5)
    narrow = Limit(SLOW, 2)
    limits = [wide, narrow]
    first = limiter.try_acquire("multi", limits)
    assert first.allowed
    assert (first.limit, first.remaining, first.policy) == (2, 1, narrow)
    assert [(d.limit, d.remaining, d.allowed) for d in first.details] == [
        (5, 4, True),
        (2, 1, True),
    ]
    second = limiter.try_acquire("multi", limits)
    assert second.allowed
    assert second.remaining == 0
    third = limiter.try_acquire("multi", limits)
    assert not third.allowed
    assert (third.limit, third.remaining, third.policy) == (2, 0, narrow)
    assert 999.0 < third.retry_after <= 1000.0
    assert len(third.details) == 2
    assert third.details[0].remaining == 3  # the refused call took nothing from `wide`
    assert third.details[0].allowed is True
    assert third.details[1].allowed is False
    assert third.details[1].retry_after == third.retry_after
    peeked = limiter.peek("multi", limits)
    assert [d.remaining for d in peeked.details] == [3, 0]
    # Each limit is its own bucket: `wide` alone still has its 3 tokens.
    assert limiter.try_acquire("multi", wide).remaining == 2


def test_several_limits_report_the_most_restrictive(limiter: RateLimiter) -> None:
    # Allowed: the fewest remaining wins, whatever the order.
    wide, narrow = Limit(0.01, 5), Limit(SLOW, 2)
    decision = limiter.try_acquire("order", [narrow, wide])
    assert (decision.policy, decision.remaining, decision.limit) == (narrow, 1, 2)
    assert [d.policy for d in decision.details] == [narrow, wide]

    # Refused: the longest retry_after wins, even over a limit with fewer remaining.
    slow, quick = Limit(SLOW, 3), Limit(1.0, 2)
    limits = [quick, slow]
    assert limiter.try_acquire("refuse", limits, cost=2).allowed
    refused = limiter.try_acquire("refuse", limits, cost=2)
    assert not refused.allowed
    assert refused.policy == slow
    assert (refused.limit, refused.remaining) == (3, 1)
    assert 999.0 < refused.retry_after <= 1000.0
    by_policy = {d.policy: d for d in refused.details}
    assert by_policy[quick].remaining == 0
    assert 1.0 < by_policy[quick].retry_after <= 2.0
    assert by_policy[slow].retry_after == refused.retry_after
    assert [d.remaining for d in limiter.peek("refuse", limits).details] == [0, 1]


def test_async_several_limits(url: str) -> None:
    wide, narrow = Limit(0.01, 5), Limit(SLOW, 2)

    async def body(limiter: AsyncRateLimiter) -> list[Decision]:
        return [await limiter.try_acquire("multi", [wide, narrow]) for _ in range(3)]

    decisions = run_async(url, body)
    assert [d.allowed for d in decisions] == [True, True, False]
    assert [d.remaining for d in decisions] == [1, 0, 0]
    assert [d.details[0].remaining for d in decisions] == [4, 3, 3]
    assert decisions[2].policy == narrow


# -- cost -------------------------------------------------------------------------------------
def test_cost_above_burst_is_a_config_error_and_takes_nothing(limiter: RateLimiter) -> None:
    limit = Limit(SLOW, 5)
    assert limiter.try_acquire("cost", limit).remaining == 4
    for call in (limiter.try_acquire, limiter.acquire, limiter.peek):
        with pytest.raises(ConfigError, match="cost") as info:
            call("cost", limit, cost=6)
        assert info.value.param == "cost"
    with pytest.raises(ConfigError, match="cost"):
        limiter.try_acquire("cost", [Limit(SLOW, 10), Limit(SLOW, 2)], cost=3)
    assert limiter.peek("cost", limit).remaining == 4


def test_cost_takes_that_many_tokens(limiter: RateLimiter) -> None:
    limit = Limit(SLOW, 5)
    first = limiter.try_acquire("cost3", limit, cost=3)
    assert first.allowed
    assert first.remaining == 2
    refused = limiter.try_acquire("cost3", limit, cost=3)
    assert not refused.allowed
    assert refused.remaining == 2
    assert 999.0 < refused.retry_after <= 1000.0
    assert limiter.peek("cost3", limit).remaining == 2
    last = limiter.try_acquire("cost3", limit, cost=2)
    assert last.allowed
    assert last.remaining == 0


def test_async_cost(url: str) -> None:
    limit = Limit(SLOW, 5)

    async def body(limiter: AsyncRateLimiter) -> None:
        with pytest.raises(ConfigError, match="cost"):
            await limiter.try_acquire("cost", limit, cost=6)
        assert (await limiter.peek("cost", limit)).remaining == 5
        assert (await limiter.try_acquire("cost", limit, cost=3)).remaining == 2
        assert not (await limiter.try_acquire("cost", limit, cost=3)).allowed
        assert (await limiter.try_acquire("cost", limit, cost=2)).remaining == 0

    run_async(url, body)


# -- peek and reset ---------------------------------------------------------------------------
def test_peek_consumes_nothing_and_reset_refills(limiter: RateLimiter) -> None:
    limit = Limit(SLOW, 3)
    for _ in range(5):
        fresh = limiter.peek("pr", limit)
        assert fresh.allowed
        assert fresh.remaining == 3
        assert fresh.retry_after == 0.0
        assert fresh.reset_after == 0.0
    assert limiter.try_acquire("pr", limit).remaining == 2
    peeked = limiter.peek("pr", limit)
    assert peeked.allowed
    assert peeked.remaining == 2
    assert 999.0 < peeked.reset_after <= 1000.0
    too_much = limiter.peek("pr", limit, cost=3)
    assert not too_much.allowed
    assert 999.0 < too_much.retry_after <= 1000.0
    assert limiter.peek("pr", limit).remaining == 2
    assert limiter.try_acquire("pr", limit, cost=2).remaining == 0
    assert not limiter.try_acquire("pr", limit).allowed
    assert limiter.reset("pr", limit) is None
    assert limiter.peek("pr", limit).remaining == 3
    assert limiter.try_acquire("pr", limit, cost=3).allowed

    several = [Limit(SLOW, 2), Limit(SLOW, 4)]
    assert limiter.try_acquire("prs", several, cost=2).allowed
    assert [d.remaining for d in limiter.peek("prs", several).details] == [0, 2]
    limiter.reset("prs", several)
    assert [d.remaining for d in limiter.peek("prs", several).details] == [2, 4]


def test_async_peek_and_reset(url: str) -> None:
    limit = Limit(SLOW, 3)

    async def body(limiter: AsyncRateLimiter) -> None:
        for _ in range(3):
            assert (await limiter.peek("pr", limit)).remaining == 3
        assert (await limiter.try_acquire("pr", limit, cost=3)).remaining == 0
        assert (await limiter.peek("pr", limit)).remaining == 0
        assert not (await limiter.try_acquire("pr", limit)).allowed
        assert await limiter.reset("pr", limit) is None
        assert (await limiter.peek("pr", limit)).remaining == 3
        assert (await limiter.try_acquire("pr", limit)).remaining == 2

    run_async(url, body)


# -- the script cache vanishing ---------------------------------------------------------------
KEYS = [f"user:{i}" for i in range(30)]  # spread over every cluster primary


def _assert_every_primary_used(target: Any) -> None:
    for client in primaries(target):
        with client:
            assert client.dbsize() > 0


def test_script_flush_sync(target: Any) -> None:
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
        assert [limiter.try_acquire(k, limit).remaining for k in KEYS] == [4] * len(KEYS)
        script_flush(target)
        decisions = [limiter.try_acquire(k, limit) for k in KEYS]
        assert all(d.allowed for d in decisions)
        assert [d.remaining for d in decisions] == [3] * len(KEYS)
        script_flush(target)
        assert [limiter.peek(k, limit).remaining for k in KEYS] == [3] * len(KEYS)
    _assert_every_primary_used(target)


def test_script_flush_async(target: Any) -> None:
    limit = Limit(SLOW, 5)

    async def body(limiter: AsyncRateLimiter) -> list[list[int]]:
        rounds = [[(await limiter.try_acquire(k, limit)).remaining for k in KEYS]]
        script_flush(target)
        rounds.append([(await limiter.try_acquire(k, limit)).remaining for k in KEYS])
        script_flush(target)
        rounds.append([(await limiter.peek(k, limit)).remaining for k in KEYS])
        return rounds

    assert run_async(target.url, body) == [[4] * len(KEYS), [3] * len(KEYS), [3] * len(KEYS)]
    _assert_every_primary_used(target)


def test_server_restart_sync(own_server: Server) -> None:
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(own_server.url, timeout=5.0) as limiter:
        assert limiter.try_acquire("restart", limit).remaining == 4
        own_server.restart()
        after = limiter.try_acquire("restart", limit)
        assert after.allowed
        assert after.remaining == 4
        assert limiter.try_acquire("restart", limit).remaining == 3
        assert limiter.peek("restart", limit).remaining == 3


def test_server_restart_async(own_server: Server) -> None:
    limit = Limit(SLOW, 5)

    async def body(limiter: AsyncRateLimiter) -> list[int]:
        got = [(await limiter.try_acquire("restart", limit)).remaining]
        # In a thread, as in a live service: the event loop keeps running while the server
        # goes away, so redis-py's pool sees the dead socket before handing it out.
        await asyncio.to_thread(own_server.restart)
        got.append((await limiter.try_acquire("restart", limit)).remaining)
        got.append((await limiter.try_acquire("restart", limit)).remaining)
        got.append((await limiter.peek("restart", limit)).remaining)
        return got

    assert run_async(own_server.url, body) == [4, 4, 3, 3]


def _kill_clients(target: Any) -> None:
    """Close every client connection on every primary (as ``timeout`` or a proxy would)."""
    for client in primaries(target):
        with client:
            client.client_kill_filter(_type="normal", skipme=True)


def test_connections_closed_by_the_server_sync(target: Any) -> None:
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
        assert [limiter.try_acquire(k, limit).remaining for k in KEYS] == [4] * len(KEYS)
        _kill_clients(target)
        time.sleep(0.05)
        assert [limiter.try_acquire(k, limit).remaining for k in KEYS] == [3] * len(KEYS)


def test_connections_closed_by_the_server_async(target: Any) -> None:
    limit = Limit(SLOW, 5)

    async def body(limiter: AsyncRateLimiter) -> list[list[int]]:
        rounds = [[(await limiter.try_acquire(k, limit)).remaining for k in KEYS]]
        _kill_clients(target)
        await asyncio.sleep(0.05)  # the event loop sees the closed sockets
        rounds.append([(await limiter.try_acquire(k, limit)).remaining for k in KEYS])
        return rounds

    assert run_async(target.url, body) == [[4] * len(KEYS), [3] * len(KEYS)]


# -- storage failures -------------------------------------------------------------------------
def test_closed_mode_raises_backend_error_on_a_closed_port() -> None:
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(closed_url(), timeout=1.0, failure_mode="closed") as limiter:
        for call in (limiter.try_acquire, limiter.peek, limiter.acquire):
            started = time.monotonic()
            with pytest.raises(BackendError) as info:
                call("down", limit)
            assert time.monotonic() - started < 1.0 + 0.5
            assert info.value.reason == "connection"
            assert isinstance(info.value.__cause__, redis.RedisError)
        with pytest.raises(BackendError):
            limiter.reset("down", limit)


def test_open_mode_admits_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tokenlimit")
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(closed_url(), timeout=1.0, failure_mode="open") as limiter:
        for _ in range(20):
            started = time.monotonic()
            decision = limiter.try_acquire("down", limit)
            assert time.monotonic() - started < 1.0 + 0.5
            assert decision.allowed
            assert decision.limit == 5
        assert limiter.peek("down", limit).allowed
        assert limiter.acquire("down", limit, timeout=0).allowed
    records = [r for r in caplog.records if r.name == "tokenlimit"]
    # The failures (throttled), and the circuit breaker opening after three of them.
    assert [r.levelno for r in records] == [logging.WARNING] * 2
    assert "circuit breaker open" in records[1].getMessage()


def test_async_failure_modes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tokenlimit")
    limit = Limit(SLOW, 5)
    url = closed_url()

    async def closed(limiter: AsyncRateLimiter) -> None:
        started = time.monotonic()
        with pytest.raises(BackendError) as info:
            await limiter.try_acquire("down", limit)
        assert time.monotonic() - started < 1.0 + 0.5
        assert info.value.reason == "connection"
        assert isinstance(info.value.__cause__, redis.RedisError)
        with pytest.raises(BackendError):
            await limiter.peek("down", limit)

    async def open_(limiter: AsyncRateLimiter) -> None:
        for _ in range(20):
            started = time.monotonic()
            decision = await limiter.try_acquire("down", limit)
            assert time.monotonic() - started < 1.0 + 0.5
            assert decision.allowed
            assert decision.limit == 5

    run_async(url, closed, timeout=1.0, failure_mode="closed")
    assert [r for r in caplog.records if r.name == "tokenlimit"] == []
    run_async(url, open_, timeout=1.0, failure_mode="open")
    records = [r for r in caplog.records if r.name == "tokenlimit"]
    # As for the sync limiter: the failures (throttled), then the circuit breaker opening.
    assert [r.levelno for r in records] == [logging.WARNING] * 2
    assert "circuit breaker open" in records[1].getMessage()


def test_server_stopped_midway_then_back_sync(own_server: Server) -> None:
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(own_server.url, timeout=1.0) as limiter:
        assert limiter.try_acquire("mid", limit).remaining == 4
        own_server.stop()
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(BackendError) as info:
                limiter.try_acquire("mid", limit)
            assert time.monotonic() - started < 1.5
            assert info.value.reason == "connection"
            assert isinstance(info.value.__cause__, redis.RedisError)
        own_server.start()
        assert [limiter.try_acquire("mid", limit).remaining for _ in range(3)] == [4, 3, 2]
        assert limiter.peek("mid", limit).remaining == 2


def test_server_stopped_midway_then_back_async(own_server: Server) -> None:
    limit = Limit(SLOW, 5)

    async def body(limiter: AsyncRateLimiter) -> list[int]:
        assert (await limiter.try_acquire("mid", limit)).remaining == 4
        own_server.stop()
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(BackendError) as info:
                await limiter.try_acquire("mid", limit)
            assert time.monotonic() - started < 1.5
            assert info.value.reason == "connection"
            assert isinstance(info.value.__cause__, redis.RedisError)
        own_server.start()
        got = [(await limiter.try_acquire("mid", limit)).remaining for _ in range(3)]
        got.append((await limiter.peek("mid", limit)).remaining)
        return got

    assert run_async(own_server.url, body, timeout=1.0) == [4, 3, 2, 2]


# -- the limiter's own deadline ---------------------------------------------------------------
A = Limit(SLOW, 10)  # timed out while the server is paused
B = Limit(SLOW, 30)  # used afterwards: its values never overlap A's


def _check_after_pause(answers: list[tuple[str, Decision]]) -> None:
    """``answers``: peek a, then a, b, a, b consumed, then peek a, peek b."""
    values = [(name, d.remaining) for name, d in answers]
    r = values[0][1]
    assert r in (8, 9), values  # 9, or 8 if the timed-out call ran once the server woke up
    assert values == [
        ("a", r),
        ("a", r - 1),
        ("b", 29),
        ("a", r - 2),
        ("b", 28),
        ("a", r - 2),
        ("b", 28),
    ]
    assert all(d.allowed for _, d in answers)


def test_deadline_on_a_paused_server_sync(own_server: Server) -> None:
    assert own_server.process is not None
    limiter = RateLimiter.from_url(own_server.url, timeout=0.2)
    opener = RateLimiter.from_url(own_server.url, timeout=0.2, failure_mode="open")
    try:
        assert limiter.try_acquire("a", A).remaining == 9
        assert opener.peek("a", A).remaining == 9
        os.kill(own_server.process.pid, signal.SIGSTOP)
        try:
            for call in (limiter.try_acquire, limiter.peek):
                started = time.monotonic()
                with pytest.raises(BackendError) as info:
                    call("a", A)
                assert time.monotonic() - started < 0.2 + 0.3
                assert info.value.reason == "timeout"
                assert isinstance(info.value.__cause__, redis.RedisError)
            started = time.monotonic()
            assert opener.peek("a", A).allowed
            assert time.monotonic() - started < 0.2 + 0.3
        finally:
            os.kill(own_server.process.pid, signal.SIGCONT)
        wait_until_serving(own_server)
        answers = [
            ("a", limiter.peek("a", A)),
            ("a", limiter.try_acquire("a", A)),
            ("b", limiter.try_acquire("b", B)),
            ("a", limiter.try_acquire("a", A)),
            ("b", limiter.try_acquire("b", B)),
            ("a", limiter.peek("a", A)),
            ("b", limiter.peek("b", B)),
        ]
        _check_after_pause(answers)
        assert opener.peek("a", A).remaining == answers[-2][1].remaining
    finally:
        limiter.close()
        opener.close()


def test_deadline_on_a_paused_server_async(own_server: Server) -> None:
    assert own_server.process is not None
    pid = own_server.process.pid

    async def body(limiter: AsyncRateLimiter) -> list[tuple[str, Decision]]:
        assert (await limiter.try_acquire("a", A)).remaining == 9
        os.kill(pid, signal.SIGSTOP)
        try:
            for call in (limiter.try_acquire, limiter.peek):
                started = time.monotonic()
                with pytest.raises(BackendError) as info:
                    await call("a", A)
                assert time.monotonic() - started < 0.2 + 0.3
                assert info.value.reason == "timeout"
                assert isinstance(info.value.__cause__, redis.RedisError)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until_serving(own_server)
        return [
            ("a", await limiter.peek("a", A)),
            ("a", await limiter.try_acquire("a", A)),
            ("b", await limiter.try_acquire("b", B)),
            ("a", await limiter.try_acquire("a", A)),
            ("b", await limiter.try_acquire("b", B)),
            ("a", await limiter.peek("a", A)),
            ("b", await limiter.peek("b", B)),
        ]

    _check_after_pause(run_async(own_server.url, body, timeout=0.2))


def test_async_open_mode_on_a_paused_server(own_server: Server) -> None:
    assert own_server.process is not None
    pid = own_server.process.pid

    async def body(limiter: AsyncRateLimiter) -> None:
        assert (await limiter.try_acquire("a", A)).remaining == 9
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert (await limiter.try_acquire("a", A)).allowed
            assert time.monotonic() - started < 0.2 + 0.3
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until_serving(own_server)
        assert (await limiter.peek("b", B)).remaining == 30
        assert (await limiter.try_acquire("b", B)).remaining == 29

    run_async(own_server.url, body, timeout=0.2, failure_mode="open")


# -- at most once -----------------------------------------------------------------------------
MODES = ["sync-url", "async-url", "sync-client", "async-client"]


def _decide_n(url: str, mode: str, n: int, limit: Limit) -> None:
    """Make ``n`` consuming decisions (try_acquire and acquire) the way ``mode`` says, with
    the overrides read (a script run once a second) off: callers count the decisions' runs."""
    if mode.startswith("sync"):
        client = redis.Redis.from_url(url) if mode == "sync-client" else None
        if client is not None:
            limiter = RateLimiter(client, overrides=False)
        else:
            limiter = RateLimiter.from_url(url, timeout=5.0, overrides=False)
        try:
            for i in range(n):
                call = limiter.try_acquire if i % 2 else limiter.acquire
                assert call("once", limit).allowed
        finally:
            limiter.close()
            if client is not None:
                client.close()
        return

    async def main() -> None:
        aclient = redis.asyncio.Redis.from_url(url) if mode == "async-client" else None
        if aclient is not None:
            limiter = AsyncRateLimiter(aclient, overrides=False)
        else:
            limiter = AsyncRateLimiter.from_url(url, timeout=5.0, overrides=False)
        try:
            for i in range(n):
                call = limiter.try_acquire if i % 2 else limiter.acquire
                assert (await call("once", limit)).allowed
        finally:
            await limiter.aclose()
            if aclient is not None:
                await aclient.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_each_decision_runs_the_script_once(standalone: Any, mode: str) -> None:
    limit = Limit(SLOW, 50)
    n = 20
    with redis.Redis.from_url(standalone.url) as admin:
        admin.script_flush()
        before = script_runs(admin)
        _decide_n(standalone.url, mode, n, limit)
        delta = diff(script_runs(admin), before)
    assert delta["ran"] == n
    assert delta["eval"] <= 1
    assert delta["eval"] == delta["noscript"]  # an EVAL only ever follows a NOSCRIPT
    with RateLimiter.from_url(standalone.url, timeout=5.0) as limiter:
        assert limiter.peek("once", limit).remaining == 50 - n


class _ChoppyOs:
    """``os`` for ``tokenlimit._redis.sync``, whose sync exchange writes and reads the descriptor
    itself: every write first finds the send buffer full (EAGAIN), then takes 7 bytes at a time;
    every read first finds nothing after its wakeup (EAGAIN)."""

    def __init__(self) -> None:
        self.writes = self.reads = 0

    def write(self, fd: int, data: bytes) -> int:
        self.writes += 1
        if self.writes % 2:
            raise BlockingIOError
        return os.write(fd, data[:7])

    def read(self, fd: int, size: int) -> bytes:
        self.reads += 1
        if self.reads % 2:
            raise BlockingIOError
        return os.read(fd, size)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_sync_exchange_survives_short_writes_and_empty_wakeups(
    standalone: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send buffer that takes nothing or part of the command, and a reader woken with nothing
    to read, only slow the exchange down: each decision still runs once and reads its own reply."""
    import tokenlimit._redis.sync

    url = standalone.url
    choppy = _ChoppyOs()
    monkeypatch.setattr(tokenlimit._redis.sync, "os", choppy)
    limit = Limit(SLOW, 5)
    with (
        redis.Redis.from_url(url) as admin,
        # All to the server, and only decisions (no overrides read): 7 script runs.
        RateLimiter.from_url(url, timeout=5.0, local_cache=False, overrides=False) as limiter,
    ):
        before = script_runs(admin)
        decisions = [limiter.try_acquire("choppy", limit) for _ in range(7)]
        assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
        assert diff(script_runs(admin), before)["ran"] == 7
    assert choppy.writes >= 7  # (one more write and read after a NOSCRIPT)
    assert choppy.reads >= 14


class _DemotingOs:
    """``os`` for the sync exchange: the first read, the reply already waiting, runs
    ``meanwhile`` before reading it, as if another thread acted in between."""

    def __init__(self, meanwhile: Callable[[], None]) -> None:
        self.meanwhile: Callable[[], None] | None = meanwhile

    def read(self, fd: int, n: int) -> bytes:
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            meanwhile()
        return os.read(fd, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.mark.parametrize("when", ["reading", "taking"])
def test_sync_readonly_retires_the_connections_in_an_exchange(
    own_server: Server, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A decision meets READONLY (its server was demoted) while another, on another thread,
    is mid-exchange on another connection to it (reading its reply, or still taking the
    connection): that one is closed when its exchange ends, not kept for the next decision,
    which must look for the primary again."""
    import tokenlimit._redis.sync

    limit = Limit(SLOW, 5)
    seen: list[object] = []

    def demote_and_decide() -> None:
        with own_server.client(socket_timeout=5) as admin:
            admin.replicaof("127.0.0.1", free_port())
            try:
                limiter.try_acquire("demoted", limit)  # on a second connection: READONLY
            except BackendError as error:
                seen.append(error.__cause__)
            admin.replicaof("NO", "ONE")

    # Overrides off: no read on the reader thread borrows the connection this test follows.
    with RateLimiter.from_url(own_server.url, timeout=5.0, overrides=False) as limiter:
        for _ in range(2):  # the first lends its connection to the server check
            assert limiter.try_acquire("before", limit).allowed
        lanes = limiter.backend._lanes  # type: ignore[attr-defined]
        ((conn, _, _),) = lanes._free  # the connection the next decision will use
        conn.send_command("CLIENT", "ID")
        first = int(conn.read_response())
        if when == "reading":
            monkeypatch.setattr(tokenlimit._redis.sync, "os", _DemotingOs(demote_and_decide))
        else:
            take = lanes._take
            meanwhile = [demote_and_decide]

            def taken_then_demoted(deadline: float) -> Any:
                lane = take(deadline)
                if meanwhile:
                    meanwhile.pop()()
                return lane

            monkeypatch.setattr(lanes, "_take", taken_then_demoted)
        assert limiter.try_acquire("during", limit).allowed  # it ran before the demotion
        monkeypatch.undo()
        assert len(seen) == 1
        assert isinstance(seen[0], redis.ReadOnlyError), seen
        assert lanes._free == []
        with own_server.client(socket_timeout=5) as admin:
            assert first not in {int(entry["id"]) for entry in admin.client_list()}
        assert limiter.try_acquire("after", limit).allowed


@pytest.mark.parametrize("kind", ["blocking", "plain"])
def test_closing_the_idle_connections_leaves_those_in_use(standalone: Any, kind: str) -> None:
    """What READONLY does to the pool (drop_idle): idle connections closed, one in use on
    another thread untouched, on every redis-py major (6's BlockingConnectionPool.disconnect()
    takes no argument and would close them all)."""
    from tokenlimit._redis.sync import _disconnect_idle

    pool_class = redis.BlockingConnectionPool if kind == "blocking" else redis.ConnectionPool
    pool = pool_class.from_url(standalone.url, max_connections=4)
    try:
        busy, idle = pool.get_connection(), pool.get_connection()
        for conn in (busy, idle):
            conn.connect()
        pool.release(idle)
        _disconnect_idle(pool)
        assert idle._sock is None
        assert busy._sock is not None
        busy.send_command("PING")
        assert busy.read_response() in (b"PONG", "PONG")
        pool.release(busy)
    finally:
        pool.disconnect()


def test_timed_out_decision_runs_at_most_once_with_a_retrying_client(
    own_server: Server,
) -> None:
    """A user's client with redis-py's default retries: the limiter still sends once."""
    assert own_server.process is not None
    client = redis.Redis(host="127.0.0.1", port=own_server.port, socket_timeout=0.05)
    limit = Limit(SLOW, 10)
    try:
        # Counts script runs: the overrides read (a script, once a second, started after a
        # decision on a thread of its own) is none of this decision's.
        limiter = RateLimiter(client, timeout=0.3, overrides=False)
        assert limiter.try_acquire("once", limit).remaining == 9
        with own_server.client() as admin:
            before = script_runs(admin)
            os.kill(own_server.process.pid, signal.SIGSTOP)
            try:
                with pytest.raises(BackendError) as info:
                    limiter.try_acquire("once", limit)
                assert info.value.reason == "timeout"
            finally:
                os.kill(own_server.process.pid, signal.SIGCONT)
            wait_until_serving(own_server)
            assert diff(script_runs(admin), before)["ran"] <= 1
        assert limiter.peek("once", limit).remaining in (8, 9)
    finally:
        client.close()


# -- clients passed directly ------------------------------------------------------------------
def test_sync_client_directly(target: Any) -> None:
    client = target.client()
    try:
        limiter = RateLimiter(client, timeout=5.0)
        limit = Limit(SLOW, 3)
        decisions = [limiter.try_acquire("direct", limit) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert limiter.peek("direct", limit).remaining == 0
        limiter.reset("direct", limit)
        assert limiter.peek("direct", limit).remaining == 3
        limiter.close()
        assert client.ping()  # not the limiter's to close
    finally:
        client.close()


def test_async_client_directly(target: Any) -> None:
    limit = Limit(SLOW, 3)

    async def main() -> list[int]:
        client = target.async_client()
        try:
            limiter = AsyncRateLimiter(client, timeout=5.0)
            got = [(await limiter.try_acquire("direct", limit)).remaining for _ in range(3)]
            assert not (await limiter.try_acquire("direct", limit)).allowed
            await limiter.reset("direct", limit)
            got.append((await limiter.peek("direct", limit)).remaining)
            await limiter.aclose()
            assert await client.ping()
            return got
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [2, 1, 0, 3]


def test_wrong_client_types_raise_type_error() -> None:
    port = free_port()
    aclient = redis.asyncio.Redis(host="127.0.0.1", port=port)
    acluster = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for wrong in (aclient, acluster, "x", None, 42):
            with pytest.raises(TypeError, match="client"):
                RateLimiter(wrong)
        for wrong in (client, "x", None, 42):
            with pytest.raises(TypeError, match="client"):
                AsyncRateLimiter(wrong)
    finally:
        client.close()
        asyncio.run(aclient.aclose())


def test_cluster_clients_directly(cluster: Any) -> None:
    client = RedisCluster(startup_nodes=cluster.startup_nodes())
    try:
        limiter = RateLimiter(client, timeout=5.0)
        limit = Limit(SLOW, 2)
        assert [limiter.try_acquire(k, limit).remaining for k in KEYS] == [1] * len(KEYS)
    finally:
        client.close()

    async def main() -> list[int]:
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in cluster.host_ports()]
        aclient = redis.asyncio.cluster.RedisCluster(startup_nodes=nodes)
        try:
            alimiter = AsyncRateLimiter(aclient, timeout=5.0)
            return [(await alimiter.try_acquire(k, Limit(SLOW, 2))).remaining for k in KEYS]
        finally:
            await aclient.aclose()

    assert asyncio.run(main()) == [0] * len(KEYS)
    _assert_every_primary_used(cluster)


# -- URLs -------------------------------------------------------------------------------------
def _roundtrip_url(url: str) -> None:
    limit = Limit(SLOW, 2)
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        got = [limiter.try_acquire("url", limit) for _ in range(3)]
        assert [d.allowed for d in got] == [True, True, False]

    async def body(limiter: AsyncRateLimiter) -> list[bool]:
        return [(await limiter.try_acquire("aurl", limit)).allowed for _ in range(3)]

    assert run_async(url, body) == [True, True, False]


def test_from_url_memory() -> None:
    _roundtrip_url("memory://")


def test_from_url_redis(standalone: Any) -> None:
    assert standalone.url.startswith("redis://")
    _roundtrip_url(standalone.url)


def test_from_url_cluster(cluster: Any) -> None:
    assert cluster.url.startswith("redis+cluster://")
    assert cluster.url.count(",") == 2
    _roundtrip_url(cluster.url)
    host, port = cluster.host_ports()[1]
    cluster.flush()
    _roundtrip_url(f"redis+cluster://{host}:{port}")  # one node is enough to find the rest


def test_from_url_unix_socket() -> None:
    binary = available_binaries()[FLAVOURS[0]]
    server = Server(binary)
    path = server.workdir / "s.sock"
    server.args = ("--unixsocket", str(path), "--unixsocketperm", "700")
    server.start()
    try:
        _roundtrip_url(f"unix://{path}")
    finally:
        server.stop()


@pytest.mark.parametrize(
    "bad", ["http://127.0.0.1:6379", "127.0.0.1:6379", "", "memcached://x", "redis//x"]
)
def test_from_url_bad_scheme(bad: str) -> None:
    for cls in (RateLimiter, AsyncRateLimiter):
        with pytest.raises(ConfigError, match="url") as info:
            cls.from_url(bad)
        assert info.value.param == "url"
        assert isinstance(info.value, ValueError)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ bounds exchanges without a task")
def test_an_abandoned_exchange_never_logs_an_unretrieved_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past its deadline an exchange is cancelled and left to end in its own task. If it ends
    with an error just before the loop closes (here: it swallows the cancellation, as redis-py's
    ``wait_for`` can, then fails), nobody awaits it: its error must still be consumed, or asyncio
    logs "Task exception was never retrieved" with a traceback whenever the task is collected
    (in a test run, from inside pytest's own code: CPython 3.11 then failed the run with
    "SystemError: AST constructor recursion depth mismatch")."""
    from tokenlimit._redis import aio as _aredis

    tasks: list[asyncio.Future[Any]] = []
    ensure_future = asyncio.ensure_future

    def recorded(coro: Any) -> asyncio.Future[Any]:
        tasks.append(ensure_future(coro))
        return tasks[-1]

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass
        raise redis.ConnectionError("Connection lost")

    monkeypatch.setattr(_aredis.asyncio, "ensure_future", recorded)
    with pytest.raises(BackendError) as info:
        asyncio.run(_aredis._bounded(stubborn(), 0.01))
    monkeypatch.undo()
    assert info.value.reason == "timeout"
    (task,) = tasks
    assert task.done()
    # asyncio's own flag, set while an exception is unretrieved (logged when collected); read
    # before anything here retrieves it.
    assert task._log_traceback is False  # type: ignore[attr-defined]
    assert isinstance(task.exception(), redis.ConnectionError)


@pytest.mark.cluster
def test_a_standalone_url_on_a_cluster_node_fails_naming_the_cluster_url(cluster: Any) -> None:
    """A plain client pointed at one node of a cluster: keys of other nodes get MOVED, which a
    standalone client cannot follow; the decision fails with a BackendError naming the fix."""
    host, port = cluster.host_ports()[0]
    url = f"redis://{host}:{port}"
    keys = [f"user:{i}" for i in range(30)]  # some are served by the other primaries
    limiter = RateLimiter.from_url(url)
    try:
        errors = []
        for key in keys:
            try:
                limiter.try_acquire(key, "10/second")
            except BackendError as error:
                errors.append(error)
        assert errors, "every key was on the first node"
        assert {e.reason for e in errors} == {"cluster"}
        assert all("redis+cluster://" in str(e) for e in errors)
    finally:
        limiter.close()

    async def decide(limiter: AsyncRateLimiter) -> list[BackendError]:
        found = []
        for key in keys:
            try:
                await limiter.try_acquire(key, "10/second")
            except BackendError as error:
                found.append(error)
        return found

    found = run_async(url, decide)
    assert found
    assert {e.reason for e in found} == {"cluster"}
