"""Backends from URLs: ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://``,
``rediss+cluster://``, ``redis+sentinel://``, ``rediss+sentinel://`` and ``memory://``; each
``redis`` scheme may also be spelled ``valkey`` (``valkeys://``, ``valkey+cluster://``...). Clients
made here are owned by the limiter: they never retry a command (a retried decision could take
tokens twice) and time out at its deadline."""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from ._errors import BackendError, ConfigError, ConfigTypeError
from ._memory import AsyncMemoryBackend, MemoryBackend
from ._redis.pools import client_options, pool_options
from ._request import Request

if TYPE_CHECKING:
    from ._backend import AsyncBackend, AsyncLeaser, SyncBackend

__all__ = ["async_backend_from_url", "parse_url", "redact", "scrub", "sync_backend_from_url"]

_T = TypeVar("_T")

_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
    "memory",
)
# Valkey speaks the same protocol: its schemes are other names for the redis ones.
_ALIASES = {
    scheme.replace("redis", "valkey", 1): scheme for scheme in _SCHEMES if "redis" in scheme
}


# -- secrets: no message about a URL may carry any piece of its password ---------------------------
_QUERY_SECRET = re.compile(r"([?&;][^=&#]*password=)([^&#;]*)", re.IGNORECASE)
_SEPARATORS = re.compile(r"[/#?@:&=;,\s]+")


def _userinfo(url: str) -> str:
    """Everything between ``://`` and the last ``@``: an unescaped ``/``, ``#`` or ``?`` in a
    password makes ``urlsplit`` end the host part early, so its own split cannot be trusted."""
    return url.partition("://")[2].rpartition("@")[0]


def redact(url: str) -> str:
    """``url`` with its password, and the value of any ``...password=`` query option, as ``***``."""
    head, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = _QUERY_SECRET.sub(r"\1***", rest)
    userinfo, at, hosts = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if at and colon:
        rest = f"{user}:***@{hosts}"
    return f"{head}{sep}{rest}"


