"""Concurrency limits (``limiter.concurrency``): at most N holders per key, on every backend.

Exactness under 8 processes, leases that end on their own when a holder is SIGKILLed, release
on exception, the decorator (sync and async), waiting for a slot, failure modes (a closed port,
a stopped or paused server), async cancellation, clusters, the memory backend on a fake clock,
the scripts' own validation and keys/TTLs, and the input table.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
from conftest import Target

from servers import Server, free_port
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    ConfigError,
    Limit,
    MemoryBackend,
    RateLimiter,
    RateLimitExceeded,
)
from tokenlimit._base import DEFAULT_PREFIX
from tokenlimit._concurrency import build_slots, hold, release
from tokenlimit._memory import AsyncMemoryBackend
from tokenlimit._request import build_request
from tokenlimit._scripts import hold_script, release_script

T = TypeVar("T")
MAX = 3
PROCESSES, ROUNDS = 8, 12


# -- helpers ----------------------------------------------------------------------------------
def storage_key(key: str, prefix: str = DEFAULT_PREFIX) -> str:
    return build_slots(prefix, key, 1, 1.0, 0).key


def bucket_key(key: str) -> str:
    return build_request(DEFAULT_PREFIX, key, Limit(1, 5)).keys[0]


def enter(guard: Any) -> Any:
    """Enter and leave ``guard``: its Decision, or what entering raised."""
    with guard as decision:
        return decision


async def aenter(guard: Any) -> Any:
    async with guard as decision:
        return decision


def raise_inside(guard: Any, before: Callable[[], Any]) -> None:
    with guard:
        before()
        raise ValueError("mine")


async def araise_inside(guard: Any, before: Callable[[], Any]) -> None:
    async with guard:
        before()
        raise ValueError("mine")


def run_async(url: str, body: Callable[[AsyncRateLimiter], Awaitable[T]], **options: Any) -> T:
    options.setdefault("timeout", 5.0)

    async def main() -> T:
        limiter = AsyncRateLimiter.from_url(url, **options)
        try:
            return await body(limiter)
        finally:
            await limiter.aclose()

    return asyncio.run(main())


def _context() -> Any:
    """``forkserver`` (children fork from a server that imported tokenlimit and redis once), else
    ``spawn``; never a plain fork of the test process and its threads and sockets."""
    try:
        ctx = multiprocessing.get_context("forkserver")
    except ValueError:  # pragma: no cover - no forkserver on this platform
        return multiprocessing.get_context("spawn")
    ctx.set_forkserver_preload(["test_concurrency", "tokenlimit", "redis"])
    return ctx


def _stop(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- workers (run in child processes) -----------------------------------------------------------
def hammer(
    url: str, key: str, current: Any, peak: Any, lock: Any, barrier: Any, results: Any
) -> None:
    """Take the slot ``ROUNDS`` times (refused tries retry soon), counting the holders in
    shared memory while inside; report ``("ok", admitted, refused)``."""
    try:
        limiter = RateLimiter.from_url(url, timeout=5)
        guard = limiter.concurrency(key, MAX, lease=30)
        admitted = refused = 0
        try:
            limiter.peek("connect", Limit(1, 1))  # connect before the race
            barrier.wait(60)
            while admitted < ROUNDS:
                try:
                    with guard:
                        with lock:
                            current.value += 1
                            peak.value = max(peak.value, current.value)
                        time.sleep(0.005)
                        with lock:
                            current.value -= 1
                    admitted += 1
                except RateLimitExceeded:
                    refused += 1
                    time.sleep(0.001)  # retry soon, leaving the 2 cores to the holders
        finally:
            limiter.close()
        results.put(("ok", admitted, refused))
    except BaseException as exc:
        results.put(("error", repr(exc), 0))


def hold_forever(url: str, key: str, lease: float, ready: Any) -> None:
    """Take one of the key's 2 slots, say so, and never give it back."""
    limiter = RateLimiter.from_url(url, timeout=5)
    limiter.concurrency(key, 2, lease=lease).__enter__()
    ready.set()
    time.sleep(600)


