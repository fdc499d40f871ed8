"""What every framework integration shares, free of any framework: the default identity
(an API key the app vouches for, then user, then client IP through trusted proxies), exempt
paths, methods and predicates, response headers, the 429/503 bodies, and deciding (or giving
tokens back) without blocking an event loop."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

from tokenlimit._backend import is_remote
from tokenlimit._decision import Decision
from tokenlimit._errors import ConfigError, ConfigTypeError
from tokenlimit._leasing import held_admission
from tokenlimit._limit import Limit
from tokenlimit._limiter import AsyncRateLimiter, RateLimiter
from tokenlimit._plan import LimitChoice, LimitPlan, LimitSpec
from tokenlimit._validate import check_cost

__all__ = [
    "ApiKeyValidator",
    "KeyFunction",
    "LimitChooser",
    "Policy",
    "RequestLimit",
    "RequestT",
    "ResponsePredicate",
    "TrustedProxies",
    "api_key_identity",
    "check_methods",
    "check_predicate",
    "custom_identity",
    "decide_async",
    "decide_sync",
    "default_identity",
    "held_tokens",
    "ip_identity",
    "rate_limit_headers",
    "raw_fields",
    "raw_rate_limit_headers",
    "record_request",
    "refund_async",
    "refund_sync",
    "refused_body",
    "response_headers",
    "retry_after_seconds",
    "unavailable_body",
]

logger = logging.getLogger("tokenlimit")

UNKNOWN_IP = "ip:unknown"  # the one bucket of every client whose address is unknown

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_ip(text: str | None) -> IPAddress | None:
    if not text:
        return None
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:5000"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return _embedded_ipv4(address) or address
    return address


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 7915 IPv4-translated


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 client inside an IPv6 form that carries one: mapped, NAT64, SIIT or Teredo.
    Left as IPv6, all the IPv4 clients behind such a form would share one /64 bucket."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or address in _SIIT:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.teredo is not None:
        return address.teredo[1]
    return None


def _unix_socket_peer(peer: str | None) -> bool:
    """True for the peer a server reports for a unix-socket connection: none, ``""``, or the
    socket's path. Only a local process (a proxy) can connect there."""
    return not peer or peer.startswith(("/", "unix:"))


class TrustedProxies:
    """Which ``X-Forwarded-For`` entries to believe.

    ``None``/``0``: none (the socket peer is the client). An ``int`` N: exactly N proxies stand
    in front of the app, so the client is the Nth address from the right. A list of CIDRs: walk
    from the socket peer leftwards through the header while the address is a trusted proxy; the
    first untrusted address is the client. A spoofed header from an untrusted peer is ignored.

    A unix-socket peer (no address, or a path) is a local proxy, trusted whatever the spec:
    unless a hop count is given, the walk starts at the header's right-most entry.
    """

    __slots__ = ("hops", "networks")

    def __init__(self, spec: int | str | Iterable[str] | None = None) -> None:
        self.hops = 0
        self.networks: tuple[IPNetwork, ...] = ()
        if spec is None:
            return
        if isinstance(spec, bool):
            raise ConfigTypeError("trusted_proxies", "must be a hop count or a list of CIDRs")
        if isinstance(spec, int):
            if spec < 0:
                raise ConfigError("trusted_proxies", f"hop count must be >= 0, got {spec}")
            self.hops = spec
            return
        items = [spec] if isinstance(spec, str) else list(spec)
        networks = []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
            except ValueError:
                raise ConfigError("trusted_proxies", f"not an IP network: {item!r}") from None
        self.networks = tuple(networks)

    def _trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def ignores_header(self, peer: str | None) -> bool:
        """True when ``X-Forwarded-For`` cannot matter for ``peer``, known without parsing it:
        no proxy is trusted and the peer is no unix socket."""
        return not self.hops and not self.networks and not _unix_socket_peer(peer)

    def reads_header(self, peer: str | None, peer_ip: IPAddress | None) -> bool:
        """Whether ``X-Forwarded-For`` may name the client of a request from ``peer``."""
        if self.hops:
            return True
        if peer_ip is None:
            return _unix_socket_peer(peer)
        return self._trusted(peer_ip)

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> IPAddress | None:
        """The client's address given the socket peer and the ``X-Forwarded-For`` value."""
        peer_ip = _parse_ip(peer)
        if not forwarded_for or not self.reads_header(peer, peer_ip):
            return peer_ip
        chain = [part.strip() for part in forwarded_for.split(",") if part.strip()]
        if self.hops:
            if not chain:
                return peer_ip
            return _parse_ip(chain[-min(self.hops, len(chain))]) or peer_ip
        for entry in reversed(chain):
            address = _parse_ip(entry)
            if address is None:
                return None  # garbage after a trusted proxy: do not guess
            if not self._trusted(address):
                return address
        return _parse_ip(chain[0]) if chain else peer_ip


