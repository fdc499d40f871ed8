"""Concurrency limits: at most ``max_in_flight`` holders of one key at a time.

``limiter.concurrency(key, max_in_flight, lease=60.0, timeout=0)`` returns a ``Concurrency``
(``RateLimiter``) or an ``AsyncConcurrency`` (``AsyncRateLimiter``): a context manager and a
decorator that holds one slot for the block or call and gives it back on the way out.

Storage, per key, one sorted set: member = a random holder id, score = the end of its lease in
microseconds of server time. Taking a slot is one script call (``slot_hold.lua``): drop the
holders whose lease has ended, admit if fewer than ``max_in_flight`` remain (adding the id) and
set the key's TTL to its longest lease; giving it back is one more (``slot_release.lua``).
``hold`` and ``release`` below are the reference model of both: the memory backend runs them on
its own (injectable) clock.

Decisions where the design brief is silent:

- ``max_in_flight`` and ``lease`` are not part of the key: a new ``max_in_flight`` applies at
  once to the slots already held (lowering it admits no one until enough holders leave; raising
  it admits at once), and callers passing different values for one key each enforce their own
  bound against the same holders. The key is ``{prefix}{tag}:c``: the same hash tag as the
  identity's buckets (one slot on a cluster; keyed by the limiter's hash secret as they are),
  a suffix that no bucket key can end with.
- A slot taken by a call whose outcome is unknown (a timeout after the script was sent) is not
  given back by a second call: its lease ends it. A cancelled async caller lets its in-flight
  acquire finish in the background and gives back what it took.
- A holder past its lease lost its slot (others may have been admitted meanwhile): giving it
  back is then a no-op, logged (throttled) as a warning.
- A shadow limiter (``shadow=True``) admits a would-be refusal at once, without a slot and
  marked ``shadowed``; ``tokenlimit.testing.disabled()`` admits without touching storage.
- Taking a slot goes through the limiter's circuit breaker as a decision does (_breaker.py):
  while it is open, the failure mode applies at once. Giving a slot back always asks the server:
  only holders that took their slot there do, so a hung server costs at most one deadline per
  such holder, where skipping it would hold their slots until their leases end.
- ``failure_mode="local"``: while storage is down, a holder takes one of this process's share
  of the slots (``max_in_flight // expected_processes``, at least 1) in the limiter's local
  store; its holder id starts with ``LOCAL``, so leaving gives the slot back where it was taken.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import hashlib
import inspect
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, ParamSpec, TypeVar, cast

from . import _switch
from ._backend import holds_slots, is_remote
from ._decision import Decision
from ._decorator import KeySpec, is_per_call, key_function, needs_a_call
from ._errors import BackendError, ConfigTypeError, RateLimitExceeded
from ._log import ThrottledLog
from ._request import identity_tag
from ._slots import hold, release
from ._validate import check_int, check_key, check_number

if TYPE_CHECKING:
    from typing import Self

    from ._backend import AsyncBackend, SyncBackend
    from ._fallback import LocalFallback
    from ._limiter import AsyncRateLimiter, RateLimiter

__all__ = ["AsyncConcurrency", "Concurrency", "Slots", "build_slots", "hold", "release"]

MAX_IN_FLIGHT = 1_000_000_000  # as slot_hold.lua checks it
MAX_LEASE = 30 * 86_400.0  # seconds: µs of server time plus a lease stay exact in doubles
SUFFIX = ":c"  # bucket keys end in a limit's base64url id, never in ':'
FIRST_PAUSE = 0.005  # seconds: the first wait for a slot; doubled after each refusal...
MAX_PAUSE = 0.25  # ...up to this (with jitter), never past the timeout or the earliest lease end

P = ParamSpec("P")
R = TypeVar("R")
# The limiter a guard holds slots through: Concurrency's sync one, AsyncConcurrency's async one.
_Lim = TypeVar("_Lim", "RateLimiter", "AsyncRateLimiter")
_PER_CALL = "tokenlimit:per-call"  # stands in for a key made at each call (never stored)
LOCAL = "local:"  # starts the id of a holder of a local slot (failure_mode="local")

_background: set[asyncio.Future[None]] = set()  # releases running for cancelled callers
_overrun = ThrottledLog()


# -- the pure middle: arguments in, keys and decisions out ------------------------------------
@dataclass(frozen=True, slots=True)
class Slots:
    """One concurrency limit: the storage key, its bound, the lease (µs) and the wait (s)."""

    key: str
    max_in_flight: int
    lease_us: int
    timeout: float

    def hold_args(self, holder: str) -> tuple[str, str, str]:
        return (holder, str(self.max_in_flight), str(self.lease_us))


def build_slots(
    prefix: str,
    key: object,
    max_in_flight: object,
    lease: object,
    timeout: object,
    hasher: hashlib.blake2b | None = None,
) -> Slots:
    """Validate ``concurrency()``'s arguments (errors name the parameter)."""
    storage = slots_key(prefix, key, hasher)  # first: a bad key is the error named first
    most = check_int("max_in_flight", max_in_flight, minimum=1, maximum=MAX_IN_FLIGHT)
    seconds = check_number("lease", lease, maximum=MAX_LEASE)  # 30 days
    wait = check_number("timeout", timeout, allow_zero=True)
    return Slots(storage, most, max(1, math.ceil(seconds * 1e6)), wait)


