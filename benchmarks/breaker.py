"""What the circuit breaker does to latency with a hung server, and how soon decisions resume.

    python benchmarks/breaker.py                  # default deadline (0.5 s) and breaker
    python benchmarks/breaker.py --timeout 0.1 --calls 200

Starts its own Valkey (``_server.valkey_server``) behind the test suite's fault proxy
(``tests/faultproxy.py``), then for each failure mode, sync and async: decides on a warm
connection, black-holes the server (the proxy reads and never answers) and times each call;
heals it and times how long until a decision comes from the server again. The same with
``breaker=False``, for comparison. Prints one table row per run (Markdown); takes about
``2 x 3 x 2 x (threshold x timeout + cool-down)`` seconds, well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

from _server import valkey_server  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402

from tokenlimit import AsyncRateLimiter, BackendError, Decision, Limit, RateLimiter  # noqa: E402

LIMIT = Limit(0.001, 1_000_000)  # nothing refused: a decision's limit says where it was made


def _row(label: str, latencies: list[float], threshold: int, resumed: float) -> str:
    first, rest = latencies[:threshold], latencies[threshold:]
    return (
        f"| {label} | {statistics.median(first) * 1e3:.1f} ms | "
        f"{statistics.median(rest) * 1e3:.3f} ms | {max(rest) * 1e3:.1f} ms | {resumed:.2f} s |"
    )


def _on_server(decision: Decision | None, limiter: RateLimiter | AsyncRateLimiter) -> bool:
    """Decided by the server, with the circuit closed (open mode admits undecided calls at the
    same limit, so the circuit's state tells them apart)."""
    return decision is not None and not limiter._circuit.tripped


def run_sync(url: str, mode: str, breaker: bool, timeout: float, calls: int) -> str:
    options: dict[str, Any] = {"timeout": timeout, "failure_mode": mode, "breaker": breaker}
    if mode == "local":
        options["expected_processes"] = 2
    host, port = url.split("//")[1].split("/")[0].split(":")
    with FaultProxy(int(port), host) as proxy, RateLimiter.from_url(proxy.url, **options) as lim:

        def call() -> Decision | None:
            try:
                return lim.try_acquire("k", LIMIT)
            except BackendError:
                return None

        while not _on_server(call(), lim):
            time.sleep(0.05)
        proxy.blackhole()
        latencies = []
        for _ in range(calls):
            started = time.monotonic()
            call()
            latencies.append(time.monotonic() - started)
        proxy.heal()
        healed = time.monotonic()
        while not _on_server(call(), lim):
            time.sleep(0.002)
        resumed = time.monotonic() - healed
    threshold = lim._circuit.threshold if breaker else 1
    return _row(f"{mode}, sync, breaker={breaker}", latencies, int(threshold), resumed)


def run_async(url: str, mode: str, breaker: bool, timeout: float, calls: int) -> str:
    options: dict[str, Any] = {"timeout": timeout, "failure_mode": mode, "breaker": breaker}
    if mode == "local":
        options["expected_processes"] = 2
    host, port = url.split("//")[1].split("/")[0].split(":")

    async def main() -> tuple[list[float], float, float]:
        with FaultProxy(int(port), host) as proxy:
            async with AsyncRateLimiter.from_url(proxy.url, **options) as lim:

                async def call() -> Decision | None:
                    try:
                        return await lim.try_acquire("k", LIMIT)
                    except BackendError:
                        return None

                async def timed(made: Callable[[], Awaitable[Any]]) -> float:
                    started = time.monotonic()
                    await made()
                    return time.monotonic() - started

                while not _on_server(await call(), lim):
                    await asyncio.sleep(0.05)
                proxy.blackhole()
                latencies = [await timed(call) for _ in range(calls)]
                proxy.heal()
                healed = time.monotonic()
                while not _on_server(await call(), lim):
                    await asyncio.sleep(0.002)
                return latencies, time.monotonic() - healed, lim._circuit.threshold

    latencies, resumed, threshold = asyncio.run(main())
    return _row(
        f"{mode}, async, breaker={breaker}", latencies, int(threshold) if breaker else 1, resumed
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=0.5, help="the limiter's deadline (s)")
    parser.add_argument("--calls", type=int, default=100, help="calls while the server hangs")
    args = parser.parse_args()
    # The table only: the limiter's warnings and the proxy's shutdown noise are expected here.
    logging.getLogger("tokenlimit").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    print(
        "| run | added latency, first calls (median) | then (median) | then (max) "
        "| resumed after healing |"
    )
    print("| --- | --- | --- | --- | --- |")
    with valkey_server() as url:
        for breaker in (True, False):
            for mode in ("closed", "open", "local"):
                calls = args.calls if breaker else 4  # without it, every call waits
                for run in (run_sync, run_async):
                    print(run(url, mode, breaker, args.timeout, calls), flush=True)


if __name__ == "__main__":
    main()