def ip_identity(address: IPAddress | None, ipv6_prefix: int = 64) -> str:
    """``ip:<addr>``; IPv6 clients grouped by ``/ipv6_prefix`` (one /64 is one subscriber)."""
    if address is None:
        return UNKNOWN_IP
    if isinstance(address, ipaddress.IPv6Address) and ipv6_prefix < 128:
        network = ipaddress.IPv6Network((address, ipv6_prefix), strict=False)
        return f"ip:{network}"
    return f"ip:{address}"


def api_key_identity(raw: str) -> str:
    """``apikey:<hash>``: the key itself never reaches Redis, logs or headers.

    Unkeyed on purpose: an API key's entropy makes its digest unguessable, and the limiter keys
    the hash of this identity (like every identity) with its ``hash_secret`` on the way to a
    bucket key; ``tokenlimit peek --api-key`` and existing buckets compute the same string."""
    digest = hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"apikey:{digest}"


def default_identity(
    *,
    api_key: str | None,
    user_id: object,
    peer: str | None,
    forwarded_for: str | None,
    proxies: TrustedProxies,
    ipv6_prefix: int = 64,
) -> str:
    """API key, then authenticated user, then client IP.

    ``api_key`` must be one the app vouches for (its header opted into, its validator passed:
    see ``_check``): a key taken as the caller presents it would let a client mint a fresh
    bucket per request with made-up keys.
    """
    if api_key:
        return api_key_identity(api_key)
    if user_id is not None and user_id != "":
        return f"user:{user_id}"
    if forwarded_for and proxies.ignores_header(peer):
        forwarded_for = None  # never read, so never a cache key
    if len(peer or "") + len(forwarded_for or "") <= _CACHED_INPUT_CHARS:
        key = _ip_key(peer, forwarded_for, proxies, ipv6_prefix)
    else:  # a client-written header this long is computed each time, never kept
        key = _ip_key.__wrapped__(peer, forwarded_for, proxies, ipv6_prefix)
    if key == UNKNOWN_IP:
        _report_unknown()
    return key


_unknown_reported = False


def _report_unknown() -> None:
    """Warn, once per process, that clients without a known address share one bucket."""
    global _unknown_reported
    if _unknown_reported:
        return
    _unknown_reported = True
    logger.warning(
        "tokenlimit: a request's client address is unknown, so it is limited in the bucket "
        "'ip:unknown' that every such request shares. Behind a proxy on a unix socket, have "
        "the proxy set X-Forwarded-For; behind proxies on TCP, list them in trusted_proxies "
        "(a hop count or their CIDRs); or give a key function that names the client."
    )


# Parsing addresses with ``ipaddress`` is most of an identity's cost, and the same few clients
# (or proxies) send most requests: remember recent answers. A pure function of its arguments
# (``TrustedProxies`` hashes by identity and never changes after construction). Bounded in
# bytes as well as entries: only inputs of at most _CACHED_INPUT_CHARS are kept.
_CACHED_INPUT_CHARS = 256


@functools.lru_cache(maxsize=8192)
def _ip_key(
    peer: str | None, forwarded_for: str | None, proxies: TrustedProxies, ipv6_prefix: int
) -> str:
    return ip_identity(proxies.client_ip(peer, forwarded_for), ipv6_prefix)


def _check_exempt(exempt: str | Iterable[str] | None) -> tuple[str, ...]:
    if exempt is None:
        return ()
    items = [exempt] if isinstance(exempt, str) else exempt
    try:
        paths = tuple(items)
    except TypeError:
        raise ConfigTypeError("exempt", "must be a list of paths like '/health'") from None
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError("exempt", f"paths must be strings starting with '/', got {path!r}")
    return paths


