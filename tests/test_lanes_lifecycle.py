"""The sync lean path's held connections (``_redis._Lanes``) over a limiter's life: in a forked
child, when the limiter closes under threads mid-decision, and when cluster nodes are replaced."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from servers import Server
from tokenlimit import BackendError, Limit, RateLimiter
from tokenlimit._request import build_request

SLOW = 0.001  # tokens per second: no refill worth speaking of during a test
CHILD_WAIT = 10.0  # seconds a forked child gets to decide (its limiter's deadline is 5)
WAIT = 10.0  # seconds a test waits for its threads to get somewhere (their deadline is 5)


def in_forked_child(body: Callable[[], bool]) -> int | None:
    """Run ``body`` in a child forked from this process; its exit code (0: ``body`` returned
    True), or None if it did not end in time (then it is killed)."""

    def main() -> None:
        try:
            ok = body()
        except BaseException:  # any failure: the exit code reports it
            os._exit(2)
        os._exit(0 if ok else 1)

    child = multiprocessing.get_context("fork").Process(target=main)
    child.start()
    child.join(CHILD_WAIT)
    if child.is_alive():
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        return None
    return child.exitcode


# -- fork -------------------------------------------------------------------------------------
def test_a_forked_child_decides_while_the_parent_held_the_lanes_lock(standalone: Any) -> None:
    """A lock held at fork time (by another thread of the parent) stays held in the child
    forever: the child's lanes must not wait on it."""
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(standalone.url, timeout=5.0, local_cache=False) as limiter:
        for _ in range(2):  # the first lends its connection to the server check
            assert limiter.try_acquire("fork:lock", limit).allowed
        lanes = limiter.backend._lanes  # type: ignore[attr-defined]

        def decide() -> bool:
            decision = limiter.try_acquire("fork:lock", limit)
            return decision.allowed and decision.remaining == 2

        with lanes._lock:
            code = in_forked_child(decide)
        assert code is not None, "the child hung on the lock its parent held at fork time"
        assert code == 0


def test_a_forked_child_keeps_its_connection_for_its_next_decision(standalone: Any) -> None:
    """A caller of the parent waiting in the pool at fork time does not exist in the child:
    the child's lanes keep the connection of its decision instead of handing it back."""
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(standalone.url, timeout=5.0, local_cache=False) as limiter:
        for _ in range(2):
            assert limiter.try_acquire("fork:waiting", limit).allowed
        lanes = limiter.backend._lanes  # type: ignore[attr-defined]

        def decide() -> bool:
            decision = limiter.try_acquire("fork:waiting", limit)
            return decision.allowed and len(lanes._free) == 1

        with lanes.waiting():  # as a parent thread waiting in the pool would be
            code = in_forked_child(decide)
        assert code == 0


