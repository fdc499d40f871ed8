"""Views for every shape the integration must limit: function and class-based, sync and async,
through the middleware and through ``ratelimit``."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils.decorators import method_decorator
from django.views import View

from tokenlimit import BackendError, Limit, MemoryBackend, RateLimiter
from tokenlimit.integrations.django import ratelimit


def plain(request: HttpRequest) -> HttpResponse:
    return HttpResponse("plain")


async def aplain(request: HttpRequest) -> HttpResponse:
    return HttpResponse("aplain")


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


class PlainView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("cbv")


class APlainView(View):
    async def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("acbv")


@ratelimit("2/minute")
def limited(request: HttpRequest) -> HttpResponse:
    return HttpResponse("limited")


@ratelimit("2/minute")
def limited_twin(request: HttpRequest) -> HttpResponse:
    return HttpResponse("limited twin")


@ratelimit("2/minute")
async def alimited(request: HttpRequest) -> HttpResponse:
    return HttpResponse("alimited")


@ratelimit(limit="2/minute")
class LimitedView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("limited cbv")


@ratelimit("2/minute")
class ALimitedView(View):
    async def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("alimited cbv")


class MethodLimitedView(View):
    @method_decorator(ratelimit("2/minute"))
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("method limited")


class AMethodLimitedView(View):
    @method_decorator(ratelimit("2/minute"))
    async def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("amethod limited")


@method_decorator(ratelimit("2/minute"), name="dispatch")
class ADispatchLimitedView(View):
    async def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("adispatch limited")


@method_decorator(ratelimit("2/minute"), name="dispatch")
class DispatchLimitedView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("dispatch limited")


def _tenant(request: Any) -> str | None:
    tenant = request.headers.get("X-Tenant")
    return f"tenant:{tenant}" if tenant else None


@ratelimit("2/minute", key=_tenant)
def by_tenant(request: HttpRequest) -> HttpResponse:
    return HttpResponse("by tenant")


@ratelimit(["2/minute", Limit.per_hour(100, name="hourly")])
async def multi(request: HttpRequest) -> HttpResponse:
    return HttpResponse("multi")


@ratelimit("10/minute", 4, cost=2)
def expensive(request: HttpRequest) -> HttpResponse:
    return HttpResponse("expensive")


@ratelimit("2/minute", headers=False)
def quiet(request: HttpRequest) -> HttpResponse:
    return HttpResponse("quiet")


# A limiter of the view's own: its refusals and failures reach the middleware as exceptions.
own_limiter = RateLimiter(MemoryBackend())


def raises_refusal(request: HttpRequest) -> HttpResponse:
    own_limiter.acquire("inner", Limit.per_minute(1, name="inner"), timeout=0)
    return HttpResponse("inner")


def raises_backend_error(request: HttpRequest) -> HttpResponse:
    raise BackendError("storage down at 10.1.2.3:6379", reason="connection")
