"""The local over-limit cache: refusals answered in-process until the server's window ends.

Unit tests of ``RefusalCache`` run on an injected clock, against ``MemoryBackend`` (the
reference model) on the same fake clock as the oracle: every number must match it. The tests on
real servers prove that a cached refusal makes no round trip, that the cache stops answering at
or before the server's own moment of admission, and that ``reset`` and ``local_cache=False``
work, sync and async.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tokenlimit import (
    AsyncRateLimiter,
    ConfigError,
    Decision,
    Limit,
    MemoryBackend,
    RateLimiter,
)
from tokenlimit._cache import DEFAULT_SIZE, RefusalCache, check_local_cache

SLOW = 0.001  # tokens per second: nothing refills during a test


class FakeClock:
    """Seconds for ``MemoryBackend``, set in whole µs (the middle of one, so ``int(s * 1e6)``
    gives ``us`` back)."""

    def __init__(self, us: int = 1_000_000_000) -> None:
        self.us = us

    def __call__(self) -> float:
        return (self.us + 0.5) / 1_000_000


def same(local: Decision, server: Decision, tol: float = 1e-9) -> None:
    """``local`` says what ``server`` said, field by field and limit by limit."""
    for a, b in zip((local, *local.details), (server, *server.details), strict=True):
        assert (a.allowed, a.limit, a.remaining, a.policy) == (
            b.allowed,
            b.limit,
            b.remaining,
            b.policy,
        )
        assert a.retry_after == pytest.approx(b.retry_after, abs=tol)
        assert a.reset_after == pytest.approx(b.reset_after, abs=tol)
    assert len(local.details) == len(server.details)


# -- RefusalCache on a fake clock, against the model --------------------------------------------

# Rates whose token interval is a whole number of µs, so the server's µs-rounded reply is exact
# and every number can be compared exactly.
RATES = [0.5, 1, 2, 4, 10, 1000]


@settings(max_examples=300, deadline=None)
@given(
    specs=st.lists(st.tuples(st.sampled_from(RATES), st.integers(1, 12)), min_size=1, max_size=3),
    cost=st.integers(1, 12),
    taken=st.integers(0, 12),
    gap=st.integers(0, 3_000_000),
    points=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=6),
)
def test_cached_refusal_is_the_models_refusal_aged(
    specs: list[tuple[float, int]], cost: int, taken: int, gap: int, points: list[float]
) -> None:
    limits = [Limit(rate, burst, name=str(i)) for i, (rate, burst) in enumerate(specs)]
    assume(cost <= min(lim.burst for lim in limits))
    clock = FakeClock()
    model = RateLimiter(MemoryBackend(clock=clock))
    for _ in range(taken):
        model.try_acquire("k", limits, cost=1)
    while model.try_acquire("k", limits, cost=cost).allowed:
        pass
    clock.us += gap
    refused = model.peek("k", limits, cost=cost)
    assume(not refused.allowed)

    cache = RefusalCache()
    keys = model._request("k", limits, cost).keys
    sent, start = clock(), clock.us
    cache.put(keys, cost, sent, refused)
    if not len(cache):  # only a refusal that ends within the server's slack is not kept
        assert refused.retry_after <= 2e-6 + max(1e-6 / lim.rate for lim in limits)
        return
    until = cache._entries[keys].until
    window_us = math.floor((until - sent) * 1e6)
    for point in sorted(points):  # forward only: the memory backend drops buckets once full
        clock.us = start + int(point * window_us)
        local = cache.get(keys, cost, clock())
        assert local is not None
        server = model.peek("k", limits, cost=cost)
        assert not server.allowed  # never refuse what the server would admit
        same(local, server)
        assert cache.get(keys, cost + 1, clock()) is None  # another cost: ask the server
    # Once the window ends the server is asked, and admits by retry_after at the latest.
    clock.us = start + math.ceil((until - sent) * 1e6) + 1
    assert cache.get(keys, cost, clock()) is None
    assert not len(cache)  # met expired: removed
    clock.us = start + math.ceil(refused.retry_after * 1e6)
    assert model.peek("k", limits, cost=cost).allowed


def refusal(retry: float, limit: Limit | None = None) -> Decision:
    lim = limit or Limit(1, 5)
    return Decision(False, lim.burst, 0, retry, retry + 1, policy=lim)


def test_answers_only_the_same_cost_until_the_window_ends() -> None:
    cache = RefusalCache()
    cache.put(("a",), 2, 100.0, refusal(1.0))
    assert cache.get(("a",), 1, 100.5) is None
    assert cache.get(("b",), 2, 100.5) is None
    hit = cache.get(("a",), 2, 100.5)
    assert hit is not None
    assert not hit.allowed
    assert hit.retry_after == pytest.approx(0.5)
    assert hit.reset_after == pytest.approx(1.5)
    assert len(cache) == 1
    assert cache.get(("a",), 2, 101.0) is None
    assert len(cache) == 0


def test_allowed_decisions_and_tiny_waits_are_not_kept() -> None:
    cache = RefusalCache()
    lim = Limit(1, 5)
    cache.put(("a",), 1, 0.0, Decision(True, 5, 4, 0.0, 1.0, policy=lim))
    cache.put(("b",), 1, 0.0, refusal(1e-7))
    assert len(cache) == 0


def test_fresher_reply_wins() -> None:
    cache = RefusalCache()
    cache.put(("a",), 1, 10.0, refusal(5.0))
    cache.put(("a",), 1, 9.0, refusal(1.0))  # sent earlier, arrived later: ignored
    hit = cache.get(("a",), 1, 10.0)
    assert hit is not None
    assert hit.retry_after == pytest.approx(5.0)
    cache.put(("a",), 1, 11.0, refusal(0.5))
    assert cache.get(("a",), 1, 11.6) is None


def test_forget_drops_every_entry_sharing_a_key() -> None:
    cache = RefusalCache()
    cache.put(("a",), 1, 0.0, refusal(9.0))
    cache.put(("b",), 1, 0.0, refusal(9.0))
    cache.forget(("a",), 1.0)
    assert cache.get(("a",), 1, 1.0) is None
    assert cache.get(("b",), 1, 1.0) is not None
    both = Decision(
        False, 5, 0, 9.0, 9.0, policy=Limit(1, 5),
        details=(refusal(9.0, Limit(1, 5)), refusal(9.0, Limit(2, 5))),
    )  # fmt: skip
    cache.put(("x", "y"), 1, 2.0, both)
    cache.put(("y",), 1, 2.0, refusal(9.0))
    cache.forget(("y",), 3.0)
    assert len(cache) == 1  # ("b",) only
    cache.forget(("b", "z"), 3.0)
    assert len(cache) == 0
    # A refusal sent before the reset may describe the bucket before it: not kept.
    cache.put(("y",), 1, 2.5, refusal(9.0))
    assert len(cache) == 0
    cache.put(("y",), 1, 3.5, refusal(9.0))
    assert len(cache) == 1
    cache.clear(4.0)
    assert len(cache) == 0
    # Nor one sent before a clear (an override changed, every bucket was reset).
    cache.put(("y",), 1, 3.9, refusal(9.0))
    assert len(cache) == 0
    cache.put(("y",), 1, 4.1, refusal(9.0))
    assert len(cache) == 1


def test_bound_drops_expired_entries_first_then_the_oldest() -> None:
    cache = RefusalCache(8)
    for i in range(4):
        cache.put((f"short{i}",), 1, 0.0, refusal(1.0))
    for i in range(4):
        cache.put((f"long{i}",), 1, 0.0, refusal(100.0))
    cache.put(("new",), 1, 5.0, refusal(100.0))  # full: the four expired ones go
    assert len(cache) == 5
    assert cache.get(("long0",), 1, 5.0) is not None
    for i in range(4):
        cache.put((f"more{i}",), 1, 6.0, refusal(100.0))
    assert len(cache) == 8
    cache.put(("last",), 1, 7.0, refusal(100.0))  # full of live entries: the oldest goes
    assert len(cache) <= 8
    assert cache.get(("long0",), 1, 7.0) is None
    assert cache.get(("last",), 1, 7.0) is not None


def test_bound_holds_under_100k_distinct_refusals_in_amortized_constant_time() -> None:
    cache = RefusalCache()
    decision = refusal(3600.0)
    started = time.perf_counter()
    for i in range(100_000):
        cache.put((f"k{i}",), 1, i * 1e-3, decision)
        assert len(cache) <= DEFAULT_SIZE
    elapsed = time.perf_counter() - started
    assert cache.get(("k99999",), 1, 100.0) is not None
    assert cache.get(("k0",), 1, 100.0) is None
    assert elapsed < 5.0  # ~0.3 s here; a sweep per insertion would take minutes


def test_threads_keep_the_books_straight() -> None:
    cache = RefusalCache(16)
    keysets = [(f"k{i}",) for i in range(12)] + [(f"k{i}", f"k{i + 1}") for i in range(12)]
    both = Decision(
        False, 5, 0, 1.0, 1.0, policy=Limit(1, 5),
        details=(refusal(1.0, Limit(1, 5)), refusal(0.5, Limit(2, 5))),
    )  # fmt: skip
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for n in range(20_000):
                keys = keysets[(seed * 7 + n * 13) % len(keysets)]
                now = n * 1e-4
                if n % 11 == 0:
                    cache.forget(keys, now - 0.5)
                elif n % 3 == 0:
                    cache.put(keys, 1, now, both if len(keys) > 1 else refusal(1.0))
                else:
                    cache.get(keys, 1, now)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert len(cache) <= 16
    assert cache._multi == sum(len(k) > 1 for k in cache._entries)


@pytest.mark.parametrize(
    ("value", "expected"), [(True, DEFAULT_SIZE), (False, 0), (0, 0), (1, 1), (50_000, 50_000)]
)
def test_option_values(value: Any, expected: int) -> None:
    assert check_local_cache(value) == expected


@pytest.mark.parametrize(("value", "kind"), [(-1, ConfigError), (1.5, TypeError),
                                            ("100", TypeError), (None, TypeError)])  # fmt: skip
def test_bad_option_values_name_the_parameter(value: Any, kind: type[Exception]) -> None:
    for build in (
        lambda: RateLimiter.from_url("memory://", local_cache=value),
        lambda: AsyncRateLimiter.from_url("memory://", local_cache=value),
    ):
        with pytest.raises(kind, match="local_cache") as info:
            build()
        assert isinstance(info.value, ConfigError)


def test_memory_backend_never_caches() -> None:
    """The memory backend may run on a fake clock: a cache on real time would contradict it."""
    for option in (True, 100):
        limiter = RateLimiter.from_url("memory://", local_cache=option)
        assert limiter.local_cache == 0
        assert AsyncRateLimiter(MemoryBackend(), local_cache=option).local_cache == 0


# -- on real servers -----------------------------------------------------------------------------


class Calls:
    """Counts the decisions that reach ``limiter.backend``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, limiter: Any, *, aio: bool = False) -> None:
        self.count = 0
        original = limiter.backend.decide

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(*args, **kwargs)

        async def aspy(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await original(*args, **kwargs)

        monkeypatch.setattr(limiter.backend, "decide", aspy if aio else spy)


def commands_run(client: redis.Redis) -> int:
    """Commands the server ran, INFO itself excepted."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


@pytest.fixture
def sync_limiter(target: Any) -> Iterator[RateLimiter]:
    with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
        yield limiter


def test_on_by_default_for_redis_and_sized(target: Any) -> None:
    with RateLimiter.from_url(target.url) as limiter:
        assert limiter.local_cache == DEFAULT_SIZE
    with RateLimiter.from_url(target.url, local_cache=123) as limiter:
        assert limiter.local_cache == 123
    for off in (False, 0):
        with RateLimiter.from_url(target.url, local_cache=off) as limiter:
            assert limiter.local_cache == 0

    async def main() -> None:
        client = target.async_client()
        try:
            assert AsyncRateLimiter(client).local_cache == DEFAULT_SIZE
            assert AsyncRateLimiter(client, local_cache=7).local_cache == 7
        finally:
            await client.aclose()
        limiter = AsyncRateLimiter.from_url(target.url, local_cache=False)
        assert limiter.local_cache == 0
        await limiter.aclose()

    asyncio.run(main())
    with target.client() as client:
        assert RateLimiter(client).local_cache == DEFAULT_SIZE


def test_refusal_is_answered_without_a_round_trip(
    standalone: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lim = Limit(SLOW, 2)
    with (
        RateLimiter.from_url(
            standalone.url, timeout=5.0, overrides=False
        ) as limiter,  # commands counted
        redis.Redis.from_url(standalone.url) as admin,
    ):
        calls = Calls(monkeypatch, limiter)
        assert limiter.try_acquire("hot", lim, cost=2).allowed
        first = limiter.try_acquire("hot", lim, cost=2)
        assert not first.allowed
        assert calls.count == 2
        before = commands_run(admin)
        for _ in range(500):
            again = limiter.try_acquire("hot", lim, cost=2)
            assert not again.allowed
            assert 0 < again.retry_after <= first.retry_after
            assert not limiter.peek("hot", lim, cost=2).allowed
        assert commands_run(admin) == before  # the server saw none of them
        assert calls.count == 2
        assert limiter.try_acquire("hot", lim, cost=1).remaining == 0  # another cost: asked
        assert calls.count == 3


def test_refusal_is_cached_on_every_target(
    sync_limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch, sync_limiter)
    lim = Limit(SLOW, 1)
    sync_limiter.try_acquire("hot", lim)
    assert not sync_limiter.try_acquire("hot", lim).allowed
    for _ in range(50):
        assert not sync_limiter.try_acquire("hot", lim).allowed
    assert calls.count == 2


def test_local_cache_false_asks_the_server_every_time(
    target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RateLimiter.from_url(target.url, timeout=5.0, local_cache=False) as limiter:
        calls = Calls(monkeypatch, limiter)
        lim = Limit(SLOW, 1)
        for _ in range(5):
            limiter.try_acquire("hot", lim)
        assert calls.count == 5


def drain(take: Callable[[], Decision]) -> float:
    """Take until refused; returns how long the refusal took to come back.

    The cache ages its refusal from the moment the request was sent, up to that long before
    the server decided: its ``retry_after`` may be that much shorter than the server's.
    """
    while True:
        sent = time.perf_counter()
        if not take():
            return time.perf_counter() - sent


CASES = [
    pytest.param([Limit(2, 4)], 1, id="one-limit-cost-1"),
    pytest.param([Limit(2, 4)], 3, id="one-limit-cost-3"),
    pytest.param([Limit(2, 4), Limit(1, 6)], 1, id="two-limits-cost-1"),
    pytest.param([Limit(2, 4), Limit(1, 4)], 2, id="two-limits-both-refuse-cost-2"),
    pytest.param([Limit(7, 10), Limit(0.3, 9)], 4, id="two-limits-odd-rates-cost-4"),
]


@pytest.mark.parametrize(("limits", "cost"), CASES)
def test_local_refusal_is_what_the_server_says(
    target: Any, monkeypatch: pytest.MonkeyPatch, limits: list[Limit], cost: int
) -> None:
    with (
        RateLimiter.from_url(target.url, timeout=5.0) as limiter,
        RateLimiter.from_url(target.url, timeout=5.0, local_cache=False) as plain,
    ):
        plain.peek("who", limits)  # connect (to this slot's node) now, not in between
        rtt = drain(lambda: limiter.try_acquire("who", limits, cost=cost))
        calls = Calls(monkeypatch, limiter)
        for _ in range(3):
            time.sleep(0.02)
            began = time.perf_counter()
            local = limiter.try_acquire("who", limits, cost=cost)
            server = plain.peek("who", limits, cost=cost)
            assert calls.count == 0
            # Both answers hold at most this far apart (and the machine may be busy).
            same(local, server, tol=0.002 + rtt + time.perf_counter() - began)


def test_window_ends_at_or_before_the_servers(target: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lim = Limit(20, 1)  # a token every 50 ms
    with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
        calls = Calls(monkeypatch, limiter)
        for _ in range(3):
            while True:
                first = limiter.try_acquire("w", lim)
                # The server decided before this: it admits by then + retry_after at the latest.
                decided = time.perf_counter()
                if not first.allowed:
                    break
            asked = calls.count
            local_answers = 0
            while True:
                began = time.perf_counter()
                decision = limiter.try_acquire("w", lim)
                if calls.count == asked:  # answered here: the server's window must still run
                    local_answers += 1
                    assert not decision.allowed
                    assert began < decided + first.retry_after
                    continue
                asked = calls.count
                if decision.allowed:
                    break
                # The local window ends early by the server's slack, rounding and a drift
                # margin, so the server may still refuse for a few µs: keep asking.
                first, decided = decision, time.perf_counter()
            assert local_answers > 0


def test_reset_clears_cached_refusals(
    sync_limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = Limit(SLOW, 1, name="a"), Limit(SLOW, 3, name="b")
    sync_limiter.try_acquire("r", a)
    assert not sync_limiter.try_acquire("r", a).allowed
    assert not sync_limiter.try_acquire("r", [a, b]).allowed
    calls = Calls(monkeypatch, sync_limiter)
    sync_limiter.reset("r", a)
    assert sync_limiter.try_acquire("r", [a, b]).allowed  # the pair's entry went too
    assert calls.count == 1
    sync_limiter.try_acquire("r", a)  # refused by the server (a is empty again)
    sync_limiter.reset("r", [b, a])
    assert sync_limiter.try_acquire("r", a).allowed
    assert calls.count == 3


def test_bound_holds_on_a_server(target: Any) -> None:
    lim = Limit(SLOW, 1)
    with RateLimiter.from_url(target.url, timeout=5.0, local_cache=40) as limiter:
        for i in range(400):
            limiter.try_acquire(f"k{i}", lim)
            assert not limiter.try_acquire(f"k{i}", lim).allowed
            assert limiter._refusals is not None
            assert len(limiter._refusals) <= 40
        assert len(limiter._refusals) > 30


class Sink:
    def __init__(self) -> None:
        self.decisions: list[tuple[bool, float]] = []

    def record_decision(self, limits: Sequence[Limit], decision: Decision, seconds: float) -> None:
        self.decisions.append((decision.allowed, seconds))

    def record_error(self, limits: Sequence[Limit], reason: str, failed_open: bool) -> None:
        raise AssertionError(reason)


def test_local_refusals_are_recorded_as_decisions_and_peeks_are_not(standalone: Any) -> None:
    sink = Sink()
    lim = Limit(SLOW, 1)
    with RateLimiter.from_url(standalone.url, timeout=5.0, metrics=sink) as limiter:
        limiter.try_acquire("m", lim)
        limiter.try_acquire("m", lim)
        limiter.peek("m", lim)
        limiter.try_acquire("m", lim)  # answered here
    assert [allowed for allowed, _ in sink.decisions] == [True, False, False]
    assert 0 <= sink.decisions[-1][1] < 1.0


# -- async ---------------------------------------------------------------------------------------


def run(url: str, body: Callable[[AsyncRateLimiter], Any], **options: Any) -> Any:
    async def main() -> Any:
        limiter = AsyncRateLimiter.from_url(url, timeout=5.0, **options)
        try:
            return await body(limiter)
        finally:
            await limiter.aclose()

    return asyncio.run(main())


def test_async_refusal_is_answered_without_a_round_trip(
    target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lim = Limit(SLOW, 1)

    async def body(limiter: AsyncRateLimiter) -> None:
        calls = Calls(monkeypatch, limiter, aio=True)
        await limiter.try_acquire("a", lim)
        first = await limiter.try_acquire("a", lim)
        assert not first.allowed
        results = await asyncio.gather(*(limiter.try_acquire("a", lim) for _ in range(200)))
        assert not any(results)
        assert calls.count == 2
        await limiter.reset("a", lim)
        assert (await limiter.try_acquire("a", lim)).allowed
        assert calls.count == 3

    run(target.url, body)


def test_async_local_refusal_is_what_the_server_says(target: Any) -> None:
    limits = [Limit(2, 4), Limit(1, 4)]

    async def body(limiter: AsyncRateLimiter) -> None:
        plain = AsyncRateLimiter.from_url(target.url, timeout=5.0, local_cache=False)
        try:
            await plain.peek("who", limits)  # connect (to this slot's node) now, not in between
            while True:
                sent = time.perf_counter()
                if not await limiter.try_acquire("who", limits, cost=2):
                    break
            rtt = time.perf_counter() - sent
            await asyncio.sleep(0.02)
            began = time.perf_counter()
            local = await limiter.try_acquire("who", limits, cost=2)
            server = await plain.peek("who", limits, cost=2)
            same(local, server, tol=0.002 + rtt + time.perf_counter() - began)
        finally:
            await plain.aclose()

    run(target.url, body)


def test_async_bound_and_off(target: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lim = Limit(SLOW, 1)

    async def bounded(limiter: AsyncRateLimiter) -> None:
        for i in range(200):
            await limiter.try_acquire(f"k{i}", lim)
            await limiter.try_acquire(f"k{i}", lim)
            assert limiter._refusals is not None
            assert len(limiter._refusals) <= 20

    run(target.url, bounded, local_cache=20)

    async def off(limiter: AsyncRateLimiter) -> None:
        calls = Calls(monkeypatch, limiter, aio=True)
        for _ in range(4):
            await limiter.try_acquire("x", lim)
        assert calls.count == 4

    run(target.url, off, local_cache=False)
