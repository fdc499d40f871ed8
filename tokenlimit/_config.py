"""The default limiter behind ``rate_limit``: ``configure(...)``, else ``TOKENLIMIT_URL``, else
``memory://`` with a warning that it is per process.

The limiters made here from a URL take ``hash_secret`` from ``TOKENLIMIT_HASH_SECRET`` when the
option is not given (a limiter passed to ``configure`` is used as it was made)."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._base import DEFAULT_TIMEOUT
from ._errors import ConfigTypeError
from ._hash_secret import ENV_HASH_SECRET, env_hash_secret, hasher_for
from ._limiter import AsyncRateLimiter, RateLimiter
from ._memory import AsyncMemoryBackend, MemoryBackend
from ._url import async_backend_from_url, parse_url, sync_backend_from_url

if TYPE_CHECKING:
    from typing import Unpack

    from ._base import LimiterOptions

__all__ = ["configure", "default_async_limiter", "default_limiter", "default_sync_limiter"]

_lock = threading.Lock()
_sync: RateLimiter | AsyncRateLimiter | None = None
_async: RateLimiter | AsyncRateLimiter | None = None
_owned = False  # made here from a URL: close it when replaced


def configure(
    url_or_limiter: str | RateLimiter | AsyncRateLimiter | None, **options: Unpack[LimiterOptions]
) -> None:
    """Set the limiter ``rate_limit`` uses when given none.

    A URL makes a sync and an async limiter (sharing one store for ``memory://``); a limiter is
    used as given. ``None`` forgets the configuration (the environment is read again).
    """
    if url_or_limiter is None:
        _install(None, None, owned=False)
    elif isinstance(url_or_limiter, (RateLimiter, AsyncRateLimiter)):
        _install(url_or_limiter, url_or_limiter, owned=False)
    elif isinstance(url_or_limiter, str):
        _install(*limiter_pair(url_or_limiter, with_env_secret(options)), owned=True)
    else:
        raise ConfigTypeError(
            "url_or_limiter", f"must be a URL or a limiter, not {type(url_or_limiter).__name__}"
        )


def _install(
    sync: RateLimiter | AsyncRateLimiter | None,
    async_: RateLimiter | AsyncRateLimiter | None,
    *,
    owned: bool,
) -> None:
    global _sync, _async, _owned
    with _lock:
        old, old_owned = _sync, _owned
        _sync, _async, _owned = sync, async_, owned
    # The async twin's clients close with their event loops (see LoopLocalBackend).
    if old_owned and isinstance(old, RateLimiter):
        old.close()


def limiter_pair(url: str, options: Mapping[str, Any]) -> tuple[RateLimiter, AsyncRateLimiter]:
    """A sync and an async limiter on one URL (one shared store for ``memory://``).

    ``options``: the limiters' keyword options (``LimiterOptions``), as ``configure`` or the
    integrations' settings gathered them, checked by the limiters."""
    scheme, url = parse_url(url)
    timeout = options.get("timeout", DEFAULT_TIMEOUT)
    store = MemoryBackend() if scheme == "memory" else None
    sync = RateLimiter(sync_backend_from_url(url, timeout=timeout, memory=store), **options)
    async_backend = (
        AsyncMemoryBackend(store)
        if store is not None
        else async_backend_from_url(url, timeout=timeout)
    )
    async_ = AsyncRateLimiter(async_backend, **options)
    # One server, one circuit: what the sync twin learnt about it holds for the async one. And
    # failure_mode="local": one share per process, whichever twin decides (Django serves sync
    # and async views from one process), so the twins keep one set of local buckets.
    async_._circuit = sync._circuit
    async_._fallback = sync._fallback
    return sync, async_


def with_env_secret(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with ``hash_secret`` from ``TOKENLIMIT_HASH_SECRET`` where they give none
    (an explicit ``hash_secret=None`` keeps hashing unkeyed). A bad value in the environment is
    a ``ConfigError`` naming the variable."""
    merged = dict(options)
    if "hash_secret" not in merged:
        secret = env_hash_secret()
        if secret is not None:
            hasher_for(secret, ENV_HASH_SECRET)  # checked here: the error names the variable
            merged["hash_secret"] = secret
    return merged


def _ensure() -> None:
    global _sync, _async, _owned
    with _lock:
        if _sync is not None:
            return
        url = os.environ.get("TOKENLIMIT_URL")
        if not url:
            warnings.warn(
                "tokenlimit: no limiter configured (configure() or TOKENLIMIT_URL); using memory://,"
                " which limits each process separately",
                RuntimeWarning,
                stacklevel=4,
            )
            url = "memory://"
        _sync, _async = limiter_pair(url, with_env_secret({}))
        _owned = True


def default_limiter(for_async: bool) -> RateLimiter | AsyncRateLimiter:
    """The limiter ``configure()`` set for sync or async code (what ``rate_limit`` uses)."""
    return default_async_limiter() if for_async else default_sync_limiter()


def default_sync_limiter() -> RateLimiter | AsyncRateLimiter:
    _ensure()
    assert _sync is not None
    return _sync


def default_async_limiter() -> RateLimiter | AsyncRateLimiter:
    _ensure()
    assert _async is not None
    return _async
