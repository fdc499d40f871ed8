"""The failure policy under real network faults, injected by ``faultproxy.FaultProxy`` between the
limiter and a real server: latency, dropped, refused and blackholed connections, slow connections.

Every decision is timed on its own (``time.monotonic``) and must return, decided or failed,
within the limiter's ``timeout`` plus a margin generous enough for a loaded 2-core machine.
What the server ran is read from the server itself (``INFO commandstats``), never through the
proxy. The worst latency seen under each fault is printed at the end of the module (``-s``).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio
from faultproxy import FaultProxy
from pools import in_use_after_linger
from redis.backoff import NoBackoff
from redis.retry import Retry

from servers import available_binaries
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    Decision,
    Limit,
    RateLimiter,
)

T = TypeVar("T")
FLAVOURS = sorted(available_binaries())
SLOW = 0.001  # tokens per second: nothing refills during a test
TIMEOUT = 0.05  # the limiter's deadline for one decision
MARGIN = 0.25  # scheduling on a loaded 2-core machine
BOUND = TIMEOUT + MARGIN  # no decision may take longer, whatever the fault
LATENCY = 0.3  # the injected delay: six deadlines
SYNC_KINDS = ["url", "client", "bare-client"]
ASYNC_KINDS = ["url", "client"]

WORST: dict[str, float] = {}  # label -> worst decision latency seen (printed at module end)


# -- fixtures and helpers ---------------------------------------------------------------------
@dataclass
class Bed:
    """A real server, a fault proxy in front of it, and an admin client that bypasses the proxy."""

    proxy: FaultProxy
    admin: redis.Redis
    flavour: str


@contextmanager
def _bed(target: Any) -> Iterator[Bed]:
    host, port = target.host_ports()[0]
    with FaultProxy(port, host) as proxy, redis.Redis(host=host, port=port) as admin:
        yield Bed(proxy, admin, target.flavour)


@pytest.fixture
def bed(standalone: Any) -> Iterator[Bed]:
    """A proxied standalone server, every flavour."""
    with _bed(standalone) as made:
        yield made


@pytest.fixture
def bed1(testbed: Any) -> Iterator[Bed]:
    """A proxied standalone server, one flavour only (the heavier tests)."""
    target = testbed.get("standalone", FLAVOURS[0])
    target.flush()
    with _bed(target) as made:
        yield made


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if WORST:
        print("\nworst decision latency per fault (s):")
        for label in sorted(WORST):
            print(f"  {label:<46} {WORST[label]:.3f}")


def note(label: str, elapsed: float, bound: float = BOUND) -> None:
    """Record one decision's latency and check it against ``bound``."""
    WORST[label] = max(WORST.get(label, 0.0), elapsed)
    assert elapsed < bound, f"{label}: a decision took {elapsed:.3f}s (bound {bound:.3f}s)"


def timed(call: Callable[[], T]) -> tuple[float, T | BackendError]:
    """Run one decision; its latency and its result or BackendError (anything else raises)."""
    started = time.monotonic()
    try:
        result: T | BackendError = call()
    except BackendError as error:
        result = error
    return time.monotonic() - started, result


async def atimed(call: Awaitable[T]) -> tuple[float, T | BackendError]:
    started = time.monotonic()
    try:
        result: T | BackendError = await call
    except BackendError as error:
        result = error
    return time.monotonic() - started, result


def scripts_ran(admin: redis.Redis) -> int:
    """Scripts the server ran: EVALSHA and EVAL calls, minus the refused ones (NOSCRIPT)."""
    stats = admin.info("commandstats")
    ran = 0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        entry = stats.get(name, {})
        ran += int(entry.get("calls", 0)) - int(entry.get("failed_calls", 0))
    return ran


def settled_scripts_ran(bed: Bed) -> int:
    """``scripts_ran`` once the late requests and replies have landed and the count holds."""
    bed.proxy.wait_idle(quiet=0.1)
    last = scripts_ran(bed.admin)
    while True:
        time.sleep(0.05)
        now = scripts_ran(bed.admin)
        if now == last:
            return now
        last = now


def bare_options() -> dict[str, Any]:
    """A client with no connect handshake (RESP2, no CLIENT SETINFO): every decision on a new
    connection sends its script at once, even when each round trip takes longer than the
    deadline, so the at-most-once checks see as many late replies as there are calls."""
    if "driver_info" in inspect.signature(redis.Redis.__init__).parameters:
        return {"protocol": 2, "driver_info": None}
    return {"protocol": 2, "lib_name": None, "lib_version": None}  # pragma: no cover


@contextmanager
def sync_limiter(kind: str, proxy: FaultProxy, **options: Any) -> Iterator[RateLimiter]:
    """``url``: from_url; ``client``: a user's ``redis.Redis`` with redis-py's default retry
    policy; ``bare-client``: the same without a connect handshake. The circuit breaker is off:
    these tests follow every call to the server (test_breaker.py tests the breaker), and count
    the scripts it ran: the overrides read is off too (test_overrides.py tests it under faults)."""
    options.setdefault("timeout", TIMEOUT)
    options.setdefault("breaker", False)
    options.setdefault("overrides", False)
    if kind == "url":
        with RateLimiter.from_url(proxy.url, **options) as limiter:
            yield limiter
        return
    extra = bare_options() if kind == "bare-client" else {}
    client = redis.Redis(host=proxy.host, port=proxy.port, **extra)
    try:
        limiter = RateLimiter(client, **options)
        yield limiter
        limiter.close()
    finally:
        client.close()


