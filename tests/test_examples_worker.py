"""examples/worker.py: acquire() paces a job loop to the vendor's limit, across workers."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

import tokenlimit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import worker


def test_worker_bursts_then_paces(url: str) -> None:
    with tokenlimit.RateLimiter.from_url(url, timeout=5) as limiter:
        calls = worker.run(limiter, 13)
    assert len(calls) == 13
    # 10 at once, then one every 0.2 s: the 13th needs 3 refills, i.e. >= 0.6 s.
    assert calls[9] < 0.5
    assert calls[12] >= 0.58
    assert calls[12] < 3.0


def test_two_workers_share_one_budget(target: object) -> None:
    url = target.url  # type: ignore[attr-defined]
    results: list[list[float]] = []
    started = time.monotonic()  # one clock for both workers

    def one() -> None:
        with tokenlimit.RateLimiter.from_url(url, timeout=5) as limiter:
            results.append(worker.run(limiter, 7, started=started))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = sorted(results[0] + results[1])
    assert len(times) == 14
    # Shared: 10 immediately, the remaining 4 need 4 refills of 0.2 s between the two workers.
    assert times[13] >= 0.78


def test_worker_gives_up_when_the_wait_exceeds_patience() -> None:
    limiter = tokenlimit.RateLimiter.from_url("memory://")
    day = tokenlimit.Limit.per_day(1000)
    limiter.try_acquire("vendor:geocoder", day, cost=1000)  # the day's budget is gone
    calls = worker.run(limiter, 3, patience=0.1)
    assert calls == []
    with pytest.raises(tokenlimit.RateLimitExceeded):
        limiter.acquire("vendor:geocoder", worker.VENDOR_LIMITS, timeout=0.1)
