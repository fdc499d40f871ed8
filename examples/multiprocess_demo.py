"""Several processes, one budget: the limit holds across processes because Redis decides.

    python examples/multiprocess_demo.py [--processes 4] [--seconds 3]

Uses $TOKENLIMIT_URL if set, else starts an embedded Valkey (pip install 'tokenlimit[demo]').
Each process hammers the same API key as fast as it can; the report compares what was admitted
with what the policy allows (burst + rate x elapsed) and exits non-zero if the limit leaked.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenlimit import Limit, RateLimiter

POLICY = Limit(rate=10, burst=20, name="demo")  # 10 requests/s per key, bursts of 20
KEY = "apikey:demo"


def worker(url: str, start_at: float, seconds: float, results: mp.Queue) -> None:  # type: ignore[type-arg]
    limiter = RateLimiter.from_url(url, timeout=2.0)
    admitted = refused = 0
    while time.time() < start_at:
        time.sleep(0.001)
    end = start_at + seconds
    while time.time() < end:
        if limiter.try_acquire(KEY, POLICY).allowed:
            admitted += 1
        else:
            refused += 1
    limiter.close()
    results.put((os.getpid(), admitted, refused))


@contextlib.contextmanager
def server() -> Iterator[str]:
    url = os.environ.get("TOKENLIMIT_URL")
    if url:
        yield url
        return
    from embedded import embedded_valkey

    with embedded_valkey() as url:
        yield url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    with server() as url:
        RateLimiter.from_url(url).reset(KEY, POLICY)
        ctx = mp.get_context("spawn")
        results: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        start_at = time.time() + 1.5  # let every process import and connect first
        procs = [
            ctx.Process(target=worker, args=(url, start_at, args.seconds, results))
            for _ in range(args.processes)
        ]
        for p in procs:
            p.start()
        rows = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()

    admitted = sum(r[1] for r in rows)
    refused = sum(r[2] for r in rows)
    allowed_max = POLICY.burst + int(POLICY.rate * args.seconds)
    print(f"policy: {POLICY.rate:g}/s, burst {POLICY.burst}, shared by {len(rows)} processes")
    print(f"{'pid':>8} {'admitted':>9} {'refused':>9}")
    for pid, a, r in sorted(rows):
        print(f"{pid:>8} {a:>9} {r:>9}")
    print(f"{'total':>8} {admitted:>9} {refused:>9}")
    budget = f"burst {POLICY.burst} + {POLICY.rate:g}/s x {args.seconds:g}s"
    print(f"policy allows at most {allowed_max} ({budget}); admitted {admitted}")
    if admitted > allowed_max + 1:  # +1: a token may refill in the last instant
        print("FAIL: the limit leaked", file=sys.stderr)
        return 1
    print("OK: the processes shared one budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
