"""A sync view, an async view, a view with a limit of its own, and an exempt health check."""

from django.http import HttpRequest, JsonResponse

from tokenlimit.integrations.django import ratelimit


def hello(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"hello": "from a sync view"})


async def hello_async(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"hello": "from an async view"})


@ratelimit("2/minute")  # on top of the middleware's 5/minute, in a bucket of its own
def search(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"results": []})


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})
