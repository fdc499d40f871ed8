"""Leased tokens (issue 18): ``Limit(..., lease=N)``.

The pure model (``_model.lease``) first, then the lease script held to it integer for integer
and byte for byte on real servers (the server's ``TIME`` pinned, as in test_script.py); the
lease table (``_lease.py``) on an injected clock; the limiters on the memory backend (a fake
clock) and on every real server: admissions never above the policy, tokens given back,
decisions honest to within the lease, and the features a decision has (cost, several limits,
tiers, shadow mode, metrics, failure modes). Fleet-wide exactness under processes is in
test_contention.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
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
    Decision,
    Limit,
    MemoryBackend,
    RateLimiter,
)
from tokenlimit._cache import DEFAULT_SIZE, RefusalCache
from tokenlimit._lease import HOLD, LeaseTable, lease_cap, with_cost
from tokenlimit._model import decide, lease, refund
from tokenlimit._request import Request, build_request
from tokenlimit._scripts import lease_script
from tokenlimit._settle import ThreadSettler
from tokenlimit.testing import FakeClock, reset_all

T0 = 1_700_000_000_000_000  # a realistic server time in µs
T0_NS = T0 * 1000


def _flat(results: Sequence[tuple[bool, int, int, int]]) -> list[int]:
    return [int(x) for r in results for x in r]


# -- the model ------------------------------------------------------------------------------------


def test_a_lease_takes_what_every_bucket_holds_up_to_want() -> None:
    params = [(100_000_000, 10), (10**9, 4)]  # 10/s burst 10; 1/s burst 4
    out = lease([None, None], params, 1, 8, 0, T0)
    assert (out.allowed, out.granted) == (True, 4)  # the fewest any bucket holds
    assert out.new_states == (T0_NS + 4 * 100_000_000, T0_NS + 4 * 10**9)
    assert [r.remaining for r in out.results] == [6, 0]
    # the same as four plain decisions of one token, state for state
    states: list[int | None] = [None, None]
    for _ in range(4):
        step = decide(states, params, 1, T0, consume=True)
        assert step.new_states is not None
        states = list(step.new_states)
    assert list(out.new_states) == states


def test_a_lease_is_all_or_nothing_for_its_need() -> None:
    params = [(10**9, 3)]
    full = lease([None], params, 3, 3, 0, T0)
    assert (full.allowed, full.granted) == (True, 3)
    refused = lease(list(full.new_states), params, 1, 3, 0, T0)
    assert (refused.allowed, refused.granted) == (False, 0)
    assert refused.new_states == full.new_states  # nothing written
    (result,) = refused.results
    assert result.retry_us == 1_000_000  # one token is a second away
    # the need is admitted exactly where decide admits it
    for need in (1, 2, 3):
        expected = decide(list(full.new_states), params, need, T0 + 1_500_000, consume=False)
        got = lease(list(full.new_states), params, need, 3, 0, T0 + 1_500_000)
        assert got.allowed == expected.allowed
        assert [r.retry_us for r in got.results] == [r.retry_us for r in expected.results]


def test_a_lease_gives_back_first_never_above_full() -> None:
    params = [(10**9, 5)]
    taken = lease([None], params, 1, 5, 0, T0)
    assert taken.granted == 5
    # three unused tokens go back, and the need is taken from them: one call
    again = lease(list(taken.new_states), params, 1, 1, 3, T0)
    assert (again.allowed, again.granted) == (True, 1)
    back = refund(list(taken.new_states), params, 3, T0)
    assert again.new_states[0] == T0_NS + 3 * 10**9
    assert back.new_states[0] == T0_NS + 2 * 10**9
    # a refused lease still keeps what was given back; an absent bucket stays absent
    owed = [T0_NS + 5 * 10**9]
    refused = lease(owed, params, 5, 5, 2, T0)
    assert not refused.allowed
    assert refused.new_states == (T0_NS + 3 * 10**9,)
    absent = lease([None], params, 5, 5, 2, T0 + 0)
    assert absent.granted == 5  # a full bucket: nothing to give back to
    capped = lease([T0_NS + 10**9], params, 1, 1, 5, T0)  # back > debt: full, not fuller
    assert capped.results[0].remaining == 4  # 5 after the give-back, one taken


# -- the script agrees with the model -------------------------------------------------------------


script_limits = st.lists(
    st.builds(Limit, st.one_of(st.integers(1, 50), st.floats(0.5, 20_000.0)), st.integers(1, 10)),
    min_size=1,
    max_size=3,
)


def test_script_matches_model(target: Target) -> None:
    """At a pinned server time: random prior debts (absent too), needs, wants and give-backs;
    the reply integer for integer, and what is stored byte for byte."""
    client = target.client()
    script = lease_script()

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        limits=script_limits,
        debts=st.lists(st.one_of(st.none(), st.integers(0, 30 * 10**9)), min_size=3, max_size=3),
        need=st.integers(1, 10),
        extra=st.integers(0, 10),
        back=st.integers(0, 10),
        micros=st.sampled_from([0, 1, 999_999]),
    )
    def run(
        limits: list[Limit], debts: list[int | None], need: int, extra: int, back: int, micros: int
    ) -> None:
        smallest = min(limit.burst for limit in limits)
        need = min(need, smallest)
        want = min(need + extra, smallest)
        back = min(back, smallest)
        request = build_request(PREFIX, fresh_id("lease"), limits, need)
        node = node_client(client, request.keys[0])
        seconds, _ = node.time()
        now = (int(seconds) - 1) * 1_000_000 + micros
        states: list[int | None] = []
        for key, debt in zip(request.keys, debts, strict=False):
            tat = None if debt is None else now * 1000 + debt
            if tat is not None:
                node.set(key, str(tat), px=3_600_000)
            states.append(tat)
        args = (request.args[0], str(want), str(back), *request.args[1:])
        reply = node.eval(frozen(script, now), len(request.keys), *request.keys, *args)
        out = lease(states, request.params, need, want, back, now)
        assert reply == [out.now, int(out.allowed), *_flat(out.results), out.granted]
        assert_stored(node, request.keys, list(out.new_states))

    try:
        run()
    finally:
        client.close()


@pytest.mark.parametrize(
    "args",
    [
        ["0", "1", "0", "1000", "5"],  # no need
        ["2", "1", "0", "1000", "5"],  # want below need
        ["1", "6", "0", "1000", "5"],  # want above the burst
        ["1", "1", "6", "1000", "5"],  # more back than the burst
        ["1", "1", "-1", "1000", "5"],
        ["1", "nan", "0", "1000", "5"],
        ["1", "1", "0", "1000"],  # an argument missing
    ],
)
def test_script_refuses_bad_arguments_touching_nothing(target: Target, args: list[str]) -> None:
    request = build_request(PREFIX, fresh_id("bad"), Limit(1, 5))
    (key,) = request.keys
    client = target.client()
    try:
        node = node_client(client, key)
        seconds, micros = node.time()
        tat = str((int(seconds) * 1_000_000 + int(micros)) * 1000 + 3 * 10**9)
        node.set(key, tat, px=60_000)
        with pytest.raises(redis.ResponseError, match="tokenlimit: "):
            node.eval(lease_script().body, 1, key, *args)
        assert node.get(key) == tat.encode()
    finally:
        client.close()


# -- the lease table, on an injected clock --------------------------------------------------------


def _request(limits: Limit | list[Limit], cost: int = 1, key: str = "k") -> Request:
    return build_request(PREFIX, key, limits, cost)


def _grant(table: LeaseTable, request: Request, granted: int, now: float) -> Decision | None:
    """The store granted ``granted`` tokens (remaining 0 after, full in 1 s)."""
    n = len(request.limits)
    reply = [0, int(granted >= request.cost)] + [int(granted > 0), 0, 0, 1_000_000] * n
    decision, _ = table.granted(request, reply, granted, now)
    return decision


def test_a_new_key_leases_its_cost_alone_then_grows_while_used_up() -> None:
    table = LeaseTable(lambda: 0.0)
    request = _request(Limit(1000, 1000, lease=64))
    now = 10.0
    refill = table.claim(request, now)
    assert refill is not None
    assert (refill.want, refill.back, refill.plain) == (1, 0, True)  # an ordinary decision
    _grant(table, request, 1, now)
    wants = []
    for _step in range(1, 9):  # used up within the hold each time: 2, 4, ... up to the cap
        now += 0.001
        assert table.take(request, now) is None
        refill = table.claim(request, now)
        assert refill is not None
        assert not refill.plain
        wants.append(refill.want)
        _grant(table, request, refill.want, now)
        for _ in range(refill.want - 1):
            assert table.take(request, now) is not None
    assert wants == [2, 4, 8, 16, 32, 64, 64, 64]
    assert table.handed == sum(w - 1 for w in wants)


def test_a_lease_shrinks_to_what_was_used_and_gives_the_rest_back() -> None:
    table = LeaseTable(lambda: 0.0)
    request = _request(Limit(1000, 1000, lease=64))
    now = 0.0
    for size in (1, 2, 4, 8, 16):
        refill = table.claim(request, now)
        assert refill is not None
        assert refill.want == size
        _grant(table, request, size, now)
        for _ in range(size - 1):
            table.take(request, now)
    refill = table.claim(request, now)
    assert refill is not None
    assert refill.want == 32
    _grant(table, request, 32, now)
    for _ in range(4):  # 5 of 32 used, then the hold ends
        assert table.take(request, now) is not None
    later = now + HOLD
    assert table.take(request, later) is None  # never handed out after its hold
    refill = table.claim(request, later)
    assert refill is not None
    assert (refill.back, refill.want) == (27, 5)  # given back in the refill; shrunk to 5
    assert table.returned == 27


def test_one_refill_in_flight_per_key_the_others_decide_on_the_store() -> None:
    table = LeaseTable(lambda: 0.0)
    request = _request(Limit(1000, 1000, lease=8))
    assert table.claim(request, 0.0) is not None
    assert table.claim(request, 0.0) is None  # in flight
    other = _request(Limit(1000, 1000, lease=8), key="other")
    assert table.claim(other, 0.0) is not None  # another key is free
    table.failed(request, 0.0)
    assert table.claim(request, 0.0) is not None


def test_a_refill_overtaken_by_a_reset_hands_out_none_of_what_it_brings() -> None:
    """The store may run a refill before a reset that the process sees first: the tokens it
    brings beyond the caller's cost go back (capped at full), and none is handed out."""
    table = LeaseTable(lambda: 0.0)
    request = _request(Limit(1000, 1000, lease=64))
    now = 1.0
    for size in (1, 2, 4):  # grow to a lease of 8
        refill = table.claim(request, now)
        assert refill is not None
        _grant(table, request, size, now)
        for _ in range(size - 1):
            assert table.take(request, now) is not None
    refill = table.claim(request, now)
    assert refill is not None
    assert refill.want == 8
    table.clear(request.keys)  # reset() while the refill is in flight
    n = len(request.limits)
    reply = [0, 1] + [1, 0, 0, 1_000_000] * n
    decision, due = table.granted(request, reply, 8, now)
    assert (decision, due) == (None, now)  # the caller's own decision, decoded as usual
    assert table.take(request, now) is None  # nothing handed out
    assert table.expired(now) == [(request, 7)]  # all of it goes back at once
    # The next refill is an ordinary one again.
    refill = table.claim(request, now)
    assert refill is not None
    assert refill.back == 0