# -- exactness ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_processes_never_exceed_max_in_flight(target: Target) -> None:
    ctx = _context()
    key = f"jobs:{uuid.uuid4().hex}"
    current, peak, lock = ctx.Value("i", 0, lock=False), ctx.Value("i", 0, lock=False), ctx.Lock()
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=hammer, args=(target.url, key, current, peak, lock, barrier, results))
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        _stop(procs)
    assert [o[0] for o in outcomes] == ["ok"] * PROCESSES, outcomes
    assert sum(o[1] for o in outcomes) == PROCESSES * ROUNDS
    assert sum(o[2] for o in outcomes) > 0  # there was contention: some tries were refused
    assert peak.value == MAX  # never more than 3 inside at once, and 3 were
    assert current.value == 0
    with target.client() as client:  # every slot given back: the key is gone
        assert client.exists(storage_key(key)) == 0


def test_a_killed_holder_loses_its_slot_after_its_lease(standalone: Target) -> None:
    ctx = _context()
    key = f"killed:{uuid.uuid4().hex}"
    ready = ctx.Event()
    proc = ctx.Process(target=hold_forever, args=(standalone.url, key, 1.0, ready))
    proc.start()
    try:
        assert ready.wait(60)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        # A live holder with a long lease keeps the key alive: only the dead holder's own lease
        # can free its slot.
        limiter = RateLimiter.from_url(standalone.url, timeout=5)
        with limiter, limiter.concurrency(key, 2, lease=30):
            with pytest.raises(RateLimitExceeded) as info:  # still held by the dead process
                enter(limiter.concurrency(key, 2))
            assert 0 < info.value.retry_after <= 1.0
            with standalone.client() as client:
                assert client.zcard(storage_key(key)) == 2
                assert 29_000 < client.pttl(storage_key(key)) <= 30_000
            assert enter(limiter.concurrency(key, 2, timeout=10)).allowed  # once it ends
    finally:
        _stop([proc])


# -- every backend --------------------------------------------------------------------------------
def test_holds_refuses_and_frees(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5) as limiter:
        guard = limiter.concurrency("worker", 2, lease=30)
        with guard as first:
            assert (first.allowed, first.limit, first.remaining) == (True, 2, 1)
            with guard as second:
                assert second.remaining == 0
                with pytest.raises(RateLimitExceeded) as info:
                    enter(guard)
                assert not info.value.decision.allowed
                assert 20 < info.value.retry_after <= 30  # when the earliest lease ends
                # another key, and the token buckets of the same key, are independent
                with limiter.concurrency("other", 1):
                    assert limiter.try_acquire("worker", Limit(1, 1)).allowed
            with guard as again:  # one slot was given back
                assert again.remaining == 0


def test_release_on_exception(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5) as limiter:
        guard = limiter.concurrency("fails", 1)
        for _ in range(3):
            with pytest.raises(ValueError, match="boom"), guard:
                raise ValueError("boom")
        with guard as decision:
            assert decision.allowed


def test_async_holds_refuses_and_frees(url: str) -> None:
    async def body(limiter: AsyncRateLimiter) -> None:
        guard = limiter.concurrency("aworker", 2, lease=30)
        async with guard, guard:
            with pytest.raises(RateLimitExceeded):
                async with guard:
                    pytest.fail("a third holder got in")
        with pytest.raises(KeyError):
            async with guard:
                raise KeyError("x")
        held = await asyncio.gather(*(_hold_briefly(guard) for _ in range(6)))
        assert sorted(held) == [False] * 4 + [True] * 2

    run_async(url, body)


async def _hold_briefly(guard: Any) -> bool:
    try:
        async with guard:
            await asyncio.sleep(0.2)
    except RateLimitExceeded:
        return False
    return True


