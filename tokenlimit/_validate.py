"""Argument checks shared by every public entry point: each names the parameter it checks."""

from __future__ import annotations

import math

from ._errors import ConfigError, ConfigTypeError
from ._model import MAX_HOLD_US

__all__ = [
    "FAILURE_MODES",
    "check_cost",
    "check_deadline",
    "check_expected_processes",
    "check_failure_mode",
    "check_hold",
    "check_key",
    "check_number",
    "check_prefix",
    "check_timeout",
    "shown",
]

MAX_KEY_BYTES = 1 << 20  # identities are hashed, so length costs only CPU; refuse the absurd
_SHOWN_CHARS = 60
FAILURE_MODES = ("open", "closed", "local")
MAX_PROCESSES = 1_000_000  # expected_processes at most
# A day: the deadline becomes socket, poll and lock timeouts, which overflow past ~24 days.
MAX_DEADLINE = 86_400.0
MAX_HOLD = MAX_HOLD_US / 1e6  # seconds: the longest hold_back, one day


def shown(value: object) -> str:
    """``repr(value)`` for a message, kept short: an int of more than 64 bits by its size
    (``str()`` refuses one of more than 4300 digits), a long string by its start and length."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"{'a negative' if value < 0 else 'an'} int of {value.bit_length()} bits"
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"
    return repr(value)


def _bound(limit: float) -> str:
    return f"{limit:.0f}" if limit == int(limit) else repr(limit)


def check_number(
    param: str,
    value: object,
    *,
    positive: bool = True,
    allow_zero: bool = False,
    maximum: float = math.inf,
) -> float:
    """Return ``value`` as a finite float (at most ``maximum``), or raise naming ``param``; an
    int beyond a double's range is refused, not raised as OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(param, f"must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond a double's range
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number):
        raise ConfigError(param, "must not be NaN")
    if positive and (number < 0 or (number == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(param, f"must be {bound}, got {shown(value)}")
    if number > maximum:
        raise ConfigError(param, f"must be <= {_bound(maximum)}, got {shown(value)}")
    if not math.isfinite(number):
        within = "" if isinstance(value, float) else " (within a float's range)"
        raise ConfigError(param, f"must be finite{within}, got {shown(value)}")
    return number


def check_int(param: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` as an int from ``minimum`` to ``maximum``, or raise naming ``param``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(param, f"must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ConfigError(param, f"must be >= {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(param, f"must be <= {maximum}, got {shown(value)}")
    return int(value)


def check_cost(value: object) -> int:
    """A request's cost: a whole number of tokens, at least 1."""
    return check_int("cost", value, minimum=1)


def check_timeout(param: str, value: object) -> float | None:
    """A wait budget in seconds: None (no bound) or a finite number >= 0 (any size: the waits
    are slept in bounded parts, see ``LimiterBase._pause``)."""
    if value is None:
        return None
    return check_number(param, value, allow_zero=True)


def check_key(value: object) -> bytes:
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


def check_prefix(prefix: object) -> str:
    """A key prefix: a str without braces (a brace would hijack the cluster hash tag)."""
    if not isinstance(prefix, str):
        raise ConfigTypeError("prefix", f"must be a str, not {type(prefix).__name__}")
    if "{" in prefix or "}" in prefix:
        raise ConfigError("prefix", "must not contain '{' or '}' (they choose the cluster slot)")
    return prefix


def check_failure_mode(mode: object) -> str:
    """``"open"``, ``"closed"`` or ``"local"``."""
    if mode not in FAILURE_MODES:
        raise ConfigError("failure_mode", f"must be 'open', 'closed' or 'local', got {mode!r}")
    return str(mode)


def check_expected_processes(failure_mode: str, processes: object) -> int | None:
    """``expected_processes``: required with ``failure_mode="local"`` (an int from 1 to
    ``MAX_PROCESSES``), refused with any other mode, where nothing would read it."""
    if failure_mode != "local":
        if processes is not None:
            raise ConfigError(
                "expected_processes",
                f"is only used with failure_mode='local' (failure_mode is {failure_mode!r})",
            )
        return None
    if processes is None:
        raise ConfigError(
            "expected_processes",
            "is required with failure_mode='local': how many processes share the limits, "
            "on every host (each enforces 1/N of every limit while storage is down)",
        )
    return check_int("expected_processes", processes, minimum=1, maximum=MAX_PROCESSES)


def check_deadline(timeout: object) -> float:
    """The limiter's per-decision deadline: a number of seconds > 0, at most a day."""
    return check_number("timeout", timeout, maximum=MAX_DEADLINE)


def check_hold(seconds: object) -> int:
    """A ``hold_back`` duration: a finite number of seconds > 0 and at most ``MAX_HOLD`` (a
    day), named ``seconds`` in errors; returned in whole µs, to the nearest and at least 1."""
    number = check_number("seconds", seconds, maximum=MAX_HOLD)
    return max(1, round(number * 1_000_000))
