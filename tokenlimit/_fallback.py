"""``failure_mode="local"``: while storage is down, each process decides in memory at its share
of every limit, and goes back to the shared buckets once the server answers again.

- A share: ``rate / N`` and ``burst // N`` tokens (at least 1), ``N`` being
  ``expected_processes``, so N processes together never exceed the policy unless the burst
  was smaller than N. A call costing more than a share's burst is admitted only when that
  local bucket is full (the share's burst is then the cost): slowly, never forever refused.
  A share keeps the limit's label as its name, so headers and metrics keep their series.
- To local: a decision (or ``hold_back``) that fails with ``BackendError``; that call is
  decided locally. While local, at most one call per ``PROBE_INTERVAL`` (the probe) tries the
  server, every other call is decided locally at once: a hung server adds at most one
  deadline per interval and limiter, never one per call.
- Back to shared: the first decision the server answers (a probe's, or one sent before the
  switch); it is the server's decision.
- The local buckets live as long as the limiter, refilling as buckets do (a server that
  flaps does not hand out a fresh share each time); at most ``MAX_LOCAL_KEYS`` are kept.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from ._limit import _MAX_FILL_SECONDS, Limit
from ._memory import MemoryBackend
from ._request import Request

__all__ = ["MAX_LOCAL_KEYS", "PROBE_INTERVAL", "LocalFallback", "share"]

PROBE_INTERVAL = 1.0  # seconds between two tries of the server while deciding locally
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
    """The local mode of one limiter: whether it decides locally, when it tries the server
    again, and the in-process buckets it decides with. Thread-safe; never awaits."""

    __slots__ = ("_clock", "_lock", "_probe_at", "_shares", "local", "processes", "store")

    def __init__(self, processes: int, *, clock: Callable[[], float] | None = None) -> None:
        self.processes = processes
        self._clock = clock or time.monotonic
        self.store = MemoryBackend(clock=self._clock, max_keys=MAX_LOCAL_KEYS)
        self._lock = threading.Lock()
        self.local = False  # read without the lock: a stale read costs one call's routing
        self._probe_at = -math.inf
        self._shares: dict[tuple[Limit, int], Limit] = {}

    # -- routing ----------------------------------------------------------------------------
    def skips_server(self) -> bool:
        """While local: True unless this call is the probe (the first since the interval
        passed; the next probe is due an interval later, whatever this one's outcome)."""
        with self._lock:
            now = self._clock()
            if now < self._probe_at:
                return True
            self._probe_at = now + PROBE_INTERVAL
            return False

    def failed(self) -> bool:
        """A call to the server failed: decide locally, next probe an interval from now.
        True if this switched to local."""
        with self._lock:
            self._probe_at = self._clock() + PROBE_INTERVAL
            switched = not self.local
            self.local = True
            return switched

    def answered(self) -> bool:
        """The server answered a decision: back to the shared buckets. True if this switched."""
        with self._lock:
            switched = self.local
            self.local = False
            return switched

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