def test_decorators_hold_a_slot_per_call(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5) as limiter:
        guard = limiter.concurrency("decorated", 1)

        @guard
        def work(x: int, *, y: int = 1) -> int:
            """Doc."""
            with pytest.raises(RateLimitExceeded):  # the call holds the only slot
                enter(guard)
            return x + y

        assert work(1, y=2) == 3
        assert work(2) == 3
        assert work.__name__ == "work"
        assert work.__doc__ == "Doc."
        assert str(inspect.signature(work)) == "(x: 'int', *, y: 'int' = 1) -> 'int'"

        @guard
        async def sync_limiter_async_def() -> str:
            with pytest.raises(RateLimitExceeded):
                async with guard:
                    pass
            return "ok"

        assert inspect.iscoroutinefunction(sync_limiter_async_def)
        assert asyncio.run(sync_limiter_async_def()) == "ok"
        assert asyncio.run(sync_limiter_async_def()) == "ok"

    async def body(limiter: AsyncRateLimiter) -> None:
        guard = limiter.concurrency("adecorated", 1)

        @guard
        async def awork(x: int) -> int:
            with pytest.raises(RateLimitExceeded):
                async with guard:
                    pass
            return x

        assert inspect.iscoroutinefunction(awork)
        assert [await awork(1), await awork(2)] == [1, 2]

        def plain() -> None:
            pass

        with pytest.raises(TypeError, match="async def"):
            guard(plain)
        with pytest.raises(TypeError, match="async with"):
            enter(guard)

    run_async(url, body)


def test_timeout_waits_for_a_slot(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5) as limiter:
        guard = limiter.concurrency("wait", 1, lease=30)
        entered, freed = threading.Event(), threading.Event()

        def holder() -> None:
            with guard:
                entered.set()
                time.sleep(0.3)
                freed.set()

        thread = threading.Thread(target=holder)
        thread.start()
        try:
            assert entered.wait(10)
            with limiter.concurrency("wait", 1, lease=30, timeout=20) as decision:
                assert decision.allowed
                assert freed.is_set()  # got in only once the holder had left
        finally:
            thread.join()


def test_timeout_runs_out(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5) as limiter, limiter.concurrency("full", 1, lease=30):
        started = time.monotonic()
        with pytest.raises(RateLimitExceeded) as info:
            enter(limiter.concurrency("full", 1, timeout=0.3))
        assert time.monotonic() - started >= 0.3  # it did wait, the whole timeout
        assert 0 < info.value.retry_after <= 30

    async def body(limiter: AsyncRateLimiter) -> None:
        async with limiter.concurrency("afull", 1, lease=30):
            started = time.monotonic()
            with pytest.raises(RateLimitExceeded):
                async with limiter.concurrency("afull", 1, timeout=0.3):
                    pass
            assert time.monotonic() - started >= 0.3
            waiter = asyncio.create_task(aenter(limiter.concurrency("afull", 1, timeout=20)))
            await asyncio.sleep(0.2)
            assert not waiter.done()
        assert (await waiter).allowed  # admitted once the holder left

    run_async(url, body)


def test_changing_max_in_flight_applies_to_current_holders(url: str) -> None:
    """``max_in_flight`` is not part of the key: the same holders count against a new bound."""
    with RateLimiter.from_url(url, timeout=5) as limiter:
        guard = limiter.concurrency("resized", 3)
        with guard, guard:
            with pytest.raises(RateLimitExceeded):
                enter(limiter.concurrency("resized", 2))
            assert enter(limiter.concurrency("resized", 4)).remaining == 1


# -- Redis specifics ------------------------------------------------------------------------------
def test_keys_ttls_and_the_script_cache(target: Target) -> None:
    key = "ttl-check"
    slots_key = storage_key(key)
    with RateLimiter.from_url(target.url, timeout=5) as limiter, target.client() as client:
        limiter.try_acquire(key, Limit(1, 5))  # a bucket of the same identity
        with limiter.concurrency(key, 3, lease=50):
            with limiter.concurrency(key, 3, lease=20):
                assert client.zcard(slots_key) == 2
                assert 49_000 < client.pttl(slots_key) <= 50_000  # the longest lease
                assert client.type(slots_key) == b"zset"
            # the longest lease is still held
            assert 49_000 < client.pttl(slots_key) <= 50_000
        with limiter.concurrency(key, 3, lease=50), limiter.concurrency(key, 3, lease=20):
            pass
        assert client.exists(slots_key) == 0
        assert client.exists(bucket_key(key)) == 1  # a different key from the bucket's
        # the script cache can vanish at any time: EVALSHA, then the body on NOSCRIPT
        for node in _primaries(target):
            with node:
                node.script_flush()
        with limiter.concurrency(key, 1) as decision:
            assert decision.allowed


