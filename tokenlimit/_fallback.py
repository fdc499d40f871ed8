"""``failure_mode="local"``: while storage is down, each process decides in memory at its share
of every limit.

- A share: ``rate / N`` and ``burst // N`` tokens (at least 1), ``N`` being
  ``expected_processes``, so N processes together never exceed the policy unless the burst
  was smaller than N. A call costing more than a share's burst is admitted only when that
  local bucket is full (the share's burst is then the cost): slowly, never forever refused.
  A share keeps the limit's label as its name, so headers and metrics keep their series.
- When: a call that fails with ``BackendError``, and every call the circuit breaker keeps from
  the server (``_breaker.py`` decides which calls go to the server, in every failure mode).
- The local buckets live as long as the limiter, refilling as buckets do (a server that
  flaps does not hand out a fresh share each time); at most ``MAX_LOCAL_KEYS`` are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ._limit import _MAX_FILL_SECONDS, Limit
from ._memory import MemoryBackend
from ._request import Request

__all__ = ["MAX_LOCAL_KEYS", "LocalFallback", "share"]

MAX_LOCAL_KEYS = 100_000  # local buckets kept at most (about 27 MB; docs/reliability.md)
_MAX_SHARES = 4096  # shares kept made; emptied when full, as choosers may make limits


def share(limit: Limit, processes: int, cost: int = 1) -> Limit:
    """One process's share of ``limit``: ``rate / processes``, ``burst // processes`` (at
    least 1, and at least ``cost``), named by ``limit``'s label. Never slower than a ``Limit``
    may refill (a burst of 1 out of a tiny rate could take over 1e12 s to fill)."""
    burst = max(1, limit.burst // processes, cost)
    # The slowest rate that fills ``burst`` within the bound a Limit checks, with room for
    # the interval's rounding up to whole nanoseconds.
    slowest = burst / _MAX_FILL_SECONDS * (1 + 1e-6)
    return Limit(max(limit.rate / processes, slowest), burst, name=limit.label)


class LocalFallback:
    """The in-process buckets one limiter decides with while the server does not, at this
    process's share of each limit. Thread-safe (the memory store is); never awaits."""

    __slots__ = ("_shares", "processes", "store")

    def __init__(self, processes: int, *, clock: Callable[[], float] | None = None) -> None:
        self.processes = processes
        self.store = MemoryBackend(clock=clock or time.monotonic, max_keys=MAX_LOCAL_KEYS)
        self._shares: dict[tuple[Limit, int], Limit] = {}

    # -- local buckets ------------------------------------------------------------------------
    def localized(self, request: Request) -> Request:
        """``request`` against this process's shares (same keys: the store is this limiter's)."""
        cost = request.cost
        limits = tuple(self._share(limit, cost) for limit in request.limits)
        return request._replace(limits=limits)

    def _share(self, limit: Limit, cost: int) -> Limit:
        made = self._shares.get((limit, cost))
        if made is None:
            if len(self._shares) >= _MAX_SHARES:
                self._shares.clear()
            made = self._shares[limit, cost] = share(limit, self.processes, cost)
        return made

    def forget(self, request: Request) -> None:
        """After ``reset``: the local buckets are full again too."""
        self.store.reset(request)

    def clear(self) -> None:
        self.store.clear()
