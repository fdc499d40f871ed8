"""The reference model (``tokenlimit._model.decide``) and the memory backend built on it.

Pure unit tests with an injected clock: integer microseconds for the model, seconds for
``MemoryBackend``. Every expected value is exact.
"""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenlimit import Limit, MemoryBackend
from tokenlimit._core import build_request
from tokenlimit._model import SLACK, LimitResult, Outcome, State, decide

T0 = 1_700_000_000_000_000  # a realistic server time in µs


def take(state: State | None, interval: float, burst: int, now: int, cost: int = 1) -> Outcome:
    return decide([state], [(interval, burst)], cost, now, consume=True)


def drain(interval: float, burst: int, now: int) -> State:
    """Take every token of a fresh bucket at ``now``; returns the (empty) state."""
    state: State | None = None
    for _ in range(burst):
        out = take(state, interval, burst, now)
        assert out.allowed
        assert out.new_states is not None
        state = out.new_states[0]
    assert state is not None
    return state


# -- a single bucket ------------------------------------------------------------------------------


@pytest.mark.parametrize(("interval", "burst"), [(1000.0, 1), (1000.0, 5), (250.0, 100),
                                                 (1e6 / 3, 7), (1e9, 3)])  # fmt: skip
def test_fresh_bucket_admits_exactly_burst_then_refuses(interval: float, burst: int) -> None:
    state: State | None = None
    for i in range(burst):
        out = take(state, interval, burst, T0)
        assert out.now == T0
        assert out.allowed is True
        (res,) = out.results
        assert res.allowed is True
        assert res.remaining == burst - 1 - i
        assert res.retry_us == 0
        assert res.reset_us == math.ceil((i + 1) * interval)
        assert out.new_states is not None
        state = out.new_states[0]
        assert state.stamp == T0
    for _ in range(3):
        out = take(state, interval, burst, T0)
        assert out.allowed is False
        assert out.new_states is None
        (res,) = out.results
        assert res == LimitResult(False, 0, math.ceil((burst + 1) * interval - burst * interval),
                                  math.ceil(burst * interval))  # fmt: skip


def test_fresh_bucket_first_reply_exact() -> None:
    out = take(None, 1000.0, 10, T0)
    assert out == Outcome(T0, True, (LimitResult(True, 9, 0, 1000),), (State(1000.0, T0),))


def test_cost_takes_cost_tokens() -> None:
    out = take(None, 1000.0, 10, T0, cost=4)
    assert out.results == (LimitResult(True, 6, 0, 4000),)
    assert out.new_states == (State(4000.0, T0),)
    out = take(out.new_states[0], 1000.0, 10, T0, cost=7)
    assert out.allowed is False
    assert out.results == (LimitResult(False, 6, 1000, 4000),)
    assert out.new_states is None


@pytest.mark.parametrize("interval", [1000.0, 50_000.0, 500_000.0, 125.0])
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_refill_after_k_intervals_gives_k_tokens(interval: float, k: int) -> None:
    burst = 10
    state = drain(interval, burst, T0)
    now = T0 + int(interval * k)
    peek = decide([state], [(interval, burst)], 1, now, consume=False)
    assert peek.results[0].remaining == k
    assert peek.new_states is None
    # one µs earlier there is one token fewer (interval < 1e6 µs: the slack is under 1 µs)
    earlier = decide([state], [(interval, burst)], 1, now - 1, consume=False)
    assert earlier.results[0].remaining == k - 1
    # and exactly k can be taken
    for i in range(k):
        out = take(state, interval, burst, now)
        assert out.allowed, i
        state = out.new_states[0]  # type: ignore[index]
    assert take(state, interval, burst, now).allowed is False


def test_refill_never_exceeds_burst() -> None:
    state = drain(1000.0, 4, T0)
    out = decide([state], [(1000.0, 4)], 1, T0 + 10**9, consume=False)
    assert out.results == (LimitResult(True, 4, 0, 0),)


@pytest.mark.parametrize(("interval", "burst", "cost"), [(1000.0, 5, 1), (1000.0, 5, 3),
                                                         (777.0, 9, 4), (20_000.0, 2, 2),
                                                         (999_999.0, 3, 1)])  # fmt: skip
