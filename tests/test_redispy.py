"""The redis-py internals the fast paths touch (tokenlimit/_redis/driver.py): all present on every
supported redis-py, and where one goes missing, decisions take redis-py's public path, stay
exact, and the library says so once, never an AttributeError at decision time (issue 13)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import redis
from conftest import Target

from tokenlimit import AsyncRateLimiter, Limit, RateLimiter
from tokenlimit._redis import driver as _redispy
from tokenlimit._redis.batch import Batcher
from tokenlimit._redis.sync import _Lanes

LIMIT = Limit(0.001, 5)  # no refill during the test: exactly 5 admissions per key


# What the supported releases older than the lock's lack (each has its fallback below).
ABSENT_BEFORE = {"NodesManager.move_slot": (7, 4)}


def test_every_internal_is_present_on_this_redis_py() -> None:
    _redispy.reprobe()
    version = tuple(int(part) for part in redis.__version__.split(".")[:2])
    expected = [name for name, since in ABSENT_BEFORE.items() if version < since]
    assert _redispy.missing() == expected, redis.__version__


@pytest.fixture
def without(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Probe as if redis-py lacked the internal named by the test's parameter."""
    name: str = request.param
    monkeypatch.setitem(_redispy.INTERNALS, name, lambda: False)
    _redispy.reprobe()
    yield name
    monkeypatch.undo()
    _redispy.reprobe()


def admitted(results: list[bool]) -> int:
    return sum(results)


@pytest.mark.parametrize("without", ["Connection._sock"], indirect=True)
def test_sync_without_the_socket_takes_the_public_path(
    without: str,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_lanes(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lean path ran without its internal")

    monkeypatch.setattr(_Lanes, "call", no_lanes)
    with caplog.at_level(logging.WARNING, logger="tokenlimit"):
        _redispy.reprobe()
        limiter = RateLimiter.from_url(target.url, timeout=5.0, prefix="fallback:")
        client = target.client()
        own = RateLimiter(client, timeout=5.0, prefix="fallback-own:")
        try:
            assert admitted([limiter.try_acquire("k", LIMIT).allowed for _ in range(8)]) == 5
            assert admitted([own.try_acquire("k", LIMIT).allowed for _ in range(8)]) == 5
            assert limiter.peek("k", LIMIT).remaining == 0
            limiter.reset("k", LIMIT)
            assert limiter.try_acquire("k", LIMIT).remaining == 4
        finally:
            limiter.close()
            own.close()
            client.close()
    said = [r.getMessage() for r in caplog.records if without in r.getMessage()]
    assert len(said) == 1
    assert "public path" in said[0]


@pytest.mark.parametrize(
    "without",
    [
        "asyncio Connection._reader/_writer, StreamReader._buffer",
        "asyncio ConnectionPool._in_use_connections",
    ],
    indirect=True,
)
def test_async_without_stream_internals_takes_the_public_path(
    without: str, standalone: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    streams = "_reader" in without
    if streams:

        def no_batches(*args: object, **kwargs: object) -> None:
            raise AssertionError("a batch ran without its internals")

        monkeypatch.setattr(Batcher, "submit", no_batches)

    async def main() -> list[bool]:
        limiter = AsyncRateLimiter.from_url(standalone.url, timeout=5.0, prefix="afallback:")
        try:
            decisions = await asyncio.gather(*(limiter.try_acquire("k", LIMIT) for _ in range(20)))
            return [d.allowed for d in decisions]
        finally:
            await limiter.aclose()

    assert admitted(asyncio.run(main())) == 5


@pytest.mark.parametrize(
    "without",
    ["AbstractConnection._connect", "ConnectionPool._available_connections"],
    indirect=True,
)
def test_sync_without_the_connect_hooks_still_decides(without: str, target: Target) -> None:
    limiter = RateLimiter.from_url(target.url, timeout=5.0, prefix="nohook:")
    try:
        assert admitted([limiter.try_acquire("k", LIMIT).allowed for _ in range(8)]) == 5
    finally:
        limiter.close()


def test_a_tls_socket_turns_the_lean_path_off(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean path reads raw sockets, so a TLS one sends it redis-py's way for good, before
    anything is sent on it; the reply policy still runs there (NOSCRIPT after a flush)."""
    import tokenlimit._redis.sync

    monkeypatch.setattr(tokenlimit._redis.sync, "_is_tls", lambda sock: True)
    limiter = RateLimiter.from_url(target.url, timeout=5.0, prefix="tls:")
    client = target.client()
    try:
        assert limiter.try_acquire("k", LIMIT).remaining == 4
        assert limiter.backend._lean is False  # type: ignore[attr-defined]
        client.script_flush()
        assert admitted([limiter.try_acquire("k", LIMIT).allowed for _ in range(8)]) == 4
        assert limiter.peek("k", LIMIT).remaining == 0
    finally:
        limiter.close()
        client.close()


@pytest.mark.parametrize("without", ["NodesManager.move_slot"], indirect=True)
def test_cluster_without_move_slot_rereads_the_slots(without: str) -> None:
    from tokenlimit._redis.sync import _refresh_slot

    calls: list[str] = []

    class Manager:
        def move_slot(self, moved: object) -> None:
            calls.append("move_slot")

        def initialize(self) -> None:
            calls.append("initialize")

    class Cluster:
        nodes_manager = Manager()

    _refresh_slot(Cluster(), 3999, ("127.0.0.1", 7000))
    assert calls == ["initialize"]


@pytest.mark.parametrize("coroutine", [True, False], ids=["redis-py 8", "redis-py 7.4"])
def test_async_move_slot_is_awaited_only_where_it_is_a_coroutine(
    coroutine: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async ``NodesManager.move_slot`` is a coroutine function from redis-py 8.0, a plain
    function in 7.4: either way the slot map learns the node that MOVED names."""
    from redis.exceptions import MovedError

    from tokenlimit._redis.aio import AsyncRedisBackend

    moved: list[tuple[int, str, int]] = []

    def record(error: MovedError) -> None:
        moved.append((error.slot_id, error.host, error.port))

    class Manager:
        if coroutine:

            async def move_slot(self, error: MovedError) -> None:
                record(error)

        else:

            def move_slot(self, error: MovedError) -> None:
                record(error)

    backend = object.__new__(AsyncRedisBackend)
    backend.client = type("Cluster", (), {"nodes_manager": Manager()})()  # type: ignore[assignment]
    monkeypatch.setitem(_redispy.INTERNALS, "NodesManager.move_slot", lambda: True)
    _redispy.reprobe()  # as on the redis-py releases that have it, whichever runs the test
    try:
        asyncio.run(backend._refresh_slot(3999, ("127.0.0.1", 7000)))
    finally:
        monkeypatch.undo()
        _redispy.reprobe()
    assert moved == [(3999, "127.0.0.1", 7000)]