def _primaries(target: Target) -> list[redis.Redis]:
    if target.kind != "cluster":
        return [redis.Redis.from_url(target.url)]
    return [redis.Redis(host=h, port=p) for h, p in target.host_ports()]


def test_cluster_keys_spread_and_share_the_identity_slot(cluster: Target) -> None:
    keys = [f"tenant:{i}" for i in range(12)]
    with RateLimiter.from_url(cluster.url, timeout=5) as limiter, cluster.client() as client:
        assert isinstance(client, redis.cluster.RedisCluster)
        cluster_client: Any = client  # redis-py's cluster methods are untyped
        nodes = set()
        for key in keys:
            with limiter.concurrency(key, 1, lease=30):
                with pytest.raises(RateLimitExceeded):
                    enter(limiter.concurrency(key, 1))
                slots_key = storage_key(key)
                assert client.zcard(slots_key) == 1
                nodes.add(cluster_client.get_node_from_key(slots_key).name)
                # the identity's own hash tag: the same slot as its token buckets
                assert cluster_client.keyslot(slots_key) == cluster_client.keyslot(bucket_key(key))
        assert len(nodes) > 1

    async def body(limiter: AsyncRateLimiter) -> None:
        for key in keys:
            async with limiter.concurrency(key, 1):
                with pytest.raises(RateLimitExceeded):
                    async with limiter.concurrency(key, 1):
                        pass

    run_async(cluster.url, body)


@pytest.mark.parametrize(
    "args",
    [
        ("abc", "nan", "1000"),
        ("abc", "0", "1000"),
        ("abc", "0x10", "1000"),
        ("abc", "1", "0"),
        ("abc", "1", "inf"),
        ("abc", "1", "99999999999999999"),
        ("not hex", "1", "1000"),
        ("", "1", "1000"),
        ("abc", "1"),
    ],
)
def test_the_hold_script_validates_its_arguments(standalone: Target, args: tuple[str]) -> None:
    with standalone.client() as client:
        with pytest.raises(redis.ResponseError, match="tokenlimit"):
            client.eval(hold_script().body, 1, "x", *args)
        with pytest.raises(redis.ResponseError, match="tokenlimit"):
            client.eval(release_script().body, 1, "x", "not hex")
        assert client.dbsize() == 0