@asynccontextmanager
async def async_limiter(kind: str, proxy: FaultProxy, **options: Any) -> AsyncIterator[Any]:
    options.setdefault("timeout", TIMEOUT)
    options.setdefault("breaker", False)  # as in sync_limiter
    options.setdefault("overrides", False)
    if kind == "url":
        async with AsyncRateLimiter.from_url(proxy.url, **options) as limiter:
            yield limiter
        return
    client = redis.asyncio.Redis(host=proxy.host, port=proxy.port)
    try:
        async with AsyncRateLimiter(client, **options) as limiter:
            yield limiter
    finally:
        await client.aclose()


class Recorder:
    """A metrics sink that keeps what it is told."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.decisions: list[Decision] = []
        self.errors: list[tuple[str, bool]] = []

    def record_decision(self, limits: Sequence[Limit], decision: Decision, seconds: float) -> None:
        with self._lock:
            self.decisions.append(decision)

    def record_error(self, limits: Sequence[Limit], reason: str, failed_open: bool) -> None:
        with self._lock:
            self.errors.append((reason, failed_open))


WARM = Limit(SLOW, 1_000_000)


def warmed(limiter: RateLimiter, recorder: Recorder | None = None, tries: int = 20) -> None:
    """Connect ``limiter`` through the proxy (and load its script) before the test counts
    anything, then forget what ``recorder`` saw meanwhile. Connecting takes several round trips
    through the proxy's threads, and on the loaded CI machine that once missed the 50 ms
    deadline of a healthy first decision; a decision on a held connection takes one."""
    recorder = recorder or Recorder()
    for _ in range(tries):
        before = len(recorder.errors)
        try:
            limiter.try_acquire("warm-up", WARM)
        except BackendError:
            continue
        if len(recorder.errors) == before:  # decided by the server, not admitted as open
            break
    else:
        raise AssertionError(f"no decision within {tries} tries")
    recorder.decisions.clear()
    recorder.errors.clear()


async def awarmed(limiter: AsyncRateLimiter, recorder: Recorder, tries: int = 20) -> None:
    """``warmed`` for an async limiter."""
    for _ in range(tries):
        before = len(recorder.errors)
        try:
            await limiter.try_acquire("warm-up", WARM)
        except BackendError:
            continue
        if len(recorder.errors) == before:
            break
    else:
        raise AssertionError(f"no decision within {tries} tries")
    recorder.decisions.clear()
    recorder.errors.clear()


def expect_exact(decision: Decision | BackendError, burst: int, remaining: int) -> None:
    """A reply that belongs to this call: its own limit and exactly the tokens it left."""
    assert isinstance(decision, Decision), decision
    assert decision.allowed
    assert (decision.limit, decision.remaining) == (burst, remaining)


def missed(result: object) -> bool:
    """A deadline missed: no reply at all, which is not a wrong reply."""
    return isinstance(result, BackendError) and result.reason == "timeout"


def exact_sync(limiter: RateLimiter, key: str, burst: int, cost: int) -> None:
    """``try_acquire`` then ``peek`` on a fresh bucket leave exactly ``burst - cost``, each in
    its own reply. A deadline missed on a busy machine moves the check to a fresh key (the
    missed call may have taken tokens); a reply with wrong numbers fails at once."""
    limit = Limit(SLOW, burst)
    for attempt in range(3):
        fresh = f"{key}#{attempt}"
        got = timed(lambda: limiter.try_acquire(fresh, limit, cost=cost))[1]  # noqa: B023
        if missed(got):
            continue
        expect_exact(got, burst, burst - cost)
        for _ in range(3):  # a peek takes nothing: trying it again is harmless
            peeked = timed(lambda: limiter.peek(fresh, limit))[1]  # noqa: B023
            if not missed(peeked):
                break
        expect_exact(peeked, burst, burst - cost)
        return
    raise AssertionError(f"{key}: three deadlines missed in a row on a healthy server")


async def exact_async(limiter: AsyncRateLimiter, key: str, burst: int, cost: int) -> None:
    limit = Limit(SLOW, burst)
    for attempt in range(3):
        fresh = f"{key}#{attempt}"
        got = (await atimed(limiter.try_acquire(fresh, limit, cost=cost)))[1]
        if missed(got):
            continue
        expect_exact(got, burst, burst - cost)
        for _ in range(3):
            peeked = (await atimed(limiter.peek(fresh, limit)))[1]
            if not missed(peeked):
                break
        expect_exact(peeked, burst, burst - cost)
        return
    raise AssertionError(f"{key}: three deadlines missed in a row on a healthy server")


def speek(limiter: RateLimiter, key: str, limit: Limit) -> Decision:
    """``peek``, tried again after a missed deadline (it takes nothing): after a fault the
    connections are new, and connecting through the proxy may miss the 50 ms deadline."""
    for _ in range(3):
        got = timed(lambda: limiter.peek(key, limit))[1]
        if not missed(got):
            break
    assert isinstance(got, Decision), got
    return got


async def apeek(limiter: AsyncRateLimiter, key: str, limit: Limit) -> Decision:
    """``peek``, tried again after a missed deadline (it takes nothing)."""
    for _ in range(3):
        got = (await atimed(limiter.peek(key, limit)))[1]
        if not missed(got):
            break
    assert isinstance(got, Decision), got
    return got


def verify_sync(limiter: RateLimiter, tag: str, n: int = 12) -> None:
    """Distinct keys, bursts and costs: a reply meant for another call shows a wrong number."""
    for i in range(n):
        exact_sync(limiter, f"{tag}:{i}", 100 + i, 1 + i % 7)


async def warm(limiter: AsyncRateLimiter, n: int) -> None:
    """Leave ``n`` connected connections in the pool, opening one more per round.

    Opening a connection takes a handshake of a few round trips; many opening at once through
    the proxy (a Python thread sharing the GIL) can take longer than the 50 ms deadline, and a
    connection whose handshake times out is closed again. One at a time always gets there.
    """
    limit = Limit(SLOW, 1)
    for size in range(1, n + 1):
        for _ in range(20):
            got = await asyncio.gather(
                *(limiter.peek("warm", limit) for _ in range(size)), return_exceptions=True
            )
            for result in got:
                if not isinstance(result, (Decision, BackendError)):
                    raise result
            if all(isinstance(result, Decision) for result in got):
                break
        else:
            raise AssertionError(f"could not open {size} connections")


async def verify_async(limiter: AsyncRateLimiter, tag: str, n: int = 12) -> None:
    """As ``verify_sync``, one call after the other, then ``n`` more at once (each reply must
    reach its own caller; a missed deadline is tolerated there, a wrong number never)."""
    for i in range(n):
        await exact_async(limiter, f"{tag}:{i}", 100 + i, 1 + i % 7)
    await warm(limiter, n)
    limits = [Limit(SLOW, 300 + i) for i in range(n)]
    together = await asyncio.gather(
        *(atimed(limiter.try_acquire(f"{tag}:x{i}", limits[i], cost=1 + i % 5)) for i in range(n))
    )
    decided = 0
    for i, (_, got) in enumerate(together):
        if not missed(got):
            expect_exact(got, 300 + i, 300 + i - (1 + i % 5))
            decided += 1
    assert decided > 0


# -- the proxy itself -------------------------------------------------------------------------
def test_the_proxy_injects_each_fault(bed1: Bed) -> None:
    """What the other tests rely on: each mode does what it says, and heal undoes it."""
    proxy = bed1.proxy
    no_retry = Retry(NoBackoff(), 0)

    def client(timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host=proxy.host, port=proxy.port, socket_timeout=timeout, retry=no_retry,
            **bare_options(),
        )  # fmt: skip

    with client() as plain:
        assert plain.ping()
        proxy.latency(0.2)
        started = time.monotonic()
        assert plain.ping()
        assert 0.2 <= time.monotonic() - started < 0.2 + MARGIN
        proxy.latency(0.1, "both")
        started = time.monotonic()
        assert plain.ping()
        assert 0.2 <= time.monotonic() - started < 0.2 + MARGIN
        proxy.heal()
        assert plain.ping()
        with socket.create_connection((proxy.host, proxy.port), timeout=2) as raw:
            raw.sendall(b"PING\r\n")
            assert raw.recv(100) == b"+PONG\r\n"
            assert proxy.drop() == 2  # the client's idle connection and this one
            with pytest.raises(ConnectionResetError):
                raw.recv(100)
        assert plain.ping()  # its pool saw the reset connection and made a new one

        proxy.refuse()
        with pytest.raises(redis.ConnectionError, match="refused"):
            client().ping()
        proxy.refuse(reset=True)
        with pytest.raises(redis.ConnectionError):
            client().ping()
        proxy.heal()
        assert plain.ping()

        quick = client(0.2)
        assert quick.ping()
        proxy.blackhole()
        for mute in (quick, client(0.2)):  # a connection made before, and one made during
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                mute.ping()
            assert time.monotonic() - started < 0.2 + MARGIN
        proxy.heal()
        assert plain.ping()

    proxy.slow_fraction(0.5, 0.2)
    slow = []
    for _ in range(6):
        with client() as fresh:
            started = time.monotonic()
            assert fresh.ping()
            slow.append(time.monotonic() - started >= 0.2)
    assert slow == [False, True] * 3
    proxy.heal()
    proxy.wait_idle()
    assert proxy.stats()["in_flight"] == 0


# -- 300 ms latency, 50 ms deadline: bounded, and the script runs at most once per call --------
@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_latency_sync_bounded_and_at_most_once(bed: Bed, kind: str) -> None:
    limit, n = Limit(SLOW, 1000), 8
    with sync_limiter(kind, bed.proxy) as limiter:
        warmed(limiter)
        assert limiter.try_acquire("lat", limit).remaining == 999  # a warm pooled connection
        before = scripts_ran(bed.admin)
        bed.proxy.latency(LATENCY)
        for _ in range(n):
            elapsed, result = timed(lambda: limiter.try_acquire("lat", limit))
            note(f"latency 300ms sync {kind}", elapsed)
            assert isinstance(result, BackendError)
            assert result.reason == "timeout"
        ran = settled_scripts_ran(bed) - before  # every late reply has landed by now
        bed.proxy.heal()
        # At most once per call; at least the call on the warm connection sent its script
        # (the bare client sends one per call: no handshake to time out first).
        assert 1 <= ran <= n
        if kind == "bare-client":
            assert ran == n
        # Each script that ran took exactly its one token: none ran twice, none was lost.
        assert speek(limiter, "lat", limit).remaining == 999 - ran
    print(f"[latency sync {kind}/{bed.flavour}] {n} calls, server ran {ran} scripts")


@pytest.mark.parametrize("kind", ASYNC_KINDS)
def test_latency_async_bounded_and_at_most_once(bed: Bed, kind: str) -> None:
    limit, n = Limit(SLOW, 1000), 8

    async def main() -> int:
        async with async_limiter(kind, bed.proxy) as limiter:
            # `n` pooled connections, each ready to send a script at once, and the script cached.
            await warm(limiter, n)
            assert (await limiter.try_acquire("lat", limit)).remaining == 999
            before = scripts_ran(bed.admin)
            bed.proxy.latency(LATENCY)
            together = await asyncio.gather(
                *(atimed(limiter.try_acquire("lat", limit)) for _ in range(n))
            )
            one_by_one = [await atimed(limiter.try_acquire("lat", limit)) for _ in range(n)]
            for elapsed, result in together + one_by_one:
                note(f"latency 300ms async {kind}", elapsed)
                assert isinstance(result, BackendError)
                assert result.reason == "timeout"
            ran = await asyncio.to_thread(settled_scripts_ran, bed) - before
            bed.proxy.heal()
            assert 1 <= ran <= 2 * n
            assert (await apeek(limiter, "lat", limit)).remaining == 999 - ran
            return ran

    ran = asyncio.run(main())
    print(f"[latency async {kind}/{bed.flavour}] {2 * n} calls, server ran {ran} scripts")


# -- a server slow but alive: each round trip a little under the deadline --------------------
SLOW_TIMEOUT, SLOW_TRIP = 0.2, 0.15


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_slow_server_sync_bounded(bed1: Bed, kind: str) -> None:
    """A new connection's handshake is several round trips: connecting must end by the deadline
    too, not after each of its reads had a whole timeout."""
    limit = Limit(SLOW, 100)
    with sync_limiter(kind, bed1.proxy, timeout=SLOW_TIMEOUT) as limiter:
        assert limiter.try_acquire("slow", limit).remaining == 99
        bed1.proxy.latency(SLOW_TRIP)
        bed1.proxy.drop()  # and the connections were lost: every call connects again
        outcomes = []
        for _ in range(4):
            elapsed, result = timed(lambda: limiter.try_acquire("slow", limit))
            note(f"slow server 150ms/200ms sync {kind}", elapsed, SLOW_TIMEOUT + MARGIN)
            outcomes.append(result.remaining if isinstance(result, Decision) else result.reason)
        bed1.proxy.heal()
        bed1.proxy.wait_idle()
        verify_sync(limiter, "after")
    print(f"[slow server sync {kind}] {outcomes}")


@pytest.mark.parametrize("kind", ASYNC_KINDS)
def test_slow_server_async_bounded(bed1: Bed, kind: str) -> None:
    limit = Limit(SLOW, 100)

    async def main() -> list[Any]:
        async with async_limiter(kind, bed1.proxy, timeout=SLOW_TIMEOUT) as limiter:
            assert (await limiter.try_acquire("slow", limit)).remaining == 99
            bed1.proxy.latency(SLOW_TRIP)
            bed1.proxy.drop()
            await asyncio.sleep(0.01)  # the loop sees the resets before the next call
            outcomes: list[Any] = []
            for _ in range(4):
                elapsed, result = await atimed(limiter.try_acquire("slow", limit))
                note(f"slow server 150ms/200ms async {kind}", elapsed, SLOW_TIMEOUT + MARGIN)
                outcomes.append(result.remaining if isinstance(result, Decision) else result.reason)
            bed1.proxy.heal()
            await asyncio.to_thread(bed1.proxy.wait_idle)
            await verify_async(limiter, "after")
            return outcomes

    print(f"[slow server async {kind}] {asyncio.run(main())}")


def test_deadline_landing_anywhere_in_the_connect_async(bed1: Bed) -> None:
    """Deadlines from 0.2 ms to 4 ms land before, during and just after each step of opening a
    connection (TCP connect, handshake sends and reads) to a blackholed server. A user's client
    keeps redis-py's 5 s socket timeout and retry policy: a deadline that is lost on the way
    (Python < 3.12's ``wait_for``, which redis-py sends through, can swallow a cancellation)
    would hold that decision for many seconds."""
    calls = 200

    async def main() -> list[float]:
        client = redis.asyncio.Redis(host=bed1.proxy.host, port=bed1.proxy.port)
        bed1.proxy.blackhole()
        latencies = []
        try:
            for i in range(calls):
                limiter = AsyncRateLimiter(
                    client, timeout=0.0002 + (i % 40) * 0.0001, overrides=False
                )
                task = asyncio.ensure_future(atimed(limiter.try_acquire("k", Limit(SLOW, 5))))
                # asyncio.wait, unlike wait_for, cannot lose the test's own deadline.
                done, _ = await asyncio.wait((task,), timeout=BOUND + 1)
                if not done:
                    task.cancel()
                    raise AssertionError(f"a decision with a {limiter.timeout}s deadline hung")
                elapsed, result = task.result()
                assert isinstance(result, BackendError)
                latencies.append(elapsed)
        finally:
            await client.aclose()
        return latencies

    for elapsed in asyncio.run(main()):
        note("blackholed, deadline 0.2-4 ms in connect (async client)", elapsed)


# -- the server down: open admits and counts it, closed raises --------------------------------
FAULTS = {
    "refused": (lambda p: p.refuse(), "connection"),
    "reset": (lambda p: p.refuse(reset=True), "connection"),
    "blackholed": (lambda p: p.blackhole(), "timeout"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("kind", ["url", "client"])
def test_server_down_sync_open_admits_closed_raises(bed1: Bed, kind: str, fault: str) -> None:
    inject, reason = FAULTS[fault]
    limit, n = Limit(SLOW, 7), 4
    opened, closed = Recorder(), Recorder()
    with (
        sync_limiter(kind, bed1.proxy, failure_mode="open", metrics=opened) as open_limiter,
        sync_limiter(kind, bed1.proxy, failure_mode="closed", metrics=closed) as closed_limiter,
    ):
        warmed(open_limiter, opened)
        warmed(closed_limiter, closed)
        assert open_limiter.try_acquire("down", limit).remaining == 6
        assert closed_limiter.try_acquire("down", limit).remaining == 5
        inject(bed1.proxy)
        for _ in range(n):
            elapsed, admitted = timed(lambda: open_limiter.try_acquire("down", limit))
            note(f"{fault} sync open {kind}", elapsed)
            assert isinstance(admitted, Decision)
            assert admitted.allowed
            assert admitted.limit == 7
            elapsed, refused = timed(lambda: closed_limiter.try_acquire("down", limit))
            note(f"{fault} sync closed {kind}", elapsed)
            assert isinstance(refused, BackendError)
            assert refused.reason == reason
            assert isinstance(refused.__cause__, redis.RedisError)
        assert opened.errors == [(reason, True)] * n  # each fail-open counted
        assert closed.errors == [(reason, False)] * n
        assert len(opened.decisions) == len(closed.decisions) == 1  # the healthy ones only
        bed1.proxy.heal()
        warmed(open_limiter, opened)  # connected anew
        warmed(closed_limiter, closed)
        assert open_limiter.try_acquire("down", limit).remaining == 4
        assert closed_limiter.try_acquire("down", limit).remaining == 3
        assert len(opened.decisions) == len(closed.decisions) == 1


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("kind", ASYNC_KINDS)
def test_server_down_async_open_admits_closed_raises(bed1: Bed, kind: str, fault: str) -> None:
    inject, reason = FAULTS[fault]
    limit, n = Limit(SLOW, 7), 4
    opened, closed = Recorder(), Recorder()

    async def main() -> None:
        async with (
            async_limiter(kind, bed1.proxy, failure_mode="open", metrics=opened) as open_,
            async_limiter(kind, bed1.proxy, failure_mode="closed", metrics=closed) as closed_,
        ):
            await awarmed(open_, opened)
            await awarmed(closed_, closed)
            assert (await open_.try_acquire("down", limit)).remaining == 6
            assert (await closed_.try_acquire("down", limit)).remaining == 5
            inject(bed1.proxy)
            # A user's client keeps redis-py's retry policy for connecting (the async backend
            # uses its pool as is): it retries a refused connect until the deadline, "timeout".
            reasons = {reason, "timeout"} if kind == "client" else {reason}
            for _ in range(n):
                elapsed, admitted = await atimed(open_.try_acquire("down", limit))
                note(f"{fault} async open {kind}", elapsed)
                assert isinstance(admitted, Decision)
                assert admitted.allowed
                assert admitted.limit == 7
                elapsed, refused = await atimed(closed_.try_acquire("down", limit))
                note(f"{fault} async closed {kind}", elapsed)
                assert isinstance(refused, BackendError)
                assert refused.reason in reasons
                assert isinstance(refused.__cause__, redis.RedisError)
            assert [(r in reasons, failed_open) for r, failed_open in opened.errors] == [
                (True, True)
            ] * n
            assert [(r in reasons, failed_open) for r, failed_open in closed.errors] == [
                (True, False)
            ] * n
            assert len(opened.decisions) == len(closed.decisions) == 1  # the healthy ones only
            bed1.proxy.heal()
            await awarmed(open_, opened)  # connected anew
            await awarmed(closed_, closed)
            assert (await open_.try_acquire("down", limit)).remaining == 4
            assert (await closed_.try_acquire("down", limit)).remaining == 3
            assert len(opened.decisions) == len(closed.decisions) == 1

    asyncio.run(main())


def test_fastapi_answers_503_while_the_server_refuses(bed1: Bed) -> None:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from tokenlimit.integrations.fastapi import RateLimit, install_handlers

    limiter = AsyncRateLimiter.from_url(bed1.proxy.url, timeout=TIMEOUT, overrides=False)
    api = FastAPI()
    install_handlers(api)

    @api.get("/dependency", dependencies=[Depends(RateLimit(Limit(SLOW, 50), limiter=limiter))])
    async def guarded() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/decorated")
    @limiter.limit(limit=Limit(SLOW, 50), key="decorated")
    async def decorated() -> dict[str, str]:
        return {"ok": "yes"}

    paths = ["/dependency", "/decorated"]

    def all_ok(client: TestClient) -> None:
        """Every path answers 200, within 10 s: a limiter's first call connects and loads its
        script inside one 50 ms deadline, which a loaded 2-core machine can miss (a 503)."""
        deadline = time.monotonic() + 10
        while [client.get(path).status_code for path in paths] != [200, 200]:
            assert time.monotonic() < deadline, "no 200s within 10 s"
            time.sleep(0.05)

    with TestClient(api) as client:
        all_ok(client)
        bed1.proxy.refuse()
        for path in paths * 2:
            started = time.monotonic()
            response = client.get(path)
            note("refused fastapi 503", time.monotonic() - started)
            assert response.status_code == 503
            assert response.json() == {"detail": "rate limiter unavailable"}
            assert "retry-after" not in response.headers
        bed1.proxy.heal()
        all_ok(client)  # decisions resume once the server is back


# -- no poisoned connections ------------------------------------------------------------------
@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_no_poisoned_connections_sync(bed: Bed, kind: str) -> None:
    """After each fault, every reply is the caller's own, including while late replies to
    calls that gave up are still landing."""
    proxy, lat = bed.proxy, Limit(SLOW, 1000)
    with sync_limiter(kind, proxy) as limiter:
        verify_sync(limiter, "before")
        proxy.latency(LATENCY)
        for _ in range(4):  # the first call uses the warm connection, the others new ones
            assert isinstance(timed(lambda: limiter.try_acquire("lat", lat))[1], BackendError)
        proxy.heal()
        # Keep deciding while the late replies land (up to LATENCY after they were sent): a
        # connection kept after a timeout would hand one of them to one of these calls.
        started, i = time.monotonic(), 0
        while time.monotonic() - started < LATENCY + 0.2:
            exact_sync(limiter, f"landing:{i}", 100 + i % 50, 1 + i % 7)
            i += 1
        proxy.wait_idle()
        verify_sync(limiter, "latency")

        assert limiter.peek("idle", lat).remaining == 1000
        assert proxy.drop() >= 1  # pooled connections die while idle
        verify_sync(limiter, "dropped")

        proxy.blackhole()
        for _ in range(3):
            elapsed, result = timed(lambda: limiter.try_acquire("mute", lat))
            note(f"blackholed sync closed {kind}", elapsed)
            assert isinstance(result, BackendError)
        proxy.heal()
        verify_sync(limiter, "blackholed")

        proxy.refuse()
        assert isinstance(timed(lambda: limiter.try_acquire("refused", lat))[1], BackendError)
        proxy.heal()
        verify_sync(limiter, "refused")


@pytest.mark.parametrize("kind", ASYNC_KINDS)
def test_no_poisoned_connections_async(bed: Bed, kind: str) -> None:
    proxy, lat = bed.proxy, Limit(SLOW, 1000)

    async def main() -> None:
        async with async_limiter(kind, proxy) as limiter:
            await verify_async(limiter, "before")
            proxy.latency(LATENCY)
            late = await asyncio.gather(
                *(atimed(limiter.try_acquire("lat", lat)) for _ in range(6))
            )
            assert all(isinstance(result, BackendError) for _, result in late)
            proxy.heal()
            started, i = time.monotonic(), 0
            while time.monotonic() - started < LATENCY + 0.2:
                await exact_async(limiter, f"landing:{i}", 100 + i % 50, 1 + i % 7)
                i += 1
            await asyncio.to_thread(proxy.wait_idle)
            await verify_async(limiter, "latency")

            proxy.drop()
            await asyncio.sleep(0.01)
            await verify_async(limiter, "dropped")

            proxy.blackhole()
            for _ in range(3):
                elapsed, result = await atimed(limiter.try_acquire("mute", lat))
                note(f"blackholed async closed {kind}", elapsed)
                assert isinstance(result, BackendError)
            proxy.heal()
            await verify_async(limiter, "blackholed")

    asyncio.run(main())


STORM = Limit(SLOW, 10_000)
STORM_KEYS = 20


async def _storm(limiter: AsyncRateLimiter, calls: int, wave: int, seed: int) -> Counter[str]:
    """``calls`` decisions in waves of ``wave`` at once, most cancelled at a random point:
    by ``wait_for`` with a tiny timeout, or by ``task.cancel()`` after a few loop turns."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        call = limiter.try_acquire(f"storm:{i % STORM_KEYS}", STORM)
        started = time.monotonic()
        try:
            if i % 3 == 0:
                await asyncio.wait_for(call, rng.uniform(0.0, 0.004))
            elif i % 3 == 1:
                task = asyncio.ensure_future(call)
                for _ in range(rng.randrange(12)):
                    await asyncio.sleep(0)
                task.cancel()
                await task
            else:
                await call  # left alone: decided, or failed at the limiter's own deadline
            outcomes["decided"] += 1
        except (asyncio.CancelledError, asyncio.TimeoutError):
            outcomes["cancelled"] += 1
        except BackendError:
            outcomes["backend error"] += 1
        # A hundred calls connecting and cancelling at once keep one event loop busy (and the
        # proxy's thread, for the GIL): a call's deadline fires on time, but its task may wait
        # for the loop. So the bound here is "never hangs", not the deadline plus a margin.
        note(f"cancel storm, per call, {wave} at once (async)", time.monotonic() - started, 1.0)

    for start in range(0, calls, wave):
        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(start, min(calls, start + wave))))
        # Side by side, but sharing one event loop with a hundred connects: CPU-bound.
        note(f"cancel storm, wave of {wave} (async)", time.monotonic() - started, bound=2.0)
    return outcomes


