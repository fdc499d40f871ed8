"""The flag behind ``tokenlimit.testing.disabled()``: read once per decision, nothing else.

A module of its own so the limiters can read it without importing the testing kit.
"""

from __future__ import annotations

import threading

__all__ = ["DISABLED", "hold", "release", "set_forced"]

# True: every limiter admits every call without touching storage (an application's tests).
# Written only under ``_lock``; read without it (one attribute load per decision).
DISABLED = False

_lock = threading.Lock()
_holders = 0  # ``disabled()`` blocks open now, in any thread or task
_forced = False  # ``disable()`` until ``enable()``


def _update() -> None:
    global DISABLED
    DISABLED = _forced or _holders > 0


def hold() -> None:
    """One more ``disabled()`` block is open."""
    global _holders
    with _lock:
        _holders += 1
        _update()


def release() -> None:
    """One ``disabled()`` block closed: limiting is back once none is open (and not forced)."""
    global _holders
    with _lock:
        _holders = max(0, _holders - 1)
        _update()


def set_forced(value: bool) -> None:
    global _forced
    with _lock:
        _forced = value
        _update()
