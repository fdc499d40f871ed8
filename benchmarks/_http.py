"""FastAPI overhead: one uvicorn worker serving ``_app.py``, loaded by ``tools/load_test.py`` (a
separate process) on ``/plain`` and ``/limited`` in interleaved rounds.

Besides requests per second, it reads the server process's CPU time from ``/proc`` around each
run: when the server is not near 100% of a core, the load generator (not the app) was the
bottleneck and the ratio understates the limiter's cost; CPU microseconds per request do not.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _server import free_port, stop_process

HERE = Path(__file__).resolve().parent
LOAD_TEST = HERE.parent / "tools" / "load_test.py"
ROUTES = ("plain", "limited", "mw/limited", "floor")


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get(url: str, timeout: float = 2.0) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}


@contextlib.contextmanager
def app_server(redis_url: str, log_path: Path) -> Iterator[tuple[str, int]]:
    """uvicorn with one worker (no supervisor: the PID is the worker) on 127.0.0.1."""
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "_app:app",
        "--app-dir", str(HERE),
        "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    env = {**os.environ, "TOKENLIMIT_BENCH_URL": redis_url}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if _get(base + "/plain", timeout=1)[0] == 200:
                        break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn did not start; see {log_path}")
                time.sleep(0.1)
            yield base, process.pid
        finally:
            stop_process(process)


def _load(url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    command = [
        sys.executable, str(LOAD_TEST), "--url", url,
        "--concurrency", str(concurrency), "--seconds", str(seconds), "--json", "-",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"load_test failed ({done.returncode}): {done.stderr[-500:]}")
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def _sample(url: str, pid: int, seconds: float, concurrency: int) -> dict[str, Any]:
    cpu_before = _cpu_seconds(pid)
    result = _load(url, seconds, concurrency)
    cpu_after = _cpu_seconds(pid)
    sample = {
        "rps": result["throughput"],
        "sent": result["sent"],
        "allowed": result["allowed"],
        "refused": result["refused"],
        "errors": result["errors"],
        "elapsed": result["elapsed"],
        "p50_ms": result["latency_ms"]["p50"],
        "server_cpu": None,
        "cpu_us_per_request": None,
    }
    if cpu_before is not None and cpu_after is not None and result["sent"]:
        used = cpu_after - cpu_before
        sample["server_cpu"] = used / result["elapsed"] if result["elapsed"] else None
        sample["cpu_us_per_request"] = used / result["sent"] * 1e6
    return sample


def measure_fastapi(
    redis_url: str, *, rounds: int, seconds: float, concurrency: int, log_path: Path
) -> dict[str, Any]:
    """Interleaved rounds on both routes; the raw samples, medians and checks."""
    samples: dict[str, list[dict[str, Any]]] = {route: [] for route in ROUTES}
    checks: list[str] = []
    with app_server(redis_url, log_path) as (base, pid):
        status, headers = _get(base + "/limited")
        if status != 200 or "x-ratelimit-limit" not in headers:
            raise RuntimeError(f"/limited is not limited: {status} {headers}")
        checks.append(f"/limited answers 200 with X-RateLimit-Limit {headers['x-ratelimit-limit']}")
        status, headers = _get(base + "/mw/limited")
        if status != 200 or "x-ratelimit-limit" not in headers:
            raise RuntimeError(f"/mw/limited is not limited: {status} {headers}")
        statuses = [_get(base + "/tight")[0] for _ in range(3)]
        if statuses[0] != 200 or 429 not in statuses[1:]:
            raise RuntimeError(f"/tight (1/s, burst 1) did not refuse: {statuses}")
        checks.append(f"/tight (1/s, burst 1) answered {statuses}: the dependency refuses")
        for route in ROUTES:  # warm-up: connections, imports, the script cache
            _load(f"{base}/{route}", min(seconds, 0.5), concurrency)
        for number in range(rounds):
            shift = number % len(ROUTES)
            order = ROUTES[shift:] + ROUTES[:shift]
            for route in order:
                samples[route].append(_sample(f"{base}/{route}", pid, seconds, concurrency))
    medians = {r: statistics.median(s["rps"] for s in samples[r]) for r in ROUTES}

    def paired(route: str) -> float | None:
        ratios = [
            lim["rps"] / plain["rps"]
            for plain, lim in zip(samples["plain"], samples[route], strict=True)
            if plain["rps"]
        ]
        return statistics.median(ratios) if ratios else None

    for route in ROUTES:
        bad = [s for s in samples[route] if s["errors"] or s["refused"]]
        if bad:
            checks.append(f"/{route}: {len(bad)} run(s) had refusals or errors")
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "rounds": rounds,
        "samples": samples,
        "median_rps": medians,
        "ratio_of_medians": medians["limited"] / medians["plain"] if medians["plain"] else None,
        "paired_ratio_median": paired("limited"),
        "middleware_paired_ratio_median": paired("mw/limited"),
        "floor_paired_ratio_median": paired("floor"),
        "checks": checks,
    }
