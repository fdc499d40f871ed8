"""The Celery app tests/test_celery.py runs in a real worker (``celery -A celery_app worker``).

``TOKENLIMIT_CELERY_URL`` is a server's ``redis://host:port`` URL: database 1 is the broker and
the result backend, database 0 holds the buckets and what the tasks record.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

from tokenlimit import Limit, RateLimiter
from tokenlimit.integrations.celery import RateLimitedTask

SERVER = os.environ.get("TOKENLIMIT_CELERY_URL", "redis://127.0.0.1:6379").rstrip("/")
RATE, BURST = 5.0, 5
VENDOR_LIMIT = Limit(RATE, BURST, name="vendor")

app = Celery("celery_app", broker=f"{SERVER}/1", backend=f"{SERVER}/1")
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)

# One limiter and one recording client per process: both are safe across the worker's fork.
limiter = RateLimiter.from_url(f"{SERVER}/0", timeout=5.0)
store = redis.Redis.from_url(f"{SERVER}/0")


def _record(task: Any, kind: str, **facts: Any) -> None:
    """Append what this run saw to the ``runs`` list, with the server's clock."""
    seconds, micros = store.time()
    entry = {
        "id": task.request.id,
        "kind": kind,
        "at": seconds + micros / 1e6,
        "retries": task.request.retries,
        "pid": os.getpid(),
        "redis_py": redis.__version__,  # the worker's, to compare with tokenlimit's
        **facts,
    }
    store.rpush("runs", json.dumps(entry))


class CountingTask(RateLimitedTask):
    """Counts its refusals (each one is a Celery retry) in ``deferrals``."""

    def on_retry(self, exc: BaseException, task_id: str, *args: Any, **kwargs: Any) -> None:
        store.incr("deferrals")


@app.task(
    bind=True,
    base=CountingTask,
    max_retries=0,  # a refusal that took one of the task's retries would fail it
    rate_limit_global=VENDOR_LIMIT,
    rate_limit_key="vendor:{vendor}",
    rate_limit_limiter=limiter,
)
def call_vendor(self: Any, vendor: str, n: int) -> int:
    _record(self, "call", vendor=vendor, n=n)
    return n


@app.task(
    bind=True,
    base=CountingTask,
    max_retries=1,
    rate_limit_global="1/second",
    rate_limit_burst=1,
    rate_limit_key="flaky",
    rate_limit_limiter=limiter,
)
def flaky(self: Any) -> int:
    """Fails its first run with a retry of its own; the second run succeeds."""
    _record(self, "flaky")
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return int(self.request.retries)
