"""Django: ``RateLimitMiddleware`` configured from ``settings.TOKENLIMIT``, a ``ratelimit(...)``
view decorator, and system checks that report a bad setting at start-up. Sync and async alike.

    INSTALLED_APPS = [..., "tokenlimit.integrations.django"]  # runs the checks at start-up
    MIDDLEWARE = [..., "django.contrib.auth.middleware.AuthenticationMiddleware",
                  "tokenlimit.integrations.django.RateLimitMiddleware"]
    TOKENLIMIT = {"URL": "redis://localhost:6379/0", "LIMIT": "100/minute", "EXEMPT": ["/health"]}

    @ratelimit("10/minute")  # its own limit and bucket, on top of the middleware's
    def search(request): ...

    @ratelimit_exempt  # free of the middleware's limit
    def health(request): ...

Every ``TOKENLIMIT`` entry is in docs/integrations/django.md (and ``_settings.Options``). This
module reads each request's facts and renders the shared check's verdict; sync code decides
through a ``RateLimiter`` and async code through an ``AsyncRateLimiter`` on the same URL, so the
event loop never waits on a socket.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from tokenlimit._decision import Decision
from tokenlimit._errors import BackendError, ConfigError, ConfigTypeError, RateLimitExceeded
from tokenlimit._extras import needs_extra
from tokenlimit.integrations._check import (
    Limiter,
    Verdict,
    ViewLimit,
    acheck,
    answer,
    asettle,
    check,
    combined,
    finish,
    merged,
    settle,
    unavailable,
)
from tokenlimit.integrations._common import (
    KeyFunction,
    Policy,
    RequestLimit,
    rate_limit_headers,
)
from tokenlimit.integrations._incumbents import DJANGO_RATELIMIT
from tokenlimit.integrations._settings import Problem, Settings
from tokenlimit.integrations._settings import problems as settings_problems

with needs_extra("django", "django", feature=__name__):
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
    from django.apps import AppConfig
    from django.conf import settings
    from django.core import checks
    from django.core.exceptions import ImproperlyConfigured
    from django.http import HttpResponse
    from django.urls import Resolver404, get_resolver
    from django.urls import resolve as resolve_url
    from django.views import View

    from tokenlimit.integrations._django import (
        LEDGER,
        DjangoRequest,
        auser_id,
        request_facts,
        resolve,
        settings_state,
        template,
        user_pk,
    )

if TYPE_CHECKING:
    from django.http import HttpRequest  # what users' key functions and choosers are handed

__all__ = [
    "RateLimitMiddleware",
    "TokenLimitConfig",
    "check_settings",
    "ratelimit",
    "ratelimit_exempt",
]

V = TypeVar("V")


class _Response(Protocol):
    """What is done to a Django response: setting a header."""

    def __setitem__(self, header: str, value: str, /) -> None: ...


class _View(Protocol):
    """A class-based view (a ``django.views.View`` subclass), as ``ratelimit`` wraps it."""

    view_is_async: ClassVar[bool]
    dispatch: Callable[..., Any]  # a response, or where view_is_async a coroutine of one


MIDDLEWARE_PATH = "tokenlimit.integrations.django.RateLimitMiddleware"
_AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
_DECISIONS = "_tokenlimit_decisions"  # request attribute: the decisions its headers report
PUBLIC = "tokenlimit"  # request attribute: the request's Decision, as the docs name it
EXEMPT = "tokenlimit_exempt"  # view (or view class) attribute set by ratelimit_exempt
_exempt_views = False  # whether any view was marked: the middleware looks only then


# -- settings --------------------------------------------------------------------------------
def _message(problem: Problem) -> object:
    kind = checks.Error if problem.serious else checks.Warning
    return kind(problem.message, hint=problem.hint, id=problem.id)


def check_settings(app_configs: object = None, **kwargs: object) -> list[object]:
    """The system check: every bad entry of ``settings.TOKENLIMIT``, each with its own id."""
    raw = getattr(settings, "TOKENLIMIT", None)
    middleware = list(getattr(settings, "MIDDLEWARE", None) or ())
    # django-ratelimit's settings, unless it is installed (and may still use them).
    theirs: list[str] = []
    if importlib.util.find_spec("django_ratelimit") is None:
        theirs = [name for name in DJANGO_RATELIMIT if hasattr(settings, name)]
    found = settings_problems(
        raw, middleware, limiter=MIDDLEWARE_PATH, auth=_AUTH_MIDDLEWARE, incumbent=theirs
    )
    return [_message(problem) for problem in found]


checks.register(check_settings, "tokenlimit")


def _middleware_policy(state: Settings) -> Policy[HttpRequest]:
    if state.policy is None:
        raise ImproperlyConfigured(
            "RateLimitMiddleware needs settings.TOKENLIMIT['LIMIT'] (tokenlimit.E003)"
        )
    return state.policy


# -- request facts and answers ---------------------------------------------------------------
def _user_id(request: DjangoRequest) -> object:
    return user_pk(getattr(request, "user", None))


def _policy(
    state: Settings, rule: ViewLimit[HttpRequest] | None
) -> tuple[Policy[HttpRequest], str | None]:
    """The policy and scope of a view's limit (None: the middleware's)."""
    if rule is None:
        return _middleware_policy(state), None
    return rule.policy(state.base), rule.scope


def _call_sync(
    rule: ViewLimit[HttpRequest] | None,
    route: str | None,
    request: DjangoRequest,
    view: Callable[[], _Response],
) -> _Response:
    """Check ``request`` in sync code, then answer 429/503 or call ``view()``."""
    state = settings_state()
    if not state.enabled:
        vars(request).setdefault(PUBLIC, None)
        return view()
    policy, scope = _policy(state, rule)
    user = functools.partial(_user_id, request)
    # Both the middleware and the decorator see the request's end: each counts it there.
    facts = request_facts(request, request, policy, user, route=route, routed=False)
    verdict = check(policy, facts, state.sync, scope=scope, resolve=resolve)
    refused = _render(state, request, policy, verdict)
    if refused is not None:
        return refused
    response = view()
    if verdict.charge is not None:  # deduct_when: keep the tokens, or give them back
        after = settle(verdict.charge, response, resolve=resolve, log=state.log)
        _settled(request, verdict, after)
    return _done(state.sync, request, route, verdict, response)


async def _call_async(
    rule: ViewLimit[HttpRequest] | None,
    route: str | None,
    request: DjangoRequest,
    view: Callable[[], Awaitable[_Response]],
) -> _Response:
    state = settings_state()
    if not state.enabled:
        vars(request).setdefault(PUBLIC, None)
        return await view()
    policy, scope = _policy(state, rule)
    user = functools.partial(auser_id, request)
    # Both the middleware and the decorator see the request's end: each counts it there.
    facts = request_facts(request, request, policy, user, route=route, routed=False)
    verdict = await acheck(policy, facts, state.async_, scope=scope)
    refused = _render(state, request, policy, verdict)
    if refused is not None:
        return refused
    response = await view()
    if verdict.charge is not None:  # deduct_when: keep the tokens, or give them back
        _settled(request, verdict, await asettle(verdict.charge, response, log=state.log))
    return _done(state.async_, request, route, verdict, response)


def _settled(request: DjangoRequest, verdict: Verdict, after: Decision | None) -> None:
    """After a give-back, the response's headers report the bucket as it now is."""
    decisions: list[Decision] = getattr(request, _DECISIONS, None) or []
    if after is not None:
        for index, decision in enumerate(decisions):
            if decision is verdict.decision:
                decisions[index] = after


