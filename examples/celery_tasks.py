"""A Celery task module whose vendor calls share one budget per vendor across every worker.

    celery -A celery_tasks worker --concurrency 4     # as many workers and hosts as you like
    python examples/celery_demo.py                    # or all of it at once, on an embedded Valkey

$TOKENLIMIT_URL (default redis://localhost:6379/0) is the broker, the result backend and the
limiter's store. Each vendor allows 5 calls per second with bursts of 5, whatever the number of
worker processes: a refused task goes back to the queue with countdown = retry_after instead of
sleeping in a worker slot, and that does not count against its max_retries.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from tokenlimit import RateLimiter
from tokenlimit.integrations.celery import RateLimitedTask

URL = os.environ.get("TOKENLIMIT_URL", "redis://localhost:6379/0")
VENDOR_RATE, VENDOR_BURST = 5, 5

app = Celery("celery_tasks", broker=URL, backend=URL)
app.conf.broker_connection_retry_on_startup = True
limiter = RateLimiter.from_url(URL)  # safe to make before the worker forks its processes
calls = redis.Redis.from_url(URL)  # where the demo records each call, for its report


@app.task(
    bind=True,
    base=RateLimitedTask,
    rate_limit_global=VENDOR_RATE,
    rate_limit_burst=VENDOR_BURST,
    rate_limit_key="vendor:{vendor}",  # one bucket per vendor, filled from the task's arguments
    rate_limit_limiter=limiter,
    max_retries=3,  # for the vendor's own errors; waiting for a token takes none of them
)
def geocode(self: RateLimitedTask, vendor: str, address: str) -> str:
    """Stand-in for the vendor's API call: records which task ran when (the server's clock)."""
    seconds, micros = calls.time()
    calls.rpush(f"demo:calls:{vendor}", f"{self.request.id} {seconds + micros / 1e6:.6f}")
    time.sleep(0.01)  # the call itself
    return f"{vendor}: {address} -> 51.5,-0.1"
