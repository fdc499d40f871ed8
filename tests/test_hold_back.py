"""``hold_back``: refuse every caller of a bucket until a given time, through the shared store.

The pure model (``_model.hold``) first, with an injected clock; then the holdback script held to
it integer for integer and byte for byte on real servers (standalone and cluster, with the
server's ``TIME`` pinned as in test_script.py); then the public ``RateLimiter.hold_back`` and
``AsyncRateLimiter.hold_back`` on every backend, seen from another limiter on the same store.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import pytest
import redis
from conftest import Target
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_script import PREFIX, assert_stored, fresh_id, frozen, node_client

from tokenlimit import AsyncRateLimiter, ConfigError, Limit, MemoryBackend, RateLimiter
from tokenlimit._model import MAX_HOLD_US, SLACK, Outcome, decide, hold
from tokenlimit._request import Request, build_request
from tokenlimit._scripts import holdback_script
from tokenlimit.testing import FakeClock

T0 = 1_700_000_000_000_000  # a realistic server time in µs
T0_NS = T0 * 1000
SECOND = 1_000_000  # µs


def take(states: Sequence[int | None], params: list[tuple[int, int]], now: int) -> Outcome:
    return decide(states, params, 1, now, consume=True)


# -- the model -----------------------------------------------------------------------------------


def test_a_hold_refuses_until_its_end_then_refills_at_the_rate() -> None:
    params = [(100_000_000, 5)]  # 10/s, burst 5
    out = hold([None], params, 2 * SECOND, T0)
    assert out.new_states == (T0_NS + 2 * 10**9 + 4 * 100_000_000,)
    (result,) = out.results
    assert (out.allowed, result.allowed, result.remaining) == (False, False, 0)
    assert result.retry_us == 2 * SECOND
    assert result.reset_us == 2 * SECOND + 4 * 100_000
    states = out.new_states
    assert not take(states, params, T0 + 2 * SECOND - 1).allowed  # 1 µs early: refused
    first = take(states, params, T0 + 2 * SECOND)
    assert first.allowed  # one token, exactly at the end of the hold
    assert first.new_states is not None
    assert not take(first.new_states, params, T0 + 2 * SECOND).allowed
    # then the normal rate: one more token per 100 ms
    assert take(first.new_states, params, T0 + 2 * SECOND + 100_000).allowed


def test_a_hold_never_reduces_a_larger_debt() -> None:
    params = [(10**9, 5)]  # 1/s, burst 5: emptied, the bucket owes 5 s
    empty = T0_NS + 5 * 10**9
    out = hold([empty], params, 1 * SECOND, T0)
    assert out.new_states == (empty,)  # kept as it was (4 s + 1 s of hold < 5 s of debt)
    assert out.results[0].retry_us == 1 * SECOND
    longer = hold([empty], params, 3 * SECOND, T0)
    assert longer.new_states == (T0_NS + 3 * 10**9 + 4 * 10**9,)


def test_a_hold_holds_every_limit() -> None:
    params = [(1_000_000, 100), (10**9, 3)]  # 1000/s burst 100, 1/s burst 3
    out = hold([None, None], params, 500_000, T0)
    assert out.new_states == (
        T0_NS + 500_000_000 + 99 * 1_000_000,
        T0_NS + 500_000_000 + 2 * 10**9,
    )
    assert [r.retry_us for r in out.results] == [500_000, 500_000]
    assert not take(out.new_states, params, T0 + 499_999).allowed
    assert take(out.new_states, params, T0 + 500_000).allowed


def test_a_hold_shorter_than_the_slack_admits_at_once() -> None:
    """The model's own slack (1e-6 of an interval) applies to a hold as to any debt."""
    params = [(86_400 * 10**9, 2)]  # one token a day: a slack of 86.4 ms
    out = hold([None], params, 1000, T0)  # 1 ms
    assert out.allowed
    assert out.results[0].remaining == 1


states_st = st.one_of(st.none(), st.integers(0, 20 * 10**9).map(lambda d: T0_NS - 10**9 + d))
limit_st = st.tuples(st.integers(1_000, 2 * 10**9), st.integers(1, 20))


