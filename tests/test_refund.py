"""``refund``: give tokens back to a bucket, never above full, through the shared store.

The pure model (``_model.refund``) first; then the refund script held to it integer for integer
and byte for byte on real servers (standalone and cluster, with the server's ``TIME`` pinned as
in test_script.py); then the public ``RateLimiter.refund`` and ``AsyncRateLimiter.refund`` on
every backend, seen from another limiter on the same store.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest
import redis
from conftest import Target
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_script import PREFIX, assert_stored, fresh_id, frozen, node_client

from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    ConfigError,
    Limit,
    MemoryBackend,
    RateLimiter,
)
from tokenlimit._model import decide, refund
from tokenlimit._request import Request, build_request
from tokenlimit._scripts import refund_script
from tokenlimit.testing import FakeClock

T0 = 1_700_000_000_000_000  # a realistic server time in µs
T0_NS = T0 * 1000
SECOND = 1_000_000  # µs


def _flat(results: Sequence[tuple[bool, int, int, int]]) -> list[int]:
    return [int(x) for r in results for x in r]


# -- the model -----------------------------------------------------------------------------------


def test_a_refund_gives_back_what_a_take_took() -> None:
    params = [(100_000_000, 5)]  # 10/s, burst 5
    taken = decide([None], params, 2, T0, consume=True)
    assert taken.new_states == (T0_NS + 200_000_000,)
    back = refund(list(taken.new_states), params, 2, T0)
    assert back.new_states == (T0_NS,)  # TAT = now: full again
    (result,) = back.results
    assert (back.allowed, result.remaining, result.reset_us) == (True, 5, 0)
    assert decide(list(back.new_states), params, 5, T0, consume=False).allowed


def test_a_refund_never_fills_a_bucket_above_full() -> None:
    params = [(10**9, 3)]  # 1/s, burst 3
    absent = refund([None], params, 3, T0)
    assert absent.new_states == (None,)  # an absent bucket is full, and stays absent
    assert absent.results[0].remaining == 3
    one_owed = T0_NS + 10**9  # one token short
    out = refund([one_owed], params, 3, T0)
    assert out.new_states == (T0_NS,)  # three given back, one counted
    assert decide(list(out.new_states), params, 1, T0, consume=False).results[0].remaining == 3
    past = T0_NS - 5 * 10**9  # a TAT already behind now: full, left as it is
    assert refund([past], params, 1, T0).new_states == (past,)


def test_a_refund_gives_back_to_every_limit() -> None:
    params = [(1_000_000, 100), (10**9, 3)]  # 1000/s burst 100, 1/s burst 3
    states: list[int | None] = [T0_NS + 50 * 1_000_000, T0_NS + 3 * 10**9]
    out = refund(states, params, 2, T0)
    assert out.new_states == (T0_NS + 48 * 1_000_000, T0_NS + 10**9)
    assert [r.remaining for r in out.results] == [52, 2]
    assert out.allowed


def test_the_reply_of_a_still_empty_bucket_is_a_refusal() -> None:
    """A bucket held back past its burst (hold_back) may still refuse after a refund."""
    params = [(10**9, 2)]
    held = T0_NS + 10 * 10**9  # owes 10 s, more than 2 tokens
    out = refund([held], params, 1, T0)
    assert out.new_states == (T0_NS + 9 * 10**9,)
    assert not out.allowed
    assert out.results[0].retry_us == 8 * SECOND


states_st = st.one_of(st.none(), st.integers(0, 20 * 10**9).map(lambda d: T0_NS - 10**9 + d))
limit_st = st.tuples(st.integers(1_000, 2 * 10**9), st.integers(1, 20))


@settings(max_examples=300, deadline=None)
@given(
    limits=st.lists(st.tuples(states_st, limit_st), min_size=1, max_size=3),
    cost=st.integers(1, 20),
    later=st.integers(0, 40 * SECOND),
)
def test_a_refund_gives_at_most_cost_and_never_overfills(
    limits: list[tuple[int | None, tuple[int, int]]], cost: int, later: int
) -> None:
    """Whatever the state: the TAT never moves forward, nor back past now; at any later time
    the refunded bucket admits whatever the other would, with at most ``cost`` more tokens
    and never more than ``burst``; the reply is a read-only check of one token."""
    states = [state for state, _ in limits]
    params = [param for _, param in limits]
    cost = min(cost, *(burst for _, burst in params))
    out = refund(states, params, cost, T0)
    for state, new in zip(states, out.new_states, strict=True):
        if state is None:
            assert new is None
        else:
            assert new is not None
            assert new <= state
            assert new >= min(state, T0_NS)
    back = decide(out.new_states, params, 1, T0 + later, consume=False)
    kept = decide(states, params, 1, T0 + later, consume=False)
    if kept.allowed:
        assert back.allowed
    for b, k, (_, burst) in zip(back.results, kept.results, params, strict=True):
        assert k.remaining <= b.remaining <= min(k.remaining + cost, burst)
    peek = decide(out.new_states, params, 1, T0, consume=False)
    assert (peek.allowed, peek.results) == (out.allowed, out.results)


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(st.tuples(states_st, limit_st), min_size=1, max_size=3), cost=st.integers(1, 20)
)
def test_a_take_then_its_refund_at_once_leaves_the_bucket_as_it_was(
    limits: list[tuple[int | None, tuple[int, int]]], cost: int
) -> None:
    states = [state for state, _ in limits]
    params = [param for _, param in limits]
    cost = min(cost, *(burst for _, burst in params))
    taken = decide(states, params, cost, T0, consume=True)
    if taken.new_states is None:  # refused: nothing to give back
        return
    out = refund(list(taken.new_states), params, cost, T0)
    before = decide(states, params, 1, T0, consume=False)
    after = decide(out.new_states, params, 1, T0, consume=False)
    assert after.results == before.results


def test_memory_backend_refunds_as_the_model() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    request = build_request(PREFIX, "login", Limit(1, 5), 2)
    backend.decide(request, consume=True)
    (key,) = request.keys
    before = backend._states[key]
    reply = backend.refund(request)
    now = reply[0]
    out = refund([before], request.params, 2, now)
    assert reply == [now, int(out.allowed), *_flat(out.results)]
    assert backend._states.get(key) == out.new_states[0]
    assert backend.decide(request, consume=False)[3] == 5  # full again
    fresh = build_request(PREFIX, "nobody", Limit(1, 5))
    backend.refund(fresh)
    assert fresh.keys[0] not in backend._states  # absent stays absent


# -- the script agrees with the model -----------------------------------------------------------


def model_refund(
    states: list[int | None], request: Request, now: int
) -> tuple[list[int], list[int | None]]:
    out = refund(states, request.params, request.cost, now)
    return [out.now, int(out.allowed), *_flat(out.results)], list(out.new_states)


script_limits = st.lists(
    st.builds(Limit, st.one_of(st.integers(1, 50), st.floats(0.5, 20_000.0)), st.integers(1, 10)),
    min_size=1,
    max_size=3,
)


def test_script_matches_model(target: Target) -> None:
    """At a pinned server time: random prior debts (absent too), costs and limits; the reply
    integer for integer, and what is stored byte for byte (an unchanged bucket keeps its bytes
    and its TTL)."""
    client = target.client()
    script = refund_script()

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        limits=script_limits,
        debts=st.lists(st.one_of(st.none(), st.integers(0, 30 * 10**9)), min_size=3, max_size=3),
        cost=st.integers(1, 10),
        micros=st.sampled_from([0, 1, 999_999]),
    )
    def run(limits: list[Limit], debts: list[int | None], cost: int, micros: int) -> None:
        cost = min(cost, *(limit.burst for limit in limits))
        request = build_request(PREFIX, fresh_id("refund"), limits, cost)
        node = node_client(client, request.keys[0])
        seconds, _ = node.time()
        # A second back: a bucket given back to full (TAT = now, a 1 ms TTL) may be gone by
        # the time it is read, which assert_stored accepts only for a TAT not ahead of the
        # server's clock.
        now = (int(seconds) - 1) * SECOND + micros
        states: list[int | None] = []
        for key, debt in zip(request.keys, debts, strict=False):
            tat = None if debt is None else now * 1000 + debt
            if tat is not None:
                node.set(key, str(tat), px=3_600_000)
            states.append(tat)
        reply = node.eval(frozen(script, now), len(request.keys), *request.keys, *request.args)
        expected, after = model_refund(states, request, now)
        assert reply == expected
        assert_stored(node, request.keys, after)
        for key, state, new in zip(request.keys, states, after, strict=True):
            ttl = node.pttl(key)
            if new == state and state is not None:  # untouched: its TTL too
                assert 3_000_000 < ttl <= 3_600_000
            elif new is not None:
                owed_ms = max(1, math.ceil((new - now * 1000) / 1_000_000))
                assert ttl <= owed_ms

    try:
        run()
    finally:
        client.close()


@pytest.mark.parametrize(
    "args",
    [
        ["0", "1000", "5"],  # no cost
        ["6", "1000", "5"],  # more than the burst
        ["nan", "1000", "5"],
        ["1e3", "1000", "5"],
        ["-1", "1000", "5"],
        ["1", "0", "5"],
        ["1", "1000", "0"],
        ["1", "1000"],  # an argument missing
        ["1", "1000", "5", "7"],
    ],
)
def test_script_refuses_bad_arguments_touching_nothing(target: Target, args: list[str]) -> None:
    request = build_request(PREFIX, fresh_id("bad"), Limit(1, 5))
    (key,) = request.keys
    client = target.client()
    try:
        node = node_client(client, key)
        tat = str(server_node_ns(node) + 3 * 10**9)
        node.set(key, tat, px=60_000)
        with pytest.raises(redis.ResponseError, match="tokenlimit: "):
            node.eval(refund_script().body, 1, key, *args)
        assert node.get(key) == tat.encode()
    finally:
        client.close()


def server_node_ns(node: redis.Redis) -> int:
    seconds, micros = node.time()
    return (int(seconds) * SECOND + int(micros)) * 1000


def test_script_refuses_corrupt_state_touching_nothing(target: Target) -> None:
    request = build_request(PREFIX, fresh_id("corrupt"), [Limit(1, 5), Limit(100, 10)])
    client = target.client()
    try:
        node = node_client(client, request.keys[0])
        owed = str(server_node_ns(node) + 3 * 10**9)
        node.set(request.keys[0], owed, px=60_000)
        node.set(request.keys[1], "not a tat", px=60_000)
        with pytest.raises(redis.ResponseError, match="corrupt bucket state"):
            node.eval(refund_script().body, 2, *request.keys, *request.args)
        assert node.get(request.keys[0]) == owed.encode()  # the valid bucket was not written
        assert node.get(request.keys[1]) == b"not a tat"
    finally:
        client.close()


# -- the public method, on every backend -----------------------------------------------------------


def test_refund_gives_back_to_another_limiter_on_the_same_store(url: str) -> None:
    lim = Limit(0.01, 3)  # one token per 100 s: nothing refills during the test
    # Without its local cache: a refusal cached here would stand until its retry_after, whatever
    # another process gives back (test_refund_forgets_the_refusals_cached_for_its_buckets).
    taker = RateLimiter.from_url(url, timeout=5.0, local_cache=False)
    # another process's limiter: on memory:// only the same store is shared
    other = RateLimiter(taker.backend) if url == "memory://" else RateLimiter.from_url(url)
    try:
        assert [taker.try_acquire("login", lim).allowed for _ in range(4)] == [True] * 3 + [False]
        decision = other.refund("login", lim)
        assert decision.allowed
        assert decision.remaining == 1
        assert taker.try_acquire("login", lim).allowed  # exactly the one given back
        assert not taker.try_acquire("login", lim).allowed
    finally:
        taker.close()
        if url != "memory://":
            other.close()


def test_refund_never_fills_above_the_burst(limiter: RateLimiter) -> None:
    lim = Limit(0.01, 3)
    assert limiter.refund("fresh", lim, cost=3).remaining == 3
    assert limiter.try_acquire("owes", lim).remaining == 2
    assert limiter.refund("owes", lim, cost=3).remaining == 3  # one owed: one counted
    for key in ("fresh", "owes"):
        assert [limiter.try_acquire(key, lim).allowed for _ in range(4)] == [True] * 3 + [False]


def test_refund_gives_back_to_every_limit_at_once(limiter: RateLimiter) -> None:
    limits = [Limit(0.01, 5), Limit(0.001, 2)]
    assert limiter.try_acquire("k", limits).allowed
    assert limiter.try_acquire("k", limits).allowed
    assert not limiter.try_acquire("k", limits).allowed  # the 2-burst is empty
    decision = limiter.refund("k", limits)
    assert [d.remaining for d in decision.details] == [4, 1]
    for lim, left in zip(limits, (4, 1), strict=True):  # each limit alone shows it too
        assert limiter.peek("k", lim).remaining == left
    assert limiter.try_acquire("k", limits).allowed


@pytest.mark.parametrize(
    ("cost", "error"),
    [
        (0, ConfigError),
        (-1, ConfigError),
        (6, ConfigError),  # more than the burst: never taken, never given back
        (True, TypeError),
        ("1", TypeError),
        (1.5, TypeError),
        (None, TypeError),
    ],
)
def test_refund_validates_cost(cost: object, error: type[Exception]) -> None:
    backend = MemoryBackend()
    limiter = RateLimiter(backend)
    limiter.try_acquire("k", Limit(1, 5), cost=3)
    with pytest.raises(error, match="cost"):
        limiter.refund("k", Limit(1, 5), cost=cost)  # type: ignore[arg-type]
    assert limiter.peek("k", Limit(1, 5)).remaining == 2  # nothing half-applied


def test_async_refund(url: str) -> None:
    lim = Limit(0.01, 3)

    async def main() -> None:
        limiter = AsyncRateLimiter.from_url(url, timeout=5.0)
        try:
            for _ in range(3):
                assert (await limiter.try_acquire("login", lim)).allowed
            assert (await limiter.refund("login", lim, cost=2)).remaining == 2

            async def choose(key: str) -> Limit:
                return lim

            assert (await limiter.refund("login", choose)).remaining == 3
            with pytest.raises(ConfigError, match="cost"):
                await limiter.refund("login", lim, cost=0)
        finally:
            await limiter.aclose()

    asyncio.run(main())


def test_refund_forgets_the_refusals_cached_for_its_buckets(target: Target) -> None:
    """A refusal answered in-process until its retry_after no longer holds once tokens are
    back: the next call asks the server."""
    lim = Limit(0.01, 2)
    with RateLimiter.from_url(target.url, timeout=5.0, local_cache=True) as limiter:
        assert limiter.local_cache
        assert [limiter.try_acquire("k", lim).allowed for _ in range(3)] == [True, True, False]
        assert not limiter.try_acquire("k", lim).allowed  # from the local cache
        limiter.refund("k", lim)
        assert limiter.try_acquire("k", lim).allowed


def test_refund_storage_failure_follows_the_failure_mode() -> None:
    from servers import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    with RateLimiter.from_url(dead, timeout=0.2) as closed, pytest.raises(BackendError):
        closed.refund("k", Limit(1, 5))
    with RateLimiter.from_url(dead, timeout=0.2, failure_mode="open") as open_:
        assert open_.refund("k", Limit(1, 5)).allowed  # logged, nothing given back


def test_refund_needs_the_capability() -> None:
    """A third-party backend without ``refund`` gets a TypeError naming it."""

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
    with pytest.raises(TypeError, match="refund"):
        limiter.refund("k", Limit(1, 5))


def test_refund_survives_a_flushed_script_cache(target: Target) -> None:
    """EVALSHA, then the body on NOSCRIPT (the script had not run: nothing given twice)."""
    from test_script import primaries

    lim = Limit(0.01, 3)
    client = target.client()
    try:
        with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
            for key in ("a", "b"):
                for _ in range(3):
                    limiter.try_acquire(key, lim)
            limiter.refund("a", lim)
            for node in primaries(client):
                node.script_flush()
            assert limiter.refund("b", lim).remaining == 1  # one given back, not two
    finally:
        client.close()
