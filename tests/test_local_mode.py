"""``failure_mode="local"``: while storage is down each process decides in memory at its share of
every limit (``expected_processes``), then goes back to the shared buckets.

The arithmetic and the probing rule on a fake clock (a store that fails on demand); then real
servers behind ``faultproxy.FaultProxy``: refused, then healed (sync and async, with the
Prometheus series), and blackholed (a hung server adds at most one deadline per probe interval).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
import redis
from faultproxy import FaultProxy

import tokenlimit
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    ConfigError,
    Decision,
    Limit,
    MemoryBackend,
    RateLimiter,
)
from tokenlimit._breaker import Breaker, Circuit
from tokenlimit._fallback import LocalFallback, share
from tokenlimit._request import Request
from tokenlimit.testing import FakeClock, memory_limiter

SLOW = 0.001  # tokens per second: nothing refills during a test
PROBE_INTERVAL = Breaker().cool_down  # the circuit breaker's first cool-down
TIMEOUT = 0.05  # the limiter's deadline for one decision through the proxy
_T = TypeVar("_T")


def on_clock(limiter: RateLimiter | AsyncRateLimiter, clock: FakeClock) -> None:
    """``limiter``'s local buckets and circuit breaker on ``clock``."""
    limiter._fallback = LocalFallback(limiter.expected_processes or 1, clock=clock)
    limiter._circuit = Circuit.of(
        limiter.breaker, limiter.failure_mode, clock=clock, listener=limiter._circuit_changed
    )