@settings(max_examples=300, deadline=None)
@given(
    limits=st.lists(st.tuples(states_st, limit_st), min_size=1, max_size=3),
    hold_us=st.integers(1, 30 * SECOND),
    later=st.integers(0, 40 * SECOND),
    cost=st.integers(1, 20),
)
def test_a_hold_never_admits_more(
    limits: list[tuple[int | None, tuple[int, int]]], hold_us: int, later: int, cost: int
) -> None:
    """Whatever the state, at any later time, a held bucket admits nothing the unheld one
    would refuse, and shows no more tokens; and nothing is admitted before the hold ends."""
    states = [state for state, _ in limits]
    params = [param for _, param in limits]
    cost = min(cost, *(burst for _, burst in params))
    out = hold(states, params, hold_us, T0)
    assert out.new_states is not None
    for state, new in zip(states, out.new_states, strict=True):
        assert state is None or new >= state  # the TAT never moves back
    held = decide(out.new_states, params, cost, T0 + later, consume=False)
    unheld = decide(states, params, cost, T0 + later, consume=False)
    if held.allowed:
        assert unheld.allowed
    for h, u in zip(held.results, unheld.results, strict=True):
        assert h.remaining <= u.remaining
        assert h.retry_us >= u.retry_us
    if later < hold_us:
        slack_us = max(interval for interval, _ in params) * SLACK / 1000
        assert not held.allowed or hold_us - later <= slack_us + 1
    # the reply is a read-only check of one token right after the hold
    peek = decide(out.new_states, params, 1, T0, consume=False)
    assert (peek.allowed, peek.results) == (out.allowed, out.results)


def test_memory_backend_holds_back_as_the_model() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    lim = Limit(10, 5)
    request = build_request(PREFIX, "partner", lim)
    reply = backend.hold_back(request, 2 * SECOND)
    now = reply[0]
    out = hold([None], request.params, 2 * SECOND, now)
    assert reply == [now, int(out.allowed), *_flat(out.results)]
    clock.advance(1.999)
    assert backend.decide(request, consume=True)[1] == 0
    clock.advance(0.001)
    assert backend.decide(request, consume=True)[1] == 1
    # a second, shorter hold changes nothing: the bucket stays as it is
    before = backend.decide(request, consume=False)
    backend.hold_back(request, 1)
    assert backend.decide(request, consume=False)[1:] == before[1:]


def _flat(results: Sequence[tuple[bool, int, int, int]]) -> list[int]:
    return [int(x) for r in results for x in r]


# -- the script agrees with the model -----------------------------------------------------------


def model_hold(states: list[int | None], request: Request, hold_us: int, now: int) -> tuple[
    list[int], list[int | None]
]:  # fmt: skip
    out = hold(states, request.params, hold_us, now)
    assert out.new_states is not None
    return [out.now, int(out.allowed), *_flat(out.results)], list(out.new_states)


def holdback_args(request: Request, hold_us: int) -> list[str]:
    return [str(hold_us), *request.args[1:]]


script_limits = st.lists(
    st.builds(Limit, st.one_of(st.integers(1, 50), st.floats(0.5, 20_000.0)), st.integers(1, 10)),
    min_size=1,
    max_size=3,
)


def test_script_matches_model(target: Target) -> None:
    """At a pinned server time: random prior debts, holds and limits; the reply integer for
    integer, and what is stored byte for byte (an unchanged bucket keeps its bytes)."""
    client = target.client()
    script = holdback_script()

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        limits=script_limits,
        debts=st.lists(st.one_of(st.none(), st.integers(0, 30 * 10**9)), min_size=3, max_size=3),
        hold_us=st.one_of(st.integers(1, 10 * SECOND), st.just(MAX_HOLD_US)),
        micros=st.sampled_from([0, 1, 999_999]),
    )
    def run(limits: list[Limit], debts: list[int | None], hold_us: int, micros: int) -> None:
        request = build_request(PREFIX, fresh_id("hold"), limits)
        node = node_client(client, request.keys[0])
        seconds, _ = node.time()
        now = int(seconds) * SECOND + micros
        states: list[int | None] = []
        for key, debt in zip(request.keys, debts, strict=False):
            tat = None if debt is None else now * 1000 + debt
            if tat is not None:
                node.set(key, str(tat), px=3_600_000)
            states.append(tat)
        reply = node.eval(frozen(script, now), len(request.keys), *request.keys,
                          *holdback_args(request, hold_us))  # fmt: skip
        expected, after = model_hold(states, request, hold_us, now)
        assert reply == expected
        assert_stored(node, request.keys, after)
        for key, state, new in zip(request.keys, states, after, strict=True):
            ttl = node.pttl(key)
            if new == state:  # untouched: its TTL too
                assert 3_000_000 < ttl <= 3_600_000
            else:
                assert new is not None
                owed_ms = math.ceil((new - now * 1000) / 1_000_000)
                assert ttl <= owed_ms
                assert ttl > 0 or owed_ms <= 1000  # a short one may be gone already

    try:
        run()
    finally:
        client.close()


