"""FastAPI overhead: one uvicorn worker serving ``_app.py``, loaded by ``tools/load_test.py`` (a
separate process) on ``/plain`` and ``/limited`` in interleaved rounds.

Besides requests per second, it reads the server process's CPU time from ``/proc`` around each
run: when the server is not near 100% of a core, the load generator (not the app) was the
bottleneck and the ratio understates the limiter's cost; CPU microseconds per request do not.

With a baseline (``run.py --baseline REV``), a second uvicorn serves the same ``_app.py`` with
that revision's tokenlimit first on ``PYTHONPATH`` (and its own Redis database, so the two never
share a bucket), and its routes, ``base/plain``, ``base/limited`` and ``base/mw/limited``, take
part in the same interleaved rounds: each server's limited / plain ratio is against its own
plain route.
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
from typing import TYPE_CHECKING, Any

from _server import free_port, stop_process

if TYPE_CHECKING:
    from _baseline import Baseline

HERE = Path(__file__).resolve().parent
LOAD_TEST = HERE.parent / "tools" / "load_test.py"
ROUTES = ("plain", "limited", "mw/limited", "leased", "headers", "floor")
BASE = "base/"  # the baseline server's routes: base/plain, base/limited, base/mw/limited
BASE_ROUTES = ("plain", "limited", "mw/limited")


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
def app_server(
    redis_url: str, log_path: Path, baseline: Baseline | None = None
) -> Iterator[tuple[str, int]]:
    """uvicorn with one worker (no supervisor: the PID is the worker) on 127.0.0.1; with a
    baseline, its tokenlimit is the one imported."""
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "_app:app",
        "--app-dir", str(HERE),
        "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    env = {**os.environ, "TOKENLIMIT_BENCH_URL": redis_url}
    cwd = None
    if baseline is not None:
        env = baseline.env(env)
        # `python -m` puts the working directory first on sys.path, before PYTHONPATH: in the
        # repository's root that would be the current tree's tokenlimit/.
        cwd = baseline.path
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
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


def _check_app(base: str, label: str, checks: list[str]) -> str:
    """The routes limit (and /tight refuses); which tokenlimit the server imported."""
    status, headers = _get(base + "/limited")
    if status != 200 or "x-ratelimit-limit" not in headers:
        raise RuntimeError(f"{label}/limited is not limited: {status} {headers}")
    checks.append(
        f"{label}/limited answers 200 with X-RateLimit-Limit {headers['x-ratelimit-limit']}"
    )
    status, headers = _get(base + "/mw/limited")
    if status != 200 or "x-ratelimit-limit" not in headers:
        raise RuntimeError(f"{label}/mw/limited is not limited: {status} {headers}")
    if not label:  # the current tree's server: its leased global limit
        status, headers = _get(base + "/leased")
        if status != 200 or "x-ratelimit-limit" not in headers:
            raise RuntimeError(f"/leased is not limited: {status} {headers}")
        # The floor sends the same fields as /leased, no more and no fewer.
        fields = {name for name in headers if "ratelimit" in name}
        status, floor = _get(base + "/headers")
        if status != 200 or {name for name in floor if "ratelimit" in name} != fields:
            raise RuntimeError(f"/headers does not send /leased's fields: {status} {floor}")
    statuses = [_get(base + "/tight")[0] for _ in range(3)]
    if statuses[0] != 200 or 429 not in statuses[1:]:
        raise RuntimeError(f"{label}/tight (1/s, burst 1) did not refuse: {statuses}")
    checks.append(f"{label}/tight (1/s, burst 1) answered {statuses}: the dependency refuses")
    with urllib.request.urlopen(base + "/_bench/tokenlimit", timeout=2) as response:
        file: str = json.load(response)["file"]
    return file


def measure_fastapi(
    redis_url: str,
    *,
    rounds: int,
    seconds: float,
    concurrency: int,
    log_path: Path,
    baseline: Baseline | None = None,
) -> dict[str, Any]:
    """Interleaved rounds on every route (of both servers); the raw samples, medians and
    checks."""
    checks: list[str] = []
    with contextlib.ExitStack() as stack:
        base, pid = stack.enter_context(app_server(redis_url, log_path))
        targets = {route: (f"{base}/{route}", pid) for route in ROUTES}
        imported = {"current": _check_app(base, "", checks)}
        if baseline is not None:
            # Database 1: the same server, but never the current tree's buckets.
            url = redis_url.rsplit("/", 1)[0] + "/1"
            old_log = log_path.with_name("uvicorn-" + baseline.rev + ".log")
            old, old_pid = stack.enter_context(app_server(url, old_log, baseline))
            file = _check_app(old, BASE.rstrip("/"), checks)
            if not Path(file).resolve().is_relative_to(baseline.path.resolve()):
                raise RuntimeError(f"the {baseline.name} server imported tokenlimit from {file}")
            imported["baseline"] = file
            for route in BASE_ROUTES:
                targets[BASE + route] = (f"{old}/{route}", old_pid)
        labels = tuple(targets)
        samples: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
        for url, _ in targets.values():  # warm-up: connections, imports, the script cache
            _load(url, min(seconds, 0.5), concurrency)
        for number in range(rounds):
            shift = number % len(labels)
            for label in labels[shift:] + labels[:shift]:
                url, server = targets[label]
                samples[label].append(_sample(url, server, seconds, concurrency))
    medians = {r: statistics.median(s["rps"] for s in samples[r]) for r in labels}

    def paired(route: str, plain: str = "plain") -> float | None:
        ratios = [
            lim["rps"] / first["rps"]
            for first, lim in zip(samples[plain], samples[route], strict=True)
            if first["rps"]
        ]
        return statistics.median(ratios) if ratios else None

    for label in labels:
        bad = [s for s in samples[label] if s["errors"] or s["refused"]]
        if bad:
            checks.append(f"/{label}: {len(bad)} run(s) had refusals or errors")
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "seconds": seconds,
        "rounds": rounds,
        "samples": samples,
        "median_rps": medians,
        "ratio_of_medians": medians["limited"] / medians["plain"] if medians["plain"] else None,
        "paired_ratio_median": paired("limited"),
        "middleware_paired_ratio_median": paired("mw/limited"),
        "leased_paired_ratio_median": paired("leased"),
        "floor_paired_ratio_median": paired("floor"),
        "headers_paired_ratio_median": paired("headers"),
        "leased_to_headers_paired_ratio_median": paired("leased", "headers"),
        "checks": checks,
    }
    if baseline is not None:
        result["imported"] = imported
        result["base_paired_ratio_median"] = paired(BASE + "limited", BASE + "plain")
        result["base_middleware_paired_ratio_median"] = paired(BASE + "mw/limited", BASE + "plain")
    return result