def test_a_refusal_neither_grows_nor_holds() -> None:
    table = LeaseTable(lambda: 0.0)
    request = _request(Limit(1000, 1000, lease=8))
    refill = table.claim(request, 0.0)
    assert refill is not None
    assert _grant(table, request, 0, 0.0) is None  # refused: decoded by the limiter
    refill = table.claim(request, 0.001)
    assert refill is not None
    assert refill.want == 1
    assert table.held() == 0


def test_expired_and_drained_tokens_are_detached_once() -> None:
    table = LeaseTable(lambda: 0.0)
    a = _request(Limit(100, 100, lease=10), key="a")
    b = _request(Limit(100, 100, lease=10), key="b")
    for request, now in ((a, 0.0), (b, 0.05)):
        table.claim(request, now)
        _grant(table, request, 1, now)
        table.claim(request, now)
        _grant(table, request, 2, now)  # one held
    assert table.next_due() == pytest.approx(HOLD)
    assert [(r.keys, n) for r, n in table.expired(HOLD)] == [(a.keys, 1)]
    assert table.expired(HOLD) == []
    assert [(r.keys, n) for r, n in table.drain()] == [(b.keys, 1)]
    assert table.held() == 0
    assert table.next_due() is None
    assert table.returned == 2


def test_local_decisions_count_held_tokens_and_age_the_reset() -> None:
    table = LeaseTable(lambda: 0.0)
    limits = [Limit(10, 20, lease=8), Limit(1, 50, lease=8)]
    request = _request(limits, cost=2)
    table.claim(request, 0.0)
    reply = [0, 1, 1, 12, 0, 800_000, 1, 42, 0, 8_000_000]  # what the store left per limit
    decision, due = table.granted(request, reply, 8, 0.0)
    assert due == pytest.approx(HOLD)
    assert decision is not None
    assert decision.allowed
    assert [d.remaining for d in decision.details] == [18, 48]  # 6 tokens still held here
    local = table.take(request, 0.05)
    assert local is not None
    assert [d.remaining for d in local.details] == [16, 46]
    assert local.remaining == 16
    assert local.policy is limits[0]
    assert local.reset_after == pytest.approx(0.75)


