from __future__ import annotations

from django.urls import path

from django_project import views
from tokenlimit.integrations.django import ratelimit

urlpatterns = [
    path("plain", views.plain),
    path("aplain", views.aplain),
    path("cbv", views.PlainView.as_view()),
    path("acbv", views.APlainView.as_view()),
    path("health", views.health),
    path("health/deep", views.health),
    path("limited", views.limited),
    path("limited-twin", views.limited_twin),
    path("alimited", views.alimited),
    path("limited-cbv", views.LimitedView.as_view()),
    path("alimited-cbv", views.ALimitedView.as_view()),
    path("method-limited", views.MethodLimitedView.as_view()),
    path("amethod-limited", views.AMethodLimitedView.as_view()),
    path("dispatch-limited", views.DispatchLimitedView.as_view()),
    path("adispatch-limited", views.ADispatchLimitedView.as_view()),
    path("as-view-limited", ratelimit("2/minute")(views.APlainView.as_view())),
    path("by-tenant", views.by_tenant),
    path("multi", views.multi),
    path("expensive", views.expensive),
    path("quiet", views.quiet),
    path("raises-refusal", views.raises_refusal),
    path("raises-backend-error", views.raises_backend_error),
]
