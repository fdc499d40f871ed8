"""Connections held by the sync lean path never starve the limiter's other calls (issue 13,
defect 1): ``reset()``, concurrency holds and releases and redis-py's own path can use an idle
held connection, on the limiter's pools and on a user's ``BlockingConnectionPool`` alike."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
import redis
from conftest import Target

from servers import Server
from tokenlimit import Limit, RateLimiter

LIMIT = Limit(1000, 1000)
TIMEOUT = 2.0  # the limiters' deadline: a starved call would take all of it and fail


def timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def burst(limiter: RateLimiter, server: Server, threads: int) -> None:
    """``threads`` decisions truly at once, each on a thread of its own that then ends: the
    server is paused while they send, so each needs a connection of its own."""
    errors: list[BaseException] = []

    def decide(n: int) -> None:
        try:
            limiter.try_acquire(f"burst-{n}", LIMIT)
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=decide, args=(n,)) for n in range(threads)]
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        for worker in workers:
            worker.start()
        time.sleep(0.3)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    for worker in workers:
        worker.join()
    assert errors == []
    # The first decision's server check hands one connection back (see _check_server): the
    # next decision takes it again.
    limiter.try_acquire("after", LIMIT)


def other_calls(limiter: RateLimiter) -> None:
    """What a starved pool failed: reset, a concurrency hold and its release, a peek."""
    limiter.reset("burst-0", LIMIT)
    with limiter.concurrency("job", 1, timeout=0):
        pass
    limiter.peek("burst-1", LIMIT)


def test_a_pool_of_one_serves_reset_and_slots_after_decisions(standalone: Target) -> None:
    limiter = RateLimiter.from_url(
        f"{standalone.url}?max_connections=1", timeout=TIMEOUT, prefix="one:"
    )
    try:
        limiter.try_acquire("a", LIMIT)
        limiter.try_acquire("b", LIMIT)
        assert timed(lambda: other_calls(limiter)) < TIMEOUT / 2
    finally:
        limiter.close()


@pytest.mark.parametrize("size", [1, 4])
def test_a_users_blocking_pool_serves_reset_and_slots_after_a_burst(
    own_server: Server, size: int
) -> None:
    pool = redis.BlockingConnectionPool.from_url(own_server.url, max_connections=size)
    client = redis.Redis(connection_pool=pool)
    limiter = RateLimiter(client, timeout=TIMEOUT, prefix="users:")
    try:
        burst(limiter, own_server, size)
        assert timed(lambda: other_calls(limiter)) < TIMEOUT / 2
    finally:
        limiter.close()
        client.close()


def test_the_default_pool_serves_reset_and_slots_after_a_burst_past_its_size(
    own_server: Server,
) -> None:
    limiter = RateLimiter.from_url(own_server.url, timeout=TIMEOUT, prefix="wide:")
    try:
        burst(limiter, own_server, 150)
        took = timed(lambda: other_calls(limiter))
        print(f"reset + hold + release + peek after a burst of 150: {took * 1000:.1f} ms")
        assert took < TIMEOUT / 2
    finally:
        limiter.close()


def test_slots_hold_in_open_mode_on_a_busy_pool(own_server: Server) -> None:
    """A starved hold failed with a storage error, which open mode admits: 4 jobs ran at once
    under ``max_in_flight=1``."""
    limiter = RateLimiter.from_url(
        f"{own_server.url}?max_connections=2",
        timeout=TIMEOUT,
        failure_mode="open",
        prefix="open:",
    )
    try:
        burst(limiter, own_server, 2)
        inside = 0
        most = 0
        lock = threading.Lock()
        refused = 0

        def job() -> None:
            nonlocal inside, most, refused
            try:
                with limiter.concurrency("one-at-a-time", 1, timeout=TIMEOUT):
                    with lock:
                        inside += 1
                        most = max(most, inside)
                    time.sleep(0.05)
                    with lock:
                        inside -= 1
            except Exception:
                with lock:
                    refused += 1

        workers = [threading.Thread(target=job) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert most == 1
    finally:
        limiter.close()