# What ``methods=`` may name: RFC 9110's methods and PATCH (RFC 5789).
HTTP_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)


def check_methods(methods: object, param: str = "methods") -> frozenset[str] | None:
    """``methods=``: None (every method), or a list of HTTP method names, any case; the set of
    their upper-case forms (what every framework's request says)."""
    if methods is None:
        return None
    example = "a list like ['POST']"
    if isinstance(methods, (str, bytes)):
        raise ConfigTypeError(param, f"must be {example}, not the string {methods!r}")
    if not isinstance(methods, Iterable):
        raise ConfigTypeError(param, f"must be {example}, not {methods!r}")
    names = list(methods)
    if not names:
        raise ConfigError(param, f"must name at least one method ({example}), or be None")
    found = set()
    for name in names:
        if not isinstance(name, str) or name.upper() not in HTTP_METHODS:
            known = ", ".join(sorted(HTTP_METHODS))
            raise ConfigError(param, f"{name!r} is not an HTTP method (one of {known})")
        found.add(name.upper())
    return frozenset(found)


def check_predicate(param: str, predicate: object, takes: str) -> Callable[..., object] | None:
    """``exempt_when=`` or ``deduct_when=``: None, or a callable of one argument, ``takes``
    (flask-limiter's ``exempt_when`` takes none, so one written for it fails here)."""
    if predicate is None:
        return None
    if not callable(predicate):
        raise ConfigTypeError(param, f"must be a callable taking {takes}, not {predicate!r}")
    try:
        signature = inspect.signature(predicate)
    except (TypeError, ValueError):  # a builtin without one: taken as it is
        return predicate
    try:
        signature.bind(None)
    except TypeError:
        raise ConfigTypeError(
            param, f"must take one argument, {takes}; {predicate!r} takes {signature}"
        ) from None
    return predicate


RequestT = TypeVar("RequestT")
"""The framework's request, handed to key functions and limit choosers: Flask's and Starlette's
``Request``, Django's ``HttpRequest``."""

KeyFunction: TypeAlias = Callable[[RequestT], str | Awaitable[str | None] | None]
"""A ``key``: the request -> the caller's identity (None or ``""``: the default identity), or an
awaitable of it."""

LimitChooser: TypeAlias = Callable[[RequestT], LimitChoice | Awaitable[LimitChoice]]
"""A ``limit`` standing in for the limits (tiers): the request -> the limit(s) for it, or an
awaitable of them; what it picks is checked at each request."""

RequestLimit: TypeAlias = float | Limit | str | Sequence[Limit | str] | LimitChooser[RequestT]
"""An integration's ``limit``: a number of tokens per second or a string like ``"100/minute"``
(each with ``burst``), a ``Limit``, a list of them, or a chooser taking the request."""

ResponsePredicate: TypeAlias = Callable[..., object]
"""A ``deduct_when`` as the shared check holds it: one argument, the response (each framework's
own, or what it can show of one; the frameworks' signatures name it), -> truthy when the
request counts against the limit, or an awaitable of that where the framework is async. Every
response it is given has ``status_code`` and ``headers``."""

ApiKeyValidator: TypeAlias = Callable[[str], object]
"""An ``api_key_validator``: the raw key -> truthy when the app knows it, or an awaitable of
that (any value: only its truth counts)."""

DEFAULT_API_KEY_HEADER = "X-API-Key"  # read when a validator is given without a header name


