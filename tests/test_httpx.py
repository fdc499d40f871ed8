"""tokenlimit.integrations.httpx: the transports, on an in-process inner transport.

What a transport does around one request, seen from both sides: it takes a token before
sending (or raises without sending), hands the inner transport's response back as the same
object with its body unread, and on 429/503 with Retry-After holds back every client of the
key through the limiter's store. tests/test_outbound_fleet.py runs them against a real partner
server from several processes; tests/test_outbound.py checks the Retry-After rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import httpx
import pytest

import tokenlimit
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    ConfigError,
    Limit,
    MemoryBackend,
    RateLimiter,
    RateLimitExceeded,
)
from tokenlimit._request import Request
from tokenlimit.integrations.httpx import AsyncRateLimitTransport, RateLimitTransport

LIMIT = Limit(10, 3)


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that records whether anyone read or closed it."""

    def __init__(self) -> None:
        self.read = False
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        self.read = True
        yield b"partner body"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.read = True
        yield b"partner body"

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


class Upstream(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """The inner transport: answers ``status`` with ``headers``, counts what it was sent."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = headers or {}
        self.sent: list[httpx.Request] = []
        self.responses: list[httpx.Response] = []
        self.bodies: list[Body] = []
        self.closed = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        body = Body()
        response = httpx.Response(self.status, headers=self.headers, stream=body)
        self.bodies.append(body)
        self.responses.append(response)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self.handle_request(request)

    def close(self) -> None:
        self.closed += 1

    async def aclose(self) -> None:
        self.closed += 1


@pytest.fixture
def store() -> MemoryBackend:
    return MemoryBackend()


def get(url: str = "https://partner.example/v1/items") -> httpx.Request:
    return httpx.Request("GET", url)


# -- before sending ------------------------------------------------------------------------------


def test_takes_a_token_per_request_and_refuses_without_sending(store: MemoryBackend) -> None:
    upstream = Upstream()
    transport = RateLimitTransport(
        LIMIT, key="partner", limiter=RateLimiter(store), timeout=0, transport=upstream
    )
    for _ in range(3):
        assert transport.handle_request(get()).status_code == 200
    with pytest.raises(RateLimitExceeded) as caught:
        transport.handle_request(get())
    assert len(upstream.sent) == 3  # the refused one never left
    assert 0 < caught.value.retry_after <= 0.1
    assert RateLimiter(store).peek("partner", LIMIT).remaining == 0  # the same bucket


def test_waits_for_a_token_up_to_the_timeout(store: MemoryBackend) -> None:
    upstream = Upstream()
    limiter = RateLimiter(store)
    waiting = RateLimitTransport(
        Limit(20, 1), key="k", limiter=limiter, transport=upstream, timeout=1.0
    )
    for _ in range(3):  # the second and third wait ~50 ms each
        waiting.handle_request(get())
    assert len(upstream.sent) == 3
    patient = RateLimitTransport(
        Limit(0.01, 1), key="slow", limiter=limiter, transport=upstream, timeout=0.5
    )
    patient.handle_request(get())
    with pytest.raises(RateLimitExceeded):  # the wait (100 s) is past the timeout: at once
        patient.handle_request(get())
    assert len(upstream.sent) == 4


def test_a_key_function_of_the_request(store: MemoryBackend) -> None:
    upstream = Upstream()
    transport = RateLimitTransport(
        Limit(10, 1),
        key=lambda r: f"host:{r.url.host}",
        limiter=RateLimiter(store),
        transport=upstream,
        timeout=0,
    )
    transport.handle_request(get("https://a.example/x"))
    transport.handle_request(get("https://b.example/x"))  # its own bucket
    with pytest.raises(RateLimitExceeded):
        transport.handle_request(get("https://a.example/y"))
    bad = RateLimitTransport(
        LIMIT,
        key=lambda r: None,  # type: ignore[arg-type,return-value]
        limiter=RateLimiter(store),
        transport=upstream,
    )
    with pytest.raises(ConfigError, match="key"):
        bad.handle_request(get())


def test_the_limit_spellings(store: MemoryBackend) -> None:
    upstream = Upstream()
    limiter = RateLimiter(store)
    for spelling in (2, "2/second", Limit(2, 2), [Limit(2, 2), "100/minute"]):
        transport = RateLimitTransport(
            spelling, key=f"k{spelling!r}", limiter=limiter, transport=upstream, timeout=0
        )
        transport.handle_request(get())
        transport.handle_request(get())
        with pytest.raises(RateLimitExceeded):
            transport.handle_request(get())

    def tier(key: str) -> Limit:
        return Limit(1, 1) if key == "free" else Limit(100, 100)

    chosen = RateLimitTransport(tier, key="free", limiter=limiter, transport=upstream, timeout=0)
    chosen.handle_request(get())
    with pytest.raises(RateLimitExceeded):
        chosen.handle_request(get())


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": "often"}, "limit"),
        ({"key": ""}, "key"),
        ({"key": 5}, "key"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "1"}, "timeout"),
        ({"limiter": "redis://"}, "limiter"),
        ({"transport": object()}, "transport"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict[str, object], param: str) -> None:
    arguments: dict[str, object] = {"limit": LIMIT, "key": "k", **kwargs}
    limit = arguments.pop("limit")
    for cls in (RateLimitTransport, AsyncRateLimitTransport):
        with pytest.raises(ConfigError, match=f"^{param}: "):
            cls(limit, **arguments)  # type: ignore[arg-type]


def test_an_async_limiter_cannot_limit_the_sync_transport() -> None:
    with pytest.raises(ConfigError, match="limiter"):
        RateLimitTransport(LIMIT, key="k", limiter=AsyncRateLimiter(MemoryBackend()))  # type: ignore[arg-type]


def test_the_configured_limiter_by_default(store: MemoryBackend) -> None:
    tokenlimit.configure(RateLimiter(store))
    upstream = Upstream()
    transport = RateLimitTransport(Limit(1, 1), key="k", transport=upstream, timeout=0)
    transport.handle_request(get())
    assert RateLimiter(store).peek("k", Limit(1, 1)).remaining == 0


def test_through_a_client_and_close_closes_the_inner_transport(store: MemoryBackend) -> None:
    upstream = Upstream()
    transport = RateLimitTransport(LIMIT, key="k", limiter=RateLimiter(store), transport=upstream)
    with httpx.Client(transport=transport) as client:
        assert client.get("https://partner.example/").status_code == 200
    assert upstream.closed == 1
    assert isinstance(RateLimitTransport(LIMIT, key="k")._transport, httpx.HTTPTransport)


# -- after the response ------------------------------------------------------------------------


def test_a_429_with_retry_after_holds_back_every_client(store: MemoryBackend) -> None:
    upstream = Upstream(429, {"Retry-After": "2", "X-Partner": "yes"})
    mine = RateLimitTransport(LIMIT, key="partner", limiter=RateLimiter(store), transport=upstream)
    response = mine.handle_request(get())
    # the same object, its body unread and open: the caller may still stream it
    assert response is upstream.responses[0]
    assert response.status_code == 429
    assert response.headers["X-Partner"] == "yes"
    assert not upstream.bodies[0].read
    assert not upstream.bodies[0].closed
    assert response.read() == b"partner body"
    # another client of the key, on another limiter of the same store: held back ~2 s
    other = RateLimitTransport(
        LIMIT, key="partner", limiter=RateLimiter(store), transport=Upstream(), timeout=0
    )
    with pytest.raises(RateLimitExceeded) as caught:
        other.handle_request(get())
    assert 1.5 < caught.value.retry_after <= 2.0


@pytest.mark.parametrize(
    ("status", "retry_after", "held"),
    [
        (429, "1", True),
        (503, "1", True),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT", False),  # a date in the past: no wait
        (429, None, False),  # no Retry-After: no hold
        (429, "soon", False),  # unreadable: no hold
        (429, "0", False),
        (500, "1", False),
        (200, "1", False),
    ],
)
def test_which_answers_hold_back(
    store: MemoryBackend, status: int, retry_after: str | None, held: bool
) -> None:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    transport = RateLimitTransport(
        LIMIT, key="k", limiter=RateLimiter(store), transport=Upstream(status, headers)
    )
    assert transport.handle_request(get()).status_code == status
    assert RateLimiter(store).peek("k", LIMIT).allowed is not held


def test_an_http_date_in_the_future_holds_back_until_then(store: MemoryBackend) -> None:
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    transport = RateLimitTransport(
        LIMIT, key="k", limiter=RateLimiter(store), transport=Upstream(503, {"Retry-After": when})
    )
    transport.handle_request(get())
    assert 28 < RateLimiter(store).peek("k", LIMIT).retry_after <= 30


class FailingHold:
    """A store that decides but cannot hold back: the storage fails after the request went."""

    remote = False

    def __init__(self) -> None:
        self.store = MemoryBackend()

    def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        return self.store.decide(request, consume=consume)

    def reset(self, request: Request, *, timeout: float) -> None:
        self.store.reset(request)

    def hold_back(self, request: Request, hold_us: int, *, timeout: float) -> Sequence[int]:
        raise BackendError("the store went away", reason="connection")

    def close(self) -> None:
        pass


def test_a_failed_hold_follows_the_failure_mode() -> None:
    upstream = Upstream(429, {"Retry-After": "1"})
    closed = RateLimitTransport(
        LIMIT, key="k", limiter=RateLimiter(FailingHold()), transport=upstream
    )
    with pytest.raises(BackendError):
        closed.handle_request(get())
    assert upstream.bodies[0].closed  # not leaked
    opened = RateLimitTransport(
        LIMIT, key="k", transport=upstream, limiter=RateLimiter(FailingHold(), failure_mode="open")
    )
    assert opened.handle_request(get()) is upstream.responses[1]


# -- the async twin ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [AsyncRateLimiter, RateLimiter], ids=["async", "sync-limiter"])
def test_async_transport(
    store: MemoryBackend, make: Callable[[MemoryBackend], AsyncRateLimiter | RateLimiter]
) -> None:
    async def main() -> None:
        limiter = make(store)
        upstream = Upstream()
        transport = AsyncRateLimitTransport(
            LIMIT,
            key="k",
            limiter=limiter,
            transport=upstream,
            timeout=0,
        )
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                assert (await client.get("https://partner.example/")).status_code == 200
            with pytest.raises(RateLimitExceeded):
                await client.get("https://partner.example/")
        assert len(upstream.sent) == 3
        assert upstream.closed == 1

        upstream = Upstream(429, {"Retry-After": "2"})
        held = AsyncRateLimitTransport(LIMIT, key="held", limiter=limiter, transport=upstream)
        response = await held.handle_async_request(get())
        assert response is upstream.responses[0]
        assert not upstream.bodies[0].read
        assert await response.aread() == b"partner body"
        other = AsyncRateLimitTransport(
            LIMIT, key="held", limiter=AsyncRateLimiter(store), transport=Upstream(), timeout=0
        )
        with pytest.raises(RateLimitExceeded) as caught:
            await other.handle_async_request(get())
        assert 1.5 < caught.value.retry_after <= 2.0

    asyncio.run(main())


def test_async_transport_waits_without_blocking_the_loop(store: MemoryBackend) -> None:
    async def main() -> None:
        upstream = Upstream()
        transport = AsyncRateLimitTransport(
            Limit(10, 1), key="k", transport=upstream, limiter=AsyncRateLimiter(store), timeout=2
        )
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.gather(*(transport.handle_async_request(get()) for _ in range(4)))
        task.cancel()
        assert len(upstream.sent) == 4
        assert ticks >= 10  # ~0.3 s of waiting, the loop free all along

    asyncio.run(main())


def test_async_failed_hold_closes_the_response() -> None:
    async def main() -> None:
        upstream = Upstream(429, {"Retry-After": "1"})
        transport = AsyncRateLimitTransport(
            LIMIT, key="k", transport=upstream, limiter=RateLimiter(FailingHold())
        )
        with pytest.raises(BackendError):
            await transport.handle_async_request(get())
        assert upstream.bodies[0].closed

    asyncio.run(main())
