"""Redis Sentinel: ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``.

The sentinels are asked for the service's primary whenever a connection to it is made (redis-py's
``SentinelConnectionPool``), so after a failover new connections go to the promoted replica.
What is ours on top, and why:

- Every sentinel exchange is bounded by the decision's deadline (their connections get the same
  deadline class as the primary's, see ``_pools.deadline_class``) and never retried: redis-py
  would otherwise ask each sentinel with its own defaults (retries with backoff) while a
  decision waits. Each sentinel gets an equal share of the deadline, so that one that hangs
  leaves time to ask the others.
- The pool blocks for a free connection within the deadline, as for ``redis://`` URLs (see
  ``_pools.pool_options``), instead of raising "Too many connections".
- A connection the limiter holds outside the pool (``_redis._Lanes``) to a server that is no
  longer the primary is dropped: at its next use if the sentinels named another primary since
  it was made, and at once, with every idle one, when a server answers READONLY (a demoted
  primary); the next connection asks the sentinels again (see ``_redis`` and ``_batch``).
- The URL's password is the primary's (and its replicas'): sentinels are often deployed without
  one, and a password they do not expect fails the AUTH. Sentinels that require their own take
  ``?sentinel_password=...`` (and ``sentinel_username=``). Other query options are read as for
  ``redis://`` URLs and apply to the primary. ``rediss+sentinel://`` speaks TLS to both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from redis import BlockingConnectionPool, Redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.sentinel import Sentinel, SentinelConnectionPool

from tokenlimit._errors import ConfigError

from .driver import BLOCKING_TAKES_INUSE, close_idle_blocking
from .pools import MAX_CONNECTIONS, client_options, deadline_class, pool_options

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "SCHEMES",
    "SentinelURL",
    "async_sentinel_client",
    "parse_sentinel_url",
    "sync_sentinel_client",
]

SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = ("sentinel_password", "sentinel_username")


@dataclass(frozen=True)
class SentinelURL:
    """What a ``redis+sentinel://`` URL says: where to ask, for what, and how to connect."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    primary: dict[str, object] = field(default_factory=dict)  # the primary's connection options
    sentinel: dict[str, object] = field(default_factory=dict)  # the sentinels' (auth, TLS)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read a ``redis+sentinel://`` URL; anything wrong is a ConfigError naming ``url`` (its
    message may hold a piece of a password that was not percent-encoded: callers go through
    ``_url.parse_url``, which scrubs it)."""
    from redis.connection import parse_url as redis_parse_url

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError("url", str(exc)) from None
    tls = parts.scheme.lower().startswith("rediss")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_host_port(item) for item in hosts.split(","))
    segments = [unquote(s) for s in parts.path.split("/")[1:]]
    if segments and segments[-1] == "" and len(segments) > 1:
        segments.pop()  # a trailing slash: /service/ or /service/0/
    if not segments or not segments[0]:
        raise ConfigError("url", "no service name: redis+sentinel://host:port/service_name[/db]")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ConfigError("url", "after the service name only a database number, as in /0")
    service, db = segments[0], segments[1] if len(segments) == 2 else ""
    sentinel: dict[str, object] = {}
    query = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _SENTINEL_OPTIONS:
            sentinel[name.removeprefix("sentinel_")] = value
        else:
            query.append((name, value))
    # The rest reads exactly as a redis:// URL would (the same options, types and errors).
    auth = f"{userinfo}@" if userinfo else ""
    equivalent = f"{'rediss' if tls else 'redis'}://{auth}sentinel/{quote(db)}?{urlencode(query)}"
    try:
        primary: dict[str, object] = redis_parse_url(equivalent)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # its messages name the option
        raise ConfigError("url", str(exc)) from None
    primary.pop("host", None)
    primary.pop("port", None)
    if tls:
        primary.pop("connection_class", None)
        primary["ssl"] = True  # SentinelConnectionPool picks its TLS connection class
        sentinel["ssl"] = True
        sentinel.update((k, v) for k, v in primary.items() if k.startswith("ssl_"))
    return SentinelURL(sentinels, service, primary, sentinel)


def _host_port(item: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; without a port, 26379 (the sentinels' own)."""
    item = item.strip()
    port: str | None = None
    if item.startswith("["):
        host, closed, rest = item[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ConfigError("url", f"bad sentinel address {item!r}")
        port = rest[1:] if rest else None
    elif item.count(":") > 1:
        raise ConfigError("url", f"write an IPv6 sentinel in brackets, as in [::1]:26379: {item!r}")
    else:
        host, colon, text = item.partition(":")
        port = text if colon else None
    if not host:
        raise ConfigError("url", f"a sentinel without a host: {item!r}")
    if port is None:
        return unquote(host), DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("url", f"bad sentinel port in {item!r}: ports are 1 to 65535")
    return unquote(host), int(port)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's sentinel pool, blocking for a free connection like ``BlockingConnectionPool``;
    closing it closes the sentinels' connections too (the pool is the limiter's alone)."""

    def disconnect(self, inuse_connections: bool = True) -> None:
        # When the sentinels name a new primary, redis-py's sentinel code closes the idle
        # connections with inuse_connections=False, which redis-py 6's BlockingConnectionPool
        # does not take: the failover then raised TypeError instead of reconnecting.
        if BLOCKING_TAKES_INUSE:
            super().disconnect(inuse_connections=inuse_connections)
        elif inuse_connections:
            super().disconnect()
        else:
            close_idle_blocking(self)

    def close(self) -> None:
        super().close()
        for client in self.sentinel_manager.sentinels:
            client.close()


class _AsyncBlockingSentinelPool(AsyncSentinelConnectionPool, AsyncBlockingConnectionPool):
    """The asyncio twin of ``_BlockingSentinelPool``."""

    async def aclose(self) -> None:
        await super().aclose()
        await self._close_sentinels()

    async def disconnect(self, inuse_connections: bool = True) -> None:
        # The client's aclose() closes its pool with disconnect() before redis-py 8.2 and with
        # aclose() since; redis-py's own failover path passes inuse_connections=False.
        await super().disconnect(inuse_connections=inuse_connections)
        if inuse_connections:
            await self._close_sentinels()

    async def _close_sentinels(self) -> None:
        for client in self.sentinel_manager.sentinels:
            await client.aclose()


def _sentinel_options(target: SentinelURL, timeout: float, *, is_async: bool) -> dict[str, object]:
    """Each sentinel gets its share of the deadline: they are asked in turn, and one that
    hangs (its port open, nothing answering) must leave time to ask the next. redis-py then
    asks the one that answered first from then on."""
    share = timeout / len(target.sentinels)
    return {**client_options(share, is_async=is_async), **target.sentinel}


def _primary_options(target: SentinelURL, timeout: float, *, is_async: bool) -> dict[str, object]:
    # The URL's options win, as for redis://.
    return {**pool_options(timeout, is_async=is_async), **target.primary}


class _Forced(TypedDict, total=False):
    """``Sentinel``'s ``force_master_ip``, passed only when set (absent on some versions)."""

    force_master_ip: str