@dataclass(frozen=True, slots=True)
class Policy(Generic[RequestT]):
    """The options an integration applies to a request, validated once."""

    limits: tuple[Limit, ...]
    # A KeyFunction, or a KEY setting: a callable named by a dotted path, whose answers
    # ``custom_identity`` takes whatever they are.
    key: Callable[[RequestT], object] | None = None
    cost: int = 1
    exempt: tuple[str, ...] = ()
    proxies: TrustedProxies = field(default_factory=TrustedProxies)
    headers: bool = True
    api_key_header: str | None = None  # None: API keys are no identity (a client may make them up)
    ipv6_prefix: int = 64
    shadow: bool = False  # decide and count, never refuse (see LimiterBase.as_shadow)
    choose: LimitChooser[RequestT] | None = None  # tiers: picks the limits per request
    api_key_validator: ApiKeyValidator | None = None  # None: every key in the header counts
    methods: frozenset[str] | None = None  # None: every method is checked
    exempt_when: Callable[[RequestT], object] | None = None  # the request -> truthy: skip it
    deduct_when: ResponsePredicate | None = None  # None: every admitted request counts

    @classmethod
    def build(
        cls,
        limit: float | LimitSpec | None,
        *,
        burst: int | None = None,
        key: Callable[[RequestT], object] | None = None,
        cost: int = 1,
        exempt: str | Iterable[str] | None = None,
        trusted_proxies: int | str | Iterable[str] | TrustedProxies | None = None,
        headers: bool = True,
        api_key_header: str | None = None,
        ipv6_prefix: int = 64,
        shadow: bool = False,
        api_key_validator: ApiKeyValidator | None = None,
        methods: Iterable[str] | None = None,
        exempt_when: Callable[[RequestT], object] | None = None,
        deduct_when: ResponsePredicate | None = None,
    ) -> Policy[RequestT]:
        """The policy for these options, each checked at run time as well (a framework's config
        or settings may hold any value): a ConfigError naming the parameter."""
        if limit is None and burst is None:  # identity options only (limits set per view)
            plan = LimitPlan((), check_cost(cost))
        else:  # ``limit`` takes every spelling ``rate_limit``'s ``rate`` does, with ``burst``
            plan = LimitPlan.of(limit, burst, cost=cost, name="limit")
        if key is not None and not callable(key):
            raise ConfigTypeError("key", f"must be a callable taking the request, not {key!r}")
        if not isinstance(headers, bool):
            raise ConfigTypeError("headers", f"must be True or False, not {headers!r}")
        if not isinstance(shadow, bool):
            raise ConfigTypeError("shadow", f"must be True or False, not {shadow!r}")
        if api_key_header is not None and (
            not isinstance(api_key_header, str) or not api_key_header
        ):
            raise ConfigError(
                "api_key_header", f"must be a header name or None, not {api_key_header!r}"
            )
        if api_key_validator is not None:
            if not callable(api_key_validator):
                raise ConfigTypeError(
                    "api_key_validator",
                    f"must be a callable taking the key, not {api_key_validator!r}",
                )
            api_key_header = api_key_header or DEFAULT_API_KEY_HEADER
        if isinstance(ipv6_prefix, bool) or not isinstance(ipv6_prefix, int):
            raise ConfigTypeError("ipv6_prefix", f"must be an int, not {ipv6_prefix!r}")
        if not 0 <= ipv6_prefix <= 128:
            raise ConfigError("ipv6_prefix", f"must be within 0..128, got {ipv6_prefix}")
        proxies = (
            trusted_proxies
            if isinstance(trusted_proxies, TrustedProxies)
            else TrustedProxies(trusted_proxies)
        )
        return cls(
            plan.limits, key, plan.cost, _check_exempt(exempt), proxies, headers, api_key_header,
            ipv6_prefix, shadow, choose=plan.choose, api_key_validator=api_key_validator,
            methods=check_methods(methods),
            exempt_when=check_predicate("exempt_when", exempt_when, "the request"),
            deduct_when=check_predicate("deduct_when", deduct_when, "the response"),
        )  # fmt: skip

    def limits_for(self, request: RequestT) -> tuple[Limit, ...]:
        """The limits for ``request``: the policy's own, or what its chooser picks (sync)."""
        if self.choose is None:
            return self.limits
        return LimitPlan(self.limits, self.cost, self.choose).limits_for(request)

    async def alimits_for(self, request: RequestT) -> tuple[Limit, ...]:
        """``limits_for`` in async code: the chooser may be a coroutine function."""
        if self.choose is None:
            return self.limits
        return await LimitPlan(self.limits, self.cost, self.choose).alimits_for(request)

    def is_exempt(self, path: str) -> bool:
        for entry in self.exempt:
            if path == entry or path.startswith(entry.rstrip("/") + "/"):
                return True
        return False

    def identity(
        self, *, api_key: str | None, user_id: object, peer: str | None, forwarded_for: str | None
    ) -> str:
        """The default identity; ``api_key`` is one the app vouches for (see ``_check``)."""
        return default_identity(
            api_key=api_key if self.api_key_header else None,
            user_id=user_id,
            peer=peer,
            forwarded_for=forwarded_for,
            proxies=self.proxies,
            ipv6_prefix=self.ipv6_prefix,
        )


