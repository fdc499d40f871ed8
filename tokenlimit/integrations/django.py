"""Django: ``RateLimitMiddleware`` configured from ``settings.TOKENLIMIT``, a ``ratelimit(...)``
view decorator, and system checks that report a bad setting at start-up. Sync and async alike.

::

    INSTALLED_APPS = [..., "tokenlimit.integrations.django"]  # runs the checks at start-up
    MIDDLEWARE = [..., "django.contrib.auth.middleware.AuthenticationMiddleware",
                  "tokenlimit.integrations.django.RateLimitMiddleware"]
    TOKENLIMIT = {
        "URL": "redis://localhost:6379/0",  # default "memory://" (per process)
        "LIMIT": "100/minute",              # a Limit, a string, or a list; the middleware's limit
        "KEY": "myapp.limits.identity",     # request -> identity str, or None for the default
        "EXEMPT": ["/health"],              # path prefixes (``request.path_info``) never limited
        "TRUSTED_PROXIES": None,            # a hop count or a list of CIDRs for X-Forwarded-For
        "FAILURE_MODE": "closed",           # storage down: "closed" answers 503, "open" admits
        "HEADERS": True,                    # X-RateLimit-* and RateLimit-Policy/RateLimit fields
        "PREFIX": "tl:",                    # Redis key prefix
        "TIMEOUT": 0.5,                     # seconds allowed for one decision
        "API_KEY_HEADER": None,             # "X-API-Key": read first where auth checked it
        "API_KEY_VALIDATOR": None,          # dotted path: key -> truthy when known (async too)
        "IPV6_PREFIX": 64,                  # IPv6 clients share one bucket per /64
        "METRICS": "myapp.monitoring.sink", # a MetricsSink (tokenlimit.metrics.PrometheusMetrics)
        "SHADOW": False,                    # True: decide and count, never answer 429
    }

    @ratelimit("10/minute")                 # its own limit and bucket, on top of the middleware's
    def search(request): ...

Tiers: ``LIMIT`` (a callable or its dotted path) and ``ratelimit``'s ``limit`` (a callable) may
choose the limit(s) per request, such as the caller's plan: called with the request, it returns
a Limit, a string or a list of them; it may be a coroutine function (awaited in async code).

Sync code decides through a ``RateLimiter`` and async code through an ``AsyncRateLimiter``
built from the same URL (one shared store for ``memory://``), so the event loop never waits on
a socket.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.http import HttpResponse
from django.utils.functional import LazyObject
from django.utils.module_loading import import_string
from django.views import View

from tokenlimit._config import limiter_pair
from tokenlimit._core import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    ThrottledLog,
    check_deadline,
    check_failure_mode,
    check_prefix,
)
from tokenlimit._decision import Decision
from tokenlimit._errors import BackendError, ConfigError, ConfigTypeError, RateLimitExceeded
from tokenlimit._limit import Limit, coerce_limits
from tokenlimit._metrics import MetricsSink
from tokenlimit._url import parse_url
from tokenlimit.integrations._check import (
    RequestFacts,
    Verdict,
    ViewLimit,
    acheck,
    answer,
    check,
    combined,
    unavailable,
)
from tokenlimit.integrations._common import (
    Policy,
    TrustedProxies,
    rate_limit_headers,
    record_request,
)

__all__ = ["RateLimitMiddleware", "TokenLimitConfig", "check_settings", "ratelimit"]

V = TypeVar("V")

MIDDLEWARE_PATH = "tokenlimit.integrations.django.RateLimitMiddleware"
_AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
_DECISIONS = "_tokenlimit_decisions"  # request attribute: the decisions its headers report
_LEDGER = "_tokenlimit_charged"  # request attribute: the buckets it charged


# -- settings --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Options:
    """``settings.TOKENLIMIT``, validated."""

    url: str = "memory://"
    limits: tuple[Limit, ...] | Callable[[Any], Any] | None = None  # or a chooser (tiers)
    key: Callable[[Any], Any] | None = None
    exempt: tuple[str, ...] = ()
    proxies: TrustedProxies = dataclasses.field(default_factory=TrustedProxies)
    failure_mode: str = "closed"
    headers: bool = True
    prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT
    api_key_header: str | None = None  # None: API keys are no identity (unless validated)
    ipv6_prefix: int = 64
    metrics: MetricsSink | None = None
    shadow: bool = False
    api_key_validator: Callable[[str], Any] | None = None


def _probe(**option: Any) -> Any:
    """Validate one option alone, as ``Policy.build`` does it."""
    policy = Policy.build(None, **option)
    return getattr(policy, next(iter(option)))


def _key_function(value: Any, param: str = "key") -> Callable[[Any], Any]:
    """``KEY``: a dotted path to a callable (or the callable itself)."""
    function: Any = import_string(value) if isinstance(value, str) else value
    if not callable(function):
        raise ConfigTypeError(param, f"{value!r} is not callable")
    return cast("Callable[[Any], Any]", function)


def _api_key_validator(value: Any) -> Callable[[str], Any] | None:
    """``API_KEY_VALIDATOR``: a dotted path to ``key -> truthy when known`` (or the callable)."""
    return None if value is None else _key_function(value, "api_key_validator")


def _limit_setting(value: Any) -> tuple[Limit, ...] | Callable[[Any], Any]:
    """``LIMIT``: the limit(s), or a callable taking the request and choosing them (tiers),
    given itself or as a dotted path."""
    if callable(value):
        return cast("Callable[[Any], Any]", value)
    try:
        return coerce_limits(value)
    except ConfigError:
        if not (isinstance(value, str) and _DOTTED.match(value)):
            raise
    function: Any = import_string(value)
    if not callable(function):
        raise ConfigTypeError("limit", f"{value!r} is not callable")
    return cast("Callable[[Any], Any]", function)


_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")  # "myapp.plans.limits_for"


def _metrics_sink(value: Any) -> MetricsSink | None:
    """``METRICS``: a dotted path to a ``MetricsSink`` instance (or the instance itself)."""
    sink: Any = import_string(value) if isinstance(value, str) else value
    if sink is not None and (isinstance(sink, type) or not isinstance(sink, MetricsSink)):
        raise ConfigTypeError(
            "metrics", f"{value!r} is not a MetricsSink (record_decision() and record_error())"
        )
    return sink


# setting -> (option, check id, validator)
_FIELDS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "URL": ("url", "tokenlimit.E002", lambda v: parse_url(v)[1]),
    "LIMIT": ("limits", "tokenlimit.E003", _limit_setting),
    "KEY": ("key", "tokenlimit.E004", _key_function),
    "FAILURE_MODE": ("failure_mode", "tokenlimit.E005", check_failure_mode),
    "TRUSTED_PROXIES": ("proxies", "tokenlimit.E006", TrustedProxies),
    "EXEMPT": ("exempt", "tokenlimit.E007", lambda v: _probe(exempt=v)),
    "HEADERS": ("headers", "tokenlimit.E008", lambda v: _probe(headers=v)),
    "PREFIX": ("prefix", "tokenlimit.E009", check_prefix),
    "TIMEOUT": ("timeout", "tokenlimit.E010", check_deadline),
    "API_KEY_HEADER": ("api_key_header", "tokenlimit.E011", lambda v: _probe(api_key_header=v)),
    "IPV6_PREFIX": ("ipv6_prefix", "tokenlimit.E012", lambda v: _probe(ipv6_prefix=v)),
    "METRICS": ("metrics", "tokenlimit.E013", _metrics_sink),
    "SHADOW": ("shadow", "tokenlimit.E014", lambda v: _probe(shadow=v)),
    "API_KEY_VALIDATOR": ("api_key_validator", "tokenlimit.E015", _api_key_validator),
}


def _read(raw: Any) -> tuple[_Options, list[Any]]:
    """Validate ``settings.TOKENLIMIT``: the options, and one check message per bad setting."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        error = checks.Error(
            f"settings.TOKENLIMIT must be a dict, not {type(raw).__name__}.",
            hint='TOKENLIMIT = {"URL": "redis://localhost:6379/0", "LIMIT": "100/minute"}',
            id="tokenlimit.E001",
        )
        return _Options(), [error]
    values: dict[str, Any] = {}
    messages: list[Any] = []
    for name, value in raw.items():
        field = _FIELDS.get(name)
        if field is None:
            messages.append(
                checks.Warning(
                    f"settings.TOKENLIMIT has an unknown entry {name!r}; it is ignored.",
                    hint=f"Known entries: {', '.join(_FIELDS)}.",
                    id="tokenlimit.W001",
                )
            )
            continue
        option, check_id, validate = field
        try:
            values[option] = validate(value)
        except Exception as error:  # an import error from KEY, a ConfigError, ...
            reason = str(error)
            if isinstance(error, ConfigError):
                reason = reason.removeprefix(f"{error.param}: ")
            messages.append(checks.Error(f"settings.TOKENLIMIT[{name!r}]: {reason}", id=check_id))
    return _Options(**values), messages


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """The system check: every bad entry of ``settings.TOKENLIMIT``, each with its own id."""
    raw = getattr(settings, "TOKENLIMIT", None)
    middleware = list(getattr(settings, "MIDDLEWARE", None) or ())
    installed = MIDDLEWARE_PATH in middleware
    messages = _read(raw)[1]
    if isinstance(raw, dict) or (raw is None and installed):
        raw = raw or {}
        if installed and "LIMIT" not in raw:
            messages.append(
                checks.Error(
                    "settings.TOKENLIMIT['LIMIT'] is required by RateLimitMiddleware.",
                    hint='For example "LIMIT": "100/minute".',
                    id="tokenlimit.E003",
                )
            )
        if "URL" not in raw:
            messages.append(
                checks.Warning(
                    "settings.TOKENLIMIT['URL'] is not set: memory:// limits each process "
                    "separately.",
                    hint='Share one limit across processes: "URL": "redis://host:6379/0".',
                    id="tokenlimit.W002",
                )
            )
    if (
        installed
        and _AUTH_MIDDLEWARE in middleware
        and middleware.index(MIDDLEWARE_PATH) < middleware.index(_AUTH_MIDDLEWARE)
    ):
        messages.append(
            checks.Warning(
                "RateLimitMiddleware comes before AuthenticationMiddleware, so it cannot "
                "see the user: signed-in users are limited by IP address.",
                hint="Move it after AuthenticationMiddleware in settings.MIDDLEWARE.",
                id="tokenlimit.W003",
            )
        )
    return messages


