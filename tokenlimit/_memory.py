"""The in-process backend: the reference model behind a lock, with bounded memory."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from ._model import LimitResult, decide
from ._model import hold as hold_buckets
from ._model import lease as lease_buckets
from ._model import refund as refund_buckets
from ._request import Request
from ._slots import hold, release
from ._validate import check_int

__all__ = ["AsyncMemoryBackend", "MemoryBackend"]


class _Answer(Protocol):
    """What the model's ``decide``, ``hold``, ``refund`` and ``lease`` answer alike."""

    @property
    def now(self) -> int: ...
    @property
    def allowed(self) -> bool: ...
    @property
    def results(self) -> tuple[LimitResult, ...]: ...
    @property
    def new_states(self) -> Sequence[int | None] | None: ...


_A = TypeVar("_A", bound=_Answer)


def _reply(answer: _Answer) -> list[int]:
    """``answer`` as the scripts reply: the time, all-or-nothing, then four numbers a limit."""
    reply = [answer.now, int(answer.allowed)]
    for result in answer.results:
        reply.extend((int(result.allowed), result.remaining, result.retry_us, result.reset_us))
    return reply


class MemoryBackend:
    """Buckets in a dict, per process: thread-safe, and safe from asyncio (no await inside).

    ``clock`` returns seconds (default ``time.monotonic``); tests pass a fake one. Buckets are
    dropped once full again (their TTL), and at most ``max_keys`` are kept: beyond that the
    bucket closest to full is forgotten first, which can only admit, never refuse, too early.
    """

    remote = False

    def __init__(
        self, *, clock: Callable[[], float] | None = None, max_keys: int = 1_000_000
    ) -> None:
        self._clock = clock or time.monotonic
        self._max_keys = check_int("max_keys", max_keys, minimum=1)
        self._lock = threading.Lock()
        self._states: dict[str, int] = {}  # key -> TAT, ns
        self._expiry: list[tuple[int, str]] = []  # (TAT ns: when full, key); may hold stale entries
        # Concurrency limits: key -> {holder id: end of its lease, µs} (see _concurrency).
        self._slots: dict[str, dict[str, int]] = {}
        self._slots_swept = 1024  # sweep every key's ended leases once this many keys exist
        # Live overrides (see _overrides.py): key -> {label: (expiry, ms of the clock, payload)}.
        self._overrides: dict[str, dict[str, tuple[int, str]]] = {}

    @property
    def clock(self) -> Callable[[], float]:
        """The clock the buckets run on (a ``tokenlimit.testing.FakeClock`` in tests)."""
        return self._clock

    def now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def decide(self, request: Request, *, consume: bool, timeout: float = 0.0) -> Sequence[int]:
        with self._lock:
            now = self.now_us()
            self._sweep(now)
            states = [self._states.get(key) for key in request.keys]
            outcome = decide(states, request.params, request.cost, now, consume=consume)
            if outcome.new_states is not None:
                for key, state in zip(request.keys, outcome.new_states, strict=True):
                    self._store(key, state)
        return _reply(outcome)

    def reset(self, request: Request, *, timeout: float = 0.0) -> None:
        with self._lock:
            for key in request.keys:
                self._states.pop(key, None)

    def hold_back(self, request: Request, hold_us: int, *, timeout: float = 0.0) -> list[int]:
        """Hold the buckets back ``hold_us`` µs, as the holdback script does on a server."""
        params = request.params
        held = self._rewrite(
            request, lambda now, states: hold_buckets(states, params, hold_us, now)
        )
        return _reply(held)

    def refund(self, request: Request, *, timeout: float = 0.0) -> list[int]:
        """Give ``request.cost`` tokens back, as the refund script does on a server."""
        params, cost = request.params, request.cost
        refunded = self._rewrite(
            request, lambda now, states: refund_buckets(states, params, cost, now)
        )
        return _reply(refunded)

    def lease(self, request: Request, want: int, back: int, *, timeout: float = 0.0) -> list[int]:
        """Give ``back`` tokens back and take up to ``want`` (at least ``request.cost``), as the
        lease script does on a server; the reply ends with the tokens granted."""
        params, cost = request.params, request.cost
        leased = self._rewrite(
            request, lambda now, states: lease_buckets(states, params, cost, want, back, now)
        )
        return [*_reply(leased), leased.granted]

    def _rewrite(self, request: Request, compute: Callable[[int, list[int | None]], _A]) -> _A:
        """``compute(now, states)`` on the request's buckets under the lock, each state it
        changes stored: a script's read, compute and write, atomic here as there."""
        with self._lock:
            now = self.now_us()
            self._sweep(now)
            states = [self._states.get(key) for key in request.keys]
            answer = compute(now, states)
            if answer.new_states is not None:
                for key, old, new in zip(request.keys, states, answer.new_states, strict=True):
                    if new is not None and new != old:
                        self._store(key, new)
        return answer

    def overrides(self, key: str, args: Sequence[str], *, timeout: float = 0.0) -> list[object]:
        """Set, clear or list live overrides, as the override script does on a server."""
        with self._lock:
            # The real clock, as a server's: an override is an operator's, never a test clock's.
            now = int(time.monotonic() * 1000)
            table = self._overrides.setdefault(key, {})
            changed = 0
            op = args[0] if args else ""
            if op == "set" and len(args) == 4:
                table[args[1]] = (now + int(args[3]), args[2])
                changed = 1
            elif op == "clear" and len(args) == 2:
                changed = int(table.pop(args[1], None) is not None)
            elif op != "list" or len(args) != 1:
                raise ValueError(f"bad override operation {op!r}")
            reply: list[object] = [changed]
            for name, (expiry, payload) in list(table.items()):
                if expiry <= now:
                    del table[name]
                else:
                    reply.extend((name, payload, expiry - now))
            if not table:
                del self._overrides[key]
            return reply

    def clear(self) -> None:
        """Forget every bucket (and override)."""
        with self._lock:
            self._states.clear()
            self._expiry.clear()
            self._slots.clear()
            self._overrides.clear()

    def clear_prefix(self, prefix: str) -> int:
        """Forget every bucket and slot (one store per limiter, whatever its prefix)."""
        count = len(self)
        self.clear()
        return count

    def close(self) -> None:
        self.clear()

    def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float = 0.0
    ) -> list[int]:
        """A concurrency slot for ``holder``, as the slot_hold script takes it on a server."""
        with self._lock:
            now = self.now_us()
            slots = self._slots
            holders = slots.get(key)
            if holders is None:
                if len(slots) >= self._slots_swept:  # keys whose holders never came back
                    for name in [k for k, held in slots.items() if not max(held.values()) > now]:
                        del slots[name]
                    self._slots_swept = max(1024, 2 * len(slots))
                holders = slots[key] = {}
            reply = hold(holders, holder, max_in_flight, lease_us, now)
            if not holders:
                del slots[key]
            return reply

    def release_slot(self, key: str, holder: str, *, timeout: float = 0.0) -> int:
        """Give ``holder``'s slot back: 1 if its lease had not ended yet."""
        with self._lock:
            holders = self._slots.get(key)
            if holders is None:
                return 0
            freed = release(holders, holder, self.now_us())
            if not holders:
                del self._slots[key]
            return freed

    def __len__(self) -> int:
        return len(self._states)

    def _store(self, key: str, tat: int) -> None:
        if key not in self._states and len(self._states) >= self._max_keys:
            self._evict_one()
        self._states[key] = tat
        heapq.heappush(self._expiry, (tat, key))
        if len(self._expiry) > 2 * len(self._states) + 1024:
            self._expiry = [(t, k) for k, t in self._states.items()]
            heapq.heapify(self._expiry)

    def _live(self, when: int, key: str) -> bool:
        return self._states.get(key) == when

    def _sweep(self, now: int) -> None:
        heap = self._expiry
        now_ns = now * 1000
        while heap and heap[0][0] <= now_ns:
            when, key = heapq.heappop(heap)
            if self._live(when, key):
                del self._states[key]

    def _evict_one(self) -> None:
        heap = self._expiry
        while heap:
            when, key = heapq.heappop(heap)
            if self._live(when, key):
                del self._states[key]
                return