# -- responses ---------------------------------------------------------------------------------
def _sf_string(text: str) -> str:
    """An RFC 8941 sf-string: printable ASCII, with backslash and quote escaped."""
    safe = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=1024)
def _policy_field(limit: Limit, label: str) -> tuple[str, str]:
    """A limit's sf-string name and its ``RateLimit-Policy`` item: the same on every response.
    Cached by the label too: equal limits (one bucket) may be spelled, so labelled, apart."""
    name = _sf_string(label)
    return name, f"{name};q={limit.burst};w={max(1, math.ceil(limit.fill_time))}"


def retry_after_seconds(decision: Decision) -> int:
    """``Retry-After``: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(decision.retry_after))


def rate_limit_headers(decision: Decision) -> list[tuple[str, str]]:
    """``X-RateLimit-*``, the IETF ``RateLimit-Policy``/``RateLimit`` fields, and on refusal
    ``Retry-After``. Nothing in them names the identity or the server. ``X-RateLimit-Reset``
    is when the bucket is full again, in whole Unix seconds (rounded up), as GitHub,
    flask-limiter and slowapi send it; the IETF field carries the same moment as a delta."""
    limit = decision.policy
    if not decision.details and limit is not None:  # one limit, as most are: nothing to join
        name, policies = _policy_field(limit, limit.label)
        states = f"{name};r={decision.remaining};t={math.ceil(decision.reset_after)}"
    else:
        policies, states = _fields_of(decision.details or (decision,))
    headers = [
        ("X-RateLimit-Limit", str(decision.limit)),
        ("X-RateLimit-Remaining", str(decision.remaining)),
        ("X-RateLimit-Reset", str(math.ceil(time.time() + decision.reset_after))),
    ]
    if policies:
        headers.append(("RateLimit-Policy", policies))
        headers.append(("RateLimit", states))
    if not decision.allowed:
        headers.append(("Retry-After", str(retry_after_seconds(decision))))
    return headers


def raw_rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """``rate_limit_headers(decision)`` as ASGI sends them: lower-case byte names, byte values.
    An admission on one limit, as most are, is formatted as bytes at once, with its fields that
    never change (the limit's name and policy) encoded once per limit."""
    limit = decision.policy
    if decision.details or limit is None or not decision.allowed:
        return raw_fields(rate_limit_headers(decision))
    name, policy = _raw_policy_field(limit, limit.label)
    remaining = decision.remaining
    reset = decision.reset_after
    return [
        (b"x-ratelimit-limit", b"%d" % decision.limit),
        (b"x-ratelimit-remaining", b"%d" % remaining),
        (b"x-ratelimit-reset", b"%d" % math.ceil(time.time() + reset)),
        (b"ratelimit-policy", policy),
        (b"ratelimit", b"%s;r=%d;t=%d" % (name, remaining, math.ceil(reset))),
    ]


def raw_fields(fields: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header fields as ASGI wants them: lower-case byte names, byte values."""
    names = _RAW_NAMES
    return [
        (names.get(name) or name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in fields
    ]


# The names rate_limit_headers sends, as ASGI spells them (any other is encoded per call).
_RAW_NAMES = {
    name: name.lower().encode("latin-1")
    for name in (
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "RateLimit-Policy",
        "RateLimit",
        "Retry-After",
    )
}


@functools.lru_cache(maxsize=1024)
def _raw_policy_field(limit: Limit, label: str) -> tuple[bytes, bytes]:
    """``_policy_field``, encoded."""
    name, policy = _policy_field(limit, label)
    return name.encode("latin-1"), policy.encode("latin-1")


def _fields_of(parts: Sequence[Decision]) -> tuple[str, str]:
    """``RateLimit-Policy`` and ``RateLimit`` for several limits' decisions ("" for none)."""
    policies = []
    states = []
    for part in parts:
        limit = part.policy
        if limit is None:
            continue
        name, policy = _policy_field(limit, limit.label)
        policies.append(policy)
        states.append(f"{name};r={part.remaining};t={math.ceil(part.reset_after)}")
    return ", ".join(policies), ", ".join(states)


def response_headers(decision: Decision, *, enabled: bool) -> list[tuple[str, str]]:
    """The headers for a response: all of them, or with ``headers=False`` only a refusal's
    ``Retry-After`` (HTTP's own answer to a 429, not a rate-limit header)."""
    if enabled:
        return rate_limit_headers(decision)
    if decision.allowed:
        return []
    return [("Retry-After", str(retry_after_seconds(decision)))]


def refused_body(decision: Decision) -> bytes:
    return json.dumps(
        {"detail": "rate limit exceeded", "retry_after": retry_after_seconds(decision)}
    ).encode()


def unavailable_body() -> bytes:
    return json.dumps({"detail": "rate limiter unavailable"}).encode()


# -- deciding ----------------------------------------------------------------------------------
def _in_process(limiter: RateLimiter | AsyncRateLimiter) -> bool:
    return not is_remote(limiter.backend)


async def decide_async(
    limiter: RateLimiter | AsyncRateLimiter,
    key: str,
    limits: Sequence[Limit],
    cost: int,
    *,
    shadow: bool = False,
) -> Decision:
    """``try_acquire`` from async code; a sync limiter's network call runs off the loop.
    ``shadow``: through the limiter's shadow twin (decides and counts, never refuses)."""
    if shadow:
        limiter = limiter.as_shadow()
    if isinstance(limiter, AsyncRateLimiter):
        return await limiter.try_acquire(key, limits, cost=cost)
    if _in_process(limiter):
        return limiter.try_acquire(key, limits, cost=cost)
    return await asyncio.to_thread(limiter.try_acquire, key, limits, cost=cost)


def held_tokens(
    limiter: RateLimiter | AsyncRateLimiter, key: str, limits: Sequence[Limit], cost: int
) -> Decision | None:
    """An admission on a leased limit from tokens this process holds (no IO, nothing awaited),
    or None: ``decide_async`` decides. A shadow twin would admit it alike."""
    return held_admission(limiter, limiter._request(key, limits, cost))


async def refund_async(
    limiter: RateLimiter | AsyncRateLimiter, key: str, limits: Sequence[Limit], cost: int
) -> Decision:
    """``refund`` from async code; a sync limiter's network call runs off the loop."""
    if isinstance(limiter, AsyncRateLimiter):
        return await limiter.refund(key, limits, cost=cost)
    if _in_process(limiter):
        return limiter.refund(key, limits, cost=cost)
    return await asyncio.to_thread(limiter.refund, key, limits, cost=cost)


def refund_sync(
    limiter: RateLimiter | AsyncRateLimiter, key: str, limits: Sequence[Limit], cost: int
) -> Decision:
    """``refund`` from sync code (an async limiter cannot serve it)."""
    if not isinstance(limiter, RateLimiter):
        raise TypeError("a sync view needs a RateLimiter, not an AsyncRateLimiter")
    return limiter.refund(key, limits, cost=cost)


def decide_sync(
    limiter: RateLimiter | AsyncRateLimiter,
    key: str,
    limits: Sequence[Limit],
    cost: int,
    *,
    shadow: bool = False,
) -> Decision:
    """``try_acquire`` from sync code (an async limiter cannot serve it)."""
    if not isinstance(limiter, RateLimiter):
        raise TypeError("a sync view needs a RateLimiter, not an AsyncRateLimiter")
    if shadow:
        limiter = limiter.as_shadow()
    return limiter.try_acquire(key, limits, cost=cost)


ANY_ROUTE = "*"  # the route label when no template is known (unrouted, or before routing)


def record_request(limiter: object, route: str | None, result: str) -> None:
    """Count one request on ``route`` (a template, never a raw path) with the limiter's metrics
    sink, when it has ``record_request`` (an optional part of ``MetricsSink``); ``_check``
    decides when (once per request)."""
    record = getattr(getattr(limiter, "metrics", None), "record_request", None)
    if record is not None:
        record(route or ANY_ROUTE, result)


def custom_identity(result: object) -> str | None:
    """A custom key function's answer as an identity: None or ``""`` mean "use the default
    identity", in every integration and mode."""
    return None if result is None or result == "" else str(result)