checks.register(check_settings, "tokenlimit")


class _State:
    """What the settings make: the validated options, the limiter twins, the middleware's
    policy. Rebuilt when ``settings.TOKENLIMIT`` changes (``override_settings`` in tests)."""

    def __init__(self, raw: Any) -> None:
        options, messages = _read(raw)
        errors = [m for m in messages if m.is_serious()]
        if errors:
            raise ImproperlyConfigured("; ".join(f"{m.msg} ({m.id})" for m in errors))
        self.options = options
        self.log = ThrottledLog()  # storage failures answered 503, at most once per interval
        limiter_options = {
            "prefix": options.prefix,
            "timeout": options.timeout,
            "failure_mode": options.failure_mode,
            "metrics": options.metrics,
        }
        try:
            self.sync, self.async_ = limiter_pair(options.url, limiter_options)
        except ValueError as error:  # a URL the scheme check let through (a bad port, ...)
            raise ImproperlyConfigured(
                f"settings.TOKENLIMIT['URL']: {error} (tokenlimit.E002)"
            ) from error
        identity: dict[str, Any] = {
            "key": options.key,
            "exempt": options.exempt,
            "trusted_proxies": options.proxies,
            "headers": options.headers,
            "api_key_header": options.api_key_header,
            "ipv6_prefix": options.ipv6_prefix,
            "shadow": options.shadow,
            "api_key_validator": options.api_key_validator,
        }
        self.base = Policy.build(None, **identity)  # what a view's own limit adds its own to
        self.policy: Policy | None = None  # the middleware's
        if options.limits is not None:
            self.policy = Policy.build(options.limits, **identity)

    def middleware_policy(self) -> Policy:
        if self.policy is None:
            raise ImproperlyConfigured(
                "RateLimitMiddleware needs settings.TOKENLIMIT['LIMIT'] (tokenlimit.E003)"
            )
        return self.policy

    def close(self) -> None:
        # The async twin's clients close with their event loops (LoopLocalBackend).
        self.sync.close()


