"""requests: ``RateLimitAdapter``, mounted on a ``requests.Session`` for a partner's API.

    session = requests.Session()
    session.mount("https://api.partner.example/", RateLimitAdapter("20/second", key="partner"))

Every request sent through the adapter waits for a token of ``limit`` under ``key`` first, up
to ``timeout`` seconds (None: as long as it takes; 0: not at all), else raises
``tokenlimit.RateLimitExceeded`` and sends nothing. ``timeout`` is that wait, not the HTTP
timeout, which ``session.get(..., timeout=...)`` still sets per request. A 429 or 503 answer with
``Retry-After`` (delay-seconds or an HTTP-date) holds back every client of the key, in every
process sharing the limiter's store, until then (``RateLimiter.hold_back``, at most a day); the
response is returned unchanged, its body unread (``stream=True`` still streams). ``key`` is a
string, or a function of the ``requests.PreparedRequest``. The limiter is ``limiter=``, else
the one ``tokenlimit.configure()`` set; storage failures follow its ``failure_mode``. The other
keywords are ``HTTPAdapter``'s; keep ``max_retries`` off 429/503 (urllib3 would retry below the
limiter, untaxed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from tokenlimit._extras import needs_extra
from tokenlimit._limiter import RateLimiter
from tokenlimit._plan import LimitSpec
from tokenlimit.integrations._outbound import KeySpec, Outbound

with needs_extra("requests", "requests", feature=__name__):
    from requests import PreparedRequest, Response
    from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, DEFAULT_RETRIES, HTTPAdapter

if TYPE_CHECKING:
    from urllib3.util.retry import Retry

__all__ = ["RateLimitAdapter"]


class RateLimitAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` that takes a token before each request it sends."""

    def __init__(
        self,
        limit: LimitSpec | float,
        *,
        key: KeySpec[PreparedRequest],
        limiter: RateLimiter | None = None,
        timeout: float | None = None,
        pool_connections: int = DEFAULT_POOLSIZE,
        pool_maxsize: int = DEFAULT_POOLSIZE,
        max_retries: Retry | int | None = DEFAULT_RETRIES,
        pool_block: bool = DEFAULT_POOLBLOCK,
    ) -> None:
        self._outbound: Outbound[PreparedRequest] = Outbound.of(
            limit, key, limiter, timeout, sync=True
        )
        super().__init__(pool_connections, pool_maxsize, max_retries, pool_block)

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        ticket = self._outbound.admit(request)
        response = super().send(request, stream, timeout, verify, cert, proxies)
        try:
            self._outbound.observe(
                ticket, response.status_code, response.headers.get("Retry-After")
            )
        except BaseException:  # the hold failed (failure_mode="closed"): the caller gets the error
            response.close()
            raise
        return response
