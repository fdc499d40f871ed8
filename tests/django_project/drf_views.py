"""DRF views and throttles for tests/test_drf.py (URLs in ``drf_urls``).

The views name their authentication, renderer and permissions themselves: ``APIView`` reads
DRF's defaults when it is imported, and the default ``AnonymousUser`` needs
``django.contrib.auth``, which this project does not install. ``REST``, applied by the tests,
sets the rest (anonymous users and the throttle rates are read per request).
"""

from __future__ import annotations

from typing import Any, ClassVar

from rest_framework.authentication import BaseAuthentication
from rest_framework.decorators import (
    api_view,
    authentication_classes,
    permission_classes,
    renderer_classes,
    throttle_classes,
)
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.throttling import UserRateThrottle
from rest_framework.views import APIView

from django_project.middleware import FakeUser
from tokenlimit.integrations.drf import (
    TokenBucketThrottle,
    UserTokenBucketThrottle,
)

REST = {
    "UNAUTHENTICATED_USER": "django_project.drf_views.Anonymous",
    "DEFAULT_THROTTLE_RATES": {"anon": "3/min", "user": "3/m", "uploads": "2/min", "off": None},
}


class Anonymous(FakeUser):
    """DRF's ``request.user`` when nobody signed in (``UNAUTHENTICATED_USER``)."""

    def __init__(self) -> None:
        super().__init__(None)


class HeaderAuthentication(BaseAuthentication):  # type: ignore[misc]
    """Signs in the user named by ``X-Test-User`` (its pk), as DRF's token auth would."""

    def authenticate(self, request: Any) -> tuple[FakeUser, None] | None:
        raw = request.headers.get("X-Test-User")
        return (FakeUser(int(raw)), None) if raw else None


class Base(APIView):  # type: ignore[misc]
    authentication_classes: ClassVar[list[Any]] = [HeaderAuthentication]
    renderer_classes: ClassVar[list[Any]] = [JSONRenderer]
    permission_classes: ClassVar[list[Any]] = []
    throttle_classes: ClassVar[list[Any]] = []
    throttle_scope: str | None = None  # what ScopedTokenBucketThrottle reads

    def get(self, request: Any) -> Response:
        return Response({"ok": True})


class TwoPerMinute(TokenBucketThrottle):
    rate = "2/min"


class Burst2(UserTokenBucketThrottle):
    rate = "10/min"
    burst = 2


class Cost2(UserTokenBucketThrottle):
    rate = "4/min"
    cost = 2


def tier(request: Any) -> str:
    """A rate chosen per request (tiers): user 1 is on the bigger plan."""
    return "4/min" if getattr(request.user, "pk", None) == 1 else "1/min"


class Tiered(TokenBucketThrottle):
    rate = tier
    scope = "tiered"


class DrfUser10(UserRateThrottle):  # type: ignore[misc]
    """DRF's own, on the Django cache: the over-admission comparison."""

    rate = "10/min"


class OurUser10(UserTokenBucketThrottle):
    rate = "10/min"


def view(*throttles: type[Any], **attributes: Any) -> Any:
    """A ``Base`` view with these throttles (and class attributes such as ``throttle_scope``)."""
    return Base.as_view(throttle_classes=list(throttles), **attributes)


@api_view(["GET"])
@authentication_classes([HeaderAuthentication])
@renderer_classes([JSONRenderer])
@permission_classes([])
@throttle_classes([UserTokenBucketThrottle])
def function_view(request: Any) -> Response:
    return Response({"ok": True})
