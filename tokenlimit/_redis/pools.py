"""The limiter's own connections: options that never retry and time out at the deadline, pools
that wait for a free connection, and connections that connect by the decision's deadline.

Shared by the URL factories, the Redis backends and Sentinel (docs/internals.md, "Deadlines").
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import TYPE_CHECKING, Protocol, TypedDict

from .driver import available

if TYPE_CHECKING:
    import socket

    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.connection import AbstractConnection
    from redis.retry import Retry

__all__ = [
    "DEADLINE",
    "MAX_CONNECTIONS",
    "client_options",
    "deadline_class",
    "left_of",
    "pool_options",
]

# As many connections as redis-py's default pool; a ``max_connections`` in the URL wins.
MAX_CONNECTIONS = 100


class ClientOptions(TypedDict):
    """A client's (or its pool's) keyword arguments: see ``client_options``."""

    socket_timeout: float
    socket_connect_timeout: float
    retry: Retry | AsyncRetry


class PoolOptions(ClientOptions):
    """A blocking pool's keyword arguments: see ``pool_options``."""

    max_connections: int
    timeout: float


def pool_options(timeout: float, *, is_async: bool = False) -> PoolOptions:
    """A blocking pool: a caller that finds every connection busy waits for one, within the
    deadline, where redis-py's default pool would raise "Too many connections" on a healthy
    server (docs/internals.md, "Deadlines")."""
    return {
        **client_options(timeout, is_async=is_async),
        "max_connections": MAX_CONNECTIONS,
        "timeout": timeout,
    }


def client_options(timeout: float, *, is_async: bool = False) -> ClientOptions:
    """Timeouts at the deadline and no retries (a retried decision could take tokens twice).
    asyncio clients get asyncio's ``Retry``: redis-py 8.2 warns about, and converts, a sync one."""
    from redis.backoff import NoBackoff

    if is_async:
        from redis.asyncio.retry import Retry as AsyncRetry

        retry: Retry | AsyncRetry = AsyncRetry(NoBackoff(), 0)
    else:
        from redis.retry import Retry

        retry = Retry(NoBackoff(), 0)
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": retry}


# The deadline of the decision this thread is making, for the connections below (or None).
DEADLINE = threading.local()
_MIN_WAIT = 0.001  # a socket timeout of 0 would mean non-blocking, not "time is up"


class _Timeouts(Protocol):
    """A connection's socket timeouts (unannotated in redis-py)."""

    socket_timeout: float | None
    socket_connect_timeout: float | None


# One subclass per class, so instances can share it. A dict rather than functools.cache,
# whose wrapper mypy will not call with a class (python/mypy#11470).
_DEADLINE_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def deadline_class(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls``, but connecting and handshaking end by the deadline of the decision that needs
    it: the connect and every handshake read get at most what is left of the deadline set by
    ``_roundtrip`` (docs/internals.md, "Deadlines")."""
    made = _DEADLINE_CLASSES.get(cls)
    if made is None:  # two threads may make one each: both then use the first stored
        made = _DEADLINE_CLASSES.setdefault(cls, _deadline_subclass(cls))
    return made


def _deadline_subclass(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    if getattr(cls, "_tokenlimit_deadline", False) or not available("AbstractConnection._connect"):
        return cls
    reads_take_timeout = "timeout" in inspect.signature(cls.read_response).parameters

    # A base known only at run time: mypy cannot check a class made on a variable.
    class DeadlineConnection(cls):  # type: ignore[misc, valid-type]
        _tokenlimit_deadline = True

        def _connect(self) -> socket.socket:
            conn: _Timeouts = self
            due = getattr(DEADLINE, "at", None)
            configured = conn.socket_connect_timeout
            if due is not None:
                conn.socket_connect_timeout = left_of(due, configured)
            try:
                sock: socket.socket = super()._connect()
                return sock
            finally:
                conn.socket_connect_timeout = configured

        def read_response(self, *args: object, **kwargs: object) -> object:
            due = getattr(DEADLINE, "at", None)
            if due is not None and reads_take_timeout and "timeout" not in kwargs:
                kwargs["timeout"] = left_of(due, self.socket_timeout)
            return super().read_response(*args, **kwargs)

    DeadlineConnection.__name__ = DeadlineConnection.__qualname__ = f"Deadline{cls.__name__}"
    return DeadlineConnection


def left_of(due: float, configured: float | None) -> float:
    """Seconds left until ``due`` (at least ``_MIN_WAIT``), at most ``configured``."""
    left = max(due - time.monotonic(), _MIN_WAIT)
    return left if configured is None else min(left, configured)
