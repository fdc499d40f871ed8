"""The IO-free middle of every limiter: requests in, decisions out.

Builds the keys and script arguments for a call, decodes the script's integer reply into a
``Decision``, and holds the bits of policy (fail-open decisions, throttled logging) that the sync
and async limiters share.
"""

from __future__ import annotations

import binascii
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ._decision import Decision, decision
from ._errors import ConfigError, ConfigTypeError
from ._limit import Limit, coerce_limits
from ._resp import pack_bulk
from ._validate import check_cost, check_key, check_number, shown

__all__ = [
    "FAILURE_MODES",
    "Request",
    "achoose_limits",
    "build_request",
    "check_failure_mode",
    "check_prefix",
    "choose_limits",
    "chosen_limits",
    "decode_reply",
    "fail_open_decision",
    "identity_tag",
]

logger = logging.getLogger("tokenlimit")
_URLSAFE = bytes.maketrans(b"+/", b"-_")

FAILURE_MODES = ("open", "closed")
DEFAULT_PREFIX = "tl:"
DEFAULT_TIMEOUT = 0.5
# A day: the deadline becomes socket, poll and lock timeouts, which overflow past ~24 days.
MAX_DEADLINE = 86_400.0


class Request(NamedTuple):
    """One decision to make: the bucket keys, the script arguments, and the limits behind them.

    ``tail`` is ``numkeys, *keys, *args`` already packed as RESP bulk strings, and ``size`` the
    number of those strings: a script call is then a header, the script's SHA and ``tail``.
    A named tuple: a new key makes one per decision, and a frozen dataclass took 2 us to build.
    """

    keys: tuple[str, ...]
    args: tuple[str, ...]
    limits: tuple[Limit, ...]
    cost: int
    tail: bytes = b""
    size: int = 0

    @property
    def params(self) -> tuple[tuple[int, int], ...]:
        """``(interval_ns, burst)`` per limit, as the model and the memory backend take them."""
        return tuple((limit.interval_ns, limit.burst) for limit in self.limits)


def identity_tag(identity: bytes) -> str:
    """The hash tag for an identity: 96 bits of BLAKE2b, base64url, 16 characters.

    Hashing makes keys injective in practice, short whatever the identity's length, free of the
    braces that would move the cluster slot, and keeps API keys out of Redis in clear text.
    """
    digest = hashlib.blake2b(identity, digest_size=12).digest()
    # = base64.urlsafe_b64encode(digest).decode(), without its Python-level layers
    return binascii.b2a_base64(digest, newline=False).translate(_URLSAFE).decode()


def check_prefix(prefix: Any) -> str:
    """A key prefix: a str without braces (a brace would hijack the cluster hash tag)."""
    if not isinstance(prefix, str):
        raise ConfigTypeError("prefix", f"must be a str, not {type(prefix).__name__}")
    if "{" in prefix or "}" in prefix:
        raise ConfigError("prefix", "must not contain '{' or '}' (they choose the cluster slot)")
    return prefix


def check_failure_mode(mode: Any) -> str:
    """``"open"`` or ``"closed"``."""
    if mode not in FAILURE_MODES:
        raise ConfigError("failure_mode", f"must be 'open' or 'closed', got {mode!r}")
    return str(mode)


def check_deadline(timeout: Any) -> float:
    """The limiter's per-decision deadline: a number of seconds > 0, at most a day."""
    return check_number("timeout", timeout, maximum=MAX_DEADLINE)


# Requests for recent (prefix, key, limit, cost) calls: a hot key skips validation, hashing and
# packing. Only exact str, int and Limit (or tuple of Limits) arguments are cached (hashable,
# and equal means identical keys); the dict is emptied when full, cheaper than LRU bookkeeping.
# Keys of up to _CACHED_KEY_CHARS only: the cache holds at most 4096 x 256 characters of
# caller keys, however long the keys callers send (a longer one is built at each call).
_CACHE_SIZE = 4096
_CACHED_KEY_CHARS = 256
_cache: dict[tuple[str, str, Limit | tuple[Limit, ...], int], Request] = {}


def build_request(prefix: str, key: Any, limit: Any, cost: Any = 1) -> Request:
    """Validate one call's arguments and turn them into keys and packed script arguments."""
    if (
        type(key) is str
        and type(cost) is int
        and (
            type(limit) is Limit
            or (type(limit) is tuple and all(type(item) is Limit for item in limit))
        )
    ):
        entry = (prefix, key, limit, cost)
        request = _cache.get(entry)
        if request is None:
            request = _build(prefix, key, limit, cost)
            if len(key) <= _CACHED_KEY_CHARS:  # checked on a miss only: hits cost nothing more
                if len(_cache) >= _CACHE_SIZE:
                    _cache.clear()
                _cache[entry] = request
        return request
    if callable(limit):  # a chooser (tiers): cached by the limit it chose, never by itself
        check_key(key)
        return build_request(prefix, key, choose_limits(limit, key), cost)
    return _build(prefix, key, limit, cost)


