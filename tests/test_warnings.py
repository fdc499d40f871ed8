"""tokenlimit's own calls warn about nothing, on every URL kind and client kind (issue 13).

The suite runs with ``filterwarnings = error``, but a ``ResourceWarning`` (an unclosed socket)
is raised while the garbage collector runs, which can be inside any later test: here each
kind is driven through construction, decisions, peek, reset, a concurrency hold and close,
then collected, with every warning recorded, so one of ours names the kind that leaked.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.sentinel

import tokenlimit
from servers import SentinelGroup, Server, available_binaries
from tokenlimit import AsyncRateLimiter, Limit, RateLimiter, rate_limit

LIMIT = Limit(100, 10)
FLAVOUR = sorted(available_binaries())[0]  # the rule is the library's, not the server's


@contextmanager
def no_warnings() -> Iterator[None]:
    # Earlier tests' garbage first, outside the window: a ResourceWarning the collector raises
    # for it would otherwise be charged to the code under test here.
    gc.collect()
    gc.collect()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
        gc.collect()
        gc.collect()
    messages = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in seen]
    assert messages == []


def drive_sync(limiter: RateLimiter) -> None:
    assert limiter.try_acquire("w", LIMIT).allowed
    assert limiter.acquire("w", [LIMIT, Limit(1, 5)], timeout=1).allowed
    assert limiter.peek("w", LIMIT).limit == 10
    limiter.reset("w", LIMIT)
    with limiter.concurrency("job", 2, timeout=1):
        pass

    @limiter.limit(100, 10, key="f")
    def work() -> int:
        return 1

    assert work() == 1


async def drive_async(limiter: AsyncRateLimiter) -> None:
    assert (await limiter.try_acquire("w", LIMIT)).allowed
    assert (await limiter.acquire("w", [LIMIT, Limit(1, 5)], timeout=1)).allowed
    assert (await limiter.peek("w", LIMIT)).limit == 10
    await limiter.reset("w", LIMIT)
    async with limiter.concurrency("job", 2, timeout=1):
        pass

    @limiter.limit(100, 10, key="f")
    async def work() -> int:
        return 1

    assert await work() == 1


def run_async(make: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(make())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    started = Server(available_binaries()[FLAVOUR]).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def unix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    path = tmp_path_factory.mktemp("sock") / "valkey.sock"
    started = Server(available_binaries()[FLAVOUR])
    started.args = ("--unixsocket", str(path), "--unixsocketperm", "700")
    started.start()
    yield started, path
    started.stop()


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelGroup]:
    group = SentinelGroup(available_binaries()[FLAVOUR])
    try:
        yield group.start()
    finally:
        group.stop()


def urls(server: Server, unix: Path, cluster_url: str, sentinel_url: str) -> list[str]:
    return [
        server.url,
        f"unix://{unix}?db=0",
        cluster_url,
        sentinel_url,
        "memory://",
    ]


@pytest.fixture(scope="module")
def every_url(
    server: Server,
    unix_server: tuple[Server, Path],
    sentinels: SentinelGroup,
    testbed: Any,
) -> list[str]:
    cluster_url = testbed.get("cluster", FLAVOUR).url
    return urls(server, unix_server[1], cluster_url, sentinels.url)


KINDS = ["redis", "unix", "cluster", "sentinel", "memory"]


@pytest.mark.parametrize("kind", KINDS)
def test_from_url_sync_warns_about_nothing(kind: str, every_url: list[str]) -> None:
    url = every_url[KINDS.index(kind)]
    with no_warnings():
        limiter = RateLimiter.from_url(url, timeout=5.0, prefix=f"warn-s-{kind}:")
        try:
            drive_sync(limiter)
        finally:
            limiter.close()


@pytest.mark.parametrize("kind", KINDS)
def test_from_url_async_warns_about_nothing(kind: str, every_url: list[str]) -> None:
    url = every_url[KINDS.index(kind)]

    async def main() -> None:
        limiter = AsyncRateLimiter.from_url(url, timeout=5.0, prefix=f"warn-a-{kind}:")
        try:
            await drive_async(limiter)
        finally:
            await limiter.aclose()

    with no_warnings():
        run_async(main)


@pytest.mark.parametrize("kind", KINDS)
def test_configure_and_rate_limit_warn_about_nothing(kind: str, every_url: list[str]) -> None:
    url = every_url[KINDS.index(kind)]

    @rate_limit(100, 10, key="c")
    def plain() -> int:
        return 1

    @rate_limit(100, 10, key="c")
    async def coro() -> int:
        return 2

    async def main() -> None:
        assert await coro() == 2

    with no_warnings():
        tokenlimit.configure(url)
        try:
            assert plain() == 1
            run_async(main)
        finally:
            tokenlimit.configure(None)


def test_clients_of_ones_own_warn_about_nothing(
    server: Server, sentinels: SentinelGroup, testbed: Any
) -> None:
    cluster_target = testbed.get("cluster", FLAVOUR)
    addresses = [("127.0.0.1", s.port) for s in sentinels.sentinels]
    with no_warnings():
        clients: list[Any] = [
            redis.Redis.from_url(server.url),
            cluster_target.client(),
            redis.sentinel.Sentinel(addresses, socket_timeout=5).master_for(sentinels.service),
        ]
        try:
            for client in clients:
                limiter = RateLimiter(client, timeout=5.0, prefix="own-s:")
                try:
                    drive_sync(limiter)
                finally:
                    limiter.close()
        finally:
            for client in clients:
                client.close()

    async def main() -> None:
        manager = redis.asyncio.sentinel.Sentinel(addresses, socket_timeout=5)
        aclients: list[Any] = [
            redis.asyncio.Redis.from_url(server.url),
            cluster_target.async_client(),
            manager.master_for(sentinels.service),
        ]
        try:
            for client in aclients:
                limiter = AsyncRateLimiter(client, timeout=5.0, prefix="own-a:")
                try:
                    await drive_async(limiter)
                finally:
                    await limiter.aclose()
        finally:
            for client in aclients:
                await client.aclose()
            for sentinel in manager.sentinels:
                await sentinel.aclose()

    with no_warnings():
        run_async(main)


def test_a_users_sentinel_client_warns_about_nothing(sentinels: SentinelGroup) -> None:
    """The limiter's private copy of a Sentinel client's pool closes its sentinels too."""
    addresses = [("127.0.0.1", s.port) for s in sentinels.sentinels]
    with no_warnings():
        manager = redis.sentinel.Sentinel(addresses, socket_timeout=5)
        client = manager.master_for(sentinels.service)
        limiter = RateLimiter(client, timeout=5.0, prefix="own-sentinel:")
        try:
            drive_sync(limiter)
        finally:
            limiter.close()
            client.close()
            for sentinel in manager.sentinels:
                sentinel.close()


@pytest.mark.parametrize("kind", ["redis", "sentinel"])
def test_closing_right_after_the_first_decision_leaks_nothing(
    kind: str, every_url: list[str]
) -> None:
    """aclose() cancels the server check that the first decision starts; it was not awaited,
    so a connection it was still making (through the sentinels: slow enough to be caught most
    times) outlived its loop unclosed."""
    url = every_url[KINDS.index(kind)]

    async def main() -> None:
        limiter = AsyncRateLimiter.from_url(url, timeout=5.0, prefix=f"quick-{kind}:")
        try:
            await limiter.try_acquire("k", LIMIT)
            await limiter.peek("k", LIMIT)
        finally:
            await limiter.aclose()

    with no_warnings():
        for _ in range(10):
            run_async(main)
