"""The bucket arithmetic: the pure reference model that the Lua script mirrors line for line.

State per bucket is ``(debt, stamp)``: ``debt`` is how many microseconds the bucket needs to be
full again (0 = full, ``burst * interval`` = empty) as of server time ``stamp`` (integer µs).
This is GCRA's theoretical arrival time kept relative to ``stamp``, so the numbers stay small and
a double holds them without losing a token to rounding. A tiny slack (1e-6 of one interval)
absorbs the rounding of summed intervals; it can never admit a whole extra token.

Every operation here is done in the same order, on the same doubles, as in ``acquire.lua``, so
the two agree bit for bit; the property tests hold them to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["SLACK", "LimitResult", "Outcome", "State", "decide"]

SLACK = 1e-6


class State(NamedTuple):
    debt: float
    stamp: int


class LimitResult(NamedTuple):
    allowed: bool
    remaining: int
    retry_us: int
    reset_us: int


class Outcome(NamedTuple):
    now: int
    allowed: bool
    results: tuple[LimitResult, ...]
    new_states: tuple[State, ...] | None  # None: nothing written


def decide(
    states: Sequence[State | None],
    params: Sequence[tuple[float, int]],
    cost: int,
    now: int,
    *,
    consume: bool,
) -> Outcome:
    """Decide ``cost`` against every ``(interval_us, burst)`` at once: all or nothing."""
    debts: list[float] = []
    stamps: list[int] = []
    needs: list[float] = []
    oks: list[bool] = []
    all_ok = True
    for state, (interval, burst) in zip(states, params, strict=True):
        debt, stamp = (0.0, now) if state is None else state
        elapsed = now - stamp
        if elapsed < 0:  # the clock stepped back: pause refill until it catches up
            elapsed = 0
        else:
            stamp = now
        debt = debt - elapsed
        if debt < 0:
            debt = 0.0
        tau = burst * interval
        need = debt + cost * interval
        ok = need <= tau + interval * SLACK
        all_ok = all_ok and ok
        debts.append(debt)
        stamps.append(stamp)
        needs.append(need)
        oks.append(ok)

    write = consume and all_ok
    results: list[LimitResult] = []
    new_states: list[State] = []
    for i, (interval, burst) in enumerate(params):
        after = needs[i] if write else debts[i]
        tau = burst * interval
        remaining = math.floor((tau - after) / interval + SLACK)
        remaining = min(max(remaining, 0), burst)
        retry = 0 if oks[i] else math.ceil(needs[i] - tau)
        results.append(LimitResult(oks[i], remaining, retry, math.ceil(after)))
        new_states.append(State(after, stamps[i]))
    return Outcome(now, all_ok, tuple(results), tuple(new_states) if write else None)