@pytest.mark.parametrize(
    "args",
    [
        ["0", "1000", "5"],  # no hold
        [str(MAX_HOLD_US + 1), "1000", "5"],  # more than a day
        ["nan", "1000", "5"],
        ["1e3", "1000", "5"],
        ["-5", "1000", "5"],
        ["1000", "0", "5"],
        ["1000", "1000", "0"],
        ["1000", "1000"],  # an argument missing
        ["1000", "1000", "5", "7"],
    ],
)
def test_script_refuses_bad_arguments_touching_nothing(target: Target, args: list[str]) -> None:
    request = build_request(PREFIX, fresh_id("bad"), Limit(1, 5))
    (key,) = request.keys
    client = target.client()
    try:
        node = node_client(client, key)
        node.set(key, "123", px=60_000)
        with pytest.raises(redis.ResponseError, match="tokenlimit: "):
            node.eval(holdback_script().body, 1, key, *args)
        assert node.get(key) == b"123"
    finally:
        client.close()


def test_script_refuses_corrupt_state_touching_nothing(target: Target) -> None:
    request = build_request(PREFIX, fresh_id("corrupt"), [Limit(1, 5), Limit(100, 10)])
    client = target.client()
    try:
        node = node_client(client, request.keys[0])
        node.set(request.keys[1], "not a tat", px=60_000)
        with pytest.raises(redis.ResponseError, match="corrupt bucket state"):
            node.eval(holdback_script().body, 2, *request.keys, *holdback_args(request, SECOND))
        assert node.get(request.keys[0]) is None  # the first, valid bucket was not written
        assert node.get(request.keys[1]) == b"not a tat"
    finally:
        client.close()


# -- the public method, on every backend -----------------------------------------------------------


def test_hold_back_refuses_another_limiter_on_the_same_store(url: str) -> None:
    lim = Limit(10, 5)
    holder = RateLimiter.from_url(url, timeout=5.0)
    # another process's limiter: on memory:// only the same store is shared
    other = (
        RateLimiter(holder.backend)
        if url == "memory://"
        else RateLimiter.from_url(url, timeout=5.0)
    )
    try:
        assert other.try_acquire("partner", lim).remaining == 4
        decision = holder.hold_back("partner", lim, 2)
        assert not decision.allowed
        assert 1.9 < decision.retry_after <= 2.0
        refused = other.try_acquire("partner", lim)
        assert not refused.allowed
        assert 1.0 < refused.retry_after <= 2.0  # generous: a loaded machine may lag
        assert refused.remaining == 0
    finally:
        holder.close()
        if other is not holder and url != "memory://":
            other.close()


def test_hold_back_never_adds_tokens(url: str) -> None:
    lim = Limit(0.01, 3)  # one token per 100 s: an emptied bucket owes 300 s
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        for _ in range(3):
            assert limiter.try_acquire("k", lim).allowed
        before = limiter.peek("k", lim)
        decision = limiter.hold_back("k", lim, 1)
        assert not decision.allowed
        assert decision.retry_after >= before.retry_after - 0.5
        assert decision.retry_after > 50  # the debt, not the 1 s hold
        assert limiter.peek("k", lim).reset_after >= before.reset_after - 0.5


def test_hold_back_holds_every_limit(url: str) -> None:
    limits = [Limit(1000, 100), Limit(10, 5)]
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        limiter.hold_back("k", limits, 1.5)
        for lim in limits:  # each limit alone is held too: they are separate buckets
            refused = limiter.peek("k", lim)
            assert not refused.allowed
            assert 1.0 < refused.retry_after <= 1.5
        both = limiter.try_acquire("k", limits)
        assert not both.allowed
        assert {d.allowed for d in both.details} == {False}