class Recorder:
    """A metrics sink with the optional local-mode methods: keeps what it is told."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.errors: list[tuple[str, bool]] = []
        self.switches: list[str] = []
        self.local: list[Decision] = []

    def record_decision(self, limits: Sequence[Limit], decision: Decision, seconds: float) -> None:
        self.decisions.append(decision)

    def record_error(self, limits: Sequence[Limit], reason: str, failed_open: bool) -> None:
        self.errors.append((reason, failed_open))

    def record_switch(self, to: str) -> None:
        self.switches.append(to)

    def record_local_decision(self, limits: Sequence[Limit], decision: Decision) -> None:
        self.local.append(decision)


# -- options --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "8", 1_000_001])
def test_expected_processes_is_validated(bad: object) -> None:
    with pytest.raises(ConfigError) as caught:
        memory_limiter(failure_mode="local", expected_processes=bad)  # type: ignore[arg-type]
    assert caught.value.param == "expected_processes"


def test_local_mode_needs_expected_processes_and_no_other_mode_takes_it() -> None:
    with pytest.raises(ConfigError, match="required with failure_mode='local'") as caught:
        RateLimiter.from_url("memory://", failure_mode="local")
    assert caught.value.param == "expected_processes"
    for mode in ("open", "closed"):
        with pytest.raises(ConfigError, match="only used with failure_mode='local'") as caught:
            AsyncRateLimiter.from_url("memory://", failure_mode=mode, expected_processes=4)
        assert caught.value.param == "expected_processes"
    with pytest.raises(ConfigError, match="'open', 'closed' or 'local'") as caught:
        RateLimiter.from_url("memory://", failure_mode="fallback")
    assert caught.value.param == "failure_mode"


def test_the_option_is_kept_and_shown() -> None:
    limiter = memory_limiter(failure_mode="local", expected_processes=8)
    assert (limiter.failure_mode, limiter.expected_processes) == ("local", 8)
    assert "failure_mode='local', expected_processes=8" in repr(limiter)
    assert memory_limiter().expected_processes is None
    tokenlimit.configure("memory://", failure_mode="local", expected_processes=3)
    default = tokenlimit.default_limiter(False)
    assert (default.failure_mode, default.expected_processes) == ("local", 3)


def test_the_twins_of_one_url_share_their_local_buckets() -> None:
    """Django serves sync and async views from one process: one share, not one per twin."""
    from tokenlimit._config import limiter_pair

    sync, async_ = limiter_pair("memory://", {"failure_mode": "local", "expected_processes": 2})
    assert sync._fallback is not None
    assert async_._fallback is sync._fallback
    closed = limiter_pair("memory://", {})
    assert closed[0]._fallback is closed[1]._fallback is None


# -- the shares -------------------------------------------------------------------------------
def test_a_share_divides_rate_and_burst_rounding_the_burst_down_to_at_least_one() -> None:
    limit = Limit(10, 20)
    assert (share(limit, 3).rate, share(limit, 3).burst) == (pytest.approx(10 / 3), 6)
    assert share(limit, 20).burst == 1
    assert share(limit, 1000).burst == 1  # never 0 tokens
    assert share(limit, 1) == Limit(10, 20, name=limit.label)
    # Named by the limit's label: headers and metrics keep the limit's series.
    assert share(limit, 4).label == limit.label == "20-per-2s"
    assert share(Limit.parse("5/minute", name="login"), 2).label == "login"
    # A call costing more than a share's burst: that share's burst is the cost.
    assert share(limit, 4, cost=9).burst == 9
    # Dividing a limit as slow as a Limit may be stays a valid Limit.
    assert share(Limit(1e-12, 1), 8).burst == 1


# -- the rule, on a fake clock ------------------------------------------------------------------
class Flaky:
    """A third-party backend over a memory store that fails every call while ``down``."""

    remote = True

    def __init__(self, clock: FakeClock) -> None:
        self.store = MemoryBackend(clock=clock)
        self.down = False
        self.calls = 0
        self.releases = 0

    def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        self.calls += 1
        if self.down:
            raise BackendError("storage is down", reason="connection")
        return self.store.decide(request, consume=consume)

    def hold_back(self, request: Request, hold_us: int, *, timeout: float) -> Sequence[int]:
        self.calls += 1
        if self.down:
            raise BackendError("storage is down", reason="connection")
        return self.store.hold_back(request, hold_us)

    def refund(self, request: Request, *, timeout: float) -> Sequence[int]:
        self.calls += 1
        if self.down:
            raise BackendError("storage is down", reason="connection")
        return self.store.refund(request)

    def reset(self, request: Request, *, timeout: float) -> None:
        if self.down:
            raise BackendError("storage is down", reason="connection")
        self.store.reset(request)

    def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float
    ) -> Sequence[int]:
        self.calls += 1
        if self.down:
            raise BackendError("storage is down", reason="connection")
        return self.store.hold_slot(key, holder, max_in_flight, lease_us)

    def release_slot(self, key: str, holder: str, *, timeout: float) -> int:
        self.releases += 1
        if self.down:
            raise BackendError("storage is down", reason="connection")
        return self.store.release_slot(key, holder)

    def close(self) -> None:
        pass


@contextmanager
def flaky_limiter(processes: int) -> Iterator[tuple[RateLimiter, Flaky, FakeClock, Recorder]]:
    clock, recorder = FakeClock(1000.0), Recorder()
    backend = Flaky(clock)
    limiter = RateLimiter(
        backend,
        failure_mode="local",
        expected_processes=processes,
        metrics=recorder,
        local_cache=False,
    )
    on_clock(limiter, clock)  # the same fake clock
    yield limiter, backend, clock, recorder


def test_storage_down_decides_at_the_share_then_back_to_the_shared_bucket() -> None:
    limit = Limit(1, 10)  # one token a second, ten at most
    with flaky_limiter(4) as (limiter, backend, clock, recorder):
        assert [limiter.try_acquire("k", limit).remaining for _ in range(3)] == [9, 8, 7]
        backend.down = True
        # The share: 10 // 4 = 2 tokens, refilled at 1/4 token a second.
        got = [limiter.try_acquire("k", limit) for _ in range(3)]
        assert [d.allowed for d in got] == [True, True, False]
        assert [(d.limit, d.remaining) for d in got] == [(2, 1), (2, 0), (2, 0)]
        assert got[2].retry_after == pytest.approx(4.0)
        assert got[2].policy is not None
        assert got[2].policy.label == limit.label
        assert backend.calls == 4  # the first failure only: the next try is a second away
        clock.advance(4.0)  # one local token back; the server is tried once (the probe)
        assert limiter.try_acquire("k", limit).allowed
        assert not limiter.try_acquire("k", limit).allowed
        assert backend.calls == 5
        assert limiter.peek("k", limit).remaining == 0  # a peek is local too
        assert recorder.errors == [("connection", False)] * 2  # decided, not failed open
        assert recorder.switches == ["local"]
        assert len(recorder.local) == 5  # every local decision (the peek is not one)
        assert len(recorder.decisions) == 3 + 5
        backend.down = False
        # Within the cool-down nothing tries the server; the first call after it does. The
        # failed probe above doubled the cool-down (the circuit breaker, _breaker.py).
        assert not limiter.try_acquire("k", limit).allowed
        assert backend.calls == 5
        clock.advance(PROBE_INTERVAL)
        assert not limiter.try_acquire("k", limit).allowed
        assert backend.calls == 5
        clock.advance(PROBE_INTERVAL)
        # The shared bucket as the outage left it (7, plus 5 s of refill, at most 10).
        back = limiter.try_acquire("k", limit)
        assert (back.allowed, back.limit, back.remaining) == (True, 10, 9)
        assert backend.calls == 6
        assert recorder.switches == ["local", "shared"]
        assert limiter.try_acquire("k", limit).remaining == 8  # and it stays shared
        assert backend.calls == 7


def test_the_local_buckets_outlive_a_switch_and_reset_forgets_them() -> None:
    limit = Limit(SLOW, 4)
    with flaky_limiter(2) as (limiter, backend, clock, recorder):
        backend.down = True
        assert [limiter.try_acquire("k", limit).allowed for _ in range(3)] == [True, True, False]
        backend.down = False
        clock.advance(PROBE_INTERVAL)
        assert limiter.try_acquire("k", limit).remaining == 3  # shared again
        backend.down = True  # the server flaps: the share is not handed out afresh
        assert not limiter.try_acquire("k", limit).allowed
        assert recorder.switches == ["local", "shared", "local"]
        with pytest.raises(BackendError):  # reset follows no failure mode...
            limiter.reset("k", limit)
        assert limiter.try_acquire("k", limit).allowed  # ...but the local bucket is full again


def test_a_costly_call_is_admitted_locally_only_on_a_full_share() -> None:
    limit = Limit(1, 10)
    with flaky_limiter(5) as (limiter, backend, clock, _):
        backend.down = True
        first = limiter.try_acquire("k", limit, cost=4)  # the share is 2 tokens
        assert (first.allowed, first.limit, first.remaining) == (True, 4, 0)
        refused = limiter.try_acquire("k", limit, cost=4)
        assert not refused.allowed
        assert refused.retry_after == pytest.approx(4 * 5.0)  # four tokens at 1/5 a second
        clock.advance(refused.retry_after)
        assert limiter.try_acquire("k", limit, cost=4).allowed


def test_hold_back_holds_the_local_share_while_down() -> None:
    limit = Limit(1, 10)
    with flaky_limiter(2) as (limiter, backend, _, recorder):
        backend.down = True
        held = limiter.hold_back("k", limit, 30)
        assert (held.allowed, held.limit) == (False, 5)
        assert held.retry_after == pytest.approx(30)
        assert not limiter.try_acquire("k", limit).allowed
        assert recorder.switches == ["local"]


def test_refund_gives_back_to_the_local_share_while_down() -> None:
    """A token taken locally (deduct_when's charge) goes back to the local bucket, not to a
    server that is down; once the server answers, refunds are the server's again."""
    limit = Limit(SLOW, 4)
    with flaky_limiter(2) as (limiter, backend, _, recorder):
        backend.down = True
        assert [limiter.try_acquire("k", limit).allowed for _ in range(3)] == [True, True, False]
        given = limiter.refund("k", limit)
        assert (given.limit, given.remaining) == (2, 1)
        assert limiter.try_acquire("k", limit).allowed
        assert recorder.switches == ["local"]


def test_shadow_mode_admits_what_the_share_would_refuse() -> None:
    limit = Limit(SLOW, 2)
    with flaky_limiter(2) as (limiter, backend, _, _):
        shadow = limiter.as_shadow()
        backend.down = True
        got = [shadow.try_acquire("k", limit) for _ in range(2)]
        assert [(d.allowed, d.shadowed) for d in got] == [(True, False), (True, True)]


def test_concurrency_limits_hold_a_share_of_the_slots_locally() -> None:
    with flaky_limiter(2) as (limiter, backend, clock, recorder):
        guard = limiter.concurrency("jobs", 5, lease=60)
        with guard as held:
            assert (held.limit, held.remaining) == (5, 4)  # on the server
            backend.down = True
            with guard as first, guard as second:  # the share: 5 // 2 slots
                assert (first.limit, first.remaining, second.remaining) == (2, 1, 0)
                with pytest.raises(tokenlimit.RateLimitExceeded, match="all 2 slots"), guard:
                    pass
            with guard:  # given back locally: free again
                pass
            assert backend.releases == 0  # nothing local went to the server
            assert recorder.switches == ["local"]
            backend.down = False
            clock.advance(PROBE_INTERVAL)
            with guard as again:
                assert (again.limit, again.remaining) == (5, 3)  # the server's, as left
            assert recorder.switches == ["local", "shared"]


def test_async_limiter_on_the_fake_clock() -> None:
    clock, recorder = FakeClock(1000.0), Recorder()
    backend = Flaky(clock)

    class AsyncFlaky:
        remote = True

        async def decide(self, request: Request, *, consume: bool, timeout: float) -> Any:
            return backend.decide(request, consume=consume, timeout=timeout)

        async def reset(self, request: Request, *, timeout: float) -> None:
            backend.reset(request, timeout=timeout)

        async def aclose(self) -> None:
            pass

    async def main() -> None:
        limiter = AsyncRateLimiter(
            AsyncFlaky(), failure_mode="local", expected_processes=3, metrics=recorder
        )
        on_clock(limiter, clock)
        limit = Limit(SLOW, 9)
        assert (await limiter.try_acquire("k", limit)).remaining == 8
        backend.down = True
        got = [(await limiter.try_acquire("k", limit)).allowed for _ in range(4)]
        assert got == [True, True, True, False]
        backend.down = False
        clock.advance(PROBE_INTERVAL)
        assert (await limiter.try_acquire("k", limit)).remaining == 7
        assert recorder.switches == ["local", "shared"]
        assert len(recorder.local) == 4

    asyncio.run(main())


# -- real servers through the fault proxy ------------------------------------------------------
@pytest.fixture
def proxy(standalone: Any) -> Iterator[FaultProxy]:
    host, port = standalone.host_ports()[0]
    with FaultProxy(port, host) as made:
        yield made


def connected(limiter: RateLimiter, tries: int = 50) -> None:
    """Wait until ``limiter`` decides on the server: a peek at the whole burst (connecting
    through the proxy may miss the 50 ms deadline on a loaded machine; a miss is decided
    locally, at a share)."""
    warm = Limit(SLOW, 1_000_000)
    for _ in range(tries):
        if limiter.peek("warm-up", warm).limit == warm.burst:
            return
        time.sleep(PROBE_INTERVAL / 4)
    raise AssertionError("the limiter never reached the server")


async def aconnected(limiter: AsyncRateLimiter, tries: int = 50) -> None:
    """``connected`` for an async limiter."""
    warm = Limit(SLOW, 1_000_000)
    for _ in range(tries):
        if (await limiter.peek("warm-up", warm)).limit == warm.burst:
            return
        await asyncio.sleep(PROBE_INTERVAL / 4)
    raise AssertionError("the limiter never reached the server")


def wait_for_the_server(call: Any, limit: Limit, shared_burst: int) -> Decision:
    """Call until a decision comes from the shared bucket (its ``limit`` is the burst), at most
    a few probe intervals."""
    deadline = time.monotonic() + 10 * PROBE_INTERVAL
    while True:
        decision: Decision = call()
        if decision.limit == shared_burst:
            return decision
        assert time.monotonic() < deadline, "still local long after the server came back"
        time.sleep(0.05)


def prometheus() -> Any:
    prometheus_client = pytest.importorskip("prometheus_client")
    from tokenlimit.metrics import PrometheusMetrics

    registry = prometheus_client.CollectorRegistry()
    return registry, PrometheusMetrics(registry)


def sample(registry: Any, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


@pytest.mark.parametrize("fault", ["refused", "reset"])
def test_server_down_sync_decides_locally_then_shares_again(proxy: FaultProxy, fault: str) -> None:
    registry, sink = prometheus()
    limit = Limit(SLOW, 10)
    with RateLimiter.from_url(
        proxy.url, timeout=TIMEOUT, failure_mode="local", expected_processes=3, metrics=sink
    ) as limiter:
        connected(limiter)
        assert [limiter.try_acquire("k", limit).remaining for _ in range(2)] == [9, 8]
        proxy.refuse(reset=fault == "reset")
        got = [limiter.try_acquire("k", limit) for _ in range(5)]
        assert [d.allowed for d in got] == [True, True, True, False, False]  # 10 // 3
        assert {d.limit for d in got} == {3}
        assert sample(registry, "tokenlimit_failure_mode_switches_total", to="local") == 1
        assert sample(registry, "tokenlimit_failure_mode_switches_total", to="shared") == 0
        label = limit.label
        assert (
            sample(registry, "tokenlimit_local_decisions_total", limit=label, result="allowed") == 3
        )
        assert (
            sample(registry, "tokenlimit_local_decisions_total", limit=label, result="refused") == 2
        )
        assert sample(registry, "tokenlimit_fail_open_total", limit=label) == 0
        assert sample(registry, "tokenlimit_storage_errors_total", reason="connection") >= 1
        proxy.heal()
        back = wait_for_the_server(lambda: limiter.try_acquire("k", limit), limit, 10)
        assert (back.allowed, back.remaining) == (True, 7)  # the shared bucket, untouched since
        assert sample(registry, "tokenlimit_failure_mode_switches_total", to="shared") == 1
        assert limiter.try_acquire("k", limit).remaining == 6


def test_server_down_async_decides_locally_then_shares_again(proxy: FaultProxy) -> None:
    registry, sink = prometheus()
    limit = Limit(SLOW, 10)

    async def main() -> None:
        async with AsyncRateLimiter.from_url(
            proxy.url, timeout=TIMEOUT, failure_mode="local", expected_processes=3, metrics=sink
        ) as limiter:
            await aconnected(limiter)
            assert (await limiter.try_acquire("k", limit)).remaining == 9
            proxy.refuse()
            got = [await limiter.try_acquire("k", limit) for _ in range(5)]
            assert [d.allowed for d in got] == [True, True, True, False, False]
            assert sample(registry, "tokenlimit_failure_mode_switches_total", to="local") == 1
            proxy.heal()
            deadline = time.monotonic() + 10 * PROBE_INTERVAL
            while (back := await limiter.try_acquire("k", limit)).limit != 10:
                assert time.monotonic() < deadline, "still local long after the server came back"
                await asyncio.sleep(0.05)
            assert (back.allowed, back.remaining) == (True, 8)
            assert sample(registry, "tokenlimit_failure_mode_switches_total", to="shared") == 1

    asyncio.run(main())


# A hung server: every try waits out the deadline. While local, one call per probe interval
# tries; the rest are decided at once. The rule allows one slow call per interval after the
# call that switched (not counted); the bound allows one more.
HUNG_FOR = 2.5 * PROBE_INTERVAL
SLOW_CALL = TIMEOUT * 0.8  # a call this slow tried the server (a local decision takes µs)


def without_gc(run: Callable[[], _T]) -> _T:
    """``run()`` with the cyclic collector paused: late in a full suite, one collection of
    its large heap can stall every call in flight past SLOW_CALL (8 gathered calls at once),
    which is no try of the server."""
    gc.collect()
    gc.disable()
    try:
        return run()
    finally:
        gc.enable()


def allowed_tries(elapsed: float) -> int:
    """Tries of the server the rule allows in ``elapsed`` seconds after the switch."""
    return int(elapsed / PROBE_INTERVAL) + 1


def test_a_hung_server_costs_one_deadline_per_probe_interval_sync(proxy: FaultProxy) -> None:
    limit, recorder = Limit(SLOW, 1_000_000), Recorder()
    with RateLimiter.from_url(
        proxy.url, timeout=TIMEOUT, failure_mode="local", expected_processes=2, metrics=recorder
    ) as limiter:
        connected(limiter)
        recorder.errors.clear()  # a connect that missed its deadline while warming up
        recorder.switches.clear()
        proxy.blackhole()
        assert limiter.try_acquire("k", limit).limit == 500_000  # this call switched
        assert recorder.errors == [("timeout", False)]
        started = time.monotonic()
        slow = calls = 0
        while time.monotonic() - started < HUNG_FOR:
            before = time.monotonic()
            decision = limiter.try_acquire("k", limit)
            assert decision.allowed
            assert decision.limit == 500_000  # decided, locally
            calls += 1
            slow += time.monotonic() - before > SLOW_CALL
            time.sleep(0.002)
        elapsed = time.monotonic() - started
    tries = len(recorder.errors) - 1  # each failed try of the server, after the switch
    assert 1 <= tries <= allowed_tries(elapsed), (tries, elapsed)
    # Only those waited for the server (the bound allows one call slowed by the machine).
    assert 1 <= slow <= allowed_tries(elapsed) + 1, (slow, calls, elapsed)
    assert calls > 10 * slow
    assert recorder.switches == ["local"]


def test_a_hung_server_costs_one_deadline_per_probe_interval_async(proxy: FaultProxy) -> None:
    limit, recorder = Limit(SLOW, 1_000_000), Recorder()

    async def main() -> tuple[int, int, float]:
        async with AsyncRateLimiter.from_url(
            proxy.url, timeout=TIMEOUT, failure_mode="local", expected_processes=2, metrics=recorder
        ) as limiter:
            await aconnected(limiter)
            recorder.errors.clear()  # a connect that missed its deadline while warming up
            recorder.switches.clear()
            proxy.blackhole()
            assert (await limiter.try_acquire("k", limit)).limit == 500_000  # switched
            assert [failed_open for _, failed_open in recorder.errors] == [False]
            started = time.monotonic()
            slow = calls = 0

            async def one() -> bool:
                before = time.monotonic()
                decision = await limiter.try_acquire("k", limit)
                assert decision.allowed
                assert decision.limit == 500_000
                return time.monotonic() - before > SLOW_CALL

            while time.monotonic() - started < HUNG_FOR:
                # Eight at once: only one of them may be the probe.
                results = await asyncio.gather(*(one() for _ in range(8)))
                calls += len(results)
                slow += sum(results)
                await asyncio.sleep(0.002)
            return slow, calls, time.monotonic() - started

    slow, calls, elapsed = without_gc(lambda: asyncio.run(main()))
    tries = len(recorder.errors) - 1
    assert 1 <= tries <= allowed_tries(elapsed), (tries, elapsed)
    # A probe would hold the seven calls beside it only if they waited for it: they do not.
    assert 1 <= slow <= allowed_tries(elapsed) + 1, (slow, calls, elapsed)
    assert calls > 10 * slow
    assert recorder.switches == ["local"]


def test_concurrency_on_a_real_server_falls_back_to_local_slots(proxy: FaultProxy) -> None:
    async def main() -> None:
        async with AsyncRateLimiter.from_url(
            proxy.url, timeout=TIMEOUT, failure_mode="local", expected_processes=3
        ) as limiter:
            await aconnected(limiter)
            guard = limiter.concurrency("jobs", 7, lease=30)
            proxy.refuse()
            async with guard as one, guard as two:  # the share: 7 // 3 slots
                assert (one.limit, one.remaining, two.remaining) == (2, 1, 0)
                with pytest.raises(tokenlimit.RateLimitExceeded):
                    async with guard:
                        pass
            proxy.heal()
            deadline = time.monotonic() + 10 * PROBE_INTERVAL
            while True:
                async with guard as held:
                    if held.limit == 7:
                        break
                assert time.monotonic() < deadline, "still local long after the server came back"
                await asyncio.sleep(0.05)
            assert held.remaining == 6

    asyncio.run(main())


def test_a_users_client_falls_back_too(proxy: FaultProxy) -> None:
    limit = Limit(SLOW, 4)
    client = redis.Redis(host=proxy.host, port=proxy.port)
    try:
        limiter = RateLimiter(client, timeout=TIMEOUT, failure_mode="local", expected_processes=2)
        connected(limiter)
        proxy.refuse()
        assert [limiter.try_acquire("k", limit).allowed for _ in range(3)] == [True, True, False]
        limiter.close()
    finally:
        client.close()


# -- the integrations ----------------------------------------------------------------------------
def test_fastapi_keeps_answering_at_the_share_while_the_server_refuses(proxy: FaultProxy) -> None:
    pytest.importorskip("fastapi")
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from tokenlimit.integrations.fastapi import RateLimit, install_handlers

    # The default deadline: a refused connection fails at once, and connecting never misses it.
    limiter = AsyncRateLimiter.from_url(proxy.url, failure_mode="local", expected_processes=2)
    api = FastAPI()
    install_handlers(api)

    @api.get("/", dependencies=[Depends(RateLimit(Limit(SLOW, 4), limiter=limiter))])
    async def index() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(api) as client:
        deadline = time.monotonic() + 10
        while (first := client.get("/")).headers.get("x-ratelimit-limit") != "4":
            assert time.monotonic() < deadline, first.status_code
            time.sleep(PROBE_INTERVAL / 4)
        proxy.refuse()
        got = [client.get("/") for _ in range(3)]
        assert [r.status_code for r in got] == [200, 200, 429]  # the share of 2, never 503
        assert {r.headers["x-ratelimit-limit"] for r in got} == {"2"}
        proxy.heal()
        deadline = time.monotonic() + 10 * PROBE_INTERVAL
        while (back := client.get("/")).headers.get("x-ratelimit-limit") != "4":
            assert time.monotonic() < deadline, "still local long after the server came back"
            time.sleep(0.05)
        assert (back.status_code, back.headers["x-ratelimit-remaining"]) == (200, "2")
        client.portal.call(limiter.aclose)  # on the loop its connections were made on


def test_flask_reads_the_local_mode_from_its_config(proxy: FaultProxy) -> None:
    pytest.importorskip("flask")
    from flask import Flask

    from tokenlimit.integrations.flask import TokenLimit

    app = Flask(__name__)
    app.config.update(
        TOKENLIMIT_URL="memory://", TOKENLIMIT_FAILURE_MODE="local"
    )  # no EXPECTED_PROCESSES: the error names the setting
    with pytest.raises(ConfigError) as caught:
        TokenLimit(app, limit="10/minute")
    assert caught.value.param == "TOKENLIMIT_EXPECTED_PROCESSES"
    app = Flask(__name__)
    app.config.update(TOKENLIMIT_URL="memory://", TOKENLIMIT_EXPECTED_PROCESSES=4)
    with pytest.raises(ConfigError) as caught:
        TokenLimit(app, limit="10/minute")
    assert caught.value.param == "TOKENLIMIT_EXPECTED_PROCESSES"
    assert "only used with failure_mode='local'" in str(caught.value)

    app = Flask(__name__)
    app.config.update(
        TOKENLIMIT_URL=proxy.url,
        TOKENLIMIT_FAILURE_MODE="local",
        TOKENLIMIT_EXPECTED_PROCESSES=2,
    )
    TokenLimit(app, limit=Limit(SLOW, 4))
    app.add_url_rule("/", "index", lambda: "ok")
    client = app.test_client()
    deadline = time.monotonic() + 10
    while client.get("/").headers.get("X-RateLimit-Limit") != "4":
        assert time.monotonic() < deadline
        time.sleep(PROBE_INTERVAL / 4)
    proxy.refuse()
    got = [client.get("/") for _ in range(3)]
    assert [r.status_code for r in got] == [200, 200, 429]  # the share of 2, never 503
    assert {r.headers["X-RateLimit-Limit"] for r in got} == {"2"}


@pytest.fixture
def django_settings() -> Iterator[Any]:
    pytest.importorskip("django")
    import django_project
    from django.test import override_settings

    django_project.setup()
    with override_settings(**django_project.BASE):
        yield override_settings


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"FAILURE_MODE": "local", "EXPECTED_PROCESSES": 8}, []),
        ({"FAILURE_MODE": "local"}, ["tokenlimit.E017"]),
        ({"EXPECTED_PROCESSES": 8}, ["tokenlimit.E017"]),
        ({"FAILURE_MODE": "open", "EXPECTED_PROCESSES": 8}, ["tokenlimit.E017"]),
        ({"FAILURE_MODE": "local", "EXPECTED_PROCESSES": 0}, ["tokenlimit.E017"]),
        ({"FAILURE_MODE": "local", "EXPECTED_PROCESSES": "8"}, ["tokenlimit.E017"]),
        ({"FAILURE_MODE": "sometimes", "EXPECTED_PROCESSES": 8}, ["tokenlimit.E005"]),
    ],
)
def test_django_checks_the_local_mode_settings(
    django_settings: Any, entries: dict[str, object], expected: list[str]
) -> None:
    from django.core import checks

    with django_settings(TOKENLIMIT={"URL": "memory://", "LIMIT": "3/minute", **entries}):
        messages = checks.run_checks(tags=["tokenlimit"])
    assert sorted(m.id for m in messages) == expected
    for message in messages:
        assert "EXPECTED_PROCESSES" in message.msg or "FAILURE_MODE" in message.msg


def test_django_keeps_answering_at_the_share_while_the_server_refuses(
    django_settings: Any, proxy: FaultProxy
) -> None:
    from django.test import Client

    from tokenlimit.integrations._django import settings_state

    setting = {
        "URL": proxy.url,
        "LIMIT": Limit(SLOW, 4),
        "FAILURE_MODE": "local",
        "EXPECTED_PROCESSES": 2,
    }
    with django_settings(
        TOKENLIMIT=setting, MIDDLEWARE=["tokenlimit.integrations.django.RateLimitMiddleware"]
    ):
        state = settings_state()
        assert (state.sync.expected_processes, state.async_.expected_processes) == (2, 2)
        client = Client(REMOTE_ADDR="203.0.113.9")
        deadline = time.monotonic() + 10
        while client.get("/plain").headers.get("X-RateLimit-Limit") != "4":
            assert time.monotonic() < deadline
            time.sleep(PROBE_INTERVAL / 4)
        proxy.refuse()
        got = [client.get("/plain") for _ in range(3)]
        assert [r.status_code for r in got] == [200, 200, 429]  # the share of 2, never 503
        assert {r.headers["X-RateLimit-Limit"] for r in got} == {"2"}