def _secrets(url: str) -> list[str]:
    """The password and every piece of it (split at URL delimiters, also percent-decoded) and
    any ``...password=`` query value, longest first."""
    found = {_userinfo(url).partition(":")[2]}
    found.update(match[2] for match in _QUERY_SECRET.finditer(url))
    found.update(unquote(secret) for secret in list(found))
    for secret in list(found):
        found.update(_SEPARATORS.split(secret))
    found.discard("")
    return sorted(found, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` with ``url`` redacted and every piece of its password replaced by ``***``: each
    piece of 3 characters or more wherever it occurs, a shorter one where it stands alone."""
    secrets = _secrets(url) if isinstance(url, str) else []
    if not secrets:
        return text
    text = text.replace(url, redact(url))
    for secret in secrets:
        if len(secret) >= 3:
            text = text.replace(secret, "***")
        else:
            text = re.sub(rf"(?<![\w%]){re.escape(secret)}(?!\w)", "***", text)
    return text


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    item: BaseException | None = exc
    todo = [item]
    while todo:
        item = todo.pop()
        if item is not None and id(item) not in seen:
            seen.add(id(item))
            yield item
            todo += [item.__cause__, item.__context__]


def _driver_error(exc: Exception) -> BackendError | None:
    """A redis-py (or socket) error raised while a client is made, as a BackendError: a
    ``redis+cluster://`` client connects when it is made."""
    from redis import exceptions as rx

    from ._redis.replies import classify

    if isinstance(exc, rx.RedisClusterException):
        unreachable = isinstance(exc, rx.RedisClusterUnreachableError)
        reason = "connection" if unreachable else "cluster"
        error = BackendError(f"storage failed ({reason}): {exc}", reason=reason)
        error.__cause__ = exc
        return error
    if isinstance(exc, (rx.RedisError, OSError)):
        return classify(exc)
    return None


def _scrubbed(exc: Exception, url: str) -> Exception:
    """What to raise for ``exc``, raised while reading or connecting to ``url``: a ConfigError
    for a bad value, a BackendError for a driver error, anything else as it is; and when any
    exception in its chain holds a piece of the password, made again with its message scrubbed
    and chained to nothing (the driver's exception would carry the piece)."""
    driver = _driver_error(exc)
    if driver is not None:
        exc = driver
    elif isinstance(exc, ValueError) and not isinstance(exc, ConfigError):
        return ConfigError("url", scrub(str(exc), url))  # redis-py's own, never chained
    texts = [text for item in _chain(exc) for text in (str(item), *map(repr, item.args))]
    if all(scrub(text, url) == text for text in texts):
        return exc
    message = scrub(str(exc), url)
    if isinstance(exc, ConfigError):
        return type(exc)(exc.param, message.removeprefix(f"{exc.param}: "))
    if isinstance(exc, BackendError):
        return BackendError(message, reason=exc.reason)
    return exc  # not ours nor the driver's: a bug to see as it is


def _guarded(url: object, build: Callable[[], _T]) -> _T:
    """``build()``, through which every message derived from ``url`` passes (see ``_scrubbed``);
    raised outside the ``except``, so that no context is chained either."""
    try:
        return build()
    except Exception as exc:
        error = _scrubbed(exc, url if isinstance(url, str) else "")
        if error is exc:
            raise
    raise error


def parse_url(url: object) -> tuple[str, str]:
    """Return ``(scheme, url)`` after checking the scheme; raises ConfigError naming ``url``."""
    return _guarded(url, lambda: _parse_url(url))


def _parse_url(url: object) -> tuple[str, str]:
    if not isinstance(url, str):
        raise ConfigTypeError("url", f"must be a str, not {type(url).__name__}")
    given = url.partition("://")[0] if "://" in url else ""
    scheme = _ALIASES.get(given.lower(), given.lower())
    if scheme not in _SCHEMES:
        # The scheme only: a URL may carry a password, and this message reaches logs.
        raise ConfigError(
            "url",
            f"scheme must be one of {', '.join(_SCHEMES)} (or valkey for redis, as in "
            f"valkey://, valkeys+cluster://); got {given.lower() or 'none'!r}"
            + _instead_of(given.lower()),
        )
    url = scheme + url[len(given) :]  # case-insensitive (RFC 3986); redis-py's sync side is not
    if scheme not in ("unix", "memory"):
        _check_at_signs(url)
    if scheme in ("redis", "rediss", "unix"):
        _check_server_url(scheme, url)
    elif scheme.endswith("+cluster"):
        _cluster_args(url)
    elif scheme.endswith("+sentinel"):
        from ._redis.sentinel import parse_sentinel_url

        parse_sentinel_url(url)
    return scheme, url


def _instead_of(scheme: str) -> str:
    """What to write for a scheme of the ``limits`` package (flask-limiter's and slowapi's
    storage URLs), as the end of the error message; "" for any other."""
    if scheme.startswith("async+"):  # limits' async storage: here, the limiter is async
        inner = _ALIASES.get(scheme[6:], scheme[6:])
        if inner in _SCHEMES:
            return f": write {scheme[6:]}:// and use AsyncRateLimiter"
    if scheme in ("redis+unix", "valkey+unix"):
        return ": write unix:///path/to/socket"
    if scheme in ("memcached", "mongodb", "mongodb+srv", "etcd"):
        return ": tokenlimit decides in a script that Redis and Valkey run (or memory://)"
    return ""


def _check_at_signs(url: str) -> None:
    """Refuse an ``@`` past the host in a path, a query option's name or the fragment: that is a
    password with an unescaped ``/``, ``?`` or ``#``, whose first piece ``urlsplit`` would read
    as the host or port (connecting elsewhere, and naming that piece in every connection
    error). An ``@`` in a query option's value (``?client_name=me@host``) is fine."""
    parts = urlsplit(url)
    names = (item.partition("=")[0] for item in parts.query.split("&"))
    if "@" in parts.path or "@" in parts.fragment or any("@" in name for name in names):
        raise ConfigError(
            "url",
            "an '@' after the host: percent-encode a user name or password holding '/', '#',"
            " '?' or '@' (as %2F, %23, %3F, %40)",
        )


def _check_server_url(scheme: str, url: str) -> None:
    """Read the URL as redis-py will, so that a bad port, database or query value is a
    ConfigError naming ``url`` at the call that received it: redis-py raises a bare ValueError,
    and reads a database that is not a number (``/1O`` for ``/10``) as database 0."""
    from redis.connection import parse_url as redis_parse_url

    try:
        options = redis_parse_url(url)  # type: ignore[no-untyped-call]
        path = unquote(urlsplit(url).path)
    except ValueError as exc:  # may quote a piece of the password as the port: see _guarded
        raise ConfigError("url", str(exc)) from None
    if scheme == "unix":
        if not options.get("path"):
            raise ConfigError("url", "no socket path, as in unix:///run/redis.sock?db=0")
    elif path.strip("/") and not path.strip("/").isdigit():
        raise ConfigError("url", "the database (the path) must be a number, as in /0")


def _cluster_args(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in filter(None, hosts.split(",")):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "6379")
        try:
            nodes.append((host.strip("[]"), int(port)))
        except ValueError:
            raise ConfigError("url", f"bad cluster node {item!r}") from None
    if not nodes:
        raise ConfigError("url", "no cluster nodes given")
    options: dict[str, Any] = {}
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    for name, value in parse_qsl(parts.query):
        options[name] = value
    return nodes, options


def sync_backend_from_url(
    url: str, *, timeout: float, memory: MemoryBackend | None = None
) -> SyncBackend:
    """A sync backend for ``url``; a bad URL is a ConfigError naming ``url``, a client that
    fails to connect (a cluster's does, here) a BackendError, neither with the password."""
    return _guarded(url, lambda: _sync_backend(url, timeout, memory))


def _sync_backend(url: str, timeout: float, memory: MemoryBackend | None) -> SyncBackend:
    scheme, url = _parse_url(url)
    if scheme == "memory":
        return memory if memory is not None else MemoryBackend()
    from ._redis.sync import RedisBackend

    if scheme.endswith("+cluster"):
        from redis.cluster import ClusterNode, RedisCluster

        nodes, options = _cluster_args(url)
        options.update(client_options(timeout))
        options.pop("retry")  # RedisCluster refuses it; its node clients never retry anyway
        startup = [ClusterNode(h, p) for h, p in nodes]  # type: ignore[no-untyped-call]
        cluster = RedisCluster(startup_nodes=startup, **options)
        return RedisBackend(cluster, owned=True)
    if scheme.endswith("+sentinel"):
        from ._redis.sentinel import sync_sentinel_client

        return RedisBackend(sync_sentinel_client(url, timeout=timeout), owned=True)
    from redis import BlockingConnectionPool, Redis

    pool = BlockingConnectionPool.from_url(url, **pool_options(timeout))
    return RedisBackend(Redis.from_pool(pool), owned=True)


def async_backend_from_url(
    url: str, *, timeout: float, memory: MemoryBackend | None = None
) -> AsyncBackend:
    """The asyncio twin of ``sync_backend_from_url``."""
    return _guarded(url, lambda: _async_backend(url, timeout, memory))


def _async_backend(url: str, timeout: float, memory: MemoryBackend | None) -> AsyncBackend:
    scheme, url = _parse_url(url)
    if scheme == "memory":
        return AsyncMemoryBackend(memory)
    from ._redis.aio import AsyncRedisBackend

    if scheme.endswith("+cluster"):
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes, options = _cluster_args(url)
        options.update(client_options(timeout, is_async=True))
        options.pop("retry")

        def make() -> AsyncRedisBackend:
            client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **options)
            return AsyncRedisBackend(client, owned=True)
    elif scheme.endswith("+sentinel"):
        from ._redis.sentinel import async_sentinel_client

        def make() -> AsyncRedisBackend:
            return AsyncRedisBackend(async_sentinel_client(url, timeout=timeout), owned=True)
    else:
        from redis.asyncio import BlockingConnectionPool, Redis

        def make() -> AsyncRedisBackend:
            pool = BlockingConnectionPool.from_url(url, **pool_options(timeout, is_async=True))
            return AsyncRedisBackend(Redis.from_pool(pool), owned=True)

    make()  # fail now, at the call that received the URL, not at the first decision
    return LoopLocalBackend(make)


class LoopLocalBackend:
    """One owned async client per event loop: asyncio connections cannot cross loops, and
    frameworks and test runners start several."""

    remote = True

    def __init__(self, factory: Callable[[], AsyncBackend]) -> None:
        self._factory = factory
        # Per loop: its backend, and the generator that closes it when the loop shuts down.
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[AsyncBackend, AsyncGenerator[None, None]]
        ] = weakref.WeakKeyDictionary()
        # The loop used last and its backend: a decision finds it without a weak-dict lookup
        # or an extra coroutine (the loop held weakly, as in the dict).
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], AsyncBackend] | None = None

    async def _current(self) -> AsyncBackend:
        loop = asyncio.get_running_loop()
        entry = self._by_loop.get(loop)
        if entry is None:
            backend = self._factory()
            # Close the client when its loop shuts down: asyncio.run() (and uvicorn, asgiref)
            # finalize async generators while the loop still runs, so this one's ``finally``
            # can await the close; otherwise each finished loop would leak its connections.
            closer = _close_at_shutdown(backend)
            await closer.asend(None)
            entry = self._by_loop[loop] = (backend, closer)
        self._last = weakref.ref(loop), entry[0]
        return entry[0]

    def decide(
        self, request: Request, *, consume: bool, timeout: float
    ) -> Awaitable[Sequence[int]]:
        # A plain function handing over the loop's backend's coroutine: one coroutine less per
        # decision on the hot path (awaited by the caller all the same).
        last = self._last
        if last is not None and last[0]() is asyncio.get_running_loop():
            return last[1].decide(request, consume=consume, timeout=timeout)
        return self._decide(request, consume=consume, timeout=timeout)

    async def _decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        backend = await self._current()
        return await backend.decide(request, consume=consume, timeout=timeout)

    async def reset(self, request: Request, *, timeout: float) -> None:
        backend = await self._current()
        await backend.reset(request, timeout=timeout)

    async def hold_back(self, request: Request, hold_us: int, *, timeout: float) -> Sequence[int]:
        backend = await self._current()
        return await backend.hold_back(request, hold_us, timeout=timeout)

    async def refund(self, request: Request, *, timeout: float) -> Sequence[int]:
        backend = await self._current()
        return await backend.refund(request, timeout=timeout)

    async def lease(
        self, request: Request, want: int, back: int, *, timeout: float
    ) -> Sequence[int]:
        backend = await self._current()
        return await cast("AsyncLeaser", backend).lease(request, want, back, timeout=timeout)

    async def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float
    ) -> Sequence[int]:
        backend = await self._current()
        return await backend.hold_slot(key, holder, max_in_flight, lease_us, timeout=timeout)

    async def release_slot(self, key: str, holder: str, *, timeout: float) -> int:
        backend = await self._current()
        return int(await backend.release_slot(key, holder, timeout=timeout))

    async def clear_prefix(self, prefix: str) -> int:
        backend = await self._current()
        return int(await backend.clear_prefix(prefix))

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        if self._last is not None and self._last[0]() is loop:
            self._last = None
        entry = self._by_loop.pop(loop, None)
        if entry is not None:
            await entry[1].aclose()


async def _close_at_shutdown(backend: AsyncBackend) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await backend.aclose()
