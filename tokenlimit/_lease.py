"""Leased tokens (issue 18): tokens a process took from a bucket at once and hands out itself.

``LeaseTable`` is pure bookkeeping, thread-safe (one lock; nothing sent, awaited or slept
under it) and on an injected clock; the limiters do the IO (``_limiter.py``, ``_settle.py``).
Its invariants, which docs/reliability.md turns into the exactness argument:

- a token is handed out here only after the store granted it (the lease script took it from
  every bucket of the call): this process never admits more than the store gave it;
- a token is handed out only before its lease's hold ends (``due``); after that it goes back
  to the store (with the next refill, in the same atomic call, or by the settler), never used;
- at most one refill per bucket (set) is in flight: the others decide on the store themselves;
- a lease's size adapts to this process's demand: 1 for a new key (one store call per
  decision, as without leases), doubled when a lease is used up before its hold ends, down to
  what was used when one ends with tokens left, never above the limits' ``lease``;
- a forked child starts with no leases: the parent's tokens are the parent's.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._decision import Decision, decision
from ._limit import Limit
from ._request import Request, with_args

__all__ = ["HOLD", "LeaseTable", "Refill", "lease_cap", "with_cost"]

HOLD = 0.1  # seconds a leased token may be held before it goes back to the store
MAX_ENTRIES = 4096  # bucket sets tracked at once; past it, new keys decide unleased


@dataclass(frozen=True, slots=True)
class Refill:
    """One refill to send: give ``back`` held tokens back and take up to ``want`` (at least the
    call's cost). ``plain``: want is the cost and nothing goes back, which is exactly an
    ordinary decision (the acquire script): a key that is not hot pays nothing more."""

    want: int
    back: int
    plain: bool


class _Lease:
    """One bucket set's lease. ``remaining``/``resets``: the store's answer at the grant, per
    limit (tokens left after it; seconds until full), read back by local decisions."""

    __slots__ = (
        "due",
        "refilling",
        "remaining",
        "request",
        "resets",
        "since",
        "size",
        "stale",
        "tokens",
        "used",
    )

    def __init__(self, request: Request) -> None:
        self.request = request
        self.tokens = 0  # granted by the store, not handed out yet
        self.size = 1  # the next lease's size
        self.used = 0  # handed out from the current lease (the caller's cost included)
        self.due = 0.0  # when the current lease's hold ends (clock)
        self.since = 0.0  # when it was granted
        self.refilling = False
        # The buckets were reset while a refill was in flight: what it brings may have been
        # taken before the reset, from tokens the reset gave back, so none of it is handed out.
        self.stale = False
        self.remaining: tuple[int, ...] = ()
        self.resets: tuple[float, ...] = ()


def lease_cap(limits: Sequence[Limit]) -> int:
    """The most tokens one lease may take for a call on ``limits``: the smallest ``lease``
    (a limit without one makes the call unleased: 0)."""
    cap = limits[0].lease or 0
    for limit in limits[1:]:
        cap = min(cap, limit.lease or 0)
    return cap


def with_cost(request: Request, cost: int) -> Request:
    """``request`` for ``cost`` tokens: its keys and limits, its arguments re-packed."""
    return with_args(request, (str(cost), *request.args[1:]), cost)


class LeaseTable:
    """The leases of one limiter, keyed by bucket keys (see the module docstring)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        hold: float = HOLD,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.clock = clock
        self.hold = hold
        self._max = max_entries
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, ...], _Lease] = {}
        self._holding: set[tuple[str, ...]] = set()  # may name leases since emptied
        # Tokens: granted by the store beyond the callers' own costs, handed out here, and
        # given back (with a refill or by the settler). Read by the benchmarks and tests.
        self.granted_extra = 0
        self.handed = 0
        self.returned = 0
        _TABLES.add(self)

    # -- the hot path -------------------------------------------------------------------------
    def take(self, request: Request, now: float) -> Decision | None:
        """A local admission of ``request.cost`` held tokens, or None (refill or decide on the
        store). ``remaining`` counts the tokens still held here (see ``_held``)."""
        cost = request.cost
        with self._lock:
            lease = self._leases.get(request.keys)
            if lease is None or lease.tokens < cost or now >= lease.due:
                return None
            lease.tokens = tokens = lease.tokens - cost
            lease.used += cost
            self.handed += cost
            remaining, resets, since = lease.remaining, lease.resets, lease.since
        return _held(request.limits, remaining, resets, tokens, now - since)

    # -- refills ------------------------------------------------------------------------------
    def claim(self, request: Request, now: float) -> Refill | None:
        """Claim the one refill of ``request``'s buckets, or None: decide on the store as
        without leases (a refill is in flight, the limits lease nothing, or the table is full).
        The held tokens are detached now: the refill gives them back in the same call."""
        cap = lease_cap(request.limits)
        if cap <= 1:
            return None
        cost = request.cost
        keys = request.keys
        with self._lock:
            lease = self._leases.get(keys)
            if lease is None:
                if len(self._leases) >= self._max and not self._purge():
                    return None
                lease = self._leases[keys] = _Lease(request)
            elif lease.refilling:
                return None
            elif now < lease.due and lease.tokens < cost:  # used up within its hold: grow
                lease.size = min(cap, lease.size * 2)
            elif now >= lease.due and lease.tokens:  # its hold ended with tokens left: shrink
                lease.size = max(1, lease.used)
            size = min(lease.size, cap)
            back = lease.tokens
            lease.tokens = 0
            lease.refilling = True
            self.returned += back
        want = max(size, cost)
        return Refill(want, back, want == cost and back == 0)

    def granted(
        self, request: Request, reply: Sequence[int], granted: int, now: float
    ) -> tuple[Decision | None, float | None]:
        """The store answered a claimed refill: ``reply`` as ``decide``'s, ``granted`` tokens
        taken (0: refused). Returns the caller's decision when tokens are now held, and when
        their hold ends; else ``(None, due)``: the reply is the decision, decoded as usual, and
        ``due`` is None, or now when the buckets were reset during the refill: what it brought
        beyond the caller's cost is to go back (a give-back is capped at full), never out."""
        cost = request.cost
        with self._lock:
            lease = self._leases.get(request.keys)
            if lease is None:  # forgotten meanwhile (a fork, close): nothing is kept
                return None, None
            lease.refilling = False
            lease.since = now
            stale, lease.stale = lease.stale, False
            if granted < cost:  # refused: the hold means nothing, the size stays
                lease.due = now
                lease.used = 0
                return None, None
            lease.used = cost
            # Reset meanwhile: the hold ends at once, so the rest goes back and never out.
            lease.due = due = now if stale else now + self.hold
            if granted == cost:  # nothing held: the store's own decision (decoded as usual)
                return None, None
            n = len(request.limits)
            lease.remaining = remaining = tuple(int(reply[3 + 4 * i]) for i in range(n))
            lease.resets = resets = tuple(int(reply[5 + 4 * i]) / 1e6 for i in range(n))
            lease.request = request
            lease.tokens = tokens = granted - cost
            self.granted_extra += tokens
            self._holding.add(request.keys)
        if stale:
            return None, due
        return _held(request.limits, remaining, resets, tokens, 0.0), due

    def failed(self, request: Request, now: float) -> None:
        """The refill failed: what it gave back may or may not have reached the store (so it
        is counted as lost, never as held), and nothing was granted."""
        with self._lock:
            lease = self._leases.get(request.keys)
            if lease is not None:
                lease.refilling = False
                lease.stale = False
                lease.due = now
                lease.used = 0

    # -- giving back ----------------------------------------------------------------------------
    def expired(self, now: float) -> list[tuple[Request, int]]:
        """Detach the tokens whose hold has ended (to give back, outside the lock), shrinking
        those leases to what was used of them."""
        out: list[tuple[Request, int]] = []
        with self._lock:
            for keys in list(self._holding):
                lease = self._leases.get(keys)
                if lease is None or not lease.tokens:
                    self._holding.discard(keys)
                    continue
                if lease.refilling or now < lease.due:
                    continue
                out.append((lease.request, lease.tokens))
                self.returned += lease.tokens
                lease.size = max(1, lease.used)
                lease.tokens = 0
                self._holding.discard(keys)
        return out

    def drain(self) -> list[tuple[Request, int]]:
        """Detach every held token (``close``): all of them go back."""
        out: list[tuple[Request, int]] = []
        with self._lock:
            for keys in self._holding:
                lease = self._leases.get(keys)
                if lease is not None and lease.tokens:
                    out.append((lease.request, lease.tokens))
                    self.returned += lease.tokens
                    lease.tokens = 0
            self._holding.clear()
        return out

    def next_due(self) -> float | None:
        """When the earliest held lease's hold ends (None: no tokens are held)."""
        with self._lock:
            dues = [
                lease.due
                for keys in self._holding
                if (lease := self._leases.get(keys)) is not None and lease.tokens
            ]
        return min(dues) if dues else None

    def holds(self, keys: tuple[str, ...]) -> bool:
        """Whether tokens of ``keys``' buckets are held here (their hold may have ended: the
        next refill gives them back). Unlocked: one read of an int, as ``take`` left it."""
        lease = self._leases.get(keys)
        return lease is not None and lease.tokens > 0

    def held(self) -> int:
        """Tokens held now, over every bucket set."""
        with self._lock:
            return sum(lease.tokens for lease in self._leases.values())

    def clear(self, keys: tuple[str, ...] | None = None) -> None:
        """Drop the held tokens of ``keys`` (every key: None) without giving them back: their
        buckets were reset (full again), so these tokens must not be spent on top. A refill
        in flight may have taken its tokens before the reset: none of them is handed out."""
        with self._lock:
            leases = self._leases.values() if keys is None else [self._leases.get(keys)]
            for lease in leases:
                if lease is not None:
                    lease.tokens = 0
                    lease.stale = lease.refilling

    def forget(self) -> None:
        """Drop every lease without giving anything back (a forked child: the tokens are its
        parent's, which gives them back itself)."""
        self._lock = threading.Lock()  # the parent's may have been held by another thread
        self._leases.clear()
        self._holding.clear()

    def _purge(self) -> bool:
        """Under the lock: drop the leases that hold nothing and wait for nothing; whether
        there is room now."""
        idle = [k for k, lease in self._leases.items() if not lease.tokens and not lease.refilling]
        for keys in idle:
            del self._leases[keys]
        return len(self._leases) < self._max


