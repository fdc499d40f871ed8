"""Helpers for testing code that uses tokenlimit, and a pytest plugin.

- ``FakeClock``: seconds that move only when told (``clock.advance(1.5)``); a callable.
- ``memory_limiter(clock)`` / ``async_memory_limiter(clock)``: an in-process limiter on that
  clock, so refill is exact and tests never sleep.
- ``reset_all(limiter)`` / ``await areset_all(limiter)``: every bucket full again. On a memory
  limiter it clears the store; on Redis/Valkey it deletes the limiter's bucket keys (``SCAN``
  for ``<prefix>{*`` + ``DEL``, on every primary of a cluster). **For tests only**: it walks the
  keyspace and is not atomic with decisions made meanwhile.
- ``disabled()`` (a context manager), ``disable()``/``enable()``: every limiter in the process
  (your own, the integrations', the default one behind ``rate_limit``/``configure``) admits every
  call without touching storage or metrics, for an application's test suite.

The pytest plugin (registered as ``tokenlimit`` through the ``pytest11`` entry point, so it
loads by itself once tokenlimit is installed; ``-p no:tokenlimit`` turns it off) gives the
fixtures ``tokenlimit_clock`` (a ``FakeClock`` at 0), ``tokenlimit_limiter`` (a
``memory_limiter`` on it), ``tokenlimit_async_limiter`` (its async twin, on the same clock) and
``tokenlimit_disabled`` (limiting off for one test). The fixtures live in
``tokenlimit._pytest_plugin``, so importing this module never imports pytest.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol, TypeGuard

from . import _switch
from ._backend import is_remote
from ._errors import ConfigError, ConfigTypeError
from ._limiter import AsyncRateLimiter, RateLimiter
from ._memory import MemoryBackend

if TYPE_CHECKING:
    from typing import Unpack

    from ._base import LimiterOptions

__all__ = [
    "FakeClock",
    "areset_all",
    "async_memory_limiter",
    "disable",
    "disabled",
    "enable",
    "is_disabled",
    "memory_limiter",
    "reset_all",
]


class FakeClock:
    """A clock in seconds that moves only through ``advance`` (or ``set``); thread-safe.
    Call it for the time: ``MemoryBackend(clock=FakeClock())``."""

    __slots__ = ("_lock", "_now")

    def __init__(self, start: float = 0.0) -> None:
        self._now = _seconds("start", start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (>= 0); returns the new time."""
        step = _seconds("seconds", seconds)
        with self._lock:
            self._now += step
            return self._now

    def set(self, now: float) -> None:
        """Jump to ``now``, which may not be earlier than the current time."""
        target = _seconds("now", now)
        with self._lock:
            if target < self._now:
                raise ConfigError("now", f"{now} is earlier than the clock's {self._now}")
            self._now = target

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"


def _seconds(param: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(param, f"must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(param, f"must be finite and >= 0, got {value!r}")
    return float(value)


def _clock(clock: Callable[[], float] | None) -> Callable[[], float]:
    if clock is None:
        return FakeClock()
    if not callable(clock):
        raise ConfigTypeError("clock", f"must be a FakeClock (or a callable), not {clock!r}")
    return clock


def memory_limiter(
    clock: Callable[[], float] | None = None, **options: Unpack[LimiterOptions]
) -> RateLimiter:
    """A ``RateLimiter`` on an in-process store driven by ``clock`` (a new ``FakeClock`` at 0
    when None; reach it as ``limiter.backend.clock``). ``options`` go to ``RateLimiter``."""
    return RateLimiter(MemoryBackend(clock=_clock(clock)), **options)


def async_memory_limiter(
    clock: Callable[[], float] | None = None, **options: Unpack[LimiterOptions]
) -> AsyncRateLimiter:
    """The ``AsyncRateLimiter`` twin of ``memory_limiter`` (its clock:
    ``limiter.backend.store.clock``)."""
    return AsyncRateLimiter(MemoryBackend(clock=_clock(clock)), **options)


# -- resetting ---------------------------------------------------------------------------------
class _SyncStore(Protocol):
    """What ``reset_all`` reads of an in-process async backend's ``store`` (``MemoryBackend``)."""

    def clear_prefix(self, prefix: str) -> int: ...


def _check_limiter(limiter: object) -> None:
    if not isinstance(limiter, (RateLimiter, AsyncRateLimiter)):
        raise ConfigTypeError(
            "limiter", f"must be a RateLimiter or AsyncRateLimiter, not {limiter!r}"
        )


def _clearable(backend: object) -> None:
    if not callable(getattr(backend, "clear_prefix", None)):
        raise _cannot_clear(backend)


def _is_sync_store(store: object) -> TypeGuard[_SyncStore]:
    return callable(getattr(store, "clear_prefix", None))


def _cannot_clear(backend: object) -> ConfigTypeError:
    return ConfigTypeError("limiter", f"its backend cannot clear its keys: {backend!r}")


def reset_all(limiter: RateLimiter | AsyncRateLimiter) -> int:
    """Every bucket of ``limiter`` full again; returns how many keys went (memory: buckets
    held). An ``AsyncRateLimiter`` on Redis/Valkey needs ``areset_all``. For tests only."""
    _check_limiter(limiter)
    try:
        if isinstance(limiter, AsyncRateLimiter):
            if is_remote(limiter.backend):
                raise ConfigTypeError(
                    "limiter", "an AsyncRateLimiter on a server needs 'await areset_all(limiter)'"
                )
            # In-process (AsyncMemoryBackend): its sync store answers at once.
            store = getattr(limiter.backend, "store", None)
            if not _is_sync_store(store):
                raise _cannot_clear(store)
            return int(store.clear_prefix(limiter.prefix))
        _clearable(limiter.backend)
        return int(limiter.backend.clear_prefix(limiter.prefix))
    finally:
        limiter._forget_all()


async def areset_all(limiter: RateLimiter | AsyncRateLimiter) -> int:
    """``reset_all`` from async code, for either limiter. For tests only."""
    _check_limiter(limiter)
    if isinstance(limiter, RateLimiter) or not is_remote(limiter.backend):
        return reset_all(limiter)
    try:
        _clearable(limiter.backend)
        return int(await limiter.backend.clear_prefix(limiter.prefix))
    finally:
        limiter._forget_all()


# -- the switch --------------------------------------------------------------------------------
def disable() -> None:
    """Every limiter admits every call, touching no storage, until ``enable()``."""
    _switch.set_forced(True)


def enable() -> None:
    """Undo ``disable()`` (limiting stays off while a ``disabled()`` block is still open)."""
    _switch.set_forced(False)


def is_disabled() -> bool:
    """Whether limiting is off now."""
    return _switch.DISABLED


@contextmanager
def disabled() -> Iterator[None]:
    """``with disabled():`` limiting is off inside, and back when the block exits, also on an
    exception. Blocks nest and may overlap across threads: limiting is back once none is open.

    While off, ``try_acquire``/``acquire``/``peek`` answer admitted with every bucket full,
    decorators and web integrations let everything through, and nothing reaches the store or
    the metrics. The switch is process-wide, not per thread or task.
    """
    _switch.hold()
    try:
        yield
    finally:
        _switch.release()