def test_retry_after_is_exact(interval: float, burst: int, cost: int) -> None:
    # Integer intervals below 1e6 µs: the slack (interval * 1e-6 < 1 µs) can never cover the
    # last microsecond, so waiting retry_us - 1 must refuse and retry_us must admit.
    state = drain(interval, burst, T0)
    refused = take(state, interval, burst, T0, cost=cost)
    assert refused.allowed is False
    retry = refused.results[0].retry_us
    assert retry == cost * interval  # an empty bucket waits for exactly `cost` tokens
    assert take(state, interval, burst, T0 + retry - 1, cost=cost).allowed is False
    assert take(state, interval, burst, T0 + retry, cost=cost).allowed is True
    # part-way there: the wait shrinks by exactly the time waited
    mid = decide([state], [(interval, burst)], cost, T0 + 100, consume=True)
    assert mid.results[0].retry_us == retry - 100


@settings(max_examples=300, deadline=None)
@given(
    interval=st.integers(1, 999_999).map(float),
    burst=st.integers(1, 50),
    data=st.data(),
)
def test_retry_after_exact_property(interval: float, burst: int, data: st.DataObject) -> None:
    taken = data.draw(st.integers(0, burst), label="taken")
    cost = data.draw(st.integers(1, burst), label="cost")
    later = data.draw(st.integers(0, int(interval * burst)), label="later")
    state: State | None = None
    for _ in range(taken):
        state = take(state, interval, burst, T0).new_states[0]  # type: ignore[index]
    out = take(state, interval, burst, T0 + later, cost=cost)
    res = out.results[0]
    if out.allowed:
        assert res.retry_us == 0
        return
    retry = res.retry_us
    assert retry > 0
    assert take(state, interval, burst, T0 + later + retry, cost=cost).allowed is True
    assert take(state, interval, burst, T0 + later + retry - 1, cost=cost).allowed is False


# -- several limits: all or nothing ---------------------------------------------------------------


def test_several_limits_all_or_nothing() -> None:
    params = [(1000.0, 10), (100_000.0, 2)]  # the second one is the tight one
    states: list[State | None] = [None, None]
    for _ in range(2):
        out = decide(states, params, 1, T0, consume=True)
        assert out.allowed
        assert out.new_states is not None
        states = list(out.new_states)
    assert states == [State(2000.0, T0), State(200_000.0, T0)]
    refused = decide(states, params, 1, T0, consume=True)
    assert refused.allowed is False
    assert refused.new_states is None  # the first limit had room, yet nothing was written
    assert refused.results == (
        LimitResult(True, 8, 0, 2000),  # unchanged: reported as it stands
        LimitResult(False, 0, 100_000, 200_000),
    )
    # the first limit's tokens are really still there
    assert decide(states[:1], params[:1], 8, T0, consume=True).allowed is True
    assert decide(states[:1], params[:1], 9, T0, consume=True).allowed is False


def test_several_limits_refusal_by_any_one() -> None:
    params = [(1000.0, 3), (1000.0, 3), (1000.0, 3)]
    for tight in range(3):
        states: list[State | None] = [None, None, None]
        states[tight] = State(3000.0, T0)  # empty
        out = decide(states, params, 1, T0, consume=True)
        assert out.allowed is False
        assert out.new_states is None
        assert [r.allowed for r in out.results] == [i != tight for i in range(3)]


@settings(max_examples=200, deadline=None)
@given(
    params=st.lists(st.tuples(st.floats(1.0, 1e9), st.integers(1, 20)), min_size=1, max_size=4),
    fill=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    cost=st.integers(1, 20),
    consume=st.booleans(),
)
def test_all_or_nothing_property(
    params: list[tuple[float, int]], fill: list[float], cost: int, consume: bool
) -> None:
    states = [State(f * iv * b, T0) for f, (iv, b) in zip(fill, params, strict=False)]
    out = decide(states, params, cost, T0, consume=consume)
    assert out.allowed == all(r.allowed for r in out.results)
    if not consume or not out.allowed:
        assert out.new_states is None
    else:
        assert out.new_states is not None
        for old, new, (iv, _b) in zip(states, out.new_states, params, strict=True):
            assert new.debt == old.debt + cost * iv
            assert new.stamp == T0


