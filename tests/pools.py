"""Pool bookkeeping for the async tests: a lane that has just answered lingers (up to
``tokenlimit._batch._LINGER`` seconds) before giving its connection back, so "every connection
went back" is checked once the lanes have had that long to end."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tokenlimit._batch import _LINGER


async def in_use_after_linger(pool: Any, *, within: float = 2.0) -> int:
    """The pool's connections still checked out once lingering lanes have given theirs back
    (polled until none are left, for up to ``within`` seconds: a loaded machine is slow)."""
    await asyncio.sleep(_LINGER)
    end = time.monotonic() + within
    while pool._in_use_connections and time.monotonic() < end:
        await asyncio.sleep(0.005)
    return len(pool._in_use_connections)