def test_leases_need_every_limit_to_lease() -> None:
    assert lease_cap([Limit(10, lease=5), Limit(1, 50, lease=9)]) == 5
    assert lease_cap([Limit(10, lease=5), Limit(1, 50)]) == 0
    table = LeaseTable(lambda: 0.0)
    assert table.claim(_request([Limit(10, lease=5), Limit(1, 50)]), 0.0) is None
    assert table.claim(_request(Limit(10, lease=1)), 0.0) is None  # a lease of one: plain


def test_a_full_table_leases_no_new_key_until_idle_ones_go() -> None:
    table = LeaseTable(lambda: 0.0, max_entries=2)
    requests = [_request(Limit(10, 10, lease=4), key=f"k{i}") for i in range(3)]
    for request in requests[:2]:
        table.claim(request, 0.0)
    assert table.claim(requests[2], 0.0) is None  # both in flight
    _grant(table, requests[0], 1, 0.0)  # holds nothing now: may go
    assert table.claim(requests[2], 0.0) is not None


def test_with_cost_repacks_the_arguments() -> None:
    request = _request([Limit(10, 20), Limit(1, 50)], cost=1)
    again = with_cost(request, 7)
    assert again == _request([Limit(10, 20), Limit(1, 50)], cost=7)


# -- Limit(lease=) --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 11])
def test_lease_must_fit_the_burst(bad: int) -> None:
    with pytest.raises(ConfigError, match="lease"):
        Limit(10, 10, lease=bad)


