"""The reference model (``tokenlimit._model.decide``) and the memory backend built on it.

Pure unit tests with an injected clock: integer microseconds for the model (the server's
``TIME``), seconds for ``MemoryBackend``. A bucket's state is one integer, its TAT (GCRA
theoretical arrival time: when it is full again) in ns; every interval is a whole number of ns,
so below 2^53 ns every sum is exact and every expected value here is exact too.
"""

from __future__ import annotations

import math
import threading
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenlimit import ConfigError, Limit, MemoryBackend
from tokenlimit._model import SLACK, LimitResult, Outcome, decide, join_tat, split_tat
from tokenlimit._request import build_request

T0 = 1_700_000_000_000_000  # a realistic server time in µs
T0_NS = T0 * 1000


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def take(state: int | None, interval: int, burst: int, now: int, cost: int = 1) -> Outcome:
    return decide([state], [(interval, burst)], cost, now, consume=True)


def drain(interval: int, burst: int, now: int) -> int:
    """Take every token of a fresh bucket at ``now``; returns the (empty) state, its TAT."""
    state: int | None = None
    for _ in range(burst):
        out = take(state, interval, burst, now)
        assert out.allowed
        assert out.new_states is not None
        state = out.new_states[0]
    assert state == now * 1000 + burst * interval
    return state


def admitted_with_deficit(deficit: int, interval: int, tau: int) -> bool | None:
    """Whether a take ``deficit`` ns short of its last token is admitted: only if the slack
    (1e-6 of an interval) covers it. None when the two are within one rounding of ``tau +
    slack`` (possible only for a slack within an ulp of a whole ns: not asserted)."""
    slack = interval * SLACK
    if deficit <= slack:
        return True
    if deficit > slack + math.ulp(tau + slack):
        return False
    return None


# -- the state: one integer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tat", [0, 1, 999_999_999, 10**9, T0_NS, T0_NS + 999_999_999, 2**63 - 1, 10**24 - 1]
)
def test_split_and_join_tat_round_trip(tat: int) -> None:
    seconds, nanos = split_tat(tat)
    assert (seconds, nanos) == divmod(tat, 10**9)
    assert join_tat(seconds, nanos, 0.0) == tat
    assert join_tat(seconds, 0.0, nanos) == tat


def test_join_tat_carries_whole_seconds() -> None:
    s, ns = split_tat(T0_NS + 999_999_000)
    assert join_tat(s, ns, 1000.0) == T0_NS + 10**9
    assert join_tat(s, ns, 5 * 10**9 + 1234.0) == T0_NS + 5 * 10**9 + 999_999_000 + 1234


# -- a single bucket ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "burst"),
    [(1_000_000, 1), (1_000_000, 5), (250_000, 100), (333_333_334, 7), (10**15, 3), (777, 4)],
)
def test_fresh_bucket_admits_exactly_burst_then_refuses(interval: int, burst: int) -> None:
    state: int | None = None
    for i in range(burst):
        out = take(state, interval, burst, T0)
        assert out.now == T0
        assert out.allowed is True
        (res,) = out.results
        assert res.allowed is True
        assert res.remaining == burst - 1 - i
        assert res.retry_us == 0
        assert res.reset_us == ceil_div((i + 1) * interval, 1000)
        assert out.new_states == (T0_NS + (i + 1) * interval,)
        state = out.new_states[0]
    for _ in range(3):
        out = take(state, interval, burst, T0)
        assert out.allowed is False
        assert out.new_states is None
        assert out.results == (
            LimitResult(False, 0, ceil_div(interval, 1000), ceil_div(burst * interval, 1000)),
        )


def test_fresh_bucket_first_reply_exact() -> None:
    out = take(None, 1_000_000, 10, T0)
    assert out == Outcome(T0, True, (LimitResult(True, 9, 0, 1000),), (T0_NS + 1_000_000,))


def test_cost_takes_cost_tokens() -> None:
    out = take(None, 1_000_000, 10, T0, cost=4)
    assert out.results == (LimitResult(True, 6, 0, 4000),)
    assert out.new_states == (T0_NS + 4_000_000,)
    out = take(out.new_states[0], 1_000_000, 10, T0, cost=7)
    assert out.allowed is False
    assert out.results == (LimitResult(False, 6, 1000, 4000),)
    assert out.new_states is None


def test_state_in_the_past_is_a_full_bucket() -> None:
    for tat in (0, 1, T0_NS - 10**15, T0_NS - 1, T0_NS):
        assert take(tat, 1_000_000, 3, T0) == take(None, 1_000_000, 3, T0)


