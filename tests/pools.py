"""What the async tests ask of a redis-py pool once the limiter's work is done."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tokenlimit._redis.batch import _LINGER


async def in_use_after_linger(pool: Any, *, within: float = 2.0) -> int:
    """How many of ``pool``'s connections are still out once the limiter's lanes have given
    theirs back: a lane keeps its connection up to ``_LINGER`` after its last batch, waiting for
    the next. A connection lost for good is still counted after ``within`` seconds."""
    end = time.monotonic() + within
    while pool._in_use_connections and time.monotonic() < end:
        await asyncio.sleep(_LINGER)
    return len(pool._in_use_connections)