@pytest.mark.parametrize("bad", [True, "5", 2.0])
def test_lease_must_be_an_int(bad: object) -> None:
    with pytest.raises((TypeError, ConfigError), match="lease"):
        Limit(10, 10, lease=bad)  # type: ignore[arg-type]


def test_a_lease_never_sets_a_bucket_apart() -> None:
    leased, plain = Limit(10, 10, lease=5), Limit(10, 10)
    assert leased == plain
    assert hash(leased) == hash(plain)
    assert Limit.parse("10/second", lease=5) == Limit.per_second(10, lease=5) == plain
    assert Limit.per_minute(60, lease=3).lease == 3
    # same bucket keys; the request cache keeps each caller's own lease
    a = build_request(PREFIX, "same", leased)
    b = build_request(PREFIX, "same", plain)
    assert a.keys == b.keys
    assert a.limits[0].lease == 5
    assert b.limits[0].lease is None


# -- the limiters on the memory backend (a fake clock) --------------------------------------------


class CountingMemory(MemoryBackend):
    """Counts the store calls a limiter makes; a store of its own, shared as a server is
    (closing a limiter leaves it as it is)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.calls: list[str] = []

    def decide(self, request: Request, *, consume: bool, timeout: float = 0.0) -> Sequence[int]:
        self.calls.append("decide")
        return super().decide(request, consume=consume, timeout=timeout)

    def lease(self, request: Request, want: int, back: int, *, timeout: float = 0.0) -> list[int]:
        self.calls.append(f"lease {want} {back}")
        return super().lease(request, want, back, timeout=timeout)

    def refund(self, request: Request, *, timeout: float = 0.0) -> list[int]:
        self.calls.append(f"refund {request.cost}")
        return super().refund(request, timeout=timeout)

    def close(self) -> None:
        pass


def test_a_cold_key_makes_one_ordinary_decision_per_call() -> None:
    clock = FakeClock()
    store = CountingMemory(clock)
    limiter = RateLimiter(store)
    limit = Limit(10, 10, lease=8)
    for _ in range(3):
        assert limiter.try_acquire("user:1", limit).allowed
        clock.advance(HOLD)  # slower than one call per hold: never hot
    assert store.calls == ["decide"] * 3
    limiter.close()


def test_a_hot_key_admits_exactly_the_burst_and_gives_the_rest_back_on_close() -> None:
    clock = FakeClock()
    store = CountingMemory(clock)
    limiter = RateLimiter(store)
    other = RateLimiter(store)  # an unleased caller of the same limit: the same bucket
    limit = Limit(0.001, 100, lease=16)
    admitted = sum(limiter.try_acquire("hot", limit).allowed for _ in range(70))
    assert admitted == 70
    assert len(store.calls) < 12  # 1, 2, 4, 8, 16, 16, 16, 16: not 70
    held = limiter._leases.held() if limiter._leases else -1
    assert 0 < held <= 16
    assert other.peek("hot", Limit(0.001, 100)).remaining == 30 - held
    limiter.close()
    assert store.calls[-1] == f"refund {held}"
    assert other.peek("hot", Limit(0.001, 100)).remaining == 30
    assert sum(other.try_acquire("hot", Limit(0.001, 100)).allowed for _ in range(40)) == 30


def test_leased_decisions_are_honest_to_within_the_lease() -> None:
    clock = FakeClock()
    limiter = RateLimiter(MemoryBackend(clock=clock))
    limit = Limit(0.001, 50, lease=8)
    seen = [limiter.try_acquire("k", limit) for _ in range(60)]
    assert [d.allowed for d in seen] == [True] * 50 + [False] * 10
    # the tokens left in the bucket, this process's held ones counted: exact here (no other
    # process), so each admission reports one fewer
    assert [d.remaining for d in seen[:50]] == list(range(49, -1, -1))
    refused = seen[-1]
    assert refused.retry_after == pytest.approx(1000.0)  # the store's own refusal
    assert all(0 < d.reset_after <= 50_000 for d in seen[:50])
    limiter.close()


def test_idle_tokens_go_back_when_the_hold_ends() -> None:
    clock = FakeClock()
    store = CountingMemory(clock)
    limiter = RateLimiter(store)
    limit = Limit(0.001, 100, lease=16)
    for _ in range(10):
        limiter.try_acquire("k", limit)
    assert limiter._leases is not None
    held = limiter._leases.held()
    assert held > 0
    settler = limiter._settler
    assert settler is not None
    clock.advance(HOLD / 2)
    settler.settle()  # type: ignore[union-attr]
    assert limiter._leases.held() == held  # not yet
    clock.advance(HOLD / 2)
    settler.settle()  # type: ignore[union-attr]
    assert limiter._leases.held() == 0
    assert limiter.peek("k", Limit(0.001, 100)).remaining == 90
    limiter.close()


def test_cost_and_several_limits_take_all_or_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(CountingMemory(clock))
    limits = [Limit(0.001, 30, lease=10), Limit(0.001, 12, lease=10)]
    admitted = 0
    while limiter.try_acquire("k", limits, cost=3).allowed:
        admitted += 3
    assert admitted == 12  # the smaller bucket, exactly
    limiter.close()
    after = limiter.peek("k", [Limit(0.001, 30), Limit(0.001, 12)])
    assert [d.remaining for d in after.details] == [18, 0]


def test_metrics_count_each_leased_decision_once_and_shadow_still_admits() -> None:
    class Sink:
        def __init__(self) -> None:
            self.decisions: list[bool] = []

        def record_decision(self, limits: object, decision: Decision, seconds: float) -> None:
            self.decisions.append(decision.allowed)

        def record_error(self, limits: object, reason: str, failed_open: bool) -> None:
            raise AssertionError(reason)

    sink = Sink()
    clock = FakeClock()
    limiter = RateLimiter(MemoryBackend(clock=clock), metrics=sink)
    limit = Limit(0.001, 20, lease=8)
    results = [limiter.try_acquire("k", limit).allowed for _ in range(25)]
    assert sink.decisions == results == [True] * 20 + [False] * 5
    shadow = limiter.as_shadow()
    decision = shadow.try_acquire("k", limit)
    assert decision.allowed
    assert decision.shadowed
    limiter.close()


def test_a_chooser_may_choose_a_leased_limit() -> None:
    clock = FakeClock()
    store = CountingMemory(clock)
    limiter = RateLimiter(store)
    paid = Limit(0.001, 40, lease=10)

    def choose(key: str) -> Limit:
        return paid

    assert sum(limiter.try_acquire("acme", choose).allowed for _ in range(50)) == 40
    assert store.calls[:7] == ["decide"] + [f"lease {n} 0" for n in (2, 4, 8, 10, 10, 10)]
    limiter.close()


class FailingLease(MemoryBackend):
    def lease(self, request: Request, want: int, back: int, *, timeout: float = 0.0) -> list[int]:
        raise BackendError("store down", reason="connection")


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_failed_refill_follows_failure_mode(mode: str) -> None:
    limiter = RateLimiter(FailingLease(clock=FakeClock()), failure_mode=mode)
    limit = Limit(0.001, 20, lease=8)
    assert limiter.try_acquire("k", limit).allowed  # the first, ordinary, decision
    if mode == "closed":
        with pytest.raises(BackendError):
            limiter.try_acquire("k", limit)
    else:
        assert limiter.try_acquire("k", limit).allowed  # failed open, as any decision
    assert limiter._leases is not None
    assert limiter._leases.held() == 0
    limiter.close()


def test_peek_and_unleased_calls_never_touch_the_leases() -> None:
    clock = FakeClock()
    store = CountingMemory(clock)
    limiter = RateLimiter(store)
    limiter.peek("k", Limit(1, 5, lease=5))
    limiter.try_acquire("k", Limit(1, 5))
    assert store.calls == ["decide", "decide"]
    assert limiter._leases is not None
    assert not limiter._leases._leases
    limiter.close()


def test_async_memory_limiter_leases_and_gives_back_on_aclose() -> None:
    clock = FakeClock()
    store = CountingMemory(clock)

    async def main() -> int:
        limiter = AsyncRateLimiter(store)
        limit = Limit(0.001, 100, lease=16)
        got = await asyncio.gather(*(limiter.try_acquire("k", limit) for _ in range(40)))
        await limiter.aclose()
        return sum(d.allowed for d in got)

    assert asyncio.run(main()) == 40
    assert RateLimiter(store).peek("k", Limit(0.001, 100)).remaining == 60


# -- the limiters on every real server ------------------------------------------------------------


def test_threads_on_a_server_admit_exactly_the_burst_and_lose_nothing(target: Target) -> None:
    """Never above the burst; what a refusal left unspent is this process's own lease (a
    caller that decides on the store while another's refill takes the last tokens is refused,
    and caches it): those tokens go back to the bucket."""
    limit = Limit(1e-4, 300, lease=32)
    limiter = RateLimiter.from_url(target.url, timeout=5.0)
    other = RateLimiter.from_url(target.url, timeout=5.0, local_cache=False)
    counts: list[int] = []

    def run() -> None:
        counts.append(sum(limiter.try_acquire("fleet", limit).allowed for _ in range(100)))

    try:
        threads = [threading.Thread(target=run) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert 300 - 32 <= sum(counts) <= 300  # 500 tries: at most one lease left unspent
        limiter.close()  # gives back what it holds
        assert sum(counts) + other.peek("fleet", Limit(1e-4, 300)).remaining == 300
    finally:
        limiter.close()
        other.close()


def test_tasks_on_a_server_share_a_bucket_with_unleased_callers(target: Target) -> None:
    limit = Limit(1e-4, 200, lease=32)

    async def main() -> tuple[int, int, int]:
        leased = AsyncRateLimiter.from_url(target.url, timeout=5.0)
        plain = AsyncRateLimiter.from_url(target.url, timeout=5.0, local_cache=False)
        try:
            mine = await asyncio.gather(*(leased.try_acquire("k", limit) for _ in range(150)))
            theirs = await asyncio.gather(
                *(plain.try_acquire("k", Limit(1e-4, 200)) for _ in range(100))
            )
            await leased.aclose()  # gives the held tokens back
            left = (await plain.peek("k", Limit(1e-4, 200))).remaining
        finally:
            await plain.aclose()
        return sum(d.allowed for d in mine), sum(d.allowed for d in theirs), left

    mine, theirs, left = asyncio.run(main())
    assert mine == 150
    assert mine + theirs + left == 200  # nothing over the burst, nothing lost
    assert theirs <= 50


def test_a_process_gone_idle_gives_its_tokens_back_within_the_hold(target: Target) -> None:
    limit = Limit(1e-4, 100, lease=16)
    limiter = RateLimiter.from_url(target.url, timeout=5.0)
    other = RateLimiter.from_url(target.url, timeout=5.0, local_cache=False)
    try:
        for _ in range(10):
            assert limiter.try_acquire("idle", limit).allowed
        assert limiter._leases is not None
        held = limiter._leases.held()
        assert held > 0
        assert other.peek("idle", Limit(1e-4, 100)).remaining == 90 - held
        deadline = time.monotonic() + 5.0  # a generous margin over the 100 ms hold
        while other.peek("idle", Limit(1e-4, 100)).remaining != 90:
            assert time.monotonic() < deadline, "the settler gave nothing back"
            time.sleep(0.02)
        assert limiter._leases.held() == 0
    finally:
        limiter.close()
        other.close()


def test_reset_drops_held_tokens_so_a_full_bucket_admits_its_burst_once() -> None:
    clock = FakeClock()
    limiter = RateLimiter(CountingMemory(clock))
    limit = Limit(0.001, 20, lease=8)
    for _ in range(5):
        assert limiter.try_acquire("k", limit).allowed
    assert limiter._leases is not None
    assert limiter._leases.held() > 0
    limiter.reset("k", limit)
    assert limiter._leases.held() == 0  # not spent on top of the full bucket
    assert sum(limiter.try_acquire("k", limit).allowed for _ in range(30)) == 20
    limiter.reset("k", limit)
    for _ in range(5):
        assert limiter.try_acquire("k", limit).allowed
    assert limiter._leases.held() > 0
    reset_all(limiter)
    assert limiter._leases.held() == 0
    assert sum(limiter.try_acquire("k", limit).allowed for _ in range(30)) == 20
    limiter.close()


class GatedMemory(CountingMemory):
    """A lease that, once armed, runs on the store and then waits before its reply arrives:
    a reset made meanwhile is, for the store, later than the lease."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def lease(self, request: Request, want: int, back: int, *, timeout: float = 0.0) -> list[int]:
        reply = super().lease(request, want, back, timeout=timeout)
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.release.wait(10)
        return reply


