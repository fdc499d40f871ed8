"""One command: a Celery worker of several processes runs examples/celery_tasks.py's vendor calls
within one budget per vendor.

    python examples/celery_demo.py [--tasks 20] [--concurrency 4]

Uses $TOKENLIMIT_URL if set, else starts an embedded Valkey (pip install 'tokenlimit[demo,celery]').
Enqueues ``--tasks`` geocode tasks for each of two vendors at once, waits for every result, and
reports each vendor's admissions per second against its policy; exits non-zero if a task was
lost or ran twice, or if admissions ever exceeded burst + rate x elapsed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tokenlimit import Limit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VENDORS = ("acme", "globex")
SLACK = 1.0  # tokens: a decision and the body's reading of the clock are a moment apart


@contextlib.contextmanager
def server() -> Iterator[str]:
    url = os.environ.get("TOKENLIMIT_URL")
    if url:
        yield url
        return
    from embedded import embedded_valkey

    with embedded_valkey() as url:
        yield url


@contextlib.contextmanager
def worker(url: str, concurrency: int) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A celery_tasks worker`` with ``concurrency`` processes, stopped on exit:
    SIGTERM (a warm shutdown), then SIGKILL to its process group after 15 s."""
    command = [
        sys.executable, "-m", "celery", "-A", "celery_tasks", "--quiet", "worker",
        "--pool", "prefork", "--concurrency", str(concurrency), "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    env = {**os.environ, "TOKENLIMIT_URL": url, "PYTHONPATH": str(HERE)}
    process = subprocess.Popen(command, cwd=HERE, env=env, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def within_policy(times: list[float], rate: float, burst: int) -> float:
    """The most admissions over burst + rate x (window) in any window between two of them."""
    worst = 0.0
    for i in range(len(times)):
        for j in range(i, len(times)):
            worst = max(worst, (j - i + 1) - (burst + rate * (times[j] - times[i])))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20, help="tasks per vendor")
    parser.add_argument("--concurrency", type=int, default=4, help="worker processes")
    args = parser.parse_args()

    with server() as url:
        os.environ["TOKENLIMIT_URL"] = url
        import celery_tasks

        rate, burst = celery_tasks.VENDOR_RATE, celery_tasks.VENDOR_BURST
        celery_tasks.calls.delete(*(f"demo:calls:{vendor}" for vendor in VENDORS))
        for vendor in VENDORS:
            celery_tasks.limiter.reset(f"vendor:{vendor}", Limit(rate, burst))
        with worker(url, args.concurrency) as process:
            deadline = time.monotonic() + 60
            while not celery_tasks.app.control.ping(timeout=0.5):
                if process.poll() is not None or time.monotonic() > deadline:
                    print("FAIL: the worker did not start", file=sys.stderr)
                    return 1
            started = time.monotonic()
            results = [
                celery_tasks.geocode.delay(vendor, f"{n} Main St")
                for n in range(args.tasks)
                for vendor in VENDORS
            ]
            done = [result.get(timeout=120) for result in results]
            took = time.monotonic() - started
            runs = {
                vendor: [line.decode().split() for line in celery_tasks.calls.lrange(key, 0, -1)]
                for vendor in VENDORS
                if (key := f"demo:calls:{vendor}")
            }
            # A result unsubscribes when collected: now, while the server is up (Celery < 5.5
            # would retry for minutes at exit, the server gone).
            del results
            gc.collect()

    print(
        f"{len(done)} tasks for {len(VENDORS)} vendors on {args.concurrency} worker processes, "
        f"{took:.1f}s; policy per vendor: {rate}/s, burst {burst}"
    )
    ok = True
    for vendor, rows in runs.items():
        ids = [task_id for task_id, _ in rows]
        times = sorted(float(at) for _, at in rows)
        elapsed = times[-1] - times[0] if times else 0.0
        per_second = (len(times) - burst) / elapsed if elapsed else 0.0
        over = within_policy(times, rate, burst)
        print(
            f"  {vendor}: {len(ids)} calls ({len(set(ids))} distinct tasks) in {elapsed:.2f}s; "
            f"{per_second:.2f}/s after the burst (policy {rate}/s); "
            f"worst window {over:+.2f} tokens against burst + rate x elapsed"
        )
        if len(ids) != args.tasks or len(set(ids)) != args.tasks:
            print(f"FAIL: {vendor}: a task was lost or ran twice", file=sys.stderr)
            ok = False
        if over > SLACK:
            print(f"FAIL: {vendor}: the limit leaked", file=sys.stderr)
            ok = False
    if ok:
        print("OK: every task ran once, and each vendor's calls stayed within its budget")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
