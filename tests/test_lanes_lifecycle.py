"""The sync lean path's held connections (``_redis._Lanes``) over a limiter's life: in a forked
child, when the limiter closes under threads mid-decision, and when cluster nodes are replaced."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any

from tokenlimit import Limit, RateLimiter

SLOW = 0.001  # tokens per second: no refill worth speaking of during a test
CHILD_WAIT = 10.0  # seconds a forked child gets to decide (its limiter's deadline is 5)


def in_forked_child(body: Callable[[], bool]) -> int | None:
    """Run ``body`` in a child forked from this process; its exit code (0: ``body`` returned
    True), or None if it did not end in time (then it is killed)."""

    def main() -> None:
        try:
            ok = body()
        except BaseException:  # any failure: the exit code reports it
            os._exit(2)
        os._exit(0 if ok else 1)

    child = multiprocessing.get_context("fork").Process(target=main)
    child.start()
    child.join(CHILD_WAIT)
    if child.is_alive():
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        return None
    return child.exitcode


# -- fork -------------------------------------------------------------------------------------
def test_a_forked_child_decides_while_the_parent_held_the_lanes_lock(standalone: Any) -> None:
    """A lock held at fork time (by another thread of the parent) stays held in the child
    forever: the child's lanes must not wait on it."""
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(standalone.url, timeout=5.0, local_cache=False) as limiter:
        for _ in range(2):  # the first lends its connection to the server check
            assert limiter.try_acquire("fork:lock", limit).allowed
        lanes = limiter.backend._lanes  # type: ignore[attr-defined]

        def decide() -> bool:
            decision = limiter.try_acquire("fork:lock", limit)
            return decision.allowed and decision.remaining == 2

        with lanes._lock:
            code = in_forked_child(decide)
        assert code is not None, "the child hung on the lock its parent held at fork time"
        assert code == 0


def test_a_forked_child_keeps_its_connection_for_its_next_decision(standalone: Any) -> None:
    """A caller of the parent waiting in the pool at fork time does not exist in the child:
    the child's lanes keep the connection of its decision instead of handing it back."""
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(standalone.url, timeout=5.0, local_cache=False) as limiter:
        for _ in range(2):
            assert limiter.try_acquire("fork:waiting", limit).allowed
        lanes = limiter.backend._lanes  # type: ignore[attr-defined]

        def decide() -> bool:
            decision = limiter.try_acquire("fork:waiting", limit)
            return decision.allowed and len(lanes._free) == 1

        with lanes.waiting():  # as a parent thread waiting in the pool would be
            code = in_forked_child(decide)
        assert code == 0
