"""Worker functions for tests that run in other processes (importable by ``spawn`` children)."""

from __future__ import annotations

from typing import Any


def admit_many(
    url: str,
    key: str,
    rate: float,
    burst: int,
    calls: int,
    barrier: Any,
    results: Any,
    local_cache: bool = True,
    lease: int | None = None,
) -> None:
    """Build an own limiter, wait for every worker, then try ``calls`` times; report the count.

    Puts ``("ok", admitted)`` or ``("error", repr(exc))`` on ``results``; with ``local_cache``
    off and no ``lease``, every call is a decision on the server (``lease``: the limit's).
    """
    try:
        from tokenlimit import Limit, RateLimiter

        limit = Limit(rate, burst, lease=lease)
        limiter = RateLimiter.from_url(url, timeout=5, local_cache=local_cache)
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


def admit_many_async(
    url: str,
    key: str,
    rate: float,
    burst: int,
    tasks: int,
    barrier: Any,
    results: Any,
    local_cache: bool = True,
    lease: int | None = None,
) -> None:
    """Like ``admit_many``, but ``tasks`` concurrent asyncio tasks each try once, in one
    ``AsyncRateLimiter``. Puts ``("ok", admitted)`` or ``("error", repr(exc))`` on ``results``.
    """
    try:
        import asyncio

        from tokenlimit import AsyncRateLimiter, Limit

        limit = Limit(rate, burst, lease=lease)

        async def main() -> int:
            limiter = AsyncRateLimiter.from_url(url, timeout=5, local_cache=local_cache)
            try:
                await limiter.peek(key, limit)  # connect before the race
                start = asyncio.Event()

                async def one() -> bool:
                    await start.wait()
                    return (await limiter.try_acquire(key, limit)).allowed

                running = [asyncio.create_task(one()) for _ in range(tasks)]
                await asyncio.sleep(0)  # every task now waits on ``start``
                await asyncio.to_thread(barrier.wait, 60)
                start.set()
                return sum(await asyncio.gather(*running))
            finally:
                await limiter.aclose()

        admitted = asyncio.run(main())
        results.put(("ok", admitted))
    except BaseException as exc:
        results.put(("error", repr(exc)))


def lease_then_hang(url: str, key: str, rate: float, burst: int, lease: int, results: Any) -> None:
    """Admit on a leased limit until this process holds tokens, report ``("ok", admitted,
    held)``, then hang until killed. Its hold is made long: a process killed before its hold
    ends (the settler would otherwise give them back after 100 ms, racing the kill)."""
    try:
        import time

        from tokenlimit import Limit, RateLimiter

        limit = Limit(rate, burst, lease=lease)
        limiter = RateLimiter.from_url(url, timeout=5)
        assert limiter._leases is not None
        limiter._leases.hold = 3600.0
        admitted = 0
        while limiter._leases.held() < lease // 2:
            admitted += limiter.try_acquire(key, limit).allowed
        results.put(("ok", admitted, limiter._leases.held()))
        time.sleep(3600)
    except BaseException as exc:
        results.put(("error", repr(exc), 0))