@pytest.mark.parametrize("interval", [1_000_000, 50_000_000, 500_000_000, 125_000])
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_refill_after_k_intervals_gives_k_tokens(interval: int, k: int) -> None:
    burst = 10
    state = drain(interval, burst, T0)
    now = T0 + k * interval // 1000  # whole µs intervals
    peek = decide([state], [(interval, burst)], 1, now, consume=False)
    assert peek.results[0].remaining == k
    assert peek.new_states is None
    # one µs earlier there is one token fewer: 1000 ns short, more than the slack (interval
    # * 1e-6 < 1000 ns below 1e9 ns)
    earlier = decide([state], [(interval, burst)], 1, now - 1, consume=False)
    assert earlier.results[0].remaining == k - 1
    # and exactly k can be taken
    for i in range(k):
        out = take(state, interval, burst, now)
        assert out.allowed, i
        state = out.new_states[0]  # type: ignore[index]
    assert take(state, interval, burst, now).allowed is False


# Limit(3, 7): 333_333_334 ns per token, not a whole number of µs. The k-th token is back at
# ceil(k * interval / 1000) µs; one µs before, it is d = k * interval - 1000 * (that - 1) ns short
# (1 <= d <= 1000), and counts already if the slack (333.33 ns) covers d.
@pytest.mark.parametrize(
    ("k", "at_us", "one_us_before"),
    [
        (1, 333_334, 0),  # d = 334 ns: short
        (2, 666_667, 1),  # d = 668
        (3, 1_000_001, 3),  # d = 2 ns: inside the slack
        (4, 1_333_334, 3),  # d = 336
        (5, 1_666_667, 4),  # d = 670
        (6, 2_000_001, 6),  # d = 4
    ],
)
def test_refill_with_an_interval_off_the_microsecond(
    k: int, at_us: int, one_us_before: int
) -> None:
    interval, burst = Limit(3, 7).interval_ns, 7
    assert interval == 333_333_334
    assert at_us == ceil_div(k * interval, 1000)
    state = drain(interval, burst, T0)
    peek = decide([state], [(interval, burst)], 1, T0 + at_us, consume=False)
    assert peek.results[0].remaining == k
    before = decide([state], [(interval, burst)], 1, T0 + at_us - 1, consume=False)
    assert before.results[0].remaining == one_us_before
    short = k * interval - 1000 * (at_us - 1)
    assert (one_us_before == k) == (short <= interval * SLACK)


def test_refill_never_exceeds_burst() -> None:
    state = drain(1_000_000, 4, T0)
    out = decide([state], [(1_000_000, 4)], 1, T0 + 10**9, consume=False)
    assert out.results == (LimitResult(True, 4, 0, 0),)


# (interval ns, burst, cost, admitted one µs before retry_us): an empty bucket waits exactly
# retry_us = ceil(cost * interval / 1000) µs. One µs earlier it is d = cost * interval - 1000 *
# (retry_us - 1) ns short, 1 <= d <= 1000, and refused unless the slack (interval * 1e-6 ns)
# covers d: never below 1e6 ns per token; for a whole number of µs (d = 1000) only from 1e9 ns.
RETRY_CASES = [
    (1_000_000, 5, 1, False),
    (1_000_000, 5, 3, False),
    (777_000, 9, 4, False),
    (20_000_000, 2, 2, False),
    (999_999_000, 3, 1, False),  # d = 1000 ns, slack 999.999 ns
    (1_000_000_000, 3, 1, True),  # d = 1000 ns, slack 1000 ns: retry_us is 1 µs generous
    (777, 9, 4, False),  # retry 4 µs (3108 ns); at 3 µs 108 ns short
    (333_333_334, 5, 1, False),  # d = 334 ns, slack 333.33 ns
    (333_333_334, 5, 3, True),  # 1_000_000_002 ns: d = 2 ns
]


@pytest.mark.parametrize(("interval", "burst", "cost", "early"), RETRY_CASES)
def test_retry_after_is_exact(interval: int, burst: int, cost: int, early: bool) -> None:
    state = drain(interval, burst, T0)
    refused = take(state, interval, burst, T0, cost=cost)
    assert refused.allowed is False
    retry = refused.results[0].retry_us
    assert retry == ceil_div(cost * interval, 1000)  # an empty bucket waits for `cost` tokens
    assert take(state, interval, burst, T0 + retry, cost=cost).allowed is True
    assert take(state, interval, burst, T0 + retry - 1, cost=cost).allowed is early
    short = cost * interval - 1000 * (retry - 1)
    assert admitted_with_deficit(short, interval, burst * interval) is early
    # part-way there: the wait shrinks by exactly the time waited
    part = retry // 2
    mid = decide([state], [(interval, burst)], cost, T0 + part, consume=True)
    assert mid.results[0].retry_us == retry - part