def private_pool(pool: SentinelConnectionPool, timeout: float) -> _BlockingSentinelPool:
    """A pool like a user's Sentinel client's (same sentinels, service, options), whose
    sentinel and primary connections never retry and end by the limiter's deadline: the
    user's own may wait for seconds, or for ever without a socket timeout."""
    manager: Sentinel = pool.sentinel_manager
    addresses = [
        (c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
        for c in manager.sentinels
    ]
    share = timeout / max(1, len(addresses))
    sentinel_kwargs = {**manager.sentinel_kwargs, **client_options(share, is_async=False)}
    for name in ("socket_timeout", "socket_connect_timeout"):
        theirs = manager.sentinel_kwargs.get(name)
        if theirs is not None and theirs < share:
            sentinel_kwargs[name] = theirs
    options: _Forced = {}
    force_ip = getattr(manager, "_force_master_ip", None)  # listed in _redispy
    if force_ip is not None:
        options["force_master_ip"] = force_ip
    ours = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        addresses,
        min_other_sentinels=manager.min_other_sentinels,
        sentinel_kwargs=sentinel_kwargs,
        **options,
        **manager.connection_kwargs,
    )
    for client in ours.sentinels:
        client.connection_pool.connection_class = deadline_class(
            client.connection_pool.connection_class
        )
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
    kwargs.update(client_options(timeout, is_async=False))
    for name in ("socket_timeout", "socket_connect_timeout"):
        theirs = pool.connection_kwargs.get(name)
        if theirs is not None and theirs < timeout:
            kwargs[name] = theirs
    return _BlockingSentinelPool(  # type: ignore[no-untyped-call]
        pool.service_name,
        ours,
        connection_class=deadline_class(pool.connection_class),
        # A blocking pool fills its queue up front: at most as many as a URL's pool gets
        # (redis-py 6's plain pools default to 2**31).
        max_connections=min(pool.max_connections, MAX_CONNECTIONS),
        timeout=timeout,
        is_master=pool.is_master,
        check_connection=pool.check_connection,
        **kwargs,
    )


def sync_sentinel_client(url: str, *, timeout: float) -> Redis:
    """A client whose pool finds the service's primary through the sentinels, by the deadline."""
    target = parse_sentinel_url(url)
    # Typed from redis-py 8.2 on, untyped before: the ignore is needed on older versions only.
    manager = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), sentinel_kwargs=_sentinel_options(target, timeout, is_async=False)
    )
    for client in manager.sentinels:
        pool = client.connection_pool
        pool.connection_class = deadline_class(pool.connection_class)
    options = _primary_options(target, timeout, is_async=False)
    pool = _BlockingSentinelPool(target.service, manager, **options)  # type: ignore[no-untyped-call]
    return Redis.from_pool(pool)


def async_sentinel_client(url: str, *, timeout: float) -> AsyncRedis:
    """The asyncio twin of ``sync_sentinel_client`` (the batcher bounds every wait in it)."""
    target = parse_sentinel_url(url)
    # As above: typed from redis-py 8.2 on.
    manager = AsyncSentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), sentinel_kwargs=_sentinel_options(target, timeout, is_async=True)
    )
    options = _primary_options(target, timeout, is_async=True)
    pool = _AsyncBlockingSentinelPool(target.service, manager, **options)  # type: ignore[no-untyped-call]
    return AsyncRedis.from_pool(pool)