class AsyncMemoryBackend:
    """``MemoryBackend`` for ``AsyncRateLimiter``: the same store, awaited without blocking."""

    remote = False

    def __init__(self, store: MemoryBackend | None = None) -> None:
        self.store = store if store is not None else MemoryBackend()

    async def decide(
        self, request: Request, *, consume: bool, timeout: float = 0.0
    ) -> Sequence[int]:
        return self.store.decide(request, consume=consume)

    async def reset(self, request: Request, *, timeout: float = 0.0) -> None:
        self.store.reset(request)

    async def hold_back(self, request: Request, hold_us: int, *, timeout: float = 0.0) -> list[int]:
        return self.store.hold_back(request, hold_us)

    async def refund(self, request: Request, *, timeout: float = 0.0) -> list[int]:
        return self.store.refund(request)

    async def lease(
        self, request: Request, want: int, back: int, *, timeout: float = 0.0
    ) -> list[int]:
        return self.store.lease(request, want, back)

    async def overrides(
        self, key: str, args: Sequence[str], *, timeout: float = 0.0
    ) -> list[object]:
        return self.store.overrides(key, args)

    async def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float = 0.0
    ) -> list[int]:
        return self.store.hold_slot(key, holder, max_in_flight, lease_us)

    async def release_slot(self, key: str, holder: str, *, timeout: float = 0.0) -> int:
        return self.store.release_slot(key, holder)

    async def clear_prefix(self, prefix: str) -> int:
        return self.store.clear_prefix(prefix)

    async def aclose(self) -> None:
        self.store.close()