@pytest.mark.parametrize("pool", ["url", "blocking-client"])
def test_no_poisoned_connections_after_many_cancelled_async_calls(bed1: Bed, pool: str) -> None:
    proxy = bed1.proxy

    async def main() -> tuple[Counter[str], int]:
        blocking = None
        if pool == "url":
            context: Any = async_limiter("url", proxy)
        else:
            blocking = redis.asyncio.BlockingConnectionPool(
                host=proxy.host, port=proxy.port, max_connections=8
            )
            client = redis.asyncio.Redis(connection_pool=blocking)
            context = AsyncRateLimiter(client, timeout=TIMEOUT, breaker=False, overrides=False)
        async with context as limiter:
            await verify_async(limiter, "before")
            before = scripts_ran(bed1.admin)
            # Replies take a little while, and a quarter of the new connections much longer,
            # so the cancellations land before, during and after each exchange.
            proxy.latency(0.001)
            proxy.slow_fraction(0.25, 0.02)
            outcomes = await _storm(limiter, calls=2000, wave=100, seed=7)
            proxy.heal()
            ran = await asyncio.to_thread(settled_scripts_ran, bed1) - before
            # What the storm left behind is garbage now: collect it before the checks, whose
            # 50 ms deadline a full collection of this size could otherwise eat (~60 ms here).
            gc.collect()
            # Every script that ran took exactly one token, and no call ran twice.
            left = [(await apeek(limiter, f"storm:{k}", STORM)).remaining for k in range(20)]
            assert sum(10_000 - r for r in left) == ran
            assert ran <= 2000
            # Every reply is now its caller's own: fresh keys, and the storm's keys.
            await verify_async(limiter, "after", n=20)
            for k, r in enumerate(left):
                got = await limiter.try_acquire(f"storm:{k}", STORM, cost=2)
                expect_exact(got, 10_000, r - 2)
                expect_exact(await apeek(limiter, f"storm:{k}", STORM), 10_000, r - 2)
        if blocking is not None:
            # No connection was lost to a cancellation: all are back in the pool.
            assert await in_use_after_linger(blocking) == 0
            await client.aclose()
            await blocking.disconnect()  # a pool passed in is not the client's to close
        return outcomes, ran

    outcomes, ran = asyncio.run(main())
    assert sum(outcomes.values()) == 2000
    assert outcomes["cancelled"] > 500  # the storm did cancel calls mid-way
    print(f"[cancel storm {pool}] {dict(outcomes)}; server ran {ran} scripts")


