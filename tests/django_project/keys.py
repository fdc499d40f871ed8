"""Custom identity functions for ``TOKENLIMIT["KEY"]``."""

from __future__ import annotations

from typing import Any

NOT_CALLABLE = 42


def tenant(request: Any) -> str | None:
    """The tenant header, else None (the default identity)."""
    value = request.headers.get("X-Tenant")
    return f"tenant:{value}" if value else None


async def atenant(request: Any) -> str | None:
    """The same, as a coroutine function."""
    return tenant(request)


def empty(request: Any) -> str:
    """An empty identity: the default one applies, as for None."""
    return ""


async def aempty(request: Any) -> str:
    """The same, as a coroutine function."""
    return ""


KNOWN_API_KEYS = {"sk-known-1", "sk-known-2"}


def known_api_key(key: str) -> bool:
    """``API_KEY_VALIDATOR``: True for a key the app issued."""
    return key in KNOWN_API_KEYS


async def aknown_api_key(key: str) -> bool:
    """The same, as a coroutine function."""
    return known_api_key(key)
