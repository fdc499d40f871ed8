"""``tokenlimit bench URL``: sync decisions per second and their latency against this server,
beside redis-py's floor (``EVALSHA`` of ``return 1``, one key, the same client options), as
``benchmarks/`` measures it; one thread, the two sides interleaved in rounds."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import time
from collections.abc import Callable

from tokenlimit._errors import BackendError
from tokenlimit._limit import Limit
from tokenlimit._request import build_request

from .common import EXIT_USAGE, Output, Problem, client_of, latency, limiter_for, scratch_key

__all__ = ["SCRATCH", "run"]

# Never refuses at a rate one client reaches, and its key expires within a second.
SCRATCH = Limit(1_000_000, 1_000_000)
FLOOR_SCRIPT = "return 1"


def _timed(call: Callable[[], object], seconds: float, samples: list[float]) -> float:
    """Call back to back for ``seconds``, adding each call's time to ``samples``; return the
    time spent in all."""
    clock = time.perf_counter
    now = started = clock()
    end = started + seconds
    while now < end:
        before = now
        call()
        now = clock()
        samples.append(now - before)
    return now - started


def run(url: str, args: argparse.Namespace, out: Output) -> None:
    seconds = float(args.seconds)
    if not 0 < seconds <= 3600:
        raise Problem(EXIT_USAGE, f"--seconds: must be more than 0 and at most 3600, not {seconds}")
    key = scratch_key("bench")
    samples: dict[str, list[float]] = {"tokenlimit": [], "floor": []}
    spent = dict.fromkeys(samples, 0.0)
    # Interleaved, each side first in every other round: a machine whose load changes during
    # the run changes both sides alike.
    rounds = max(2, min(20, round(seconds)))
    with limiter_for(url, args) as limiter:
        client = client_of(limiter)
        bucket = build_request(args.prefix, key, SCRATCH).keys[0]  # the floor's key: the same node
        sha = hashlib.sha1(FLOOR_SCRIPT.encode()).hexdigest()
        calls: dict[str, Callable[[], object]] = {
            "tokenlimit": lambda: limiter.try_acquire(key, SCRATCH),
            "floor": lambda: client.evalsha(sha, 1, bucket),
        }
        try:
            client.eval(FLOOR_SCRIPT, 1, bucket)  # in the script cache from here on
            for call in calls.values():  # connections made, scripts loaded
                _timed(call, min(0.2, seconds / 10), [])
            for index in range(rounds):
                for name in sorted(calls, reverse=index % 2 == 1):
                    spent[name] += _timed(calls[name], seconds / (2 * rounds), samples[name])
        finally:
            with contextlib.suppress(BackendError):  # it expires within a second anyway
                limiter.reset(key, SCRATCH)
    rates = {name: len(samples[name]) / spent[name] for name in samples}
    times = {name: latency(samples[name]) for name in samples}
    ratio = rates["tokenlimit"] / rates["floor"]
    for name, unit, note in (
        ("tokenlimit", "decisions/s", ""),
        ("floor", "EVALSHA/s", " (redis-py, EVALSHA of 'return 1')"),
    ):
        out.row(
            name,
            f"{rates[name]:,.0f} {unit}, p50 {times[name]['p50_ms']:.3f} ms, "
            f"p99 {times[name]['p99_ms']:.3f} ms{note}",
        )
        count = len(samples[name])
        out.set(**{name: {"per_second": round(rates[name], 1), "calls": count, **times[name]}})
    out.row(
        "ratio", f"{ratio:.2f}x the floor's rate (sync, one thread, {seconds:g} s, {rounds} rounds)"
    )
    out.set(seconds=seconds, rounds=rounds, ratio=round(ratio, 4))