# -- a pool smaller than the number of concurrent callers -------------------------------------
def _slow_half(proxy: FaultProxy) -> None:
    proxy.heal()
    proxy.slow_fraction(0.5, LATENCY)


def _only(fault: Callable[[FaultProxy], None]) -> Callable[[FaultProxy], None]:
    def inject(proxy: FaultProxy) -> None:
        proxy.heal()
        fault(proxy)

    return inject


PHASES: list[tuple[str, Callable[[FaultProxy], None]]] = [
    ("healthy", FaultProxy.heal),
    ("latency 300ms", lambda p: p.latency(LATENCY)),
    ("slow half", _slow_half),
    ("blackholed", _only(FaultProxy.blackhole)),
    ("refused", _only(lambda p: p.refuse())),
    ("healed", FaultProxy.heal),
]
NO_ANSWER = ("latency 300ms", "blackholed", "refused")  # no call can be decided


def check_counted(per_key: dict[int, Counter[str]], used: dict[int, int]) -> None:
    """Each caller's bucket lost exactly its decided calls, plus at most one token per call
    that failed (it may have run on the server, once): never a token twice."""
    for t, outcomes in per_key.items():
        failed = sum(n for outcome, n in outcomes.items() if outcome != "decided")
        assert outcomes["decided"] <= used[t] <= outcomes["decided"] + failed, (t, outcomes)


