"""The ``"tokenlimit"`` logger, and ``ThrottledLog``: a warning at most once per interval."""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["ThrottledLog", "logger"]

logger = logging.getLogger("tokenlimit")


class ThrottledLog:
    """Log a storage failure at most once per ``interval`` seconds, counting what it held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        logger.warning("%s: %s%s", message, exc, more)