@settings(max_examples=300, deadline=None)
@given(
    interval=st.one_of(st.integers(1, 999_999), st.integers(1, 10**12)),
    burst=st.integers(1, 50),
    data=st.data(),
)
def test_retry_after_exact_property(interval: int, burst: int, data: st.DataObject) -> None:
    taken = data.draw(st.integers(0, burst), label="taken")
    cost = data.draw(st.integers(1, burst), label="cost")
    later = data.draw(st.integers(0, ceil_div(interval * burst, 1000)), label="later")
    state: int | None = None
    for _ in range(taken):
        state = take(state, interval, burst, T0).new_states[0]  # type: ignore[index]
    out = take(state, interval, burst, T0 + later, cost=cost)
    res = out.results[0]
    tau = burst * interval
    need = max(0, taken * interval - 1000 * later) + cost * interval  # exact, in ns
    if out.allowed:
        assert res.retry_us == 0
        assert need <= tau + interval * SLACK
        return
    retry = res.retry_us
    assert retry == ceil_div(need - tau, 1000) > 0
    assert take(state, interval, burst, T0 + later + retry, cost=cost).allowed is True
    # one µs earlier: `short` ns short (1..1000), admitted only if the slack covers it
    short = need - tau - 1000 * (retry - 1)
    assert 1 <= short <= 1000
    early = take(state, interval, burst, T0 + later + retry - 1, cost=cost).allowed
    expected = admitted_with_deficit(short, interval, tau)
    if interval < 10**6:
        assert expected is False  # the slack is under 1 ns: retry_us is the exact boundary
    if expected is not None:
        assert early is expected


# -- several limits: all or nothing ---------------------------------------------------------------


def test_several_limits_all_or_nothing() -> None:
    params = [(1_000_000, 10), (100_000_000, 2)]  # the second one is the tight one
    states: list[int | None] = [None, None]
    for _ in range(2):
        out = decide(states, params, 1, T0, consume=True)
        assert out.allowed
        assert out.new_states is not None
        states = list(out.new_states)
    assert states == [T0_NS + 2_000_000, T0_NS + 200_000_000]
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
    params = [(1_000_000, 3), (1_000_000, 3), (1_000_000, 3)]
    for tight in range(3):
        states: list[int | None] = [None, None, None]
        states[tight] = T0_NS + 3_000_000  # empty
        out = decide(states, params, 1, T0, consume=True)
        assert out.allowed is False
        assert out.new_states is None
        assert [r.allowed for r in out.results] == [i != tight for i in range(3)]


@settings(max_examples=200, deadline=None)
@given(
    params=st.lists(st.tuples(st.integers(1, 10**12), st.integers(1, 20)), min_size=1, max_size=4),
    data=st.data(),
    cost=st.integers(1, 20),
    consume=st.booleans(),
)
def test_all_or_nothing_property(
    params: list[tuple[int, int]], data: st.DataObject, cost: int, consume: bool
) -> None:
    # each TAT from well in the past (a full bucket) to an empty bucket
    states: list[int | None] = [
        data.draw(st.none() | st.integers(T0_NS - 10**13, T0_NS + iv * b), label="tat")
        for iv, b in params
    ]
    out = decide(states, params, cost, T0, consume=consume)
    assert out.allowed == all(r.allowed for r in out.results)
    if not consume or not out.allowed:
        assert out.new_states is None
    else:
        assert out.new_states is not None
        for old, new, (iv, _b) in zip(states, out.new_states, params, strict=True):
            assert new == max(old or 0, T0_NS) + cost * iv  # exact


# -- peek -----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    interval=st.integers(1, 10**12),
    burst=st.integers(1, 100),
    fill=st.integers(0, 10**6),
    cost=st.integers(1, 100),
    dt=st.integers(-(10**9), 10**9),
)
def test_peek_never_writes(interval: int, burst: int, fill: int, cost: int, dt: int) -> None:
    state = T0_NS + interval * burst * fill // 10**6
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
    out = decide([None], [(1_000_000, 5)], 2, T0, consume=False)
    assert out == Outcome(T0, True, (LimitResult(True, 5, 0, 0),), None)


# -- clock stepping backwards ---------------------------------------------------------------------


