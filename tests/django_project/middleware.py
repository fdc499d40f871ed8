"""Test middleware: a fake signed-in user from the ``X-Test-User`` header, and a sync-only
middleware that forces the chain around it into sync mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.utils.asyncio import async_unsafe
from django.utils.functional import SimpleLazyObject


class FakeUser:
    def __init__(self, pk: int | None) -> None:
        self.pk = pk
        self.is_authenticated = pk is not None


def _user(request: Any) -> FakeUser:
    raw = request.headers.get("X-Test-User")
    return FakeUser(int(raw) if raw else None)


@async_unsafe("reading request.user")  # as a database query would: never on the event loop
def _lazy_user(request: Any) -> FakeUser:
    return _user(request)


class FakeAuthMiddleware:
    """Like AuthenticationMiddleware: a lazy ``request.user`` and an async ``request.auser``."""

    sync_capable = True
    async_capable = True
    with_auser = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def _install(self, request: Any) -> None:
        request.user = SimpleLazyObject(lambda: _lazy_user(request))
        if self.with_auser:

            async def auser() -> FakeUser:
                return _user(request)

            request.auser = auser

    def __call__(self, request: Any) -> Any:
        self._install(request)
        return self.get_response(request)  # in async mode, a coroutine the handler awaits


class FakeLazyAuthMiddleware(FakeAuthMiddleware):
    """Only the lazy ``request.user`` (as before Django 5): read off the event loop."""

    with_auser = False


class SyncOnlyMiddleware:
    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)
