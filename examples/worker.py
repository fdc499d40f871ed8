"""A job worker that stays under a third-party API's limit, shared by every worker process.

    python examples/worker.py [--jobs 30] [--url redis://localhost:6379/0]

The vendor allows 5 calls per second with bursts of 10, and 1,000 per day per account; every
worker that runs this loop draws from the same buckets, because Redis decides. ``acquire()``
waits for a token instead of failing, and gives up (RateLimitExceeded) only when the wait would
be longer than the job's own patience.
"""

from __future__ import annotations

import argparse
import os
import time

from tokenlimit import Limit, RateLimiter, RateLimitExceeded

VENDOR_LIMITS = [Limit.per_second(5, burst=10, name="vendor-rate"), Limit.per_day(1000)]


def call_vendor_api(job: int) -> str:
    """Stand-in for the real HTTP call to the vendor."""
    return f"result-{job}"


def run(
    limiter: RateLimiter, jobs: int, *, patience: float = 5.0, started: float | None = None
) -> list[float]:
    """Process ``jobs`` jobs; return when each vendor call was made, in seconds since
    ``started`` (a ``time.monotonic()`` reading; default: now)."""
    started = time.monotonic() if started is None else started
    calls = []
    for job in range(jobs):
        try:
            limiter.acquire("vendor:geocoder", VENDOR_LIMITS, timeout=patience)
        except RateLimitExceeded as exc:
            print(f"job {job}: vendor budget exhausted, retry in {exc.retry_after:.1f}s")
            continue
        call_vendor_api(job)
        calls.append(time.monotonic() - started)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--url", default=os.environ.get("TOKENLIMIT_URL", "memory://"))
    args = parser.parse_args()
    with RateLimiter.from_url(args.url) as limiter:
        calls = run(limiter, args.jobs)
    elapsed = calls[-1] if calls else 0.0
    print(f"{len(calls)} vendor calls in {elapsed:.2f}s (10 at once, then 5 per second)")


if __name__ == "__main__":
    main()
