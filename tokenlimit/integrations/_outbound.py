"""What the outbound integrations share (httpx transports, the requests adapter), free of any
HTTP library.

Before a request is sent, ``admit``/``aadmit`` wait for a token of the limit under the request's
key, up to the configured wait (None: as long as it takes; 0: not at all), and otherwise raise
``RateLimitExceeded``: nothing is sent. After the response, ``observe``/``aobserve`` read its
status and ``Retry-After``: a 429 or 503 with a usable one holds back every client of the key,
in every process sharing the store (``hold_back``). The response itself is the caller's: only
its status and one header are read, never its body.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Generic, NamedTuple, TypeVar

from tokenlimit._backend import is_remote
from tokenlimit._config import default_async_limiter, default_sync_limiter
from tokenlimit._decorator import _acquire_off_loop
from tokenlimit._errors import ConfigTypeError
from tokenlimit._limit import Limit
from tokenlimit._limiter import AsyncRateLimiter, RateLimiter
from tokenlimit._plan import LimitPlan, LimitSpec
from tokenlimit._validate import MAX_HOLD, check_key, check_timeout
from tokenlimit.integrations._check import check_limiter

__all__ = ["HOLD_STATUSES", "KeySpec", "Outbound", "Ticket", "hold_seconds"]

RequestT = TypeVar("RequestT")
KeySpec = str | Callable[[RequestT], str]
"""An outbound request's key: one string for every request, or a function of the request."""

HOLD_STATUSES = frozenset({429, 503})
# RFC 9110 delay-seconds is 1*DIGIT; a decimal fraction is accepted too (some APIs send one).
_DELAY = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def hold_seconds(
    status: int, retry_after: str | None, *, now: datetime | None = None
) -> float | None:
    """How long an upstream's answer asks every client to wait: None unless ``status`` is 429
    or 503 with a ``Retry-After`` in delay-seconds or an HTTP-date in the future (``now``:
    this host's clock, UTC); at most ``MAX_HOLD`` (a day), whatever the upstream asks."""
    if status not in HOLD_STATUSES or retry_after is None:
        return None
    value = retry_after.strip()
    if _DELAY.fullmatch(value):
        seconds = float(value)  # digits beyond a float's range read as inf, then capped
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None  # neither form: no hold
        if when.tzinfo is None:  # "-0000": UTC, source unknown
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if not seconds > 0:
        return None
    return min(seconds, MAX_HOLD)


class Ticket(NamedTuple):
    """One admitted request: the limiter, key and limits its response is observed with."""

    limiter: RateLimiter | AsyncRateLimiter
    key: str
    limits: tuple[Limit, ...]


@dataclass(frozen=True, slots=True)
class Outbound(Generic[RequestT]):
    """A transport's or adapter's checked options, and the steps around one request."""

    plan: LimitPlan
    key: KeySpec[RequestT]
    limiter: RateLimiter | AsyncRateLimiter | None  # None: the default, looked up per request
    wait: float | None

    @classmethod
    def of(
        cls,
        limit: LimitSpec | float,
        key: KeySpec[RequestT],
        limiter: RateLimiter | AsyncRateLimiter | None,
        timeout: float | None,
        *,
        sync: bool,
    ) -> Outbound[RequestT]:
        """Every argument checked, each error naming its parameter. ``limit``: a number of
        requests per second, a string such as ``"20/second"``, a ``Limit``, a list, or a
        chooser called with the key; ``sync``: the limiter must be a ``RateLimiter``."""
        plan = LimitPlan.of(limit, name="limit")
        given: object = key
        if isinstance(given, str):
            check_key(given)
        elif not callable(given):
            raise ConfigTypeError(
                "key", f"must be a str or a callable taking the request, not {type(given).__name__}"
            )
        return cls(plan, key, check_limiter(limiter, sync=sync), check_timeout("timeout", timeout))

    def key_for(self, request: RequestT) -> str:
        key = self.key
        if isinstance(key, str):
            return key
        value: object = key(request)
        if not isinstance(value, str) or not value:
            raise ConfigTypeError(
                "key", f"{getattr(key, '__qualname__', key)!r} returned {value!r}, not a str"
            )
        return value

    # -- sync code ------------------------------------------------------------------------------
    def admit(self, request: RequestT) -> Ticket:
        """Wait for a token (``RateLimitExceeded`` past the wait); the ticket to observe with."""
        limiter = self.limiter if self.limiter is not None else default_sync_limiter()
        if limiter.is_async:
            raise ConfigTypeError(
                "limiter", "an AsyncRateLimiter cannot limit sync requests; use a RateLimiter"
            )
        key = self.key_for(request)
        limits = self.plan.limits_for(key)
        limiter.acquire(key, limits, timeout=self.wait)
        return Ticket(limiter, key, limits)

    def observe(self, ticket: Ticket, status: int, retry_after: str | None) -> None:
        """Hold back every client of the key if the upstream asked to wait."""
        seconds = hold_seconds(status, retry_after)
        limiter = ticket.limiter
        if seconds is not None and not limiter.is_async:
            limiter.hold_back(ticket.key, ticket.limits, seconds)

    # -- async code -----------------------------------------------------------------------------
    async def aadmit(self, request: RequestT) -> Ticket:
        """``admit`` without blocking the event loop (a sync limiter's calls run in a thread)."""
        limiter = self.limiter if self.limiter is not None else default_async_limiter()
        key = self.key_for(request)
        limits = await self.plan.alimits_for(key)
        if limiter.is_async:
            await limiter.acquire(key, limits, timeout=self.wait)
        else:
            await _acquire_off_loop(limiter, key, limits, 1, self.wait)
        return Ticket(limiter, key, limits)

    async def aobserve(self, ticket: Ticket, status: int, retry_after: str | None) -> None:
        seconds = hold_seconds(status, retry_after)
        if seconds is None:
            return
        limiter = ticket.limiter
        if limiter.is_async:
            await limiter.hold_back(ticket.key, ticket.limits, seconds)
        elif is_remote(limiter.backend):
            await asyncio.to_thread(limiter.hold_back, ticket.key, ticket.limits, seconds)
        else:
            limiter.hold_back(ticket.key, ticket.limits, seconds)
