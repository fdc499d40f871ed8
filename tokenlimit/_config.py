"""The default limiter behind ``rate_limit``: ``configure(...)``, else ``TOKENLIMIT_URL``, else
``memory://`` with a warning that it is per process."""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

from ._core import DEFAULT_TIMEOUT
from ._errors import ConfigTypeError
from ._limiter import AsyncRateLimiter, RateLimiter
from ._memory import AsyncMemoryBackend, MemoryBackend
from ._url import async_backend_from_url, parse_url, sync_backend_from_url

__all__ = ["configure", "default_async_limiter", "default_sync_limiter"]

_lock = threading.Lock()
_sync: RateLimiter | AsyncRateLimiter | None = None
_async: RateLimiter | AsyncRateLimiter | None = None


def configure(url_or_limiter: str | RateLimiter | AsyncRateLimiter | None, **options: Any) -> None:
    """Set the limiter ``rate_limit`` uses when given none.

    A URL makes a sync and an async limiter (sharing one store for ``memory://``); a limiter is
    used as given. ``None`` forgets the configuration (the environment is read again).
    """
    global _sync, _async
    if url_or_limiter is None:
        with _lock:
            _sync = _async = None
        return
    if isinstance(url_or_limiter, (RateLimiter, AsyncRateLimiter)):
        with _lock:
            _sync = _async = url_or_limiter
        return
    if not isinstance(url_or_limiter, str):
        raise ConfigTypeError(
            "url_or_limiter", f"must be a URL or a limiter, not {type(url_or_limiter).__name__}"
        )
    sync, async_ = _from_url(url_or_limiter, options)
    with _lock:
        _sync, _async = sync, async_


def _from_url(url: str, options: dict[str, Any]) -> tuple[RateLimiter, AsyncRateLimiter]:
    scheme, url = parse_url(url)
    timeout = options.get("timeout", DEFAULT_TIMEOUT)
    store = MemoryBackend() if scheme == "memory" else None
    sync = RateLimiter(sync_backend_from_url(url, timeout=timeout, memory=store), **options)
    async_backend = (
        AsyncMemoryBackend(store)
        if store is not None
        else async_backend_from_url(url, timeout=timeout)
    )
    return sync, AsyncRateLimiter(async_backend, **options)


def _ensure() -> None:
    global _sync, _async
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
        _sync, _async = _from_url(url, {})


def default_sync_limiter() -> RateLimiter | AsyncRateLimiter:
    _ensure()
    assert _sync is not None
    return _sync


def default_async_limiter() -> RateLimiter | AsyncRateLimiter:
    _ensure()
    assert _async is not None
    return _async
