"""Every private part of redis-py (and of asyncio) that tokenlimit's fast paths touch, in one room.

Tested on redis-py 6.2, 6.4, 7.4, 8.0, 8.1 and 8.2 (``noxfile.py``: ``tests``, ``compat``,
``latest``). Each internal is probed once per process, on the installed versions, before a
backend relies on it; where one is missing the backend takes redis-py's public path instead
(correct, slower) and ``tokenlimit`` logs once which internal is gone. Nothing here may raise
``AttributeError`` at decision time.

=========================================  ==============================  ====================
internal                                   used for                        without it
=========================================  ==============================  ====================
``Connection._sock``                       sync lanes: one write, one      ``send_command`` /
                                           read per decision (``_redis``)  ``read_response``
``AbstractConnection._connect``            connecting ends by the          the pool's own
                                           decision's deadline             ``socket_*timeout``
``ConnectionPool._available_connections``  a cluster node pool's idle      those connect with
                                           connections get that deadline   the client's timeout
``BlockingConnectionPool.pool`` (queue)    redis-py 6: close only idle     close every one
                                           connections after READONLY
``asyncio Connection._reader/_writer``     async batches: one write, one   one exchange per
and ``StreamReader._buffer``               read per batch (``_batch``)     decision
``asyncio ConnectionPool._in_use_...``     linger only with room to spare; no linger
                                           retire in-use ones on READONLY
``NodesManager.move_slot`` (7.4+)          follow one MOVED                re-read the slots
=========================================  ==============================  ====================
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import redis
import redis.asyncio
from redis import BlockingConnectionPool

if TYPE_CHECKING:
    import queue
    import socket
    from collections.abc import Iterable

    from redis.asyncio.connection import AbstractConnection as AsyncAbstractConnection
    from redis.client import Redis
    from redis.cluster import ClusterNode, NodesManager
    from redis.connection import AbstractConnection
    from redis.typing import EncodableT

__all__ = [
    "BLOCKING_TAKES_INUSE",
    "INTERNALS",
    "AsyncPool",
    "Conn",
    "NodePool",
    "SyncCluster",
    "SyncConnection",
    "SyncPool",
    "available",
    "close_idle_blocking",
    "missing",
    "reprobe",
]

logger = logging.getLogger("tokenlimit")


# -- the redis-py objects the fast paths reach into, as they use them ------------------------
class SyncConnection(Protocol):
    """A sync connection (``redis.connection.AbstractConnection``) as the lean path and the
    exchanges use it. redis-py leaves these methods unannotated and types ``_sock`` as None:
    this says what they take and give."""

    @property
    def _sock(self) -> socket.socket | None: ...  # None while not connected

    def send_command(self, *args: EncodableT, check_health: bool = ...) -> None: ...

    def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = ...
    ) -> None: ...

    def pack_commands(self, commands: Iterable[Iterable[EncodableT]]) -> list[bytes]: ...

    def can_read(self, timeout: float = ...) -> bool: ...

    def read_response(self) -> object: ...  # a reply: its shape is the command's

    def disconnect(self) -> None: ...


Conn = TypeVar("Conn", bound=SyncConnection)


class NodePool(Protocol):
    """What a cluster node's pool gets the deadline class through (``_redis.sync._node_pool``):
    the class of the connections it makes next, and its idle ones."""

    connection_class: type[AbstractConnection]
    _available_connections: list[AbstractConnection]


class SyncPool(NodePool, Protocol[Conn]):
    """A sync pool (``redis.ConnectionPool`` and its subclasses): it takes back the connections
    it gives."""

    def get_connection(self) -> Conn: ...

    def release(self, connection: Conn, /) -> None: ...

    def disconnect(self, inuse_connections: bool = ...) -> None: ...


class SyncCluster(Protocol):
    """A sync ``redis.cluster.RedisCluster``, whose node lookups redis-py leaves unannotated."""

    @property
    def nodes_manager(self) -> NodesManager: ...

    def get_node_from_key(self, key: str) -> ClusterNode: ...

    def get_node(self, host: str, port: int) -> ClusterNode | None: ...

    def get_nodes(self) -> list[ClusterNode]: ...

    def get_redis_connection(self, node: ClusterNode) -> Redis: ...


class AsyncPool(Protocol):
    """An asyncio pool (``redis.asyncio.ConnectionPool`` and its subclasses). redis-py leaves
    ``get_connection`` unannotated; it connects the connection before giving it."""

    async def get_connection(self) -> OpenConnection: ...

    async def release(self, connection: AsyncAbstractConnection, /) -> None: ...

    async def disconnect(self, inuse_connections: bool = ...) -> None: ...


if TYPE_CHECKING:  # views for the type checker only: nothing is ever an instance of these

    class BufferedReader(asyncio.StreamReader):
        """An ``asyncio.StreamReader`` with the buffer it reads ahead into."""

        _buffer: bytearray

    class OpenConnection(AsyncAbstractConnection):
        """An asyncio connection while connected: its streams are set (redis-py types them
        as optional, None until ``connect``)."""

        _reader: BufferedReader
        _writer: asyncio.StreamWriter

        async def connect(self) -> None: ...  # unannotated in redis-py


# -- the probes ------------------------------------------------------------------------------
def _sync_socket() -> bool:
    make: Callable[[], object] = redis.connection.Connection  # untyped on some versions
    return hasattr(make(), "_sock")


def _connect_hook() -> bool:
    return callable(getattr(redis.connection.AbstractConnection, "_connect", None))


def _available_connections() -> bool:
    return isinstance(getattr(redis.ConnectionPool(), "_available_connections", None), list)


def _blocking_queue() -> bool:
    make: Callable[[], object] = BlockingConnectionPool
    idle = getattr(make(), "pool", None)
    return hasattr(idle, "mutex") and hasattr(idle, "queue")


def _async_streams() -> bool:
    conn = redis.asyncio.Connection()
    if not (hasattr(conn, "_reader") and hasattr(conn, "_writer")):
        return False
    loop = asyncio.new_event_loop()
    try:
        return isinstance(getattr(asyncio.StreamReader(loop=loop), "_buffer", None), bytearray)
    finally:
        loop.close()


def _async_in_use() -> bool:
    return isinstance(getattr(redis.asyncio.ConnectionPool(), "_in_use_connections", None), set)


def _move_slot() -> bool:
    from redis.asyncio.cluster import NodesManager as AsyncNodesManager
    from redis.cluster import NodesManager

    return hasattr(NodesManager, "move_slot") and hasattr(AsyncNodesManager, "move_slot")


# name -> probe (True: present and of the expected shape on the installed versions)
INTERNALS: dict[str, Callable[[], bool]] = {
    "Connection._sock": _sync_socket,
    "AbstractConnection._connect": _connect_hook,
    "ConnectionPool._available_connections": _available_connections,
    "BlockingConnectionPool.pool": _blocking_queue,
    "asyncio Connection._reader/_writer, StreamReader._buffer": _async_streams,
    "asyncio ConnectionPool._in_use_connections": _async_in_use,
    "NodesManager.move_slot": _move_slot,
}

_found: dict[str, bool] = {}


def available(name: str) -> bool:
    """Whether the internal ``name`` (a key of ``INTERNALS``) can be used; probed once."""
    if not _found:
        reprobe()
    return _found[name]


# A user's Sentinel client is copied (``_sentinel.private_pool``) with its
# ``Sentinel._force_master_ip`` when set: read with getattr, absent on some versions.


def missing() -> list[str]:
    """The internals the installed versions lack (the fast paths that fall back)."""
    if not _found:
        reprobe()
    return [name for name, present in _found.items() if not present]


def reprobe() -> None:
    """Probe every internal again and log once what is missing (tests call it after patching)."""
    found = {}
    for name, probe in INTERNALS.items():
        try:
            found[name] = bool(probe())
        except Exception:  # a probe that cannot even run: the internal is not as we know it
            found[name] = False
    _found.clear()
    _found.update(found)
    gone = [name for name, present in found.items() if not present]
    if gone:
        logger.warning(
            "tokenlimit: redis-py %s lacks %s; using redis-py's public path there (slower)",
            redis.__version__,
            ", ".join(gone),
        )


# redis-py 6's BlockingConnectionPool.disconnect() takes no ``inuse_connections`` (7 does).
BLOCKING_TAKES_INUSE = (
    "inuse_connections" in inspect.signature(BlockingConnectionPool.disconnect).parameters
)


def close_idle_blocking(pool: BlockingConnectionPool) -> None:
    """``disconnect(inuse_connections=False)`` for redis-py 6's ``BlockingConnectionPool``,
    whose ``disconnect()`` closes every connection, those mid-exchange on other threads too.
    Its idle ones wait in a queue (None: room for a new one), closed under the queue's lock."""
    if not available("BlockingConnectionPool.pool"):
        pool.disconnect()
        return
    idle: queue.LifoQueue[SyncConnection | None] = pool.pool
    with idle.mutex:
        for conn in idle.queue:
            if conn is not None:
                conn.disconnect()