def test_small_blocking_pool_many_threads_never_hang(bed1: Bed) -> None:
    """A user's ``BlockingConnectionPool(max_connections=2)``, 16 threads deciding at once under
    each fault in turn: every call returns within the deadline plus the margin, decided or
    failed, and no token is ever taken twice."""
    threads, calls = 16, 3
    pool = redis.BlockingConnectionPool(
        host=bed1.proxy.host, port=bed1.proxy.port, max_connections=2, timeout=5
    )
    client = redis.Redis(connection_pool=pool)
    limiter = RateLimiter(client, timeout=TIMEOUT, breaker=False, overrides=False)
    limits = [Limit(SLOW, 500 + t) for t in range(threads)]
    per_key: dict[int, Counter[str]] = {t: Counter() for t in range(threads)}
    per_phase: dict[str, Counter[str]] = {}

    def run_phase() -> list[tuple[int, float, Decision | BackendError]]:
        barrier = threading.Barrier(threads)
        results: list[tuple[int, float, Decision | BackendError]] = []
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                barrier.wait(10)
                for _ in range(calls):
                    results.append((t, *timed(lambda: limiter.try_acquire(f"t{t}", limits[t]))))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        pool_threads = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for thread in pool_threads:
            thread.start()
        for thread in pool_threads:
            thread.join(30)
        assert errors == []
        assert len(results) == threads * calls
        return results

    try:
        for phase, inject in PHASES:
            inject(bed1.proxy)
            per_phase[phase] = Counter()
            for t, elapsed, result in run_phase():
                note(f"pool of 2, 16 threads, {phase} (sync)", elapsed)
                outcome = "decided" if isinstance(result, Decision) else result.reason
                per_key[t][outcome] += 1
                per_phase[phase][outcome] += 1
            if phase in NO_ANSWER:
                assert per_phase[phase]["decided"] == 0
        bed1.proxy.heal()
        bed1.proxy.wait_idle()
        used = {t: 500 + t - limiter.peek(f"t{t}", limits[t]).remaining for t in range(threads)}
        check_counted(per_key, used)
        verify_sync(limiter, "after")
        assert client.ping()  # the user's own pool still serves the user
    finally:
        limiter.close()
        client.close()
        pool.disconnect()  # a pool passed in is not the client's to close
    summary = {phase: dict(counts) for phase, counts in per_phase.items()}
    print(f"[pool of 2, 16 threads] {summary}")


