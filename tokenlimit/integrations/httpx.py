"""httpx: ``RateLimitTransport`` and ``AsyncRateLimitTransport``, for calling a partner's API.

    transport = RateLimitTransport("20/second", key="partner")  # burst: one second's worth
    client = httpx.Client(base_url="https://api.partner.example", transport=transport)

Every request waits for a token of ``limit`` under ``key`` before it is sent, up to ``timeout``
seconds (None: as long as it takes; 0: not at all), else raises ``tokenlimit.RateLimitExceeded``
and sends nothing. A 429 or 503 answer with ``Retry-After`` (delay-seconds or an HTTP-date)
holds back every client of the key, in every process sharing the limiter's store, until then
(``RateLimiter.hold_back``, at most a day); the response is returned to the caller unchanged,
its body unread. ``key`` is a string, or a function of the ``httpx.Request`` (such as its host).
The limiter is ``limiter=``, else the one ``tokenlimit.configure()`` set; storage failures
follow its ``failure_mode``. Each hop of a redirect is a request, and takes a token.
"""

from __future__ import annotations

from tokenlimit._errors import ConfigTypeError
from tokenlimit._extras import needs_extra
from tokenlimit._limiter import AsyncRateLimiter, RateLimiter
from tokenlimit._plan import LimitSpec
from tokenlimit.integrations._outbound import KeySpec, Outbound

with needs_extra("httpx", "httpx", feature=__name__):
    import httpx

__all__ = ["AsyncRateLimitTransport", "RateLimitTransport"]


class RateLimitTransport(httpx.BaseTransport):
    """Wraps ``transport`` (default ``httpx.HTTPTransport()``), which ``close()`` closes."""

    def __init__(
        self,
        limit: LimitSpec | float,
        *,
        key: KeySpec[httpx.Request],
        limiter: RateLimiter | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float | None = None,
    ) -> None:
        self._outbound: Outbound[httpx.Request] = Outbound.of(
            limit, key, limiter, timeout, sync=True
        )
        given: object = transport
        if given is not None and not isinstance(given, httpx.BaseTransport):
            raise ConfigTypeError(
                "transport", f"must be an httpx.BaseTransport, not {type(given).__name__}"
            )
        self._transport = transport if transport is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        ticket = self._outbound.admit(request)
        response = self._transport.handle_request(request)
        try:
            self._outbound.observe(
                ticket, response.status_code, response.headers.get("Retry-After")
            )
        except BaseException:  # the hold failed (failure_mode="closed"): the caller gets the error
            response.close()
            raise
        return response

    def close(self) -> None:
        self._transport.close()


class AsyncRateLimitTransport(httpx.AsyncBaseTransport):
    """The async twin: wraps ``transport`` (default ``httpx.AsyncHTTPTransport()``), which
    ``aclose()`` closes. ``limiter`` may be an ``AsyncRateLimiter`` or a ``RateLimiter`` (whose
    calls then run in a worker thread, never blocking the event loop)."""

    def __init__(
        self,
        limit: LimitSpec | float,
        *,
        key: KeySpec[httpx.Request],
        limiter: AsyncRateLimiter | RateLimiter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float | None = None,
    ) -> None:
        self._outbound: Outbound[httpx.Request] = Outbound.of(
            limit, key, limiter, timeout, sync=False
        )
        given: object = transport
        if given is not None and not isinstance(given, httpx.AsyncBaseTransport):
            raise ConfigTypeError(
                "transport", f"must be an httpx.AsyncBaseTransport, not {type(given).__name__}"
            )
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        ticket = await self._outbound.aadmit(request)
        response = await self._transport.handle_async_request(request)
        try:
            await self._outbound.aobserve(
                ticket, response.status_code, response.headers.get("Retry-After")
            )
        except BaseException:
            await response.aclose()
            raise
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()