_lock = threading.Lock()
_current: _State | None = None


def _state() -> _State:
    global _current
    state = _current
    if state is None:
        with _lock:
            if _current is None:
                _current = _State(getattr(settings, "TOKENLIMIT", None))
            state = _current
    return state


def _forget(*, setting: str, **kwargs: Any) -> None:
    global _current
    if setting != "TOKENLIMIT":
        return
    with _lock:
        old, _current = _current, None
    if old is not None:
        old.close()


setting_changed.connect(_forget, dispatch_uid="tokenlimit.integrations.django")


# -- request facts and answers ---------------------------------------------------------------
def _pk(user: Any) -> Any:
    return user.pk if user is not None and getattr(user, "is_authenticated", False) else None


def _user_id(request: Any) -> Any:
    return _pk(getattr(request, "user", None))


async def _auser_id(request: Any) -> Any:
    # request.user is lazy and may query the database: never on the event loop.
    auser = getattr(request, "auser", None)
    if callable(auser):
        return _pk(await auser())
    user = getattr(request, "user", None)
    if isinstance(user, LazyObject):
        return await sync_to_async(_pk)(user)
    return _pk(user)


def _kept(request: Any, name: str, kind: type[V]) -> V:
    """What the checks keep on ``request`` under ``name``: the ledger, the decisions."""
    found = getattr(request, name, None)
    if found is None:
        found = kind()
        setattr(request, name, found)
    return cast("V", found)