# -- closing under threads mid-decision -------------------------------------------------------
class _FencedOs:
    """``os`` for the sync exchange: each read and write first checks that its descriptor is
    still the open socket of the connection its thread took (``took``), and refuses (EBADF)
    rather than touch a descriptor that may now be anyone's. A read first lets the other
    threads run, as a reader woken late would. ``writes`` counts the writes made."""

    def __init__(self) -> None:
        self.current = threading.local()
        self.strays: list[int] = []
        self.writes = 0
        self.wrote = threading.Condition()

    def took(self, lane: Any) -> Any:
        self.current.sock = None if lane is None else lane[1]
        return lane

    def _check(self, fd: int) -> None:
        sock = getattr(self.current, "sock", None)
        if sock is None or sock.fileno() != fd:
            self.strays.append(fd)
            raise OSError(errno.EBADF, "not this thread's connection's socket any more")

    def write(self, fd: int, data: bytes) -> int:
        self._check(fd)
        sent = os.write(fd, data)
        with self.wrote:
            self.writes += 1
            self.wrote.notify_all()
        return sent

    def read(self, fd: int, n: int) -> bytes:
        time.sleep(0.002)
        self._check(fd)
        return os.read(fd, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_closing_under_decisions_in_flight_never_touches_a_closed_descriptor(
    own_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads each send a decision to a paused server, and the limiter closes meanwhile. No
    thread reads or writes a descriptor once its connection's socket is closed (its number may
    be reused by anything the process opens meanwhile): each decision fails with a
    BackendError that says why, and no thread is left waiting. The closed limiter still
    decides, as a closed redis-py client still runs commands."""
    import tokenlimit._redis.sync

    assert own_server.process is not None
    threads = 6
    limit = Limit(SLOW, 100)
    # The breaker off: the six failures below would open it, and the closed limiter's last
    # decision must reach the server.
    limiter = RateLimiter.from_url(own_server.url, timeout=5.0, local_cache=False, breaker=False)
    assert limiter.try_acquire("close", limit).allowed  # the script is loaded, the server checked
    lanes = limiter.backend._lanes  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5.0
    lanes._free.extend([lanes._take(deadline) for _ in range(threads)])  # one for each thread
    fenced = _FencedOs()
    take = lanes._take
    monkeypatch.setattr(lanes, "_take", lambda deadline: fenced.took(take(deadline)))
    monkeypatch.setattr(tokenlimit._redis.sync, "os", fenced)
    failed: list[BackendError] = []
    raw: list[BaseException] = []

    def decide() -> None:
        try:
            limiter.try_acquire("close", limit)
        except BackendError as error:
            failed.append(error)
        except BaseException as exc:
            raw.append(exc)

    workers = [threading.Thread(target=decide) for _ in range(threads)]
    os.kill(own_server.process.pid, signal.SIGSTOP)
    try:
        for worker in workers:
            worker.start()
        with fenced.wrote:  # each thread's exchange now waits for the paused server's reply
            assert fenced.wrote.wait_for(lambda: fenced.writes == threads, WAIT)
        limiter.close()
    finally:
        os.kill(own_server.process.pid, signal.SIGCONT)
        for worker in workers:
            worker.join(WAIT)
    assert not any(worker.is_alive() for worker in workers)
    assert fenced.strays == [], "a read or write on a descriptor closed under its exchange"
    assert raw == []
    assert [str(error) for error in failed] == [
        "storage failed (connection): the limiter was closed"
    ] * threads
    assert limiter.try_acquire("close", limit).allowed  # on redis-py's path, reconnecting
    limiter.close()


# -- cluster nodes replaced -------------------------------------------------------------------
def test_the_lanes_of_a_replaced_cluster_node_are_closed_and_dropped(cluster: Any) -> None:
    """The cluster client replaces a node's connection (as after a failover, a resharding to a
    new node or a new topology): the next decision that reaches the new pool closes the
    connections held on the old one, which no node uses any more, and forgets its lanes."""
    limit = Limit(SLOW, 5)
    with RateLimiter.from_url(cluster.url, timeout=5.0, local_cache=False) as limiter:
        backend: Any = limiter.backend
        client = backend.client
        keys = [f"replaced:{i}" for i in range(30)]  # on every node, most likely
        for key in keys:
            assert limiter.try_acquire(key, limit).remaining == 4
        node = client.get_node_from_key(build_request(limiter.prefix, keys[0], limit).keys[0])
        old_pool = node.redis_connection.connection_pool
        old_lanes = backend._node_lanes[old_pool]
        held = [lane[0] for lane in old_lanes._free]
        assert held
        assert all(conn._sock is not None for conn in held)
        others = dict(backend._node_lanes)
        del others[old_pool]
        assert others  # the keys reached other nodes too

        node.redis_connection = None  # the client makes a new one, with a new pool
        assert limiter.try_acquire(keys[0], limit).remaining == 3
        new_pool = node.redis_connection.connection_pool
        assert new_pool is not old_pool
        assert old_pool not in backend._node_lanes
        assert all(conn._sock is None for conn in held), "closed, not left open for good"
        assert backend._node_lanes[new_pool] is not old_lanes
        assert {p: backend._node_lanes[p] for p in others} == others  # the others untouched
