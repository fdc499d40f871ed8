"""Settings: DRF's throttle classes and rates; tokenlimit decides through ``TOKENLIMIT_URL``."""

import os

SECRET_KEY = "tokenlimit-example-not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "urls"
USE_TZ = True
DATABASES: dict[str, dict[str, str]] = {}
STORE = os.environ.get("TOKENLIMIT_URL", "memory://")

# The app entry runs tokenlimit's system checks (`manage.py check` validates TOKENLIMIT).
INSTALLED_APPS = ["tokenlimit.integrations.django"]
MIDDLEWARE: list[str] = []  # DRF authenticates in the view, before its throttles run

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["auth.TokenAuthentication"],
    "UNAUTHENTICATED_USER": None,  # this example has no django.contrib.auth
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_THROTTLE_CLASSES": [
        "tokenlimit.integrations.drf.AnonTokenBucketThrottle",
        "tokenlimit.integrations.drf.UserTokenBucketThrottle",
    ],
    # DRF's spellings; the burst is the count ("10/min": 10 at once, then one every 6 s).
    "DEFAULT_THROTTLE_RATES": {"anon": "5/min", "user": "10/min", "uploads": "2/min"},
}

TOKENLIMIT = {
    "URL": STORE,
    "FAILURE_MODE": "closed",  # Redis down: 503 (use "open" to admit instead)
    "TRUSTED_PROXIES": None,  # behind one reverse proxy: 1
}

# DRF's own throttles keep their history here (compare.py): the same server when there is one.
CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
        if STORE.startswith("memory://")
        else {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": STORE}
    )
}
