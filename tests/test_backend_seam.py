"""The backend seam (tokenlimit/_backend.py): every built-in backend implements it, and a third
party's plugs in through it alone, as httpx's MockTransport does through its transport seam."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
from conftest import Target

from tokenlimit import AsyncRateLimiter, Limit, MemoryBackend, RateLimiter, RateLimitExceeded
from tokenlimit._backend import AsyncBackend, SyncBackend
from tokenlimit._request import Request
from tokenlimit.testing import areset_all, reset_all

LIMIT = Limit(0.001, 3)  # no refill worth speaking of during a test


class Recording:
    """A third party's backend: keeps its state in a store it owns and counts every call. It
    says it is remote, so limiters treat it as they treat a server."""

    remote = True

    def __init__(self) -> None:
        self.store = MemoryBackend()  # any storage would do: here, one the test can trust
        self.calls: list[str] = []
        self.threads: set[int] = set()

    def _seen(self, name: str) -> None:
        self.calls.append(name)
        self.threads.add(threading.get_ident())

    def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        self._seen("decide")
        return self.store.decide(request, consume=consume)

    def reset(self, request: Request, *, timeout: float) -> None:
        self._seen("reset")
        self.store.reset(request)

    def hold_back(self, request: Request, hold_us: int, *, timeout: float) -> Sequence[int]:
        self._seen("hold_back")
        return self.store.hold_back(request, hold_us)

    def refund(self, request: Request, *, timeout: float) -> Sequence[int]:
        self._seen("refund")
        return self.store.refund(request)

    def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float
    ) -> Sequence[int]:
        self._seen("hold_slot")
        return self.store.hold_slot(key, holder, max_in_flight, lease_us)

    def release_slot(self, key: str, holder: str, *, timeout: float) -> int:
        self._seen("release_slot")
        return self.store.release_slot(key, holder)

    def clear_prefix(self, prefix: str) -> int:
        self._seen("clear_prefix")
        return self.store.clear_prefix(prefix)

    def close(self) -> None:
        self._seen("close")


class AsyncRecording:
    """The async twin, on the same kind of store."""

    remote = True

    def __init__(self) -> None:
        self.sync = Recording()

    async def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        return self.sync.decide(request, consume=consume, timeout=timeout)

    async def reset(self, request: Request, *, timeout: float) -> None:
        self.sync.reset(request, timeout=timeout)

    async def hold_back(self, request: Request, hold_us: int, *, timeout: float) -> Sequence[int]:
        return self.sync.hold_back(request, hold_us, timeout=timeout)

    async def refund(self, request: Request, *, timeout: float) -> Sequence[int]:
        return self.sync.refund(request, timeout=timeout)

    async def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float
    ) -> Sequence[int]:
        return self.sync.hold_slot(key, holder, max_in_flight, lease_us, timeout=timeout)

    async def release_slot(self, key: str, holder: str, *, timeout: float) -> int:
        return self.sync.release_slot(key, holder, timeout=timeout)

    async def clear_prefix(self, prefix: str) -> int:
        return self.sync.clear_prefix(prefix)

    async def aclose(self) -> None:
        self.sync.close()


def test_the_built_in_backends_implement_the_seam(target: Target) -> None:
    assert isinstance(MemoryBackend(), SyncBackend)
    limiter = RateLimiter.from_url(target.url, timeout=5.0)
    try:
        assert isinstance(limiter.backend, SyncBackend)
        assert limiter.backend.remote
        assert not MemoryBackend().remote
    finally:
        limiter.close()

    async def main() -> None:
        for limiter in (
            AsyncRateLimiter.from_url(target.url, timeout=5.0),
            AsyncRateLimiter(target.async_client(), timeout=5.0),
            AsyncRateLimiter(MemoryBackend()),
        ):
            try:
                assert isinstance(limiter.backend, AsyncBackend)
            finally:
                await limiter.aclose()

    asyncio.run(main())


def test_a_third_party_backend_serves_every_sync_entry_point() -> None:
    backend = Recording()
    assert isinstance(backend, SyncBackend)
    limiter = RateLimiter(backend)
    assert [limiter.try_acquire("k", LIMIT).allowed for _ in range(4)] == [True] * 3 + [False]
    assert limiter.peek("k", LIMIT).remaining == 0
    limiter.reset("k", LIMIT)
    assert limiter.try_acquire("k", LIMIT).remaining == 2
    assert not limiter.hold_back("held", LIMIT, 5).allowed
    assert not limiter.try_acquire("held", LIMIT).allowed
    assert limiter.refund("k", LIMIT).remaining == 3  # the one taken since the reset
    with limiter.concurrency("job", 1), pytest.raises(RateLimitExceeded):
        limiter.concurrency("job", 1).__enter__()

    @limiter.limit(0.001, 1, key="f")
    def work() -> int:
        return 1

    assert work() == 1
    with pytest.raises(RateLimitExceeded):
        work()
    assert reset_all(limiter) > 0
    limiter.close()
    assert {
        "decide", "reset", "hold_back", "refund", "hold_slot", "release_slot", "clear_prefix",
        "close",
    } <= set(backend.calls)  # fmt: skip


def test_a_remote_third_party_backend_runs_off_the_event_loop() -> None:
    """A sync limiter on a backend that says it is remote decides in a worker thread when an
    ``async def`` is decorated, as on Redis; the memory store decides inline."""
    backend = Recording()
    limiter = RateLimiter(backend)

    @limiter.limit(100, 10, key="a")
    async def handler() -> int:
        return 1

    loop_thread: set[int] = set()

    async def main() -> None:
        loop_thread.add(threading.get_ident())
        assert await handler() == 1

    asyncio.run(main())
    assert backend.threads
    assert not backend.threads & loop_thread


def test_a_third_party_async_backend_serves_the_async_limiter() -> None:
    backend = AsyncRecording()
    assert isinstance(backend, AsyncBackend)

    async def main() -> None:
        limiter = AsyncRateLimiter(backend)
        decisions = [await limiter.try_acquire("k", LIMIT) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True] * 3 + [False]
        assert not (await limiter.hold_back("held", LIMIT, 5)).allowed
        assert (await limiter.refund("k", LIMIT)).remaining == 1
        async with limiter.concurrency("job", 1):
            with pytest.raises(RateLimitExceeded):
                async with limiter.concurrency("job", 1):
                    pass
        assert await areset_all(limiter) > 0
        await limiter.aclose()

    asyncio.run(main())
    assert {"hold_slot", "hold_back", "refund"} <= set(backend.sync.calls)


def test_a_minimal_backend_decides_and_says_what_it_cannot_do() -> None:
    """Only decide/reset/close, the seam's first version: decisions work; a concurrency limit
    is refused at once, naming the missing capability."""

    class Minimal:
        def __init__(self) -> None:
            self.store = MemoryBackend()

        def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
            return self.store.decide(request, consume=consume)

        def reset(self, request: Request, *, timeout: float) -> None:
            self.store.reset(request)

        def close(self) -> None:
            pass

    limiter = RateLimiter(Minimal())
    assert limiter.try_acquire("k", LIMIT).allowed
    with pytest.raises(TypeError, match="concurrency"):
        limiter.concurrency("job", 1).__enter__()
