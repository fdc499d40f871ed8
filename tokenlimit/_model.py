"""The bucket arithmetic: the pure reference model that the Lua script mirrors line for line.

State per bucket is one integer, GCRA's theoretical arrival time (TAT) in nanoseconds of server
time: the moment the bucket is full again. ``debt = TAT - now`` (at least 0) is how far from
full it is, ``burst * interval`` being empty. One short integer is compact in Redis (Redis 7
keeps it in its ``int`` encoding; Valkey 9 in a small embedded string), and exact:
every interval is a whole number of nanoseconds (``Limit.interval_ns``, rounded up so the rate
is never exceeded), so debts are sums of integers, exact in doubles up to 2^53 ns (104 days).
Beyond that (long fill times; intervals past 2^53 ns are rounded up to a whole number a double
holds, so both sides read the same one) the rounding is far below the slack of 1e-6 token.

Lua has only doubles and a TAT of ~1.8e18 ns does not fit in one exactly, so both sides split
it into whole seconds and nanoseconds and only ever subtract like from like. Every operation is
done in the same order, on the same doubles, here and in ``bucket.lua``, so the two agree bit
for bit; the property tests hold them to it.

If the server clock steps back, ``TAT - now`` grows: the bucket looks emptier until the clock
catches up. A backward step can never add tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "MAX_HOLD_US",
    "NS",
    "SLACK",
    "Leased",
    "LimitResult",
    "Outcome",
    "Refunded",
    "decide",
    "hold",
    "join_tat",
    "lease",
    "refund",
    "split_tat",
]

SLACK = 1e-6
NS = 1_000_000_000  # nanoseconds per second
MAX_HOLD_US = 86_400_000_000  # the longest hold: one day (holdback.lua MAX_HOLD_US)


class LimitResult(NamedTuple):
    allowed: bool
    remaining: int
    retry_us: int
    reset_us: int


class Outcome(NamedTuple):
    now: int  # µs
    allowed: bool
    results: tuple[LimitResult, ...]
    # TAT ns per bucket; None: nothing written. After ``hold``, a bucket left as it was keeps
    # its state as given.
    new_states: tuple[int, ...] | None


class Refunded(NamedTuple):
    """What ``refund`` answers: the read-only check of one token after it (as ``Outcome``'s
    fields), and every bucket's TAT, as given where it did not move (None: absent, and left so).
    """

    now: int  # µs
    allowed: bool
    results: tuple[LimitResult, ...]
    new_states: tuple[int | None, ...]


def split_tat(tat: int) -> tuple[float, float]:
    """``(seconds, nanoseconds)`` of a stored TAT, as the script reads them from its digits."""
    seconds, nanos = divmod(tat, NS)
    return float(seconds), float(nanos)


def join_tat(now_s: float, now_ns: float, after: float) -> int:
    """The TAT ``after`` ns past now, carried into whole seconds as the script does it."""
    total = now_ns + after
    carry = math.floor(total / NS)
    nanos = total - carry * NS
    # Only past 2^53 ns of debt can rounding push this out of range; the script clamps alike.
    nanos = min(max(nanos, 0.0), NS - 1.0)
    return int(now_s + carry) * NS + int(nanos)


def decide(
    states: Sequence[int | None],
    params: Sequence[tuple[int, int]],
    cost: int,
    now: int,
    *,
    consume: bool,
) -> Outcome:
    """Decide ``cost`` against every ``(interval_ns, burst)`` at once: all or nothing.

    ``now`` is server time in integer µs (what ``TIME`` gives); ``states`` are TATs in ns.
    """
    now_s = float(now // 1_000_000)
    now_ns = float(now % 1_000_000) * 1000
    debts: list[float] = []
    needs: list[float] = []
    oks: list[bool] = []
    all_ok = True
    for state, (interval_ns, burst) in zip(states, params, strict=True):
        interval = float(interval_ns)  # doubles, as in Lua
        debt = 0.0
        if state is not None:
            tat_s, tat_ns = split_tat(state)
            debt = (tat_s - now_s) * NS + (tat_ns - now_ns)
            if debt < 0:
                debt = 0.0
        tau = burst * interval
        need = debt + cost * interval
        ok = need <= tau + interval * SLACK
        all_ok = all_ok and ok
        debts.append(debt)
        needs.append(need)
        oks.append(ok)

    write = consume and all_ok
    results: list[LimitResult] = []
    new_states: list[int] = []
    for i, (interval_ns, burst) in enumerate(params):
        interval = float(interval_ns)
        after = needs[i] if write else debts[i]
        tau = burst * interval
        remaining = math.floor((tau - after) / interval + SLACK)
        remaining = min(max(remaining, 0), burst)
        retry = 0 if oks[i] else math.ceil((needs[i] - tau) / 1000)
        results.append(LimitResult(oks[i], remaining, retry, math.ceil(after / 1000)))
        new_states.append(join_tat(now_s, now_ns, after))
    return Outcome(now, all_ok, tuple(results), tuple(new_states) if write else None)


def _debt(state: int | None, now_s: float, now_ns: float) -> float:
    """ns until the bucket whose TAT is ``state`` is full again, at least 0 (``debt_of``)."""
    if state is None:
        return 0.0
    tat_s, tat_ns = split_tat(state)
    debt = (tat_s - now_s) * NS + (tat_ns - now_ns)
    return debt if debt >= 0 else 0.0


def hold(
    states: Sequence[int | None], params: Sequence[tuple[int, int]], hold_us: int, now: int
) -> Outcome:
    """Hold every ``(interval_ns, burst)`` bucket back for ``hold_us`` µs from ``now`` (µs).

    Each debt becomes at least ``hold + (burst - 1) * interval``: one token is due exactly
    ``hold_us`` from now, and the bucket refills at its rate from then. A larger debt stays as
    it is, so a hold can refuse more, never admit more. The results are a read-only check of one
    token right after the hold (what ``decide(..., 1, now, consume=False)`` would then say);
    ``new_states`` holds every bucket's TAT, a raised one written, the others as given.
    """
    now_s = float(now // 1_000_000)
    now_ns = float(now % 1_000_000) * 1000
    held_ns = float(hold_us * 1000)
    results: list[LimitResult] = []
    new_states: list[int] = []
    all_ok = True
    for state, (interval_ns, burst) in zip(states, params, strict=True):
        interval = float(interval_ns)
        after = _debt(state, now_s, now_ns)
        held = held_ns + (burst - 1) * interval
        if state is None or after < held:
            after = held
            new_states.append(join_tat(now_s, now_ns, after))
        else:
            new_states.append(state)
        result = _one_token(after, interval, burst)
        all_ok = all_ok and result.allowed
        results.append(result)
    return Outcome(now, all_ok, tuple(results), tuple(new_states))


def _one_token(after: float, interval: float, burst: int) -> LimitResult:
    """A read-only check of one token against a bucket owing ``after`` ns (what ``decide``
    answers for cost 1 without consuming): the reply of ``hold`` and ``refund``."""
    tau = burst * interval
    need = after + interval
    ok = need <= tau + interval * SLACK
    remaining = math.floor((tau - after) / interval + SLACK)
    remaining = min(max(remaining, 0), burst)
    retry = 0 if ok else math.ceil((need - tau) / 1000)
    return LimitResult(ok, remaining, retry, math.ceil(after / 1000))


def refund(
    states: Sequence[int | None], params: Sequence[tuple[int, int]], cost: int, now: int
) -> Refunded:
    """Give ``cost`` tokens back to every ``(interval_ns, burst)`` bucket at ``now`` (µs).

    Each debt shrinks by ``cost * interval``, never below 0: ``TAT = max(now, TAT - cost *
    interval)``, so no bucket ever holds more than ``burst``. An absent bucket is full and stays
    absent; one already full is left as it is. The results are a read-only check of one token
    right after (what ``decide(..., 1, now, consume=False)`` would then say).
    """
    now_s = float(now // 1_000_000)
    now_ns = float(now % 1_000_000) * 1000
    results: list[LimitResult] = []
    new_states: list[int | None] = []
    all_ok = True
    for state, (interval_ns, burst) in zip(states, params, strict=True):
        interval = float(interval_ns)
        debt = _debt(state, now_s, now_ns)
        after = debt - cost * interval
        if after < 0:
            after = 0.0
        if state is not None and after < debt:
            new_states.append(join_tat(now_s, now_ns, after))
        else:
            new_states.append(state)
        result = _one_token(after, interval, burst)
        all_ok = all_ok and result.allowed
        results.append(result)
    return Refunded(now, all_ok, tuple(results), tuple(new_states))


class Leased(NamedTuple):
    """What ``lease`` answers: ``granted`` tokens taken from every bucket (0: refused), the
    results as ``decide``'s for the need, and every bucket's TAT (as given where it did not
    move; None: absent, and left so)."""

    now: int  # µs
    allowed: bool
    granted: int
    results: tuple[LimitResult, ...]
    new_states: tuple[int | None, ...]


def lease(
    states: Sequence[int | None],
    params: Sequence[tuple[int, int]],
    need: int,
    want: int,
    back: int,
    now: int,
) -> Leased:
    """Give ``back`` tokens back, then take as many tokens as every bucket holds, at least
    ``need`` and at most ``want``, from every ``(interval_ns, burst)`` bucket at once: all or
    nothing, the same number from each (the fewest any of them holds, capped at ``want``).

    The give-back is ``refund``'s (never above full; an absent bucket stays absent). ``need``
    is admitted exactly when ``decide`` would admit it on the buckets after the give-back; the
    results are ``decide``'s for ``need`` (``remaining`` after the grant, ``retry_us`` for
    ``need``). A refused lease still writes the buckets that the give-back moved.
    """
    now_s = float(now // 1_000_000)
    now_ns = float(now % 1_000_000) * 1000
    owed: list[float] = []  # before the give-back
    debts: list[float] = []
    oks: list[bool] = []
    all_ok = True
    fewest = want
    for state, (interval_ns, burst) in zip(states, params, strict=True):
        interval = float(interval_ns)
        debt = _debt(state, now_s, now_ns)
        owed.append(debt)
        if back > 0:
            debt = debt - back * interval
            if debt < 0:
                debt = 0.0
        tau = burst * interval
        ok = debt + need * interval <= tau + interval * SLACK
        all_ok = all_ok and ok
        held = math.floor((tau - debt) / interval + SLACK)
        fewest = min(fewest, max(held, 0))
        debts.append(debt)
        oks.append(ok)
    granted = max(fewest, need) if all_ok else 0  # need: what decide admits, whatever floor()
    results: list[LimitResult] = []
    new_states: list[int | None] = []
    for i, (state, (interval_ns, burst)) in enumerate(zip(states, params, strict=True)):
        interval = float(interval_ns)
        tau = burst * interval
        after = debts[i] + granted * interval
        remaining = math.floor((tau - after) / interval + SLACK)
        remaining = min(max(remaining, 0), burst)
        retry = 0 if oks[i] else math.ceil((debts[i] + need * interval - tau) / 1000)
        results.append(LimitResult(oks[i], remaining, retry, math.ceil(after / 1000)))
        if granted > 0 or (state is not None and after < owed[i]):
            new_states.append(join_tat(now_s, now_ns, after))
        else:
            new_states.append(state)
    return Leased(now, all_ok, granted, tuple(results), tuple(new_states))
