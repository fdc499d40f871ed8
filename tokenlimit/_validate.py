"""Argument checks shared by every public entry point: each names the parameter it checks."""

from __future__ import annotations

import math
from typing import Any

from ._errors import ConfigError, ConfigTypeError

__all__ = ["check_cost", "check_key", "check_number", "check_timeout"]

MAX_KEY_BYTES = 1 << 20  # identities are hashed, so length costs only CPU; refuse the absurd


def check_number(
    param: str, value: Any, *, positive: bool = True, allow_zero: bool = False
) -> float:
    """Return ``value`` as a finite float, or raise naming ``param``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(param, f"must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(param, f"must be finite, got {value!r}")
    if positive and (number < 0 or (number == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(param, f"must be {bound}, got {value!r}")
    return number


def check_int(param: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` as an int >= ``minimum``, or raise naming ``param``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(param, f"must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ConfigError(param, f"must be >= {minimum}, got {value!r}")
    return int(value)


def check_cost(value: Any) -> int:
    """A request's cost: a whole number of tokens, at least 1."""
    return check_int("cost", value, minimum=1)


def check_timeout(param: str, value: Any) -> float | None:
    """A wait budget in seconds: None (no bound) or a finite number >= 0."""
    if value is None:
        return None
    return check_number(param, value, allow_zero=True)


def check_key(value: Any) -> bytes:
    """An identity: a non-empty str or bytes, returned as bytes (UTF-8, surrogates kept)."""
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    else:
        raise ConfigTypeError("key", f"must be a str or bytes, not {type(value).__name__}")
    if not raw:
        raise ConfigError("key", "must not be empty")
    if len(raw) > MAX_KEY_BYTES:
        raise ConfigError("key", f"must be at most {MAX_KEY_BYTES} bytes, got {len(raw)}")
    return raw