def test_a_reset_during_a_refill_never_admits_more_than_the_full_bucket() -> None:
    clock = FakeClock()
    backend = GatedMemory(clock)
    limiter = RateLimiter(backend)
    limit = Limit(0.001, 20, lease=8)
    for _ in range(4):  # the lease grows: 1, 2, 4 ...
        assert limiter.try_acquire("k", limit).allowed
    backend.armed = True

    def until_a_refill_waits() -> None:
        while not backend.entered.is_set():
            assert limiter.try_acquire("k", limit).allowed

    caller = threading.Thread(target=until_a_refill_waits)
    caller.start()
    try:
        assert backend.entered.wait(10)
        limiter.reset("k", limit)  # the store took the lease before this
    finally:
        backend.release.set()
        caller.join(10)
    assert not caller.is_alive()
    admitted = sum(limiter.try_acquire("k", limit).allowed for _ in range(40))
    assert admitted == 20  # the full bucket, and not one of the refill's tokens on top
    limiter.close()


def _a_refusal_cached_while_tokens_are_held() -> tuple[RateLimiter, GatedMemory, FakeClock]:
    """A limiter on ``Limit(0.001, 20, lease=8)`` for "k" that holds 2 tokens and has cached
    the store's refusal made while its refill (which took the store's last 3) was in flight."""
    clock = FakeClock()
    backend = GatedMemory(clock)
    limiter = RateLimiter(backend)
    limiter._refusals = RefusalCache(DEFAULT_SIZE)  # as on a server (in-process stores: none)
    other = RateLimiter(backend, local_cache=False)
    limit, plain = Limit(0.001, 20, lease=8), Limit(0.001, 20)
    for _ in range(4):  # the lease grows to 4: 3 held
        assert limiter.try_acquire("k", limit).allowed
    while other.try_acquire("k", plain).allowed:  # the store is empty
        pass
    for _ in range(3):  # the held ones
        assert limiter.try_acquire("k", limit).allowed
    other.refund("k", plain, cost=3)
    backend.armed = True
    caller = threading.Thread(target=lambda: limiter.try_acquire("k", limit))
    caller.start()
    try:
        assert backend.entered.wait(10)  # the refill took the last 3 and waits for its reply
        assert not limiter.try_acquire("k", limit).allowed  # decided on the store: cached
        assert len(limiter._refusals) == 1
    finally:
        backend.release.set()
        caller.join(10)
    assert limiter._leases is not None
    assert limiter._leases.held() == 2
    return limiter, backend, clock


