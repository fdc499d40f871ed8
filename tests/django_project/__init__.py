"""A Django project for tests/test_django.py: views, URLs, key functions and test middleware."""

from __future__ import annotations

MIDDLEWARE = "tokenlimit.integrations.django.RateLimitMiddleware"
FAKE_AUTH = "django_project.middleware.FakeAuthMiddleware"
FAKE_LAZY_AUTH = "django_project.middleware.FakeLazyAuthMiddleware"
SYNC_ONLY = "django_project.middleware.SyncOnlyMiddleware"

# What every test starts from (test_django.py applies it with override_settings, so a process
# whose settings someone else configured first still runs these tests as written).
BASE = {
    "ALLOWED_HOSTS": ["testserver"],
    "ROOT_URLCONF": "django_project.urls",
    "MIDDLEWARE": [FAKE_AUTH, MIDDLEWARE],
    "TOKENLIMIT": {"URL": "memory://", "LIMIT": "3/minute"},
}


def setup() -> None:
    """Configure Django once per process (settings are process-global)."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="tokenlimit-tests",
            INSTALLED_APPS=["tokenlimit.integrations.django"],
            DATABASES={},
            USE_TZ=True,
            **BASE,
        )
        django.setup()
