"""tokenlimit: distributed token-bucket rate limiting on Redis and Valkey, sync and async.

Every decision is one atomic Lua call on the server, with the server's clock, so a fleet of
processes shares one exact budget per identity.
"""

from ._breaker import Breaker
from ._concurrency import AsyncConcurrency, Concurrency
from ._config import configure, default_limiter
from ._decision import Decision
from ._decorator import Guard, KeySpec
from ._errors import BackendError, ConfigError, RateLimitExceeded, TokenLimitError
from ._limit import Limit
from ._limiter import AsyncRateLimiter, RateLimiter
from ._memory import MemoryBackend
from ._metrics import MetricsSink
from ._plan import Chooser, LimitSpec

__all__ = [
    "AsyncConcurrency",
    "AsyncRateLimiter",
    "BackendError",
    "Breaker",
    "Chooser",
    "Concurrency",
    "ConfigError",
    "Decision",
    "Guard",
    "Limit",
    "LimitSpec",
    "MemoryBackend",
    "MetricsSink",
    "RateLimitExceeded",
    "RateLimiter",
    "TokenLimitError",
    "__version__",
    "configure",
    "rate_limit",
]

__version__ = "0.1.0"


def rate_limit(
    rate: float | LimitSpec | None = None,
    burst: int | None = None,
    *,
    limit: LimitSpec | None = None,
    key: KeySpec | None = None,
    cost: int = 1,
    timeout: float | None = 0,
    limiter: RateLimiter | AsyncRateLimiter | None = None,
) -> Guard:
    """Limit a function (``def`` or ``async def``) or a ``with``/``async with`` block.

    ``rate`` is tokens per second or a string like ``"100/minute"`` (``burst``: the capacity);
    ``limit`` instead a ``Limit``, a list of them, or a chooser picking them per call (called
    with the call's bound arguments). ``key`` is a template filled from those
    (``"user:{user_id}"``), a callable taking the call's arguments as given, or None (one bucket
    per function). Refused calls raise ``RateLimitExceeded`` after waiting up to ``timeout``
    seconds. Uses ``limiter``, else the one ``configure()`` set.
    """
    return Guard(
        rate, burst, limit=limit, key=key, cost=cost, timeout=timeout, limiter=limiter,
        default=default_limiter,
    )  # fmt: skip