def test_hold_back_ends_when_it_says(url: str) -> None:
    """After the hold, one token, then the normal rate (server time: generous bounds)."""
    lim = Limit(2, 5)
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        limiter.hold_back("k", lim, 0.3)
        started = time.monotonic()
        decision = limiter.acquire("k", lim, timeout=5)
        waited = time.monotonic() - started
        assert decision.allowed
        assert 0.2 < waited < 3.0
        assert decision.remaining == 0
        assert not limiter.try_acquire("k", lim).allowed  # no burst after a hold


@pytest.mark.parametrize(
    ("seconds", "error"),
    [
        (0, ConfigError),
        (-1, ConfigError),
        (math.nan, ConfigError),
        (math.inf, ConfigError),
        (86_400.001, ConfigError),
        (True, TypeError),
        ("2", TypeError),
        (None, TypeError),
    ],
)
def test_hold_back_validates_seconds(seconds: object, error: type[Exception]) -> None:
    backend = MemoryBackend()
    limiter = RateLimiter(backend)
    with pytest.raises(error, match="seconds"):
        limiter.hold_back("k", Limit(1, 5), seconds)  # type: ignore[arg-type]
    assert len(backend) == 0  # nothing half-applied


def test_hold_back_accepts_a_day_and_tiny_holds() -> None:
    limiter = RateLimiter(MemoryBackend())
    assert limiter.hold_back("a", Limit(1, 5), 86_400).retry_after == 86_400
    assert limiter.hold_back("b", Limit(1000, 5), 1e-9).retry_after == 1e-6  # at least 1 µs


def test_async_hold_back(url: str) -> None:
    lim = Limit(10, 5)

    async def main() -> None:
        limiter = AsyncRateLimiter.from_url(url, timeout=5.0)
        try:
            decision = await limiter.hold_back("partner", lim, 2)
            assert not decision.allowed
            refused = await limiter.try_acquire("partner", lim)
            assert not refused.allowed
            assert 1.0 < refused.retry_after <= 2.0

            async def choose(key: str) -> Limit:
                return Limit(1, 3)

            chosen = await limiter.hold_back("chosen", choose, 1)
            assert chosen.limit == 3
            assert not (await limiter.peek("chosen", Limit(1, 3))).allowed
            with pytest.raises(ConfigError, match="seconds"):
                await limiter.hold_back("partner", lim, 0)
        finally:
            await limiter.aclose()

    asyncio.run(main())


def test_hold_back_storage_failure_follows_the_failure_mode() -> None:
    from servers import free_port
    from tokenlimit import BackendError

    dead = f"redis://127.0.0.1:{free_port()}/0"
    with RateLimiter.from_url(dead, timeout=0.2) as closed, pytest.raises(BackendError):
        closed.hold_back("k", Limit(1, 5), 1)
    with RateLimiter.from_url(dead, timeout=0.2, failure_mode="open") as open_:
        assert open_.hold_back("k", Limit(1, 5), 1).allowed  # logged, nothing held


def test_hold_back_needs_the_capability() -> None:
    """A third-party backend without ``hold_back`` gets a TypeError naming it."""

    class Minimal:
        def __init__(self) -> None:
            self.store = MemoryBackend()

        def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
            return self.store.decide(request, consume=consume)

        def reset(self, request: Request, *, timeout: float) -> None:
            self.store.reset(request)

        def close(self) -> None:
            pass

    limiter = RateLimiter(Minimal())
    with pytest.raises(TypeError, match="hold_back"):
        limiter.hold_back("k", Limit(1, 5), 1)


def test_hold_back_survives_a_flushed_script_cache(target: Target) -> None:
    """EVALSHA, then the body on NOSCRIPT (the script had not run: nothing done twice)."""
    from test_script import primaries

    client = target.client()
    try:
        with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
            limiter.hold_back("a", Limit(10, 5), 1)
            for node in primaries(client):
                node.script_flush()
            assert not limiter.hold_back("b", Limit(10, 5), 1).allowed
            assert not limiter.peek("b", Limit(10, 5)).allowed
    finally:
        client.close()
