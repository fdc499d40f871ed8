"""Settings: one limit for every request but ``/health``, shared through ``TOKENLIMIT_URL``."""

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
    # Without a URL entry the environment's TOKENLIMIT_URL is read, else memory:// (and
    # `manage.py check` warns, W002): said here so the check passes on memory:// too.
    "URL": os.environ.get("TOKENLIMIT_URL", "memory://"),
    "LIMIT": "5/minute",
    "EXEMPT": ["/health"],
    "TRUSTED_PROXIES": None,  # behind one reverse proxy: 1
    "FAILURE_MODE": "closed",  # Redis down: 503 (use "open" to admit instead)
}
