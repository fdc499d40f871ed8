"""Settings: one limit for every request but ``/health``, shared through ``REDIS_URL``."""

import os

SECRET_KEY = "tokenlimit-example-not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "urls"
USE_TZ = True
DATABASES: dict[str, dict[str, str]] = {}

# The app entry runs tokenlimit's system checks at start-up (`manage.py check`).
INSTALLED_APPS = ["tokenlimit.integrations.django"]

# With django.contrib.auth, put RateLimitMiddleware after AuthenticationMiddleware so signed-in
# users are limited per user rather than per IP.
MIDDLEWARE = ["tokenlimit.integrations.django.RateLimitMiddleware"]

TOKENLIMIT = {
    "URL": os.environ.get("REDIS_URL", "memory://"),
    "LIMIT": "5/minute",
    "EXEMPT": ["/health"],
    "TRUSTED_PROXIES": None,  # behind one reverse proxy: 1
    "FAILURE_MODE": "closed",  # Redis down: 503 (use "open" to admit instead)
}
