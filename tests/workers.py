"""Worker functions for tests that run in other processes (importable by ``spawn`` children)."""

from __future__ import annotations

from typing import Any


def admit_many(
    url: str, key: str, rate: float, burst: int, calls: int, barrier: Any, results: Any
) -> None:
    """Build an own limiter, wait for every worker, then try ``calls`` times; report the count.

    Puts ``("ok", admitted)`` or ``("error", repr(exc))`` on ``results``.
    """
    try:
        from tokenlimit import Limit, RateLimiter

        limit = Limit(rate, burst)
        limiter = RateLimiter.from_url(url, timeout=5)
        try:
            limiter.peek(key, limit)  # connect (and load the scripts) before the race
            barrier.wait(timeout=60)
            admitted = 0
            for _ in range(calls):
                if limiter.try_acquire(key, limit).allowed:
                    admitted += 1
        finally:
            limiter.close()
        results.put(("ok", admitted))
    except BaseException as exc:
        results.put(("error", repr(exc)))