def _render(
    state: Settings, request: DjangoRequest, policy: Policy[HttpRequest], verdict: Verdict
) -> _Response | None:
    """Keep the verdict's decision for the response's headers and for the view (``PUBLIC``);
    the 429/503 response, or None."""
    verdict.report(state.log)
    kept = vars(request)
    if verdict.decision is not None and not verdict.repeated:
        kept[PUBLIC] = merged(kept.get(PUBLIC), verdict.decision)
        if policy.headers:
            kept.setdefault(_DECISIONS, []).append(verdict.decision)
    else:
        kept.setdefault(PUBLIC, None)
    if verdict.status == 200:
        return None
    response: _Response = HttpResponse(
        verdict.body, status=verdict.status, content_type="application/json"
    )
    for name, value in verdict.headers:  # a 429's Retry-After, even with HEADERS off
        response[name] = value
    return _annotate(request, response)


def _done(
    limiter: Limiter,
    request: DjangoRequest,
    route: str | None,
    verdict: Verdict,
    response: _Response,
) -> _Response:
    """The response, with every limit the request was checked against in its headers; the
    request counted now that the URL is resolved, unless a check inside counted it."""
    if verdict.decision is not None:
        finish(limiter, vars(request).get(LEDGER), template(request))
    return _annotate(request, response)


