"""A decision on a leased limit (``Limit(..., lease=N)``), for the sync and async limiters.

The limiters' ``_decide`` sends a consuming call here when its first limit has a ``lease``
(one attribute read on every other call). From held tokens when there are any (no IO); else,
after the refusal cache, one refill of the lease through the store (``LeaseTable.claim``, at
most one in flight per bucket set), or an ordinary decision on the store while another
caller's refill is in flight, as without leases: no caller waits on another's refill, so none
waits longer than one store call (asyncio fairness: tasks are served as their calls return).
Storage failures follow ``failure_mode`` as for any decision, and the circuit breaker routes a
call that would reach the store as it routes any decision (_breaker.py). See ``_lease.py`` for the
bookkeeping and ``_settle.py`` for giving tokens back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from . import _switch
from ._backend import AsyncLeaser, SyncLeaser, can_lease, can_refund
from ._decision import Decision
from ._errors import BackendError
from ._lease import LeaseTable, with_cost
from ._request import Request
from ._settle import LoopSettler, ThreadSettler

if TYPE_CHECKING:
    from ._base import LimiterBase
    from ._limiter import AsyncRateLimiter, RateLimiter

__all__ = [
    "async_settler",
    "decide_leased",
    "decide_leased_async",
    "held_admission",
    "lease_table",
    "thread_settler",
]


def lease_table(backend: object) -> LeaseTable | None:
    """A limiter's lease table, or None when its backend cannot lease and give back. On the
    clock of an in-process store (a test's ``FakeClock``), else the monotonic clock."""
    if not (can_lease(backend) and can_refund(backend)):
        return None
    store = getattr(backend, "store", backend)  # AsyncMemoryBackend wraps a MemoryBackend
    clock = getattr(store, "clock", None) if not getattr(backend, "remote", True) else None
    return LeaseTable(clock if callable(clock) else time.monotonic)


def thread_settler(limiter: RateLimiter, table: LeaseTable) -> ThreadSettler:
    def give_back(request: Request, tokens: int) -> None:
        try:
            limiter.backend.refund(with_cost(request, tokens), timeout=limiter._timeout)
        except BackendError as error:
            _lost(limiter, error)
        else:
            limiter._forget_refusals(request.keys)  # as after refund()

    return ThreadSettler(table, give_back)


def async_settler(limiter: AsyncRateLimiter, table: LeaseTable) -> LoopSettler:
    async def give_back(request: Request, tokens: int) -> None:
        try:
            await limiter.backend.refund(with_cost(request, tokens), timeout=limiter._timeout)
        except BackendError as error:
            _lost(limiter, error)
        else:
            limiter._forget_refusals(request.keys)  # as after refund()

    return LoopSettler(table, give_back)


def _lost(limiter: LimiterBase[Any], error: BackendError) -> None:
    """Giving held tokens back failed: they are lost until they refill (never over-admitted)."""
    limiter._log.warning("tokenlimit: leased tokens could not be given back", error)


def held_admission(limiter: LimiterBase[Any], request: Request) -> Decision | None:
    """What ``_decide`` answers for ``request`` when this process holds its tokens, with no IO
    and nothing awaited; None where anything else could answer first (the kill switch, an
    override in force or its read due) or nothing is held: then ``_decide`` decides. For the
    integrations' async check, which so skips a chain of coroutines per leased request."""
    table = limiter._leases
    if table is None or _switch.DISABLED:
        return None
    started = time.perf_counter()
    live = limiter._overrides
    if live is not None and (started >= live.due or live.table):
        return None
    held = table.take(request, table.clock())
    return None if held is None else _admitted(limiter, request, held, started)


def decide_leased(limiter: RateLimiter, request: Request, started: float) -> Decision:
    """``RateLimiter._decide`` for a consuming call on a leased limit."""
    table = limiter._leases
    if table is None:  # the backend cannot lease
        early = _before_refill(limiter, request, started)
        if early is not None:
            return early
        if _skips_store(limiter):
            return limiter._undecided(request, None, started, consume=True)
        return _plain(limiter, request, started)
    now = table.clock()
    held = table.take(request, now)
    if held is not None:
        return _admitted(limiter, request, held, started)
    early = _before_refill(limiter, request, started, table)
    if early is not None:
        return early
    if _skips_store(limiter):
        return limiter._undecided(request, None, started, consume=True)
    refill = table.claim(request, now)
    if refill is None:
        return _plain(limiter, request, started)
    backend = limiter.backend
    try:
        if refill.plain:  # a lease of the cost alone: an ordinary decision
            reply: Sequence[int] = backend.decide(request, consume=True, timeout=limiter._timeout)
            granted = request.cost if int(reply[1]) == 1 else 0
        else:
            raw = cast(SyncLeaser, backend).lease(
                request, refill.want, refill.back, timeout=limiter._timeout
            )
            reply, granted = raw[:-1], int(raw[-1])
    except BackendError as error:
        table.failed(request, table.clock())
        return _failure(limiter, request, started, error)
    except BaseException:  # cancelled (a client went away) or a bug: never leave it claimed
        table.failed(request, table.clock())
        raise
    decision, due = _granted(limiter, table, request, reply, granted, refill.back, started, now)
    if due is not None and isinstance(limiter._settler, ThreadSettler):
        limiter._settler.due(due)
    return decision


async def decide_leased_async(
    limiter: AsyncRateLimiter, request: Request, started: float
) -> Decision:
    """``AsyncRateLimiter._decide`` for a consuming call on a leased limit."""
    table = limiter._leases
    if table is None:  # the backend cannot lease
        early = _before_refill(limiter, request, started)
        if early is not None:
            await asyncio.sleep(0)  # yield once, as a round trip would (see AsyncRateLimiter)
            return early
        if _skips_store(limiter):
            await asyncio.sleep(0)
            return limiter._undecided(request, None, started, consume=True)
        return await _plain_async(limiter, request, started)
    now = table.clock()
    held = table.take(request, now)
    if held is not None:
        return _admitted(limiter, request, held, started)
    early = _before_refill(limiter, request, started, table)
    if early is not None:
        await asyncio.sleep(0)
        return early
    if _skips_store(limiter):
        await asyncio.sleep(0)
        return limiter._undecided(request, None, started, consume=True)
    refill = table.claim(request, now)
    if refill is None:
        return await _plain_async(limiter, request, started)
    backend = limiter.backend
    try:
        if refill.plain:
            reply: Sequence[int] = await backend.decide(
                request, consume=True, timeout=limiter._timeout
            )
            granted = request.cost if int(reply[1]) == 1 else 0
        else:
            raw = await cast(AsyncLeaser, backend).lease(
                request, refill.want, refill.back, timeout=limiter._timeout
            )
            reply, granted = raw[:-1], int(raw[-1])
    except BackendError as error:
        table.failed(request, table.clock())
        return _failure(limiter, request, started, error)
    except BaseException:  # cancelled (a client went away) or a bug: never leave it claimed
        table.failed(request, table.clock())
        raise
    decision, due = _granted(limiter, table, request, reply, granted, refill.back, started, now)
    if due is not None and isinstance(limiter._settler, LoopSettler):
        limiter._settler.due(due)
    return decision


def _admitted(
    limiter: LimiterBase[Any], request: Request, decision: Decision, started: float
) -> Decision:
    """An admission from held tokens: still one decision, counted once."""
    metrics = limiter._metrics
    if metrics is not None:
        metrics.record_decision(request.limits, decision, time.perf_counter() - started)
    return decision


def _before_refill(
    limiter: LimiterBase[Any], request: Request, started: float, table: LeaseTable | None = None
) -> Decision | None:
    """What answers before a refill: a cached refusal (nothing sent), or None. Not while
    ``table`` holds tokens of these buckets (too few for the cost, or past their hold): the
    refill gives them back, so the store may admit what it refused before."""
    refusals = limiter._refusals
    if refusals is not None:
        local = refusals.get(request.keys, request.cost, started, request.limits)
        if local is not None and (table is None or not table.holds(request.keys)):
            return limiter._answered(request, local, started, consume=True)
    return None


def _granted(
    limiter: LimiterBase[Any],
    table: LeaseTable,
    request: Request,
    reply: Sequence[int],
    granted: int,
    back: int,
    started: float,
    now: float,
) -> tuple[Decision, float | None]:
    if limiter._circuit.tripped:  # the store answered: the circuit closes
        limiter._recovered()
    if back and granted >= request.cost:  # a refusal cached before the give-back is stale
        limiter._forget_refusals(request.keys)
    decision, due = table.granted(request, reply, granted, now)
    if decision is None:  # nothing held: decoded, cached, shadowed, counted as any decision
        return limiter._decoded(request, reply, started, consume=True), due
    return _admitted(limiter, request, decision, started), due


def _failure(
    limiter: LimiterBase[Any], request: Request, started: float, error: BackendError
) -> Decision:
    """A refill failed: ``failure_mode`` decides, as for any decision."""
    return limiter._undecided(request, error, started, consume=True)


def _skips_store(limiter: LimiterBase[Any]) -> bool:
    """The circuit breaker keeps this call from the store (asked once per call: a call it lets
    through while half-open is the probe)."""
    circuit = limiter._circuit
    return circuit.tripped and not circuit.route()


def _plain(limiter: RateLimiter, request: Request, started: float) -> Decision:
    """The decision without leases (``_decide``'s own path past the refusal cache and the
    circuit, which ``_skips_store`` asked)."""
    try:
        reply = limiter.backend.decide(request, consume=True, timeout=limiter._timeout)
    except BackendError as error:
        return limiter._undecided(request, error, started, consume=True)
    if limiter._circuit.tripped:
        limiter._recovered()
    return limiter._decoded(request, reply, started, consume=True)


async def _plain_async(limiter: AsyncRateLimiter, request: Request, started: float) -> Decision:
    try:
        reply = await limiter.backend.decide(request, consume=True, timeout=limiter._timeout)
    except BackendError as error:
        return limiter._undecided(request, error, started, consume=True)
    if limiter._circuit.tripped:
        limiter._recovered()
    return limiter._decoded(request, reply, started, consume=True)