def _facts(request: Any, policy: Policy, route: str | None, user: Any) -> RequestFacts:
    header = policy.api_key_header
    return RequestFacts(
        request,
        request.path_info,
        request.META.get("REMOTE_ADDR"),
        request.META.get("HTTP_X_FORWARDED_FOR"),
        (request.headers.get(header) or None) if header else None,
        functools.partial(user, request),
        route,
        _template(request),
        route is not None,  # the middleware checks before the URL is resolved
        _kept(request, _LEDGER, dict),
    )


def _template(request: Any) -> str | None:
    """The matched URL pattern (``items/<int:item_id>``), never the raw path; None before URL
    resolution (in the middleware, until the view has run) or when nothing matched."""
    route = getattr(getattr(request, "resolver_match", None), "route", None)
    return route if isinstance(route, str) else None


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _resolve(awaitable: Awaitable[Any]) -> Any:
    """An async ``KEY``, validator or chooser's result, behind a sync middleware chain."""
    return async_to_sync(_awaited)(awaitable)


Entered = tuple[Verdict, Any]  # the verdict, and the 429/503 to answer at once (or None)


def _enter_sync(policy: Policy, request: Any, route: str | None, scope: str | None) -> Entered:
    state = _state()
    facts = _facts(request, policy, route, _user_id)
    verdict = check(policy, facts, state.sync, scope=scope, resolve=_resolve)
    return verdict, _render(state, request, policy, verdict)


