"""The flag behind ``tokenlimit.testing.disabled()`` and the ``TOKENLIMIT_ENABLED`` kill
switch: read once per decision, nothing else.

A module of its own so the limiters can read it without importing the testing kit.
"""

from __future__ import annotations

import logging
import os
import threading

__all__ = ["DISABLED", "hold", "release", "set_forced", "switched_off"]

_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


def switched_off(value: str | None) -> bool:
    """Whether a ``TOKENLIMIT_ENABLED`` value turns limiting off. A value that is neither on nor
    off leaves it on, the safe reading, and says so in the log."""
    word = (value or "").strip().lower()
    if word in _OFF:
        return True
    if word not in _ON:
        logging.getLogger("tokenlimit").error(
            "TOKENLIMIT_ENABLED=%r is not one of %s: rate limiting stays on",
            value,
            ", ".join(repr(w) for w in _ON[1:] + _OFF),
        )
    return False


# The environment's kill switch, read once at import: limiting off in every limiter of the
# process until it restarts without it.
_ENV_OFF = switched_off(os.environ.get("TOKENLIMIT_ENABLED"))
if _ENV_OFF:
    logging.getLogger("tokenlimit").warning(
        "TOKENLIMIT_ENABLED is off: every limiter admits every call, touching no storage"
    )

# True: every limiter admits every call without touching storage (an application's tests, or
# the kill switch). Written only under ``_lock``; read without it (one load per decision).
DISABLED = _ENV_OFF

_lock = threading.Lock()
_holders = 0  # ``disabled()`` blocks open now, in any thread or task
_forced = False  # ``disable()`` until ``enable()``


def _update() -> None:
    global DISABLED
    DISABLED = _ENV_OFF or _forced or _holders > 0


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
