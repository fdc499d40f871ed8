"""The incumbents' settings next to ours, free of any framework: flask-limiter's ``RATELIMIT_*``
app config and django-ratelimit's ``RATELIMIT_*`` Django settings, each with what tokenlimit
reads instead. tokenlimit reads neither, so an app moved over with them left in place would run
unlimited: Flask refuses them at ``init_app`` and Django's system check warns.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

__all__ = ["DJANGO_RATELIMIT", "FLASK_LIMITER", "flask_limiter_message", "unknown_message"]

MIGRATING = "docs/migrating.md"

# flask-limiter's config key -> what to write instead (constants.ConfigVars, and the older
# RATELIMIT_STORAGE_URL). Keys left out get the generic message.
FLASK_LIMITER: Mapping[str, str] = {
    "RATELIMIT_DEFAULT": "use TOKENLIMIT_LIMIT",
    "RATELIMIT_STORAGE_URI": "use TOKENLIMIT_URL",
    "RATELIMIT_STORAGE_URL": "use TOKENLIMIT_URL",
    "RATELIMIT_ENABLED": "use TOKENLIMIT_ENABLED",
    "RATELIMIT_HEADERS_ENABLED": "use TOKENLIMIT_HEADERS",
    "RATELIMIT_STRATEGY": "tokenlimit always uses a token bucket: remove it",
    "RATELIMIT_SWALLOW_ERRORS": 'use TOKENLIMIT_FAILURE_MODE = "open"',
    "RATELIMIT_IN_MEMORY_FALLBACK": (
        'use TOKENLIMIT_FAILURE_MODE = "local" with TOKENLIMIT_EXPECTED_PROCESSES'
    ),
    "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": (
        'use TOKENLIMIT_FAILURE_MODE = "local" with TOKENLIMIT_EXPECTED_PROCESSES'
    ),
    "RATELIMIT_KEY_FUNC": "pass key= to TokenLimit(...)",
    "RATELIMIT_KEY_PREFIX": "pass limiter=RateLimiter.from_url(url, prefix=...)",
    "RATELIMIT_DEFAULTS_COST": "pass cost= to TokenLimit(...)",
    "RATELIMIT_DEFAULTS_EXEMPT_WHEN": "pass exempt_when= to TokenLimit(...)",
    "RATELIMIT_DEFAULTS_DEDUCT_WHEN": "pass deduct_when= to TokenLimit(...)",
}
_FLASK_HEADER = "tokenlimit's header names are fixed (X-RateLimit-*, RateLimit-Policy, RateLimit)"

# django-ratelimit's setting -> the TOKENLIMIT entry to write instead.
DJANGO_RATELIMIT: Mapping[str, str] = {
    "RATELIMIT_ENABLE": 'TOKENLIMIT["ENABLED"]',
    "RATELIMIT_USE_CACHE": 'TOKENLIMIT["URL"] (the buckets live in Redis or Valkey, not a cache)',
    "RATELIMIT_CACHE_PREFIX": 'TOKENLIMIT["PREFIX"]',
    "RATELIMIT_FAIL_OPEN": 'TOKENLIMIT["FAILURE_MODE"] = "open"',
    "RATELIMIT_IP_META_KEY": 'TOKENLIMIT["TRUSTED_PROXIES"] (or a KEY function)',
    "RATELIMIT_IPV6_MASK": 'TOKENLIMIT["IPV6_PREFIX"]',
    "RATELIMIT_IPV4_MASK": 'a TOKENLIMIT["KEY"] function',
    "RATELIMIT_VIEW": "nothing: a refusal answers 429 with JSON (see docs/integrations/django.md)",
    "RATELIMIT_EXCEPTION_CLASS": "nothing: a refusal answers 429 with JSON",
    "RATELIMIT_HASH_ALGORITHM": "nothing: keys are hashed by tokenlimit",
    "RATELIMIT_BACKEND": 'TOKENLIMIT["URL"]',
}


def _flask_hint(key: str) -> str:
    hint = FLASK_LIMITER.get(key)
    if hint is not None:
        return hint
    if key.startswith("RATELIMIT_HEADER_"):
        return _FLASK_HEADER
    return f"see {MIGRATING}"


def flask_limiter_message(keys: Iterable[str]) -> tuple[str, str] | None:
    """(the first key, a message naming what to write instead of each) for flask-limiter's
    keys among ``keys``; None when there are none."""
    found = sorted(key for key in keys if key.startswith("RATELIMIT_"))
    if not found:
        return None
    first, *rest = found
    message = f"is flask-limiter's setting, which tokenlimit does not read: {_flask_hint(first)}"
    if rest:
        message += "; also " + "; ".join(f"{key}: {_flask_hint(key)}" for key in rest)
    return first, f"{message} ({MIGRATING})"


def unknown_message(key: str, known: Iterable[str], elsewhere: Mapping[str, str]) -> str:
    """Why ``key`` is refused: where it is read instead (``elsewhere``: key -> how to give it),
    else the closest known spelling, else the known keys."""
    if key in elsewhere:
        return f"is not read from app.config: {elsewhere[key]}"
    known = list(known)
    # Compared past the prefix they all share ("TOKENLIMIT_"), which would make any two alike.
    head = key.partition("_")[0] + "_"
    shared = len(head) if all(name.startswith(head) for name in known) else 0
    tails = {name[shared:]: name for name in known}
    close = difflib.get_close_matches(key[shared:], list(tails), n=1, cutoff=0.6)
    if close:
        return f"is not a setting tokenlimit reads; did you mean {tails[close[0]]}?"
    return f"is not a setting tokenlimit reads (known: {', '.join(known)})"