def slots_key(prefix: str, key: object, hasher: hashlib.blake2b | None = None) -> str:
    """The storage key of ``key``'s slots: its identity's hash tag, like its token buckets
    (``hasher``: the limiter's keyed hash, None without a hash secret)."""
    return f"{prefix}{{{identity_tag(check_key(key), hasher)}}}{SUFFIX}"


def decode(reply: Sequence[int], slots: Slots) -> Decision:
    """The hold script's reply as a Decision: ``limit`` is ``max_in_flight``, ``remaining`` the
    free slots; refused, ``retry_after`` is when the earliest lease ends (a slot is free by then
    at the latest, sooner if its holder leaves); admitted, ``reset_after`` is the lease."""
    admitted, count, wait_us = (int(x) for x in reply)
    most = slots.max_in_flight
    if admitted:
        return Decision(True, most, max(most - count, 0), 0.0, slots.lease_us / 1e6)
    return Decision(False, most, 0, wait_us / 1e6, wait_us / 1e6)


def refused(decision: Decision, slots: Slots) -> RateLimitExceeded:
    return RateLimitExceeded(
        decision,
        f"concurrency limit exceeded: all {decision.limit} slots are held; "
        f"the earliest lease ends in {decision.retry_after:.3f}s",
    )


class _Wait:
    """The pauses between tries while waiting up to ``timeout`` for a slot: exponential backoff
    with jitter (many waiters must not poll in step), never past the deadline nor past the end
    of the earliest lease."""

    __slots__ = ("deadline", "pause", "slots")

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.deadline = time.monotonic() + slots.timeout
        self.pause = FIRST_PAUSE

    def after(self, decision: Decision) -> float:
        """Seconds to sleep before the next try; ``RateLimitExceeded`` once out of time."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise refused(decision, self.slots)
        pause = min(self.pause * random.uniform(0.5, 1.0), decision.retry_after, left)
        self.pause = min(self.pause * 2, MAX_PAUSE)
        return pause


def _new_holder() -> str:
    return secrets.token_hex(16)


# -- storage calls ------------------------------------------------------------------------------
def _sync_hold(backend: SyncBackend, slots: Slots, holder: str, timeout: float) -> Sequence[int]:
    return backend.hold_slot(
        slots.key, holder, slots.max_in_flight, slots.lease_us, timeout=timeout
    )


def _sync_release(backend: SyncBackend, slots: Slots, holder: str, timeout: float) -> int:
    return int(backend.release_slot(slots.key, holder, timeout=timeout))


async def _async_hold(
    backend: AsyncBackend, slots: Slots, holder: str, timeout: float
) -> Sequence[int]:
    return await backend.hold_slot(
        slots.key, holder, slots.max_in_flight, slots.lease_us, timeout=timeout
    )


async def _async_release(backend: AsyncBackend, slots: Slots, holder: str, timeout: float) -> int:
    return int(await backend.release_slot(slots.key, holder, timeout=timeout))


def _keep(future: asyncio.Future[None]) -> None:
    """Hold a strong reference until ``future`` is done (the loop keeps only weak ones)."""
    _background.add(future)
    future.add_done_callback(_background.discard)


async def _shielded(
    attempt: asyncio.Future[Sequence[int]], give_back: Callable[[], object]
) -> Sequence[int]:
    """Await one hold; if the caller is cancelled meanwhile, let the hold finish in the
    background and give back the slot it took (the script may already have run: cancelling it
    would leave that slot to its lease)."""
    try:
        return await asyncio.shield(attempt)
    except asyncio.CancelledError:
        attempt.add_done_callback(functools.partial(_orphaned, give_back=give_back))
        raise


def _orphaned(attempt: asyncio.Future[Sequence[int]], give_back: Callable[[], object]) -> None:
    if attempt.cancelled() or attempt.exception() is not None:
        return  # nothing taken, or unknown: the lease ends it
    if int(attempt.result()[0]) == 1:
        give_back()


# -- the guards -----------------------------------------------------------------------------------
class _SlotGuard(Generic[_Lim]):
    """What both guards share: arguments, the held slots of this context, failure policy."""

    __slots__ = ("_held", "_key", "_limiter", "_slots")

    def __init__(
        self, limiter: _Lim, key: KeySpec, max_in_flight: int, *, lease: float, timeout: float
    ) -> None:
        # A callable or a template ("export:{user_id}") makes the key at each decorated call;
        # until then the slots carry a stand-in key, never used (``with`` refuses such a key).
        self._key = key if is_per_call(key) else None
        literal = _PER_CALL if self._key is not None else key
        self._slots = build_slots(
            limiter.prefix, literal, max_in_flight, lease, timeout, limiter._hasher
        )
        if not holds_slots(limiter.backend):
            raise TypeError(
                f"{type(limiter.backend).__name__} does not support concurrency limits "
                "(use a memory, Redis or Valkey limiter)"
            )
        self._limiter: _Lim = limiter
        # The slots this guard holds in the current thread or task, innermost last: one guard
        # may be entered by many threads and tasks at once, and nested.
        self._held: contextvars.ContextVar[tuple[str | None, ...]] = contextvars.ContextVar(
            "tokenlimit_slots", default=()
        )

    @property
    def max_in_flight(self) -> int:
        return self._slots.max_in_flight

    @property
    def lease(self) -> float:
        """Seconds a holder keeps its slot at most."""
        return self._slots.lease_us / 1e6

    @property
    def timeout(self) -> float:
        """Seconds to wait for a free slot (0: refuse at once)."""
        return self._slots.timeout

    def _push(self, holder: str | None) -> None:
        self._held.set((*self._held.get(), holder))

    def _pop(self) -> str | None:
        held = self._held.get()
        if not held:
            raise RuntimeError("concurrency slot released without being acquired")
        self._held.set(held[:-1])
        return held[-1]

    def _literal(self) -> None:
        """A ``with`` block has no call to make its key from."""
        if self._key is not None:
            raise needs_a_call()

    def _key_of(
        self, func: Callable[..., object]
    ) -> Callable[[tuple[object, ...], dict[str, object]], Self]:
        """How a decorated call finds its guard: this one, or one for the key the call makes."""
        if self._key is None:
            return lambda args, kwargs: self
        make = key_function(self._key, func)
        return lambda args, kwargs: self._for(make(args, kwargs))

    def _for(self, key: str | bytes) -> Self:
        """This guard for one call's own key (its bound, lease and timeout)."""
        twin = object.__new__(type(self))
        twin._key, twin._limiter, twin._held = None, self._limiter, self._held
        key = slots_key(self._limiter.prefix, key, self._limiter._hasher)
        twin._slots = dataclasses.replace(self._slots, key=key)
        return twin

    def _without_slot(self) -> tuple[Decision, None]:
        """Admitted holding nothing (storage failed open, or limiting is switched off by
        ``tokenlimit.testing``): leaving gives nothing back."""
        most = self._slots.max_in_flight
        return Decision(True, most, most - 1, 0.0, 0.0), None

    def _shadowed(self, decision: Decision) -> tuple[Decision, None]:
        """Shadow mode: all slots are held, but the caller gets in anyway, without one (so
        leaving frees nothing), marked ``shadowed`` and logged (throttled, never the key)."""
        self._limiter._shadow_log.warning(
            "tokenlimit: shadow mode admitted a call it would refuse",
            refused(decision, self._slots),
        )
        return dataclasses.replace(decision, allowed=True, shadowed=True), None

    def _settle(
        self, reply: Sequence[int], holder: str, wait: _Wait, slots: Slots | None = None
    ) -> tuple[Decision, str | None] | float:
        """One hold's reply: the caller's outcome, or how long to sleep before trying again."""
        decision = decode(reply, slots or self._slots)
        if decision.allowed:
            self._record("held")
            return decision, holder
        if self._limiter.shadow:  # decide, never refuse (nor wait)
            self._record("shadowed")
            return self._shadowed(decision)
        try:
            return wait.after(decision)
        except RateLimitExceeded:
            self._record("refused")
            raise

    # -- failure_mode="local" ----------------------------------------------------------------
    def _held_locally(
        self, fallback: LocalFallback, holder: str, wait: _Wait
    ) -> tuple[Decision, str | None] | float:
        """One try at this process's share of the slots, in the limiter's local store."""
        share = max(1, self._slots.max_in_flight // fallback.processes)
        slots = dataclasses.replace(self._slots, max_in_flight=share)
        local = LOCAL + holder
        reply = fallback.store.hold_slot(slots.key, local, share, slots.lease_us)
        return self._settle(reply, local, wait, slots)

    def _elsewhere(
        self, error: BackendError | None, holder: str, wait: _Wait
    ) -> tuple[Decision, str | None] | float:
        """A try the server did not answer (``error``) or was not asked (the circuit is open):
        a local slot (``"local"``), admitted without a slot (open), or raised (closed)."""
        fallback = self._limiter._storage_failed((), error, "admitting without a concurrency slot")
        if fallback is None:
            return self._without_slot()
        return self._held_locally(fallback, holder, wait)

    def _release_locally(self, holder: str) -> None:
        fallback = self._limiter._fallback
        assert fallback is not None  # only a limiter in local mode gives out local holders
        self._released(fallback.store.release_slot(self._slots.key, holder))

    def _record(self, result: str) -> None:
        """One entry's outcome, to the metrics sink if it counts concurrency limits."""
        record = getattr(self._limiter.metrics, "record_slot", None)
        if record is not None:
            record(self._slots.max_in_flight, result)

    async def _hold_async(
        self, attempt: Callable[[str], Awaitable[Sequence[int]]]
    ) -> tuple[Decision, str | None]:
        """Hold a slot from async code, each try made by ``attempt(holder)``."""
        if _switch.DISABLED:  # tokenlimit.testing.disabled(): admit, touch nothing
            return self._without_slot()
        holder, wait = _new_holder(), _Wait(self._slots)
        circuit = self._limiter._circuit
        while True:
            if circuit.tripped and not circuit.route():
                await asyncio.sleep(0)  # yield once, as a round trip would
                settled = self._elsewhere(None, holder, wait)
            else:
                try:
                    reply = await attempt(holder)
                except BackendError as error:
                    settled = self._elsewhere(error, holder, wait)
                else:
                    if circuit.tripped:
                        self._limiter._recovered()
                    settled = self._settle(reply, holder, wait)
            if isinstance(settled, tuple):
                return settled
            await asyncio.sleep(settled)

    def _released(self, freed: int) -> None:
        if not freed:
            _overrun.warning(
                "tokenlimit: a concurrency slot was given back after its lease had ended "
                "(others may have been admitted in its place)",
                RuntimeError(f"lease {self.lease:g}s, max_in_flight {self.max_in_flight}"),
            )

    def _release_failed(self, error: Exception) -> None:
        """Never raised over the caller's own result or exception: the lease frees the slot."""
        self._limiter._log.warning(
            "tokenlimit: could not give a concurrency slot back (its lease will end it)", error
        )

    def _check_func(self, func: object) -> None:
        if not callable(func):
            raise ConfigTypeError("func", f"concurrency decorates a callable, not {func!r}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_in_flight={self.max_in_flight}, lease={self.lease:g}, "
            f"timeout={self.timeout:g})"
        )


class Concurrency(_SlotGuard["RateLimiter"]):
    """``RateLimiter.concurrency(...)``: ``with`` (or ``async with``, off the event loop) holds
    one slot; as a decorator of a ``def`` or an ``async def``, one slot per call. Entering
    returns a ``Decision`` (``remaining``: slots left) or raises ``RateLimitExceeded``."""

    __slots__ = ()

    def __enter__(self) -> Decision:
        self._literal()
        decision, holder = self._hold()
        self._push(holder)
        return decision

    def __exit__(self, *exc_info: object) -> None:
        self._release(self._pop())

    async def __aenter__(self) -> Decision:
        self._literal()
        decision, holder = await self._ahold()
        self._push(holder)
        return decision

    async def __aexit__(self, *exc_info: object) -> None:
        await self._arelease(self._pop())

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        self._check_func(func)
        guard_for = self._key_of(func)
        if inspect.iscoroutinefunction(func):  # ``func`` is typed as a coroutine function here

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> object:
                guard = guard_for(args, kwargs)
                _, holder = await guard._ahold()
                try:
                    return await func(*args, **kwargs)
                finally:
                    await guard._arelease(holder)

            # Called like ``func``, it returns what ``func`` does (R): a coroutine of its result.
            return cast("Callable[P, R]", async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            guard = guard_for(args, kwargs)
            _, holder = guard._hold()
            try:
                return func(*args, **kwargs)
            finally:
                guard._release(holder)

        return wrapper

    def _hold(self) -> tuple[Decision, str | None]:
        if _switch.DISABLED:  # tokenlimit.testing.disabled(): admit, touch nothing
            return self._without_slot()
        limiter, slots = self._limiter, self._slots
        holder, wait = _new_holder(), _Wait(slots)
        circuit = limiter._circuit
        while True:
            if circuit.tripped and not circuit.route():
                settled = self._elsewhere(None, holder, wait)
            else:
                try:
                    reply = _sync_hold(limiter.backend, slots, holder, limiter.timeout)
                except BackendError as error:
                    settled = self._elsewhere(error, holder, wait)
                else:
                    if circuit.tripped:
                        limiter._recovered()
                    settled = self._settle(reply, holder, wait)
            if isinstance(settled, tuple):
                return settled
            time.sleep(settled)

    def _release(self, holder: str | None) -> None:
        if holder is None:  # admitted without a slot (failure_mode="open")
            return
        if holder.startswith(LOCAL):
            self._release_locally(holder)
            return
        limiter = self._limiter
        try:
            freed = _sync_release(limiter.backend, self._slots, holder, limiter.timeout)
        except Exception as error:
            self._release_failed(error)
        else:
            self._released(freed)

    # From async code, a sync limiter's network calls run in a worker thread.
    async def _ahold(self) -> tuple[Decision, str | None]:
        return await self._hold_async(self._attempt_in_thread)

    async def _attempt_in_thread(self, holder: str) -> Sequence[int]:
        limiter, slots = self._limiter, self._slots
        if not is_remote(limiter.backend):  # in-process: no thread, nothing to cut short
            return _sync_hold(limiter.backend, slots, holder, limiter.timeout)
        loop = asyncio.get_running_loop()
        call = functools.partial(_sync_hold, limiter.backend, slots, holder, limiter.timeout)
        return await _shielded(
            loop.run_in_executor(None, call),
            lambda: loop.run_in_executor(None, self._release, holder),
        )

    async def _arelease(self, holder: str | None) -> None:
        if holder is None or holder.startswith(LOCAL) or not is_remote(self._limiter.backend):
            self._release(holder)
            return
        # Shielded: a caller cancelled here still gives the slot back.
        await asyncio.shield(
            asyncio.get_running_loop().run_in_executor(None, self._release, holder)
        )


class AsyncConcurrency(_SlotGuard["AsyncRateLimiter"]):
    """``AsyncRateLimiter.concurrency(...)``: ``async with`` holds one slot; as a decorator of an
    ``async def``, one slot per call. Entering returns a ``Decision`` or raises
    ``RateLimitExceeded``."""

    __slots__ = ()

    def __enter__(self) -> Decision:
        raise TypeError("AsyncRateLimiter.concurrency needs 'async with' (or use RateLimiter)")

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ raised
        return None

    async def __aenter__(self) -> Decision:
        self._literal()
        decision, holder = await self._hold()
        self._push(holder)
        return decision

    async def __aexit__(self, *exc_info: object) -> None:
        await self._release(self._pop())

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        self._check_func(func)
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"AsyncRateLimiter.concurrency cannot decorate the plain function "
                f"{getattr(func, '__qualname__', func)!r}; use RateLimiter, or make it async def"
            )
        guard_for = self._key_of(func)

        @functools.wraps(func)
        async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> object:
            guard = guard_for(args, kwargs)
            _, holder = await guard._hold()
            try:
                return await func(*args, **kwargs)
            finally:
                await guard._release(holder)

        # Called like ``func``, it returns what ``func`` does (R): a coroutine of its result.
        return cast("Callable[P, R]", async_wrapper)

    async def _hold(self) -> tuple[Decision, str | None]:
        return await self._hold_async(self._attempt)

    async def _attempt(self, holder: str) -> Sequence[int]:
        limiter, slots = self._limiter, self._slots
        if not is_remote(limiter.backend):  # no await inside: cannot be cut short
            return await _async_hold(limiter.backend, slots, holder, limiter.timeout)
        attempt = asyncio.ensure_future(
            _async_hold(limiter.backend, slots, holder, limiter.timeout)
        )
        return await _shielded(attempt, lambda: self._give_back(holder))

    async def _release(self, holder: str | None) -> None:
        if holder is None:  # admitted without a slot (failure_mode="open")
            return
        if holder.startswith(LOCAL):
            self._release_locally(holder)
            return
        if not is_remote(self._limiter.backend):
            await self._released_now(holder)
            return
        # Shielded: a caller cancelled here still gives the slot back.
        await asyncio.shield(self._give_back(holder))

    def _give_back(self, holder: str) -> asyncio.Future[None]:
        task = asyncio.ensure_future(self._released_now(holder))
        _keep(task)
        return task

    async def _released_now(self, holder: str) -> None:
        limiter = self._limiter
        try:
            freed = await _async_release(limiter.backend, self._slots, holder, limiter.timeout)
        except Exception as error:
            self._release_failed(error)
        else:
            self._released(freed)
