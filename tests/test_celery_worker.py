"""RateLimitedTask in a real Celery worker: 4 prefork processes, broker and result backend on the
suite's Valkey. Tasks enqueued at once run within the global limit, each exactly once."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")

import celery
import conftest
import kombu
import kombu.pools
import redis
from conftest import FLAVOURS

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow
VALKEY = "valkey" if "valkey" in FLAVOURS else FLAVOURS[0]  # the suite's embedded server


def _stop(worker: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM to the worker (a warm shutdown), SIGKILL to its process group after ``grace``."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(worker.pid, signal.SIGKILL)  # its pool's children too, if any are left
    except ProcessLookupError:
        pass
    worker.wait(5)


@pytest.fixture(scope="module")
def celery_env(
    testbed: conftest.TestBed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The test app's module, and a worker of 4 processes serving it; stopped at the end."""
    target = testbed.get("standalone", VALKEY)
    target.flush()
    server = target.url.rsplit("/", 1)[0]
    os.environ["TOKENLIMIT_CELERY_URL"] = server
    sys.path.insert(0, str(TESTS))
    import celery_app

    log = tmp_path_factory.mktemp("celery") / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "celery_app", "worker",
        "--pool", "prefork", "--concurrency", "4", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", "tokenlimit@%h",
    ]  # fmt: skip
    with log.open("wb") as out:
        worker = subprocess.Popen(
            command,
            cwd=TESTS,
            env={**os.environ, "TOKENLIMIT_CELERY_URL": server, "PYTHONPATH": str(TESTS)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped whole, whatever happens
        )
    try:
        deadline = time.monotonic() + 60
        while not celery_app.app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{log.read_text()[-3000:]}")
        yield celery_app
    finally:
        # Results the tests read unsubscribe when collected: now, while the server is up
        # (Celery < 5.5 retries for minutes when the server is gone by then).
        gc.collect()
        _stop(worker)
        celery_app.app.close()
        # kombu's process-wide pools hold the client's broker connections, and close them in
        # any child this process forks later (multiprocessing's after-fork hooks), reading a
        # reply on a socket shared with this process: close them here, once.
        kombu.pools.reset()
        celery_app.limiter.close()
        celery_app.store.close()
        os.environ.pop("TOKENLIMIT_CELERY_URL", None)
        sys.path.remove(str(TESTS))
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def _runs(store: redis.Redis, kind: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in store.lrange("runs", 0, -1) if kind in raw.decode()]


def _reset(app: Any) -> None:
    app.store.delete("runs", "deferrals")
    for key in app.store.scan_iter("tl:*"):
        app.store.delete(key)


def test_tasks_enqueued_at_once_share_one_budget(celery_env: Any) -> None:
    app = celery_env
    _reset(app)
    n = 30
    results = [app.call_vendor.apply_async(("acme", i)) for i in range(n)]
    values = [result.get(timeout=60) for result in results]
    assert sorted(values) == list(range(n))  # none lost

    runs = _runs(app.store, "call")
    ids = [run["id"] for run in runs]
    assert len(runs) == n  # each ran exactly once
    assert len(set(ids)) == n
    assert set(ids) == {result.id for result in results}
    assert {run["retries"] for run in runs} == {0}  # refusals took none of max_retries=0
    assert len({run["pid"] for run in runs}) > 1  # several processes shared the budget
    assert {run["redis_py"] for run in runs} == {redis.__version__}  # on tokenlimit's redis-py

    # Within the policy over every window: k admissions between two of them, dt apart, never
    # exceed burst + rate * dt. The slack covers the moment between a decision and the
    # body's reading of the clock on a loaded machine; a per-process limit would be 4x over.
    times = sorted(run["at"] for run in runs)
    worst = 0.0
    for i in range(n):
        for j in range(i, n):
            allowed = app.BURST + app.RATE * (times[j] - times[i])
            worst = max(worst, (j - i + 1) - allowed)
    assert worst <= 1 + app.RATE * 0.25, worst

    elapsed = times[-1] - times[0]
    after_burst = (n - app.BURST) / elapsed  # admissions per second once the burst is spent
    deferrals = int(app.store.get("deferrals") or 0)
    print(
        f"\nCelery {celery.__version__}, kombu {kombu.__version__}, redis-py {redis.__version__}: "
        f"{n} tasks, policy {app.RATE:g}/s burst {app.BURST}: {elapsed:.2f}s from first to "
        f"last admission, {after_burst:.2f} admissions/s after the burst, worst window "
        f"{worst:+.2f} tokens vs burst + rate x dt, {deferrals} deferrals"
    )
    assert elapsed >= (n - app.BURST) / app.RATE - 0.5
    assert app.RATE * 0.5 <= after_burst <= app.RATE * 1.1
    assert deferrals >= n - app.BURST  # every task past the burst was put off at least once


def test_a_tasks_own_retries_still_count(celery_env: Any) -> None:
    app = celery_env
    _reset(app)
    results = [app.flaky.apply_async() for _ in range(2)]  # 1/second: runs are put off
    assert [result.get(timeout=60) for result in results] == [1, 1]
    runs = _runs(app.store, "flaky")
    # Each task ran twice, its own retry (max_retries=1) between, however often it was refused.
    assert sorted(run["retries"] for run in runs) == [0, 0, 1, 1]
    assert int(app.store.get("deferrals") or 0) >= 1
