"""The example's routes."""

import views
from django.urls import path

urlpatterns = [
    path("", views.hello),
    path("async", views.hello_async),
    path("search", views.search),
    path("health", views.health),
]
