"""URLs for tests/test_metrics.py: routes with parameters, so the route label can be checked to
be the pattern (``items/<int:item_id>``), never the path."""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse, JsonResponse
from django.urls import path

from tokenlimit.integrations.django import ratelimit


def item(request: Any, item_id: int) -> HttpResponse:
    return JsonResponse({"item": item_id})


async def aitem(request: Any, item_id: int) -> HttpResponse:
    return JsonResponse({"item": item_id})


@ratelimit("2/minute")
def limited_item(request: Any, item_id: int) -> HttpResponse:
    return JsonResponse({"item": item_id})


@ratelimit("2/minute")
async def alimited_item(request: Any, item_id: int) -> HttpResponse:
    return JsonResponse({"item": item_id})


urlpatterns = [
    path("items/<int:item_id>", item),
    path("aitems/<int:item_id>", aitem),
    path("limited/<int:item_id>", limited_item),
    path("alimited/<int:item_id>", alimited_item),
]
