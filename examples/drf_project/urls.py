"""The example's routes."""

import views
from django.urls import path

urlpatterns = [
    path("hello", views.Hello.as_view()),
    path("upload", views.Upload.as_view()),
    path("search", views.Search.as_view()),
    path("compare/drf", views.CompareDrf.as_view()),
    path("compare/ours", views.CompareOurs.as_view()),
]
