"""The fleet simulation of issue 18: processes sharing one global, leased limit.

``simulate``: ``processes`` processes (each its own ``RateLimiter``, one thread deciding back to
back) share one key for ``seconds`` on ``Limit(rate, burst, lease=lease)``. The bucket starts
full, so at most ``burst + rate * T`` can be admitted in the window T from the start to the last
decision (the allowance); the run reports how many were, the tokens the processes gave back
(with a refill or when their hold ended, and on close), and how many store calls it took.

``killed``: one process decides back to back on a leased limit that does not refill, and is
SIGKILLed mid-run; the bucket then lacks exactly the tokens it held: at most one lease.

Children start with ``spawn`` and import this module (its directory is on ``sys.path``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from typing import Any


def _decide_until(
    url: str,
    key: str,
    limit_args: tuple[float, int, int],
    start: Any,
    seconds: float,
    results: Any,
    counter: Any,
) -> None:
    """A fleet member: wait for ``start``, decide until ``seconds`` after it, close (giving
    held tokens back), report. ``counter``: admissions so far, for a SIGKILLed member."""
    try:
        from tokenlimit import Limit, RateLimiter

        rate, burst, lease = limit_args
        limit = Limit(rate, burst, lease=lease)
        limiter = RateLimiter.from_url(url, timeout=5)
        limiter.peek(key, limit)  # connect and load the scripts before the start
        table = limiter._leases
        assert table is not None
        start.wait(60)
        end = time.time() + seconds
        admitted = decisions = 0
        last = time.time()
        while True:
            for _ in range(64):
                if limiter.try_acquire(key, limit).allowed:
                    admitted += 1
                    counter.value = admitted
            decisions += 64
            last = time.time()
            if last >= end:
                break
        limiter.close()
        results.put(("ok", admitted, decisions, last, table.returned, table.granted_extra))
    except BaseException as exc:
        results.put(("error", repr(exc), 0, 0.0, 0, 0))


def _script_calls(url: str) -> int:
    import redis

    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return sum(
        int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval")
    )


def simulate(
    url: str,
    *,
    processes: int = 8,
    seconds: float = 10.0,
    rate: float = 20_000.0,
    burst: int = 2_000,
    lease: int = 100,
) -> dict[str, Any]:
    """The fleet on one key: admitted against the allowance, tokens given back, store calls."""
    from tokenlimit import Limit, RateLimiter

    ctx = multiprocessing.get_context("spawn")
    key = f"fleet:{uuid.uuid4().hex}"
    start = ctx.Event()
    results = ctx.Queue()
    counters = [ctx.RawValue("q", 0) for _ in range(processes)]
    procs = [
        ctx.Process(
            target=_decide_until,
            args=(url, key, (rate, burst, lease), start, seconds, results, counters[i]),
        )
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    time.sleep(1.0 + 0.2 * processes)  # every child imported tokenlimit and connected
    calls_before = _script_calls(url)
    with RateLimiter.from_url(url, timeout=5) as check:
        check.reset(key, Limit(rate, burst))  # full at the start
        started = time.time()
        start.set()
        try:
            outcomes = [results.get(timeout=seconds + 60) for _ in procs]
        finally:
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        calls = _script_calls(url) - calls_before
    errors = [o[1] for o in outcomes if o[0] != "ok"]
    if errors:
        return {"error": errors[0][:200]}
    admitted = sum(o[1] for o in outcomes)
    window = max(o[3] for o in outcomes) - started
    allowance = burst + rate * window
    return {
        "processes": processes,
        "seconds": seconds,
        "limit": {"rate": rate, "burst": burst, "lease": lease},
        "window": window,
        "allowance": allowance,
        "admitted": admitted,
        "admitted_share": admitted / allowance,
        "decisions": sum(o[2] for o in outcomes),
        "returned": sum(o[4] for o in outcomes),
        "granted_extra": sum(o[5] for o in outcomes),
        "script_calls": calls,
        "over": admitted > allowance,
        "within_1pct": allowance * 0.99 <= admitted <= allowance,
    }


def killed(url: str, *, lease: int = 100, seconds: float = 1.0) -> dict[str, Any]:
    """One member SIGKILLed mid-run on a bucket that does not refill: the tokens it lost."""
    from tokenlimit import Limit, RateLimiter

    rate, burst = 1e-4, 1_000_000  # one token per 10,000 s: nothing refills meanwhile
    ctx = multiprocessing.get_context("spawn")
    key = f"killed:{uuid.uuid4().hex}"
    start = ctx.Event()
    results = ctx.Queue()
    counter = ctx.RawValue("q", 0)
    proc = ctx.Process(
        target=_decide_until,
        args=(url, key, (rate, burst, lease), start, 3600.0, results, counter),
    )
    proc.start()
    time.sleep(1.5)
    start.set()
    time.sleep(seconds)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    with RateLimiter.from_url(url, timeout=5, local_cache=False) as check:
        left = check.peek(key, Limit(rate, burst)).remaining
    admitted = int(counter.value)
    # A kill between an admission and its count adds one: the bound is the lease plus one.
    return {"lease": lease, "admitted": admitted, "lost": burst - left - admitted}