# -- peek -----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    interval=st.floats(1.0, 1e9),
    burst=st.integers(1, 100),
    fill=st.floats(0.0, 1.0),
    cost=st.integers(1, 100),
    dt=st.integers(-(10**9), 10**9),
)
def test_peek_never_writes(interval: float, burst: int, fill: float, cost: int, dt: int) -> None:
    state = State(fill * interval * burst, T0)
    peek = decide([state], [(interval, burst)], cost, T0 + dt, consume=False)
    assert peek.new_states is None
    real = decide([state], [(interval, burst)], cost, T0 + dt, consume=True)
    # same verdict and wait as a real take; remaining/reset describe the untouched bucket
    assert peek.allowed == real.allowed
    assert peek.results[0].allowed == real.results[0].allowed
    assert peek.results[0].retry_us == real.results[0].retry_us
    if not real.allowed:
        assert peek.results == real.results


def test_peek_on_fresh_bucket_reports_full() -> None:
    out = decide([None], [(1000.0, 5)], 2, T0, consume=False)
    assert out == Outcome(T0, True, (LimitResult(True, 5, 0, 0),), None)


# -- clock stepping backwards ---------------------------------------------------------------------


def test_clock_backwards_adds_no_tokens() -> None:
    interval, burst = 1000.0, 5
    state = drain(interval, burst, T0)
    for back in (1, 1000, 10**6, 10**12):
        out = decide([state], [(interval, burst)], 1, T0 - back, consume=True)
        assert out.allowed is False
        assert out.results[0].remaining == 0
        assert out.results[0].retry_us == 1000  # refill paused, not reversed
    # taken in the past: the state keeps its (later) stamp and refills only from there
    half = State(2000.0, T0)  # 3 of 5 left
    out = take(half, interval, burst, T0 - 10**6)
    assert out.new_states == (State(3000.0, T0),)
    assert out.results == (LimitResult(True, 2, 0, 3000),)


events = st.lists(
    st.tuples(
        st.integers(-2_000_000, 2_000_000),  # clock step, µs (negative: backwards)
        st.integers(1, 8),  # cost (clipped to burst)
        st.booleans(),  # consume?
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    interval=st.floats(0.5, 2e6, allow_nan=False),
    burst=st.integers(1, 8),
    steps=events,
)
def test_sequences_with_backward_steps_keep_invariants(
    interval: float, burst: int, steps: list[tuple[int, int, bool]]
) -> None:
    tau = burst * interval
    now = T0
    state: State | None = None
    admitted = 0
    start: int | None = None  # when the first write happened: a fresh bucket is full until then
    max_now = now
    last_stamp = -math.inf
    for step, cost, consume in steps:
        now += step
        max_now = max(max_now, now)
        cost = min(cost, burst)
        out = decide([state], [(interval, burst)], cost, now, consume=consume)
        res = out.results[0]
        assert 0 <= res.remaining <= burst
        assert res.retry_us >= 0
        assert res.reset_us >= 0
        assert (res.retry_us == 0) == res.allowed
        if out.new_states is not None:
            (state,) = out.new_states
            if start is None:
                start = now
            admitted += cost
            assert not math.isnan(state.debt)
            assert 0 <= state.debt <= tau + interval * SLACK
            assert state.stamp >= last_stamp  # the stamp never moves backwards
            assert state.stamp <= max_now
            last_stamp = state.stamp
    # Tokens come only from forward progress of the clock: never more than a full bucket plus
    # what the furthest time reached could refill (a backward step adds nothing).
    if start is not None:
        refill = (max_now - start) / interval
        assert admitted <= burst + math.floor(refill * (1 + 1e-9) + SLACK)


# -- MemoryBackend with a fake clock --------------------------------------------------------------


class FakeClock:
    """Seconds, as ``MemoryBackend`` expects; set in whole microseconds.

    Starts at 1000 s (doubles resolve far below 1 µs there) and returns the middle of the
    microsecond, so ``int(seconds * 1e6)`` gives back exactly ``us``.
    """

    def __init__(self, us: int = 1_000_000_000) -> None:
        self.us = us

    def __call__(self) -> float:
        return (self.us + 0.5) / 1_000_000


def test_memory_backend_matches_model() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    limits = [Limit(1000, 5), Limit(3, 2)]
    request = build_request("t:", "alice", limits, 1)
    states: list[State | None] = [None, None]
    schedule = [0, 0, 1, 999, 1000, 0, 0, 0, 250_000, 333_333, 1, 5_000_000, 0, 0, 0]
    for i, dt in enumerate(schedule):
        clock.us += dt
        consume = i % 4 != 3
        reply = list(backend.decide(request, consume=consume))
        now = reply[0]
        assert now == clock.us
        out = decide(states, request.params, 1, now, consume=consume)
        expected = [out.now, int(out.allowed)]
        for r in out.results:
            expected += [int(r.allowed), r.remaining, r.retry_us, r.reset_us]
        assert reply == expected, i
        if out.new_states is not None:
            states = list(out.new_states)


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["take", "peek", "reset"]),
            st.integers(0, 3),  # which identity
            st.integers(1, 3),  # cost
            st.integers(0, 400_000),  # clock step µs
        ),
        max_size=40,
    )
)
def test_memory_backend_matches_model_property(ops: list[tuple[str, int, int, int]]) -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    limits = [Limit(10, 3), Limit(4000, 5)]
    model: dict[int, list[State | None]] = {}
    for op, who, cost, dt in ops:
        clock.us += dt
        request = build_request("t:", f"user{who}", limits, cost)
        if op == "reset":
            backend.reset(request)
            model.pop(who, None)
            continue
        consume = op == "take"
        reply = list(backend.decide(request, consume=consume))
        states = model.get(who, [None, None])
        assert reply[0] == clock.us
        out = decide(states, request.params, cost, reply[0], consume=consume)
        expected = [out.now, int(out.allowed)]
        for r in out.results:
            expected += [int(r.allowed), r.remaining, r.retry_us, r.reset_us]
        assert reply == expected
        if out.new_states is not None:
            model[who] = list(out.new_states)