async def _enter_async(
    policy: Policy, request: Any, route: str | None, scope: str | None
) -> Entered:
    state = _state()
    facts = _facts(request, policy, route, _auser_id)
    verdict = await acheck(policy, facts, state.async_, scope=scope)
    return verdict, _render(state, request, policy, verdict)


def _render(state: _State, request: Any, policy: Policy, verdict: Verdict) -> Any:
    """Keep the verdict's decision for the response's headers; the 429/503 response, or None."""
    verdict.report(state.log)
    if verdict.decision is not None and policy.headers and not verdict.repeated:
        _kept(request, _DECISIONS, list).append(verdict.decision)
    if verdict.status == 200:
        return None
    response = HttpResponse(verdict.body, status=verdict.status, content_type="application/json")
    for name, value in verdict.headers:  # a 429's Retry-After, even with HEADERS off
        response[name] = value
    return _annotate(request, response)


def _annotate(request: Any, response: Any) -> Any:
    """Every limit this request was checked against, in the response's headers."""
    decisions: list[Decision] = getattr(request, _DECISIONS, None) or []
    if decisions and response is not None:
        for name, value in rate_limit_headers(combined(decisions)):
            response[name] = value
    return response


def _admitted(limiter: Any, request: Any, verdict: Verdict, response: Any) -> Any:
    """The middleware's admission, counted now that the URL is resolved; the response."""
    if verdict.decision is not None:
        record_request(limiter, _template(request), "allowed")
    return _annotate(request, response)


# -- middleware ------------------------------------------------------------------------------
class RateLimitMiddleware:
    """Apply ``settings.TOKENLIMIT['LIMIT']`` to every request but the exempt paths.

    Put it after ``AuthenticationMiddleware`` so the default identity can see the user. Sync
    and async capable: Django picks the mode that fits the chain around it. Its bucket is the
    identity's alone, never a view's (see ``ratelimit``).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
        _state().middleware_policy()  # a bad setting fails at start-up, not at a request

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self.__acall__(request)
        state = _state()
        verdict, refused = _enter_sync(state.middleware_policy(), request, None, None)
        if refused is not None:
            return refused
        return _admitted(state.sync, request, verdict, self.get_response(request))

    async def __acall__(self, request: Any) -> Any:
        state = _state()
        verdict, refused = await _enter_async(state.middleware_policy(), request, None, None)
        if refused is not None:
            return refused
        return _admitted(state.async_, request, verdict, await self.get_response(request))

    def process_exception(self, request: Any, exception: Exception) -> Any:
        """A view's own ``RateLimitExceeded`` (``@rate_limit`` inside it) answers 429, and a
        ``BackendError`` 503, as the middleware's own decisions do."""
        state = _state()
        policy = state.middleware_policy()
        if isinstance(exception, RateLimitExceeded):
            return _render(state, request, policy, answer(policy, exception.decision))
        if isinstance(exception, BackendError):
            return _render(state, request, policy, unavailable(exception))
        return None


# -- decorator -------------------------------------------------------------------------------
def _qualified(obj: Any) -> str:
    """The view's dotted path: what its bucket is named after. ``as_view()`` functions all
    share one ``__qualname__``, so they are named after their ``view_class``."""
    owner = getattr(obj, "view_class", None)
    if isinstance(owner, type):
        obj = owner
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _async_view_instance(function: Any) -> bool:
    """True for a sync method of an async class-based view: ``method_decorator`` on
    ``dispatch`` hands us ``partial(view.dispatch)``, which returns a coroutine."""
    bound = getattr(function, "func", None) if isinstance(function, functools.partial) else None
    owner = getattr(bound, "__self__", None)
    return isinstance(owner, View) and bool(type(owner).view_is_async)


def _call_sync(rule: ViewLimit, route: str, request: Any, view: Callable[[], Any]) -> Any:
    refused = _enter_sync(rule.policy(_state().base), request, route, rule.scope)[1]
    return refused if refused is not None else _annotate(request, view())


