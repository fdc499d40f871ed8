"""URLs, views and predicates for tests/test_django_rules.py (``ROOT_URLCONF`` there):
methods, ``exempt_when``, ``deduct_when`` and ``ratelimit_exempt``."""

from __future__ import annotations

import asyncio

from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views import View

from tokenlimit.integrations.django import ratelimit, ratelimit_exempt

LOGINS = "5/15 minutes"  # five failed logins per 15 minutes per username
PAUSE = 0.2  # seconds an async login takes: concurrent ones are all in flight at once


def staff(request: HttpRequest) -> bool:
    """``EXEMPT_WHEN``/``exempt_when``: staff requests are never limited."""
    return request.headers.get("X-Staff") == "yes"


def failed(response: HttpResponse) -> bool:
    """``DEDUCT_WHEN``/``deduct_when``: only a 401 counts."""
    return response.status_code == 401


def no_arguments() -> bool:
    """flask-limiter's shape of a predicate: ours takes an argument."""
    return True


def username(request: HttpRequest) -> str:
    return f"login:{request.POST['username']}"


def page(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


def checked(request: HttpRequest) -> HttpResponse:
    """401 unless the ``X-Password`` header is right (for DEDUCT_WHEN on the middleware)."""
    return HttpResponse("ok", status=200 if request.headers.get("X-Password") == "right" else 401)


@ratelimit(LOGINS, key=username, deduct_when=failed)
def login(request: HttpRequest) -> HttpResponse:
    if request.POST["password"] != "right":
        return HttpResponse("wrong username or password", status=401)
    return HttpResponse("welcome")


@ratelimit(LOGINS, key=username, deduct_when=failed)
async def alogin(request: HttpRequest) -> HttpResponse:
    await asyncio.sleep(PAUSE)
    if request.POST["password"] != "right":
        return HttpResponse("wrong username or password", status=401)
    return HttpResponse("welcome")


@ratelimit("3/minute", methods=["post"])
def post_only(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


@ratelimit("3/minute", exempt_when=staff)
async def staff_free(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


@ratelimit_exempt
def exempted(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


@ratelimit_exempt
async def aexempted(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


@ratelimit_exempt
@ratelimit("1/minute")
def exempted_own(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


@ratelimit_exempt
class ExemptView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok")


class PlainView(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok")


@ratelimit("3/minute", scope="reports")
def daily(request: HttpRequest) -> HttpResponse:
    return HttpResponse("daily")


@ratelimit("3/minute", scope="reports")
async def weekly(request: HttpRequest) -> HttpResponse:
    return HttpResponse("weekly")


urlpatterns = [
    path("page", page),
    path("checked", checked),
    path("login", login),
    path("alogin", alogin),
    path("post-only", post_only),
    path("staff-free", staff_free),
    path("exempted", exempted),
    path("aexempted", aexempted),
    path("exempted-own", exempted_own),
    path("exempt-cbv", ExemptView.as_view()),
    path("exempt-as-view", ratelimit_exempt(PlainView.as_view())),
    path("daily", daily),
    path("weekly", weekly),
]
