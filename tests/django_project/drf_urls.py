"""URLs for tests/test_drf.py: each route is a view with the throttles its name says."""

from __future__ import annotations

from django.urls import path

from django_project.drf_views import (
    Burst2,
    Cost2,
    DrfUser10,
    OurUser10,
    Tiered,
    TwoPerMinute,
    function_view,
    view,
)
from tokenlimit.integrations.drf import (
    AnonTokenBucketThrottle,
    ScopedTokenBucketThrottle,
    UserTokenBucketThrottle,
)

urlpatterns = [
    path("user", view(UserTokenBucketThrottle)),
    path("user-twin", view(UserTokenBucketThrottle)),
    path("anon", view(AnonTokenBucketThrottle)),
    path("anon-and-user", view(AnonTokenBucketThrottle, UserTokenBucketThrottle)),
    path("uploads", view(ScopedTokenBucketThrottle, throttle_scope="uploads")),
    path("uploads-twin", view(ScopedTokenBucketThrottle, throttle_scope="uploads")),
    path("scope-off", view(ScopedTokenBucketThrottle, throttle_scope="off")),
    path("scope-unset", view(ScopedTokenBucketThrottle, throttle_scope="nowhere")),
    path("unscoped", view(ScopedTokenBucketThrottle)),
    path("two", view(TwoPerMinute)),
    path("two-twin", view(TwoPerMinute)),
    path("burst2", view(Burst2)),
    path("cost2", view(Cost2)),
    path("tiered", view(Tiered)),
    path("function", function_view),
    path("compare/drf", view(DrfUser10)),
    path("compare/ours", view(OurUser10)),
]
