"""Which limits a call takes: limit choosers (tiers), called and checked."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ._errors import ConfigError, ConfigTypeError
from ._limit import Limit, coerce_limits

__all__ = ["achoose_limits", "choose_limits", "chosen_limits"]


def _chooser_name(choose: Callable[..., Any]) -> str:
    return getattr(choose, "__qualname__", None) or repr(choose)


def chosen_limits(choose: Callable[..., Any], value: Any) -> tuple[Limit, ...]:
    """What the limit chooser ``choose`` returned, as limits; an error naming ``limit`` if it is
    not a ``Limit``, a string like ``"100/minute"`` or a list of them."""
    if type(value) is Limit:
        return (value,)
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: no "coroutine was never awaited" warning
        raise ConfigTypeError(
            "limit",
            f"{_chooser_name(choose)} returned an awaitable; an async limit chooser needs "
            "async code (AsyncRateLimiter, an async def, an async view)",
        )
    try:
        return coerce_limits(value)
    except ConfigError as exc:
        reason = str(exc).removeprefix(f"{exc.param}: ")
        raise type(exc)(
            "limit", f"{_chooser_name(choose)} returned {value!r}, not a usable limit: {reason}"
        ) from None


def choose_limits(choose: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Limit, ...]:
    """Call a sync limit chooser and check what it returned."""
    return chosen_limits(choose, choose(*args, **kwargs))


async def achoose_limits(
    choose: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Limit, ...]:
    """Call a limit chooser from async code: it may be a coroutine function (or return an
    awaitable)."""
    value = choose(*args, **kwargs)
    if inspect.isawaitable(value):
        value = await value
    return chosen_limits(choose, value)