# -- tiers: a callable standing in for the limit --------------------------------------------------
def _chooser_name(choose: Callable[..., Any]) -> str:
    return getattr(choose, "__qualname__", None) or repr(choose)


def chosen_limits(choose: Callable[..., Any], value: Any) -> tuple[Limit, ...]:
    """What the limit chooser ``choose`` returned, as limits; an error naming ``limit`` if it is
    not a ``Limit``, a string like ``"100/minute"`` or a list of them."""
    if type(value) is Limit:
        return (value,)
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: no "coroutine was never awaited" warning
        raise ConfigTypeError(
            "limit",
            f"{_chooser_name(choose)} returned an awaitable; an async limit chooser needs "
            "async code (AsyncRateLimiter, an async def, an async view)",
        )
    try:
        return coerce_limits(value)
    except ConfigError as exc:
        reason = str(exc).removeprefix(f"{exc.param}: ")
        raise type(exc)(
            "limit", f"{_chooser_name(choose)} returned {value!r}, not a usable limit: {reason}"
        ) from None


def choose_limits(choose: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Limit, ...]:
    """Call a sync limit chooser and check what it returned."""
    return chosen_limits(choose, choose(*args, **kwargs))


async def achoose_limits(
    choose: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Limit, ...]:
    """Call a limit chooser from async code: it may be a coroutine function (or return an
    awaitable)."""
    value = choose(*args, **kwargs)
    if inspect.isawaitable(value):
        value = await value
    return chosen_limits(choose, value)


def _build(prefix: str, key: Any, limit: Any, cost: Any) -> Request:
    if type(limit) is Limit and type(cost) is int and 1 <= cost <= limit.burst:
        return _build_one(prefix, check_key(key), limit, cost)
    identity = check_key(key)
    limits = coerce_limits(limit)
    cost = check_cost(cost)
    smallest = min(lim.burst for lim in limits)
    if cost > smallest:
        raise ConfigError(
            "cost", f"{shown(cost)} exceeds the burst {smallest}; it could never be admitted"
        )
    head = f"{prefix}{{{identity_tag(identity)}}}"
    keys = tuple(head + lim._id for lim in limits)
    args = [str(cost)]
    for lim in limits:
        args.append(str(lim.interval_ns))
        args.append(str(lim.burst))
    strings = (str(len(keys)), *keys, *args)
    return Request(keys, tuple(args), limits, cost, pack_bulk(strings), len(strings))


def _build_one(prefix: str, identity: bytes, limit: Limit, cost: int) -> Request:
    """``_build`` for the common call, one limit and a valid cost, with the limit's part of
    the packed arguments made once per limit: a new key costs a hash and a few joins."""
    bucket = f"{prefix}{{{identity_tag(identity)}}}{limit._id}"
    raw = bucket.encode()
    costs = b"%d" % cost
    packed = b"$1\r\n1\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
        len(raw), raw, len(costs), costs, limit._packed
    )  # fmt: skip
    args = (str(cost), str(limit.interval_ns), str(limit.burst))
    return Request((bucket,), args, (limit,), cost, packed, 5)


def decode_reply(reply: Sequence[Any], limits: Sequence[Limit]) -> Decision:
    """Turn the script's integer reply into a Decision reporting the most restrictive limit."""
    if len(reply) != 2 + 4 * len(limits):
        raise ValueError(f"unexpected reply length {len(reply)} for {len(limits)} limit(s)")
    if len(limits) == 1:  # the common case, in one object
        lim = limits[0]
        allowed = int(reply[1]) == 1
        return decision(
            allowed,
            lim.burst,
            int(reply[3]),
            0.0 if allowed else int(reply[4]) / 1e6,
            int(reply[5]) / 1e6,
            lim,
        )
    allowed = int(reply[1]) == 1
    details = []
    for i, lim in enumerate(limits):
        base = 2 + 4 * i
        details.append(
            Decision(
                allowed=int(reply[base]) == 1,
                limit=lim.burst,
                remaining=int(reply[base + 1]),
                retry_after=int(reply[base + 2]) / 1e6 if not allowed else 0.0,
                reset_after=int(reply[base + 3]) / 1e6,
                policy=lim,
            )
        )
    if allowed:
        worst = min(details, key=lambda d: (d.remaining, -d.reset_after))
    else:
        worst = max(details, key=lambda d: (d.retry_after, -d.remaining))
    return Decision(
        allowed=allowed,
        limit=worst.limit,
        remaining=worst.remaining,
        retry_after=worst.retry_after,
        reset_after=worst.reset_after,
        policy=worst.policy,
        details=tuple(details),
    )


def fail_open_decision(limits: Sequence[Limit]) -> Decision:
    """What ``failure_mode="open"`` answers when storage fails: admitted, nothing known."""
    lim = min(limits, key=lambda x: x.burst)
    return Decision(allowed=True, limit=lim.burst, remaining=lim.burst, retry_after=0.0,
                    reset_after=0.0, policy=lim)  # fmt: skip


class ThrottledLog:
    """Log a storage failure at most once per ``interval`` seconds, counting what it held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        logger.warning("%s: %s%s", message, exc, more)
