"""Re-reading a cluster's slot map after a node failed a decision, off the decision's path.

A failover that the old master announces (``CLUSTER FAILOVER``: it answers MOVED) needs no help:
the redirect names the new owner. A master that crashed or hangs announces nothing: every
decision for its slots times out or is refused a connection, while the rest of the cluster has
already promoted its replica. redis-py's own commands re-read the slot map after such an error,
inline; the limiter sends its scripts itself, so it must do the same, but never inline: reading
the map can itself wait on the dead node, and a decision has its deadline. So a failed decision
asks for a refresh and returns; the refresh runs in the background (a thread, or a task on the
client's loop), at most one at a time and at most one per ``INTERVAL``, and later decisions
go wherever the new map says.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

from redis import exceptions as rx

from tokenlimit._errors import BackendError

if TYPE_CHECKING:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    from .driver import SyncCluster

__all__ = ["AsyncSlotRefresher", "SlotRefresher", "stale_map"]

logger = logging.getLogger("tokenlimit")

INTERVAL = 0.25  # seconds between two refreshes, at most


def stale_map(error: BackendError) -> bool:
    """Whether ``error`` suggests the client's slot map is out of date: the node did not
    answer (a crash, a hang, a partition), the cluster said it is down or reconfiguring, or a
    node we took for a master answered as a replica (READONLY)."""
    return error.reason in ("timeout", "connection", "cluster") or isinstance(
        error.__cause__, rx.ReadOnlyError
    )


class _Gate:
    """At most one refresh at a time, and at most one per ``INTERVAL``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = False
        self._next = 0.0

    def enter(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._running or now < self._next:
                return False
            self._running = True
            return True

    def leave(self) -> None:
        with self._lock:
            self._running = False
            self._next = time.monotonic() + INTERVAL


class _Initialize(TypedDict, total=False):
    """What ``NodesManager.initialize`` is told, where it takes it."""

    last_failed_node_name: str


def _options(initialize: Callable[..., object], failed: str | None) -> _Initialize:
    """Ask redis-py to try the failed node last, where it knows how (redis-py 7+)."""
    try:
        known = "last_failed_node_name" in inspect.signature(initialize).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C or mocked callable
        known = False
    return {"last_failed_node_name": failed} if known and failed else {}


class SlotRefresher:
    """For a sync ``RedisCluster``: refreshes in a short-lived daemon thread."""

    def __init__(self, cluster: SyncCluster) -> None:
        self._cluster = cluster
        self._gate = _Gate()

    def failed(self, node: str | None) -> None:
        """A decision on ``node`` (``host:port``, if known) failed: refresh soon."""
        if self._gate.enter():
            thread = threading.Thread(
                target=self._run, args=(node,), name="tokenlimit-slots", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:  # interpreter shutting down: no threads any more
                self._gate.leave()

    def _run(self, node: str | None) -> None:
        manager = self._cluster.nodes_manager
        try:
            manager.initialize(**_options(manager.initialize, node))
        except Exception as exc:  # the next failed decision asks again
            logger.debug("tokenlimit: refreshing the cluster's slot map failed: %r", exc)
        finally:
            self._gate.leave()


class AsyncSlotRefresher:
    """For a ``redis.asyncio.cluster.RedisCluster``: refreshes in a task on the running loop.

    The task is the nodes manager's ``initialize`` alone: the client's own ``initialize``
    closes every connection when it fails or is cancelled, and the dead node makes it fail.
    """

    def __init__(self, cluster: AsyncRedisCluster) -> None:
        self._cluster = cluster
        self._gate = _Gate()
        self._task: asyncio.Task[None] | None = None  # held, so it is not collected mid-run

    def failed(self, node: str | None) -> None:
        if self._gate.enter():
            self._task = asyncio.get_running_loop().create_task(self._run(node))

    async def _run(self, node: str | None) -> None:
        manager = self._cluster.nodes_manager
        try:
            await manager.initialize(**_options(manager.initialize, node))
        except Exception as exc:
            logger.debug("tokenlimit: refreshing the cluster's slot map failed: %r", exc)
        finally:
            self._gate.leave()
            self._task = None