def _held(
    limits: Sequence[Limit],
    remaining: tuple[int, ...],
    resets: tuple[float, ...],
    tokens: int,
    elapsed: float,
) -> Decision:
    """An admission from held tokens: per limit, what the store left at the grant plus the
    tokens still held here (at most the burst), and the store's time to full, aged."""
    if len(limits) == 1:
        limit = limits[0]
        return decision(
            True,
            limit.burst,
            min(limit.burst, remaining[0] + tokens),
            0.0,
            max(0.0, resets[0] - elapsed),
            limit,
        )
    details = tuple(
        Decision(
            allowed=True,
            limit=limit.burst,
            remaining=min(limit.burst, left + tokens),
            retry_after=0.0,
            reset_after=max(0.0, reset - elapsed),
            policy=limit,
        )
        for limit, left, reset in zip(limits, remaining, resets, strict=True)
    )
    worst = min(details, key=lambda d: (d.remaining, -d.reset_after))
    return Decision(
        allowed=True,
        limit=worst.limit,
        remaining=worst.remaining,
        retry_after=0.0,
        reset_after=worst.reset_after,
        policy=worst.policy,
        details=details,
    )


_TABLES: weakref.WeakSet[LeaseTable] = weakref.WeakSet()


def _forget_in_child() -> None:
    for table in list(_TABLES):
        table.forget()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forget_in_child)