def test_clock_backwards_adds_no_tokens_debt_grows_by_the_step() -> None:
    interval, burst = 1_000_000, 5
    state = drain(interval, burst, T0)  # empty: TAT = T0 + 5000 µs
    for back in (1, 1000, 10**6, 10**12):
        out = decide([state], [(interval, burst)], 1, T0 - back, consume=True)
        assert out.allowed is False
        assert out.new_states is None
        # the bucket looks `back` µs emptier: the next token is still due at T0 + 1000 µs
        assert out.results == (LimitResult(False, 0, 1000 + back, 5000 + back),)


def test_clock_backwards_then_forward_as_before() -> None:
    interval, burst = 1_000_000, 5
    half = T0_NS + 2_000_000  # 3 of 5 tokens left at T0
    # 1 ms back, 2 tokens left: one is taken, and the TAT is the one a take at T0 writes
    back = take(half, interval, burst, T0 - 1000)
    at_t0 = take(half, interval, burst, T0)
    assert back.results == (LimitResult(True, 1, 0, 4000),)
    assert at_t0.results == (LimitResult(True, 2, 0, 3000),)
    assert back.new_states == at_t0.new_states == (T0_NS + 3_000_000,)
    # 3 ms back the bucket looks empty; 1 s back it is 998 ms short of the next token
    assert take(half, interval, burst, T0 - 3000).results == (LimitResult(False, 0, 1000, 5000),)
    assert take(half, interval, burst, T0 - 10**6).results == (
        LimitResult(False, 0, 998_000, 1_002_000),
    )
    # forward again: the state written in the past is the one a take at T0 writes, so from T0
    # on every answer is as before; 3 ms after T0 the bucket is full
    assert take(back.new_states[0], interval, burst, T0 + 3000).results == (  # type: ignore[index]
        LimitResult(True, 4, 0, 1000),
    )


@settings(max_examples=300, deadline=None)
@given(
    interval=st.integers(1, 10**12),
    burst=st.integers(1, 20),
    tat=st.integers(T0_NS - 10**13, T0_NS + 10**13),
    cost=st.integers(1, 20),
    early=st.integers(0, 10**10),
    late=st.integers(0, 10**10),
)
def test_earlier_clock_never_shows_more_tokens(
    interval: int, burst: int, tat: int, cost: int, early: int, late: int
) -> None:
    """For one state, an earlier time never has more tokens, and a refusal names the same
    moment whenever it is asked: now + retry_us does not move with the clock."""
    cost = min(cost, burst)
    a = decide([tat], [(interval, burst)], cost, T0 - early, consume=False).results[0]
    b = decide([tat], [(interval, burst)], cost, T0 + late, consume=False).results[0]
    assert a.remaining <= b.remaining
    assert a.reset_us - b.reset_us == early + late or b.reset_us == 0 or a.reset_us == 0
    assert a.allowed <= b.allowed
    if not b.allowed:
        assert T0 - early + a.retry_us == T0 + late + b.retry_us


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
@given(interval=st.integers(1, 2 * 10**9), burst=st.integers(1, 8), steps=events)
def test_sequences_with_backward_steps_keep_invariants(
    interval: int, burst: int, steps: list[tuple[int, int, bool]]
) -> None:
    tau = burst * interval
    room = float(tau) + interval * SLACK  # as the model computes it
    now = T0
    state: int | None = None
    admitted = 0
    start: int | None = None  # when the first write happened: a fresh bucket is full until then
    max_now = now
    for step, cost, consume in steps:
        now += step
        max_now = max(max_now, now)
        cost = min(cost, burst)
        out = decide([state], [(interval, burst)], cost, now, consume=consume)
        res = out.results[0]
        debt = max(0, (state or 0) - now * 1000)  # exact: a step back makes it larger
        need = debt + cost * interval
        assert res.allowed == (need <= room)
        assert 0 <= res.remaining <= burst
        assert (res.retry_us == 0) == res.allowed
        assert res.retry_us == (0 if res.allowed else ceil_div(need - tau, 1000))
        if out.new_states is not None:
            (new,) = out.new_states
            assert new == max(state or 0, now * 1000) + cost * interval  # GCRA, exactly
            assert new - now * 1000 <= room
            if start is None:
                start = now
            admitted += cost
            state = new
        after = max(0, (state or 0) - now * 1000)
        assert res.reset_us == ceil_div(after, 1000)
    # Tokens come only from forward progress of the clock: the TAT grows by one interval per
    # token and is at most `room` ahead of the latest time reached, so never more than a full
    # bucket plus what that time could refill (a backward step adds nothing).
    if start is not None:
        assert state is not None
        assert state >= start * 1000 + admitted * interval
        assert Fraction(admitted * interval) <= Fraction((max_now - start) * 1000) + Fraction(room)