def test_small_async_blocking_pool_many_tasks_never_hang(bed1: Bed) -> None:
    """The same with ``redis.asyncio.BlockingConnectionPool(max_connections=2)`` (which waits
    20 s for a connection by default) and 64 tasks; afterwards no connection is missing."""
    tasks, calls = 64, 2
    limits = [Limit(SLOW, 500 + t) for t in range(tasks)]
    per_key: dict[int, Counter[str]] = {t: Counter() for t in range(tasks)}
    per_phase: dict[str, Counter[str]] = {}

    async def main() -> None:
        pool = redis.asyncio.BlockingConnectionPool(
            host=bed1.proxy.host, port=bed1.proxy.port, max_connections=2
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        limiter = AsyncRateLimiter(client, timeout=TIMEOUT, breaker=False, overrides=False)

        async def work(t: int) -> list[tuple[int, float, Decision | BackendError]]:
            return [
                (t, *await atimed(limiter.try_acquire(f"t{t}", limits[t]))) for _ in range(calls)
            ]

        try:
            for phase, inject in PHASES:
                inject(bed1.proxy)
                per_phase[phase] = Counter()
                for results in await asyncio.gather(*map(work, range(tasks))):
                    for t, elapsed, result in results:
                        note(f"pool of 2, 64 tasks, {phase} (async)", elapsed)
                        outcome = "decided" if isinstance(result, Decision) else result.reason
                        per_key[t][outcome] += 1
                        per_phase[phase][outcome] += 1
                if phase in NO_ANSWER:
                    assert per_phase[phase]["decided"] == 0
            bed1.proxy.heal()
            await asyncio.to_thread(bed1.proxy.wait_idle, quiet=0.1)
            left = [(await apeek(limiter, f"t{t}", limits[t])).remaining for t in range(tasks)]
            check_counted(per_key, {t: 500 + t - left[t] for t in range(tasks)})
            await verify_async(limiter, "after")
            assert await in_use_after_linger(pool) == 0  # none lost to a timed-out call
            assert await client.ping()
        finally:
            await client.aclose()
            await pool.disconnect()  # a pool passed in is not the client's to close

    asyncio.run(main())
    summary = {phase: dict(counts) for phase, counts in per_phase.items()}
    print(f"[async pool of 2, 64 tasks] {summary}")


def _check_crowd(results: list[tuple[float, Decision | BackendError]], burst: int) -> None:
    """Every caller decided, none failed fast for want of a connection, none double-counted."""
    errors = [r for _, r in results if isinstance(r, BackendError)]
    assert errors == []
    left = sorted(r.remaining for _, r in results if isinstance(r, Decision))
    assert left == list(range(burst - len(results), burst))


def test_from_url_more_threads_than_connections(bed1: Bed) -> None:
    """``from_url`` makes a pool of 100: the 101st concurrent caller waits for a connection
    (within the deadline) rather than fail at once while the server is healthy."""
    threads, burst = 150, 1000
    bed1.proxy.latency(0.02)  # each decision holds its connection a while
    with RateLimiter.from_url(bed1.proxy.url, timeout=2.0, overrides=False) as limiter:
        barrier = threading.Barrier(threads)
        results: list[tuple[float, Decision | BackendError]] = []

        def work() -> None:
            barrier.wait(10)
            results.append(timed(lambda: limiter.try_acquire("crowd", Limit(SLOW, burst))))

        crowd = [threading.Thread(target=work) for _ in range(threads)]
        for thread in crowd:
            thread.start()
        for thread in crowd:
            thread.join(30)
        assert len(results) == threads
        for elapsed, _ in results:
            note("150 threads, from_url pool of 100 (sync)", elapsed, 2.0 + MARGIN)
        _check_crowd(results, burst)


def test_from_url_more_tasks_than_connections(bed1: Bed) -> None:
    tasks, burst = 300, 1000
    bed1.proxy.latency(0.02)

    async def main() -> list[tuple[float, Decision | BackendError]]:
        async with AsyncRateLimiter.from_url(bed1.proxy.url, timeout=2.0) as limiter:
            return await asyncio.gather(
                *(atimed(limiter.try_acquire("crowd", Limit(SLOW, burst))) for _ in range(tasks))
            )

    results = asyncio.run(main())
    for elapsed, _ in results:
        note("300 tasks, from_url pool of 100 (async)", elapsed, 2.0 + MARGIN)
    _check_crowd(results, burst)