# -- storage failures ---------------------------------------------------------------------------
def closed_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_closed_port_follows_the_failure_mode(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tokenlimit")
    url = closed_url()
    with RateLimiter.from_url(url, timeout=1.0) as closed, pytest.raises(BackendError):
        enter(closed.concurrency("down", 1))
    with RateLimiter.from_url(url, timeout=1.0, failure_mode="open") as opened:
        guard = opened.concurrency("down", 1, timeout=5)
        for _ in range(3):
            with guard as decision:  # admitted without a slot; the exit tries nothing
                assert decision.allowed

    async def closed_async(limiter: AsyncRateLimiter) -> None:
        with pytest.raises(BackendError):
            async with limiter.concurrency("down", 1):
                pytest.fail("admitted")

    async def open_async(limiter: AsyncRateLimiter) -> None:
        for _ in range(3):
            async with limiter.concurrency("down", 1) as decision:
                assert decision.allowed

    run_async(url, closed_async, timeout=1.0)
    run_async(url, open_async, timeout=1.0, failure_mode="open")
    assert any("without a concurrency slot" in r.getMessage() for r in caplog.records)


def test_a_failed_release_never_hides_the_callers_outcome(
    own_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tokenlimit")
    limiter = RateLimiter.from_url(own_server.url, timeout=0.5)
    try:
        guard = limiter.concurrency("gone", 1)

        @guard
        def returns() -> str:
            own_server.stop()
            return "result"

        assert returns() == "result"
        own_server.start()
        with pytest.raises(ValueError, match="mine"):
            raise_inside(guard, own_server.stop)
    finally:
        limiter.close()
    assert any("could not give a concurrency slot back" in r.getMessage() for r in caplog.records)


def test_async_release_on_a_paused_server(
    own_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tokenlimit")
    assert own_server.process is not None
    pid = own_server.process.pid

    async def body(limiter: AsyncRateLimiter) -> None:
        with pytest.raises(ValueError, match="mine"):
            await araise_inside(
                limiter.concurrency("paused", 1), lambda: os.kill(pid, signal.SIGSTOP)
            )
        os.kill(pid, signal.SIGCONT)

    started = time.monotonic()
    run_async(own_server.url, body, timeout=0.3)
    assert time.monotonic() - started < 10
    assert any("could not give a concurrency slot back" in r.getMessage() for r in caplog.records)


def test_async_cancelled_acquire_gives_its_slot_back(own_server: Server) -> None:
    """Cancelled after the hold was sent but before its reply: the script still runs (the
    server was paused, the command is in its socket), and the slot it took is given back."""
    assert own_server.process is not None
    pid = own_server.process.pid
    slots_key = storage_key("cancelled")

    async def body(limiter: AsyncRateLimiter) -> None:
        guard = limiter.concurrency("cancelled", 1, lease=60)
        async with guard:  # connected, scripts loaded
            pass
        os.kill(pid, signal.SIGSTOP)
        try:
            task = asyncio.create_task(aenter(guard))
            await asyncio.sleep(0.3)  # the hold is on the wire, the server paused
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            os.kill(pid, signal.SIGCONT)
        with own_server.client(socket_timeout=5) as client:
            for _ in range(100):  # the hold ran, then its release
                if client.exists(slots_key) == 0:
                    break
                await asyncio.sleep(0.05)
            assert client.exists(slots_key) == 0
        async with guard as decision:
            assert decision.allowed

    run_async(own_server.url, body, timeout=5)


# -- shadow mode and the testing switch ----------------------------------------------------------
def test_shadow_mode_admits_without_a_slot() -> None:
    store = MemoryBackend()
    enforcing = RateLimiter(store)
    guard = enforcing.as_shadow().concurrency("shadow", 1, timeout=30)
    with guard as first:
        assert first.allowed
        assert not first.shadowed
        started = time.monotonic()
        with guard as second:  # all slots held: admitted anyway, marked, without waiting
            assert second.allowed
            assert second.shadowed
        assert time.monotonic() - started < 10
        with pytest.raises(RateLimitExceeded):  # the first still holds the only slot
            enter(enforcing.concurrency("shadow", 1))
    assert enter(enforcing.concurrency("shadow", 1)).allowed
    with RateLimiter.from_url(closed_url(), timeout=1.0, shadow=True) as down:
        assert enter(down.concurrency("down", 1)).allowed  # storage failed: admitted

    async def body() -> None:
        aguard = AsyncRateLimiter(store, shadow=True).concurrency("ashadow", 1)
        async with aguard, aguard as second:
            assert second.shadowed

    asyncio.run(body())


def test_the_testing_switch_turns_slots_off() -> None:
    from tokenlimit import testing

    store = MemoryBackend()
    guard = RateLimiter(store).concurrency("off", 1)
    with testing.disabled(), guard, guard:  # both admitted, nothing stored
        assert store._slots == {}
    with guard, pytest.raises(RateLimitExceeded):  # on again
        enter(guard)


# -- keys made at each call ------------------------------------------------------------------------
def test_decorator_keys_from_templates_and_callables(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5.0) as limiter:

        @limiter.concurrency("export:{user_id}", 1)
        def export(user_id: int, then: Callable[[], Any] | None = None) -> Any:
            return then() if then is not None else user_id

        assert export(1, then=lambda: export(2)) == 2  # another user: a slot of its own
        with pytest.raises(RateLimitExceeded):
            export(1, then=lambda: export(1))  # the same user: its one slot is held
        # The call's key is the literal key it spells: one set of slots for both.
        with pytest.raises(RateLimitExceeded):
            export(7, then=lambda: enter(limiter.concurrency("export:7", 1)))
        assert export(1) == 1  # every slot given back

        @limiter.concurrency(lambda job, **_: f"job:{job}", 1)
        def run(job: str, then: Callable[[], Any] | None = None) -> Any:
            return then() if then is not None else job

        assert run("a", then=lambda: run("b")) == "b"
        with pytest.raises(RateLimitExceeded):
            run("a", then=lambda: run("a"))

        @limiter.concurrency("per:{user_id}", 1)
        async def off_loop(user_id: int) -> int:  # a sync limiter guarding an async def
            return user_id

        assert asyncio.run(off_loop(3)) == 3

    async def body(alimiter: AsyncRateLimiter) -> None:
        @alimiter.concurrency("report:{name}", 1)
        async def report(name: str, then: Callable[[], Awaitable[Any]] | None = None) -> Any:
            return await then() if then is not None else name

        assert await report("x", then=lambda: report("y")) == "y"
        with pytest.raises(RateLimitExceeded):
            await report("x", then=lambda: report("x"))
        assert await report("x") == "x"

    run_async(url, body)


def test_per_call_keys_need_a_call_and_name_the_key_when_bad() -> None:
    limiter = RateLimiter(MemoryBackend())
    alimiter = AsyncRateLimiter(AsyncMemoryBackend())
    for guard in (limiter.concurrency("u:{user_id}", 1), limiter.concurrency(lambda: "k", 1)):
        with pytest.raises(ConfigError, match="literal key") as info:
            enter(guard)
        assert info.value.param == "key"
    with pytest.raises(ConfigError) as info:
        asyncio.run(aenter(alimiter.concurrency("u:{user_id}", 1)))
    assert info.value.param == "key"
    with pytest.raises(ConfigError, match="user_id") as info:  # at decoration, not at a call

        @limiter.concurrency("u:{user_id}", 1)
        def no_such_parameter(name: str) -> None: ...

    assert info.value.param == "key"

    @limiter.concurrency(lambda n: None, 1)
    def keyless(n: int) -> int:
        return n

    with pytest.raises(ConfigError) as info:
        keyless(1)
    assert info.value.param == "key"
    assert limiter.backend._slots == {}  # nothing held, nothing stored
    with pytest.raises(ConfigError) as info:  # the bound is still checked at once
        limiter.concurrency("u:{user_id}", 0)
    assert info.value.param == "max_in_flight"


# -- metrics ------------------------------------------------------------------------------------
def test_metrics_count_each_entry_by_bound_and_outcome(url: str) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from tokenlimit.metrics import PrometheusMetrics

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    key = f"metered:{uuid.uuid4().hex}"

    def count(result: str, bound: int = 1) -> float | None:
        return registry.get_sample_value(
            "tokenlimit_concurrency_total", {"max_in_flight": str(bound), "result": result}
        )

    with RateLimiter.from_url(url, timeout=5.0, metrics=metrics) as limiter:
        with limiter.concurrency(key, 1):
            with pytest.raises(RateLimitExceeded):  # waited 0.05 s: one entry, one count
                enter(limiter.concurrency(key, 1, timeout=0.05))
            assert enter(limiter.as_shadow().concurrency(key, 1)).shadowed
        with limiter.concurrency(key, 2):
            pass

    async def body() -> None:
        alimiter = AsyncRateLimiter.from_url(url, timeout=5.0, metrics=metrics)
        try:
            async with alimiter.concurrency(key, 1):
                with pytest.raises(RateLimitExceeded):
                    async with alimiter.concurrency(key, 1):
                        pass
        finally:
            await alimiter.aclose()

    asyncio.run(body())
    assert (count("held"), count("refused"), count("shadowed")) == (2, 2, 1)
    assert count("held", 2) == 1
    assert key.encode() not in generate_latest(registry)  # never a key in a label
    # The decisions of rate limits are not mixed in.
    assert registry.get_sample_value("tokenlimit_decision_seconds_count") == 0


# -- the memory backend on a fake clock -----------------------------------------------------------
def test_memory_leases_end_on_the_backends_clock() -> None:
    now = [1000.0]
    store = MemoryBackend(clock=lambda: now[0])
    limiter = RateLimiter(store)
    guard = limiter.concurrency("mem", 2, lease=10)
    guard.__enter__()  # two holders that never exit
    guard.__enter__()
    with pytest.raises(RateLimitExceeded) as info:
        guard.__enter__()
    assert info.value.retry_after == 10.0
    now[0] += 9.999
    with pytest.raises(RateLimitExceeded):
        guard.__enter__()
    now[0] += 0.001  # both leases end
    with guard as decision:
        assert decision.remaining == 1
    store.clear()
    assert store._slots == {}

    async def body() -> None:
        aguard = AsyncRateLimiter(store).concurrency("amem", 1, lease=5)
        await aguard.__aenter__()
        with pytest.raises(RateLimitExceeded):
            async with aguard:
                pass
        now[0] += 5
        async with aguard:
            pass

    asyncio.run(body())


def test_the_model() -> None:
    holders: dict[str, int] = {}
    assert hold(holders, "a", 2, 100, 0) == [1, 1, 0]
    assert hold(holders, "b", 2, 50, 10) == [1, 2, 0]
    assert hold(holders, "c", 2, 100, 20) == [0, 2, 40]  # b's lease ends at 60
    assert hold(holders, "c", 2, 100, 60) == [1, 2, 0]  # b's ended
    assert release(holders, "a", 99) == 1
    assert release(holders, "a", 99) == 0
    assert release(holders, "c", 160) == 0  # its lease had ended
    assert holders == {}


# -- inputs -------------------------------------------------------------------------------------
BAD: list[tuple[dict[str, Any], str, type[BaseException]]] = [
    ({"key": None}, "key", TypeError),
    ({"key": ""}, "key", ConfigError),
    ({"key": 5}, "key", TypeError),
    ({"max_in_flight": 0}, "max_in_flight", ConfigError),
    ({"max_in_flight": -1}, "max_in_flight", ConfigError),
    ({"max_in_flight": 1.5}, "max_in_flight", TypeError),
    ({"max_in_flight": True}, "max_in_flight", TypeError),
    ({"max_in_flight": "3"}, "max_in_flight", TypeError),
    ({"max_in_flight": 10**10}, "max_in_flight", ConfigError),
    ({"lease": 0}, "lease", ConfigError),
    ({"lease": -1}, "lease", ConfigError),
    ({"lease": math.nan}, "lease", ConfigError),
    ({"lease": math.inf}, "lease", ConfigError),
    ({"lease": "60"}, "lease", TypeError),
    ({"lease": True}, "lease", TypeError),
    ({"lease": 31 * 86400}, "lease", ConfigError),
    ({"timeout": -1}, "timeout", ConfigError),
    ({"timeout": math.nan}, "timeout", ConfigError),
    ({"timeout": math.inf}, "timeout", ConfigError),
    ({"timeout": "1"}, "timeout", TypeError),
    ({"timeout": None}, "timeout", TypeError),
]


@pytest.mark.parametrize(("change", "param", "kind"), BAD, ids=[f"{b[1]}={b[0]}" for b in BAD])
def test_bad_arguments_name_the_parameter(
    change: dict[str, Any], param: str, kind: type[BaseException]
) -> None:
    args: dict[str, Any] = {"key": "k", "max_in_flight": 2, "lease": 60.0, "timeout": 0}
    args.update(change)
    key, most = args.pop("key"), args.pop("max_in_flight")
    for limiter in (RateLimiter(MemoryBackend()), AsyncRateLimiter(MemoryBackend())):
        with pytest.raises(kind) as info:
            limiter.concurrency(key, most, **args)
        assert isinstance(info.value, ConfigError)
        assert info.value.param == param
    with pytest.raises(TypeError):
        RateLimiter(MemoryBackend()).concurrency("k", 1)(42)  # type: ignore[type-var]