# -- the rate, in whole nanoseconds per token -----------------------------------------------------


def test_interval_is_whole_nanoseconds_rounded_up() -> None:
    assert Limit(3, 5).interval_ns == 333_333_334
    assert Limit(3, 5).interval == 333_333.334  # µs, as the bucket uses it
    assert Limit(1000).interval_ns == 1_000_000
    assert Limit(7.3, 3).interval_ns == 136_986_302
    assert Limit.parse("100/minute").interval_ns == 600_000_000
    assert Limit.per_minute(20).interval_ns == 3_000_000_000  # 1/3 per s: not rounded off
    assert Limit(1e9, 1).interval_ns == 1  # the fastest rate
    assert Limit(999_999_999.9, 3).interval_ns == 2  # just under 1 ns per token: 2 ns
    assert Limit(1.1102230246251567e-07, 1).interval_ns == 2**53 - 1  # ~104 days
    year = Limit.parse("1/year")  # past 2^53 ns: rounded up to a whole number a double holds
    assert year.interval_ns == int(float(year.interval_ns))
    assert abs(year.interval_ns - 31_104_000 * 10**9) <= 4  # the double's spacing there
    assert Limit(1e-12, 1).interval_ns == 10**21  # the slowest rate


@pytest.mark.parametrize(
    ("rate", "burst"), [(2e9, 1), (2e9, None), (1.7e308, 5), (1e-13, 1), (2e-12, 3), (5e-324, 1)]
)
def test_rates_beyond_whole_nanoseconds_are_refused(rate: float, burst: int | None) -> None:
    with pytest.raises(ConfigError) as info:
        Limit(rate, burst)
    assert info.value.param == "rate"
    assert "rate" in str(info.value)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(1e-3, 1e9),
    burst=st.integers(1, 20),
    data=st.data(),
)
def test_quantized_rate_never_admits_faster_than_asked(
    rate: float, burst: int, data: st.DataObject
) -> None:
    lim = Limit(rate, burst)
    interval = lim.interval_ns
    # whole ns, rounded up: never a shorter interval than asked (up to the rounding of the
    # float rate itself, 2^-52), and less than 1 ns longer
    assert Fraction(interval) * Fraction(rate) >= 10**9 * (1 - Fraction(1, 2**52))
    assert Fraction(interval - 1) * Fraction(rate) < 10**9 * (1 + Fraction(1, 2**52))
    # a bucket taken at arbitrary moments from full: count what it admits over the time spent
    waits = data.draw(
        st.lists(st.integers(0, ceil_div(2 * interval, 1000)), min_size=1, max_size=40),
        label="waits µs",
    )
    costs = data.draw(st.lists(st.integers(1, burst), min_size=len(waits), max_size=len(waits)))
    now, state, admitted = T0, None, 0
    for wait, cost in zip(waits, costs, strict=True):
        now += wait
        out = decide([state], [(interval, burst)], cost, now, consume=True)
        if out.allowed:
            state = out.new_states[0]  # type: ignore[index]
            admitted += cost
    elapsed_ns = (now - T0) * 1000
    # exactly: one interval per token, at most a full bucket plus its slack ahead of now
    assert Fraction(admitted * interval) <= elapsed_ns + Fraction(
        burst * interval + interval * SLACK
    )
    # so against the asked rate: burst + floor(T * rate), give or take the admission slack
    # (a token can be admitted up to 1e-6 of an interval early; see the next test)
    assert admitted <= burst + math.floor(
        Fraction(elapsed_ns, 10**9) * Fraction(rate) + 2 * Fraction(SLACK)
    )


def test_the_slack_admits_at_most_a_millionth_of_an_interval_early() -> None:
    interval, burst = Limit(1, 1).interval_ns, 1  # 1 s per token: the slack is 1000 ns
    state = take(None, interval, burst, T0).new_states[0]  # type: ignore[index]
    # 999_999 µs later: 1000 ns short of the token, within the slack: admitted, although the
    # strict bound burst + floor(T * rate) is 1 + floor(0.999999) = 1
    assert take(state, interval, burst, T0 + 999_999).allowed is True
    # 2000 ns short: refused, and told to wait for the exact token, 2 µs
    refused = take(state, interval, burst, T0 + 999_998)
    assert refused.results == (LimitResult(False, 0, 2, 2),)


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
    states: list[int | None] = [None, None]
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
            # the same integers are stored: the TAT in ns
            assert [backend._states[k] for k in request.keys] == states


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
    model: dict[int, list[int | None]] = {}
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