async def _call_async(rule: ViewLimit, route: str, request: Any, view: Callable[[], Any]) -> Any:
    refused = (await _enter_async(rule.policy(_state().base), request, route, rule.scope))[1]
    return refused if refused is not None else _annotate(request, await view())


def _limit_view_class(rule: ViewLimit, cls: type[Any]) -> type[Any]:
    route = _qualified(cls)
    original = cls.dispatch

    @functools.wraps(original)
    def dispatch(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        def view() -> Any:
            return original(self, request, *args, **kwargs)

        # Like View.dispatch: a coroutine for an async view, a response for a sync one.
        if type(self).view_is_async:
            return _call_async(rule, route, request, view)
        return _call_sync(rule, route, request, view)

    cls.dispatch = dispatch
    return cls


def _limit_view(rule: ViewLimit, function: Callable[..., Any]) -> Callable[..., Any]:
    route = _qualified(function)
    if iscoroutinefunction(function):

        @functools.wraps(function)
        async def async_view(request: Any, *args: Any, **kwargs: Any) -> Any:
            return await _call_async(
                rule, route, request, lambda: function(request, *args, **kwargs)
            )

        return async_view

    @functools.wraps(function)
    def sync_view(request: Any, *args: Any, **kwargs: Any) -> Any:
        def view() -> Any:
            return function(request, *args, **kwargs)

        if _async_view_instance(function):
            return _call_async(rule, route, request, view)
        return _call_sync(rule, route, request, view)

    return sync_view


def ratelimit(
    limit: Any = None,
    burst: int | None = None,
    *,
    key: Any = None,
    cost: int = 1,
    headers: bool | None = None,
    shadow: bool | None = None,
    scope: str | None = None,
) -> Callable[[V], V]:
    """Limit one view (function or class-based, sync or async) with its own bucket.

    ``limit`` is a ``Limit``, a string like ``"10/minute"`` (``burst`` overrides its count), or a
    list of them. ``key`` takes the request and returns the identity (None or "": ``KEY``, then
    the default, as the middleware does); ``cost`` is the tokens one request takes;
    ``headers`` defaults to ``TOKENLIMIT['HEADERS']``. On a ``View`` subclass it wraps
    ``dispatch``; ``method_decorator(ratelimit(...), name=...)`` works too (on an ``async def``
    method only from Django 5.0, whose ``method_decorator`` first supports them). ``shadow``
    defaults to ``TOKENLIMIT['SHADOW']``: True decides, counts and sends the headers as usual but
    never answers 429 (a would-be refusal is a ``Decision`` with ``shadowed=True``).

    The bucket is the view's own, ``route:<dotted.path.of.view>|<identity>``, apart from the
    middleware's; views given the same ``scope`` share one, ``scope:<scope>|<identity>``.
    """
    if limit is None:
        raise ConfigError("limit", "is required, for example ratelimit('10/minute')")
    rule = ViewLimit(
        limit, burst=burst, key=key, cost=cost, scope=scope, shadow=shadow, headers=headers
    )

    def decorate(view: V) -> V:
        if isinstance(view, type):
            if not issubclass(view, View):
                raise ConfigTypeError("view", f"{view.__name__} is not a django.views.View")
            return _limit_view_class(rule, view)  # type: ignore[return-value]
        if not callable(view):
            raise ConfigTypeError("view", f"must be a view function or class, not {view!r}")
        return _limit_view(rule, view)  # type: ignore[return-value]

    return decorate


# -- app -------------------------------------------------------------------------------------
class TokenLimitConfig(AppConfig):  # type: ignore[misc]
    """``INSTALLED_APPS`` entry with the label ``tokenlimit`` (the bare module path works too,
    labelled ``django``): either way the system checks run at start-up."""

    name = "tokenlimit.integrations.django"
    label = "tokenlimit"
    verbose_name = "tokenlimit"