def test_memory_backend_drops_full_buckets() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    lim = Limit(100, 4)  # 10_000 µs per token, full 40_000 µs after being emptied
    request = build_request("t:", "k", lim, 4)
    assert backend.decide(request, consume=True)[1] == 1
    other = build_request("t:", "other", lim, 1)
    assert backend.decide(other, consume=True)[1] == 1  # full again 10_000 µs from now
    assert len(backend) == 2
    clock.us += 10_000
    backend.decide(request, consume=False)  # any call sweeps
    assert len(backend) == 1
    clock.us += 29_999
    backend.decide(request, consume=False)
    assert len(backend) == 1  # 1 µs short of full: kept
    clock.us += 1
    reply = backend.decide(request, consume=False)
    assert len(backend) == 0
    assert list(reply[2:]) == [1, 4, 0, 0]


def test_memory_backend_peek_does_not_store() -> None:
    backend = MemoryBackend(clock=FakeClock())
    request = build_request("t:", "k", Limit(1, 3), 1)
    for _ in range(5):
        backend.decide(request, consume=False)
    assert len(backend) == 0


def test_memory_backend_max_keys_bound() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock, max_keys=1000)
    lim = Limit(0.01, 5)  # takes 500 s to refill: nothing expires during the test
    for i in range(50_000):
        clock.us += 1
        request = build_request("t:", f"id-{i}", lim, 1)
        reply = backend.decide(request, consume=True)
        assert reply[1] == 1
        assert len(backend) <= 1000
    assert len(backend) == 1000
    # the most recent identities are still tracked exactly
    last = build_request("t:", "id-49999", lim, 1)
    assert list(backend.decide(last, consume=False)[2:4]) == [1, 4]


def test_memory_backend_eviction_keeps_the_emptiest() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock, max_keys=2)
    lim = Limit(0.01, 5)
    drained = build_request("t:", "drained", lim, 5)
    assert backend.decide(drained, consume=True)[1] == 1
    for i in range(10):  # each of these is nearly full: evicted first
        backend.decide(build_request("t:", f"light-{i}", lim, 1), consume=True)
        assert len(backend) == 2
    refused = backend.decide(build_request("t:", "drained", lim, 1), consume=True)
    assert refused[1] == 0


def test_memory_backend_thread_safe_exact_admission() -> None:
    backend = MemoryBackend()  # real clock
    lim = Limit(1e-6, 100)  # one token per ~11.6 days: no refill during the test
    request = build_request("t:", "shared", lim, 1)
    admitted: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        mine = 0
        barrier.wait()
        for _ in range(50):
            if backend.decide(request, consume=True)[1] == 1:
                mine += 1
        with lock:
            admitted.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 8
    assert sum(admitted) == 100
    reply = backend.decide(request, consume=False)
    assert list(reply[1:4]) == [0, 0, 0]
