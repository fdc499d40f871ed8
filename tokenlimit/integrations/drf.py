"""Django REST framework: throttles that decide in one atomic call on the shared store, in DRF's
own idiom (``throttle_classes``, ``DEFAULT_THROTTLE_RATES``, a 429 with ``Retry-After``).

    REST_FRAMEWORK = {
        "DEFAULT_THROTTLE_CLASSES": [
            "tokenlimit.integrations.drf.AnonTokenBucketThrottle",
            "tokenlimit.integrations.drf.UserTokenBucketThrottle",
        ],
        "DEFAULT_THROTTLE_RATES": {"anon": "100/day", "user": "1000/day"},
    }
    TOKENLIMIT = {"URL": "redis://localhost:6379/0"}  # the store, and the identity options

A throttle's bucket is per scope, as DRF's cache key is: ``scope:<scope>|<identity>``, so every
view throttled under one scope shares it (a throttle with a ``rate`` and no ``scope`` is its
own scope, named after its class). The identity is the one every integration uses (an API key
the app vouches for, then DRF's ``request.user``, then the client IP), with ``KEY``,
``TRUSTED_PROXIES`` and the API-key options read from ``settings.TOKENLIMIT``. Throttles are
sync, as DRF calls them; the storage failing in closed mode raises ``ThrottleUnavailable``,
which DRF answers with a 503.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, ClassVar

from tokenlimit._config import default_sync_limiter
from tokenlimit._decision import Decision
from tokenlimit._errors import ConfigError, ConfigTypeError
from tokenlimit._extras import needs_extra
from tokenlimit._limiter import RateLimiter
from tokenlimit._log import ThrottledLog
from tokenlimit._validate import check_cost, check_int
from tokenlimit.integrations._check import (
    ViewLimit,
    check,
    check_limiter,
    check_scope,
)
from tokenlimit.integrations._common import Policy, RequestLimit, TrustedProxies
from tokenlimit.integrations._settings import Settings

with needs_extra("drf", "djangorestframework", feature=__name__):
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from rest_framework.exceptions import APIException
    from rest_framework.settings import api_settings
    from rest_framework.throttling import BaseThrottle

    from tokenlimit.integrations._django import (
        request_facts,
        resolve,
        settings_state,
        user_pk,
    )

if TYPE_CHECKING:
    from django.http import HttpRequest
    from rest_framework.request import Request

__all__ = [
    "AnonTokenBucketThrottle",
    "ScopedTokenBucketThrottle",
    "ThrottleUnavailable",
    "TokenBucketThrottle",
    "UserTokenBucketThrottle",
]

_RATES = "REST_FRAMEWORK['DEFAULT_THROTTLE_RATES']"
_log = ThrottledLog()  # storage failures answered 503, at most one line per 10 s


# -- rules ---------------------------------------------------------------------------------------
def _check_class(cls: type[TokenBucketThrottle]) -> None:
    """Refuse a bad class attribute where the throttle is written, naming it."""
    try:
        check_scope(cls.scope)
        check_cost(cls.cost)
        check_limiter(cls.limiter, sync=True)
        if cls.rate is None:
            if cls.burst is not None:
                check_int("burst", cls.burst, minimum=1)
        else:
            _rule_for(cls, cls.scope)
    except ConfigError as error:
        raise _renamed(cls, error) from None


def _renamed(cls: type, error: ConfigError) -> ConfigError:
    """``error`` naming the class attribute (``UploadThrottle.rate``), not the parameter."""
    attribute = "rate" if error.param == "limit" else error.param
    reason = str(error).removeprefix(f"{error.param}: ")
    return type(error)(f"{cls.__qualname__}.{attribute}", reason)


def _rule_for(cls: type[TokenBucketThrottle], scope: str | None) -> ViewLimit[Request] | None:
    """The limit ``cls`` applies under ``scope``, and its bucket's scope; None: not throttled
    (the scope's setting is None)."""
    if cls.rate is not None:
        return _rule(cls.rate, cls.burst, cls.cost, scope or f"{cls.__module__}.{cls.__qualname__}")
    if scope is None:
        raise ImproperlyConfigured(
            f"{cls.__qualname__} needs a rate or a scope: set `rate = '100/min'`, or "
            f"`scope` with a rate in {_RATES}"
        )
    rates = api_settings.DEFAULT_THROTTLE_RATES or {}
    if scope not in rates:
        raise ImproperlyConfigured(
            f"{cls.__qualname__}: no rate for the scope {scope!r}: set "
            f"{_RATES}[{scope!r}] (such as '100/min'), or the throttle's `rate`"
        )
    rate = rates[scope]
    if rate is None:  # DRF: a scope whose rate is None is not throttled
        return None
    try:
        return _rule(rate, cls.burst, cls.cost, scope)
    except ConfigError as error:
        reason = str(error).removeprefix(f"{error.param}: ")
        raise ImproperlyConfigured(
            f"{cls.__qualname__}: {_RATES}[{scope!r}] = {rate!r}: {reason}"
        ) from error


def _rule(
    rate: RequestLimit[Request], burst: int | None, cost: int, scope: str
) -> ViewLimit[Request]:
    """The rule for a rate in any spelling, made once per (rate, burst, cost, scope)."""
    if isinstance(rate, list):
        rate = tuple(rate)
    try:
        hash((rate, burst))
    except TypeError:  # not a spelling that can be cached: made (or refused) each time
        return _made.__wrapped__(rate, burst, cost, scope)
    return _made(rate, burst, cost, scope)


@functools.lru_cache(maxsize=256)
def _made(
    rate: RequestLimit[Request], burst: int | None, cost: int, scope: str
) -> ViewLimit[Request]:
    """``ViewLimit`` keeps its policy per settings: one per rule saves parsing per request."""
    return ViewLimit(rate, burst=burst, key=None, cost=cost, scope=scope, shadow=None, headers=None)


# -- the store and the identity ----------------------------------------------------------------
def _limiter(cls: type[TokenBucketThrottle], state: Settings) -> RateLimiter:
    """The throttle's ``limiter``, else ``settings.TOKENLIMIT``'s, else the default one."""
    if cls.limiter is not None:
        return cls.limiter
    if getattr(settings, "TOKENLIMIT", None) is not None:
        return state.sync
    default = default_sync_limiter()
    if not isinstance(default, RateLimiter):
        raise ConfigTypeError(
            "limiter",
            "DRF throttles decide in sync code: configure() a URL or a RateLimiter, "
            "not an AsyncRateLimiter",
        )
    return default


def _identity_options(base: Policy[HttpRequest]) -> Policy[HttpRequest]:
    """``settings.TOKENLIMIT``'s identity options; without its ``TRUSTED_PROXIES``, DRF's
    ``NUM_PROXIES`` as the hop count when it is one (its default, None, believes the whole
    ``X-Forwarded-For`` a client sends: not followed, since the client would choose its
    bucket)."""
    raw = getattr(settings, "TOKENLIMIT", None)
    if isinstance(raw, dict) and "TRUSTED_PROXIES" in raw:
        return base
    hops = api_settings.NUM_PROXIES
    if isinstance(hops, bool) or not isinstance(hops, int) or hops <= 0:
        return base
    return _with_hops(base, hops)


@functools.lru_cache(maxsize=8)
def _with_hops(base: Policy[HttpRequest], hops: int) -> Policy[HttpRequest]:
    return Policy.build(
        None,
        key=base.key,
        trusted_proxies=TrustedProxies(hops),
        headers=base.headers,
        api_key_header=base.api_key_header,
        ipv6_prefix=base.ipv6_prefix,
        shadow=base.shadow,
        api_key_validator=base.api_key_validator,
    )


# -- the throttles -----------------------------------------------------------------------------
class ThrottleUnavailable(APIException):  # type: ignore[misc]
    """The storage failed and the limiter's ``failure_mode`` is ``"closed"``: DRF answers 503
    with ``{"detail": "rate limiter unavailable"}`` and no ``Retry-After`` (nobody knows when)."""

    status_code = 503
    default_detail = "rate limiter unavailable"
    default_code = "throttle_unavailable"


class TokenBucketThrottle(BaseThrottle):  # type: ignore[misc]
    """A token bucket per scope and identity: ``burst`` requests at once, refilled at ``rate``.

    Class attributes, checked when a subclass is defined:

    - ``rate``: what every entry point takes (``"100/min"``, ``"1000/day"``, a number per
      second, a ``Limit``, a list of them, or a function of the request choosing them); None:
      ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"][scope]``, read per request, where ``None``
      means "not throttled", as in DRF.
    - ``burst``: the bucket's size; None: the rate's own count (``"100/min"``: 100 at once,
      as DRF's window allows).
    - ``scope``: the bucket's name, shared by every view throttled under it; None with a
      ``rate``: the throttle's dotted class path.
    - ``cost``: tokens per request.
    - ``limiter``: a sync ``RateLimiter``; None: ``settings.TOKENLIMIT``'s when that setting
      exists, else the default one (``tokenlimit.configure()``, ``TOKENLIMIT_URL``).
    """

    rate: ClassVar[RequestLimit[Request] | None] = None
    burst: ClassVar[int | None] = None
    scope: ClassVar[str | None] = None
    cost: ClassVar[int] = 1
    limiter: ClassVar[RateLimiter | None] = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        _check_class(cls)

    def __init__(self) -> None:  # DRF makes one throttle per request
        self.decision: Decision | None = None  # after a refusal: tokenlimit's Decision

    # -- what a subclass changes ----------------------------------------------------------------
    def _scope_of(self, view: object) -> str | None:
        """The scope this request is throttled under (None: the rate's own, or an error)."""
        return type(self).scope

    def _user_of(self, request: object) -> object:
        """The signed-in user's id for the identity (None: anonymous), read off DRF's
        ``request.user`` (its authentication has run before the throttles)."""
        return user_pk(getattr(request, "user", None))

    def _applies(self, request: object, view: object) -> bool:
        """Whether this throttle looks at the request at all."""
        return True

    # -- DRF's API ------------------------------------------------------------------------------
    def allow_request(self, request: Request, view: object) -> bool:
        """Take ``cost`` tokens from the bucket, or refuse (``wait`` says how long for).
        The storage failing in closed mode raises ``ThrottleUnavailable`` (503)."""
        if not self._applies(request, view):
            return True
        cls = type(self)
        rule = _rule_for(cls, self._scope_of(view))
        if rule is None:
            return True
        state = settings_state()
        if not state.enabled:  # TOKENLIMIT["ENABLED"] = False
            return True
        policy = rule.policy(_identity_options(state.base))
        http = getattr(request, "_request", request)  # DRF's Request wraps Django's
        user = functools.partial(self._user_of, request)
        facts = request_facts(request, http, policy, user, route=None, routed=True)
        verdict = check(policy, facts, _limiter(cls, state), scope=rule.scope, resolve=resolve)
        if verdict.status == 503:
            verdict.report(_log)
            raise ThrottleUnavailable()
        if verdict.status == 200:
            return True
        self.decision = verdict.decision
        return False

    def wait(self) -> float | None:
        """Seconds until the refused request could be admitted, exactly (DRF rounds it up
        into ``Retry-After``); None when nothing was refused."""
        decision = self.decision
        return None if decision is None else decision.retry_after


class AnonTokenBucketThrottle(TokenBucketThrottle):
    """Only unauthenticated requests, under the scope ``"anon"``; signed-in users pass
    untouched (DRF's ``AnonRateThrottle``)."""

    scope = "anon"

    def _applies(self, request: object, view: object) -> bool:
        user = getattr(request, "user", None)
        return not (user and getattr(user, "is_authenticated", False))

    def _user_of(self, request: object) -> object:
        return None


class UserTokenBucketThrottle(TokenBucketThrottle):
    """Every request under the scope ``"user"``: per user when signed in, else per the
    anonymous identity (DRF's ``UserRateThrottle``)."""

    scope = "user"


class ScopedTokenBucketThrottle(TokenBucketThrottle):
    """The scope is the view's ``throttle_scope`` (a view without one is not throttled), its
    rate ``DEFAULT_THROTTLE_RATES[throttle_scope]`` unless ``rate`` is set (DRF's
    ``ScopedRateThrottle``)."""

    scope_attr: ClassVar[str] = "throttle_scope"

    def _applies(self, request: object, view: object) -> bool:
        return bool(getattr(view, type(self).scope_attr, None))

    def _scope_of(self, view: object) -> str | None:
        return str(getattr(view, type(self).scope_attr))