def test_a_refusal_cached_while_tokens_are_held_does_not_strand_them() -> None:
    """Their hold ends: the next call gives them back and takes them again in one refill,
    instead of being refused by the cache while the store would admit it."""
    limiter, _, clock = _a_refusal_cached_while_tokens_are_held()
    clock.advance(HOLD)
    admitted = sum(limiter.try_acquire("k", Limit(0.001, 20, lease=8)).allowed for _ in range(6))
    assert admitted == 2
    limiter.close()


def test_tokens_the_settler_gave_back_are_not_refused_by_the_cache() -> None:
    limiter, backend, clock = _a_refusal_cached_while_tokens_are_held()
    clock.advance(HOLD)
    settler = limiter._settler
    assert isinstance(settler, ThreadSettler)
    settler.settle()
    assert backend.calls[-1] == "refund 2"
    admitted = sum(limiter.try_acquire("k", Limit(0.001, 20, lease=8)).allowed for _ in range(6))
    assert admitted == 2
    limiter.close()


def test_a_refill_cancelled_mid_call_leaves_the_key_leasable(standalone: Target) -> None:
    """A client gone while its task refills (ASGI cancels it): the claim is released, so the
    key goes on leasing instead of deciding unleased for good."""
    from faultproxy import FaultProxy

    host, port = standalone.host_ports()[0]
    limit = Limit(1000, 100, lease=10)

    async def main(proxy: FaultProxy) -> None:
        limiter = AsyncRateLimiter.from_url(proxy.url, timeout=5.0)
        try:
            await limiter.peek("cancel", limit)  # connected
            proxy.latency(0.3)
            task = asyncio.create_task(limiter.try_acquire("cancel", limit))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            proxy.heal()
            table = limiter._leases
            assert table is not None
            for _ in range(30):
                assert (await limiter.try_acquire("cancel", limit)).allowed
            assert table.held() > 0  # leasing again
        finally:
            await limiter.aclose()

    with FaultProxy(port, host) as proxy:
        asyncio.run(main(proxy))