def _annotate(request: object, response: _Response) -> _Response:
    decisions: list[Decision] = getattr(request, _DECISIONS, None) or []
    if decisions and response is not None:
        for name, value in rate_limit_headers(combined(decisions)):
            response[name] = value
    return response


# -- middleware ------------------------------------------------------------------------------
class RateLimitMiddleware:
    """Apply ``settings.TOKENLIMIT['LIMIT']`` to every request but the ``EXEMPT`` paths and the
    views marked ``ratelimit_exempt``; ``METHODS``, ``EXEMPT_WHEN`` and ``DEDUCT_WHEN`` narrow
    what it checks and what counts.

    Put it after ``AuthenticationMiddleware`` so the default identity can see the user. Sync
    and async capable: Django picks the mode that fits the chain around it. Its bucket is the
    identity's alone, never a view's (see ``ratelimit``).
    """

    sync_capable = True
    async_capable = True

    # ``get_response``: the next handler. It answers a response or, in an async chain, a
    # coroutine of one: Django picks the mode per chain, at run time.
    def __init__(self, get_response: Callable[[DjangoRequest], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
        _middleware_policy(settings_state())  # a bad setting fails at start-up, not at a request
        _load_views()

    def __call__(self, request: DjangoRequest) -> _Response | Awaitable[_Response]:
        if _exempt_views and _routes_to_exempt_view(request):
            passed: _Response | Awaitable[_Response] = self.get_response(request)
            return passed
        if self._async:
            return _call_async(None, None, request, lambda: self.get_response(request))
        return _call_sync(None, None, request, lambda: self.get_response(request))

    def process_exception(self, request: DjangoRequest, exception: Exception) -> _Response | None:
        """A view's own ``RateLimitExceeded`` (``@rate_limit`` inside it) answers 429, and a
        ``BackendError`` 503, as the middleware's own decisions do."""
        state = settings_state()
        policy = _middleware_policy(state)
        if isinstance(exception, RateLimitExceeded):
            return _render(state, request, policy, answer(policy, exception.decision))
        if isinstance(exception, BackendError):
            return _render(state, request, policy, unavailable(exception))
        return None


def _load_views() -> None:
    """Import the root URLconf, and with it the views, so that every ``ratelimit_exempt`` mark
    is known before the first request (Django would import it only during that request)."""
    try:
        get_resolver().url_patterns  # noqa: B018  # the import is the point
    except Exception:  # a broken URLconf: Django reports it at the first request, as without us
        return


def _routes_to_exempt_view(request: DjangoRequest) -> bool:
    """Whether ``request``'s URL resolves to a view marked ``ratelimit_exempt`` (resolved here:
    the middleware decides before Django resolves it)."""
    try:
        match = resolve_url(request.path_info, getattr(request, "urlconf", None))
    except Resolver404:
        return False
    view = match.func
    owner = getattr(view, "view_class", None)  # as_view()'s function: its class may be marked
    return bool(getattr(view, EXEMPT, False) or getattr(owner, EXEMPT, False))


def ratelimit_exempt(view: V) -> V:
    """Free a view (function, ``as_view()`` or ``View`` subclass) from ``RateLimitMiddleware``;
    its own ``ratelimit`` still applies. For paths, ``EXEMPT`` does the same without a lookup."""
    global _exempt_views
    if not callable(view):
        raise ConfigTypeError("view", f"must be a view function or class, not {view!r}")
    setattr(view, EXEMPT, True)
    _exempt_views = True
    return view


# -- decorator -------------------------------------------------------------------------------
def _qualified(obj: object) -> str:
    """The view's dotted path: what its bucket is named after. ``as_view()`` functions all
    share one ``__qualname__``, so they are named after their ``view_class``."""
    owner = getattr(obj, "view_class", None)
    if isinstance(owner, type):
        obj = owner
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _async_view_instance(function: object) -> bool:
    """True for a sync method of an async class-based view: ``method_decorator`` on
    ``dispatch`` hands us ``partial(view.dispatch)``, which returns a coroutine."""
    bound = getattr(function, "func", None) if isinstance(function, functools.partial) else None
    owner = getattr(bound, "__self__", None)
    return isinstance(owner, View) and bool(type(owner).view_is_async)


def _limit_view_class(rule: ViewLimit[HttpRequest], cls: type[_View]) -> type[_View]:
    route = _qualified(cls)
    original = cls.dispatch

    @functools.wraps(original)
    def dispatch(
        self: _View, request: DjangoRequest, *args: object, **kwargs: object
    ) -> _Response | Awaitable[_Response]:
        # Like View.dispatch: a coroutine for an async view, a response for a sync one.
        if type(self).view_is_async:
            return _call_async(
                rule, route, request, lambda: original(self, request, *args, **kwargs)
            )
        return _call_sync(rule, route, request, lambda: original(self, request, *args, **kwargs))

    cls.dispatch = dispatch
    return cls


def _limit_view(
    rule: ViewLimit[HttpRequest],
    # A view function: its answer is a response or, for an async view (or the sync method of
    # one that method_decorator hands over), a coroutine of one.
    function: Callable[..., Any],
) -> Callable[..., _Response | Awaitable[_Response]]:
    route = _qualified(function)
    if iscoroutinefunction(function):

        @functools.wraps(function)
        async def async_view(request: DjangoRequest, *args: object, **kwargs: object) -> _Response:
            return await _call_async(
                rule, route, request, lambda: function(request, *args, **kwargs)
            )

        return async_view

    @functools.wraps(function)
    def sync_view(
        request: DjangoRequest, *args: object, **kwargs: object
    ) -> _Response | Awaitable[_Response]:
        if _async_view_instance(function):
            return _call_async(rule, route, request, lambda: function(request, *args, **kwargs))
        return _call_sync(rule, route, request, lambda: function(request, *args, **kwargs))

    return sync_view


def ratelimit(
    limit: RequestLimit[HttpRequest] | None = None,
    burst: int | None = None,
    *,
    key: KeyFunction[HttpRequest] | None = None,
    cost: int = 1,
    headers: bool | None = None,
    shadow: bool | None = None,
    scope: str | None = None,
    methods: Iterable[str] | None = None,
    exempt_when: Callable[[HttpRequest], object] | None = None,
    deduct_when: Callable[[HttpResponse], object] | None = None,
    **others: object,
) -> Callable[[V], V]:
    """Limit one view (function or class-based, sync or async) with its own bucket,
    ``route:<dotted.path.of.view>|<identity>``; views of one ``scope`` share
    ``scope:<scope>|<identity>``. Neither is ever the middleware's.

    ``limit``: a number per second or a string like ``"10/minute"`` (``burst`` sets the
    capacity), a ``Limit``, a list, or a chooser. ``key(request)``: the identity (None or "":
    ``KEY``, then the default).
    ``headers`` and ``shadow`` (decide and count, never answer 429) default to ``HEADERS`` and
    ``SHADOW``. On a ``View`` subclass it wraps ``dispatch``; ``method_decorator`` works too (on
    an ``async def`` method only from Django 5.0).

    ``methods=["POST"]``: only those methods are checked and charged; ``exempt_when(request)``
    true: neither; ``deduct_when(response)`` (the view's response; sync, or async for an
    async view): the token is taken before the view and given back after it unless this
    returns true (a view that raises keeps it). django-ratelimit's ``method=`` and ``group=``
    are errors naming these spellings.
    """
    for name in others:
        raise _not_ours(name)
    if limit is None:
        raise ConfigError("limit", "is required, for example ratelimit('10/minute')")
    rule = ViewLimit(
        limit,
        burst=burst,
        key=key,
        cost=cost,
        scope=scope,
        shadow=shadow,
        headers=headers,
        methods=methods,
        exempt_when=exempt_when,
        deduct_when=deduct_when,
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


# django-ratelimit's spellings of what ``ratelimit`` takes under another name.
_OURS = {
    "method": "methods=['POST'] (a list of methods)",
    "group": "scope='name' (views of one scope share a bucket)",
}


def _not_ours(name: str) -> TypeError:
    """The error for a keyword ``ratelimit`` does not take: naming ours where we know it."""
    if name in _OURS:
        return ConfigTypeError(name, f"ratelimit spells it {_OURS[name]}")
    return TypeError(f"ratelimit() got an unexpected keyword argument {name!r}")


# -- app -------------------------------------------------------------------------------------
class TokenLimitConfig(AppConfig):  # type: ignore[misc]
    """``INSTALLED_APPS`` entry with the label ``tokenlimit`` (the bare module path works too,
    labelled ``django``): either way the system checks run at start-up."""

    name = "tokenlimit.integrations.django"
    label = "tokenlimit"
    verbose_name = "tokenlimit"
