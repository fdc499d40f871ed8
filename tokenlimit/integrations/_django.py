"""What the Django middleware and view decorator (``django.py``) and the DRF throttles
(``drf.py``) share: ``settings.TOKENLIMIT``, read once per change, and the facts read off a
Django request."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from tokenlimit._extras import needs_extra
from tokenlimit.integrations._check import Ledger, RequestFacts, awaited
from tokenlimit.integrations._settings import Settings, SettingsError

with needs_extra("django", "django", feature="tokenlimit.integrations.django"):
    from asgiref.sync import async_to_sync, sync_to_async
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.signals import setting_changed
    from django.utils.functional import LazyObject

if TYPE_CHECKING:
    # What a user's key function or limit chooser is handed (and annotates it with). Django is
    # untyped here, so it tells mypy nothing: what is read off a request is DjangoRequest.
    from django.http import HttpRequest

    from tokenlimit.integrations._common import Policy

__all__ = [
    "DjangoRequest",
    "auser_id",
    "request_facts",
    "resolve",
    "settings_state",
    "template",
    "user_pk",
]

LEDGER = "_tokenlimit_charged"  # request attribute: the buckets it charged


class DjangoRequest(Protocol):
    """What is read off a Django ``HttpRequest`` (``user``, ``auser`` and ``resolver_match``
    with getattr: a request may lack them)."""

    path_info: str
    method: str | None  # upper case; None only for a request made by hand
    META: Mapping[str, str]  # the entries read, REMOTE_ADDR and HTTP_X_FORWARDED_FOR, are str
    headers: Mapping[str, str]


class _User(Protocol):
    """What is read off an authenticated ``request.user``."""

    @property
    def pk(self) -> object: ...


# -- settings.TOKENLIMIT ----------------------------------------------------------------------
_lock = threading.Lock()
_current: Settings | None = None  # rebuilt when settings.TOKENLIMIT changes (override_settings)


def settings_state() -> Settings:
    """``settings.TOKENLIMIT`` read and checked, with its limiters; a bad entry raises
    ``ImproperlyConfigured``."""
    global _current
    state = _current
    if state is None:
        with _lock:
            if _current is None:
                try:
                    _current = Settings(getattr(settings, "TOKENLIMIT", None))
                except SettingsError as error:
                    raise ImproperlyConfigured(str(error)) from error
            state = _current
    return state


def _forget(*, setting: str, **kwargs: object) -> None:
    global _current
    if setting != "TOKENLIMIT":
        return
    with _lock:
        old, _current = _current, None
    if old is not None:
        old.close()


setting_changed.connect(_forget, dispatch_uid="tokenlimit.integrations.django")


# -- request facts ----------------------------------------------------------------------------
def user_pk(user: _User | None) -> object:
    """The id of a signed-in ``user``; None for an anonymous one or none."""
    return user.pk if user is not None and getattr(user, "is_authenticated", False) else None


async def auser_id(request: object) -> object:
    """``user_pk`` of the request's user, never touching the database on the event loop
    (``request.user`` is lazy and may query it)."""
    auser = getattr(request, "auser", None)
    if callable(auser):
        return user_pk(await auser())
    user = getattr(request, "user", None)
    if isinstance(user, LazyObject):
        return await sync_to_async(user_pk)(user)
    return user_pk(user)


def template(request: object) -> str | None:
    """The matched URL pattern (``items/<int:item_id>``), never the raw path; None before URL
    resolution (in the middleware, until the view has run) or when nothing matched."""
    route = getattr(getattr(request, "resolver_match", None), "route", None)
    return route if isinstance(route, str) else None


def resolve(awaitable: Awaitable[object]) -> object:
    """An async ``KEY``, validator or chooser's result, behind sync code."""
    return async_to_sync(awaited)(awaitable)


def request_facts(
    request: object,
    http: DjangoRequest,
    policy: Policy[HttpRequest],
    user: Callable[[], object],
    *,
    route: str | None,
    routed: bool,
) -> RequestFacts:
    """The check's facts: ``request`` goes to the policy's key function and chooser, the rest
    is read off ``http``, Django's request (the same one, or the one DRF's wraps)."""
    header = policy.api_key_header
    ledger = vars(http).get(LEDGER)
    if ledger is None:  # made once per request, shared by the middleware and the views
        ledger = vars(http)[LEDGER] = Ledger()
    return RequestFacts(
        request,
        http.path_info,
        http.META.get("REMOTE_ADDR"),
        http.META.get("HTTP_X_FORWARDED_FOR"),
        (http.headers.get(header) or None) if header else None,
        user,
        route,
        template(http),
        routed,
        ledger,
        http.method,
    )
