"""The pytest plugin, registered as ``tokenlimit`` through the ``pytest11`` entry point.

Kept apart from ``tokenlimit.testing`` so that application code importing the helpers never
imports pytest; only pytest, when it loads its plugins, imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._limiter import AsyncRateLimiter, RateLimiter
from .testing import FakeClock, async_memory_limiter, disabled, memory_limiter

__all__ = [
    "tokenlimit_async_limiter",
    "tokenlimit_clock",
    "tokenlimit_disabled",
    "tokenlimit_limiter",
]


@pytest.fixture
def tokenlimit_clock() -> FakeClock:
    """A ``FakeClock`` at 0 s: ``tokenlimit_clock.advance(1.0)``."""
    return FakeClock()


@pytest.fixture
def tokenlimit_limiter(tokenlimit_clock: FakeClock) -> Iterator[RateLimiter]:
    """A memory ``RateLimiter`` driven by ``tokenlimit_clock``."""
    limiter = memory_limiter(tokenlimit_clock)
    yield limiter
    limiter.close()


@pytest.fixture
def tokenlimit_async_limiter(tokenlimit_clock: FakeClock) -> AsyncRateLimiter:
    """A memory ``AsyncRateLimiter`` driven by ``tokenlimit_clock`` (its own store)."""
    return async_memory_limiter(tokenlimit_clock)


@pytest.fixture
def tokenlimit_disabled() -> Iterator[None]:
    """Limiting off for the test: every limiter admits everything, storage untouched."""
    with disabled():
        yield
