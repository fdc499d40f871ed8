"""``LimitPlan``: which limits a call takes, and at what cost, settled once per entry point.

Every entry point that takes a limit (the limiters' methods, ``rate_limit``/``limiter.limit``,
the integrations' policies) makes one plan from what it was given, in one syntax: a number of
tokens per second or a string such as ``"100/minute"`` (each with ``burst``), a ``Limit``, a
list of them, or a chooser that picks them per call (tiers). The plan parses them, refuses a
cost above the smallest burst (it could never be admitted), and calls the chooser:
``limits_for`` in sync code, ``alimits_for`` in async code (where the chooser may be a
coroutine function), checking what it chose in the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from ._errors import ConfigError, ConfigTypeError
from ._limit import Limit, coerce_limits, split_limits
from ._validate import check_cost, shown

__all__ = [
    "Chooser",
    "LimitChoice",
    "LimitPlan",
    "LimitSpec",
    "bound_arguments",
    "chosen_limits",
]

LimitChoice: TypeAlias = Limit | str | Sequence[Limit | str]
"""What a chooser returns: a ``Limit``, a string such as ``"100/minute"``, or a list of them."""

Chooser: TypeAlias = Callable[..., LimitChoice | Awaitable[LimitChoice]]
"""A callable standing in for the limit: it picks the limit(s) per call (sync, or async in
async code). A limiter calls it with the key, a decorator with the call's bound arguments, an
integration with the request."""

LimitSpec: TypeAlias = Limit | str | Sequence[Limit | str] | Chooser
"""Every way to give a limit: a ``Limit``, a string, a list of them, or a chooser (where a
``burst`` parameter stands beside it, a number of tokens per second too)."""

_SPELLINGS = "a number per second, a string like '100/minute', a Limit, a list or a chooser"


@dataclass(frozen=True, slots=True)
class LimitPlan:
    """The limits a call takes (``limits``, or ``()`` when ``choose`` picks them per call) and
    its ``cost``, checked against every burst. Made by ``LimitPlan.of``."""

    limits: tuple[Limit, ...]
    cost: int = 1
    choose: Chooser | None = None
    # Set by ``for_calls_of``: the chooser gets each call's arguments bound to this signature.
    signature: inspect.Signature | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        rate: float | LimitSpec | None = None,
        burst: int | None = None,
        *,
        limit: LimitSpec | None = None,
        cost: int = 1,
        name: str = "rate",
    ) -> LimitPlan:
        """The plan for what an entry point received, its errors naming the parameter.

        ``limit``: a ``Limit``, a string, a list of them, or a chooser, alone. Else ``rate`` (the
        parameter the entry point calls ``name``): the same, or a number of tokens per second;
        a number or a string may have a ``burst``.
        """
        if limit is not None:
            if rate is not None or burst is not None:
                reason = (
                    "a limit chooser takes no rate or burst"
                    if callable(limit)
                    else "give either rate/burst or limit=, not both"
                )
                raise ConfigError("limit", reason)
            rate, name, rates = limit, "limit", False
        elif rate is None:
            raise ConfigTypeError(name, f"required: {_SPELLINGS}")
        else:
            rates = True
        if callable(rate):
            if burst is not None:
                raise ConfigError("burst", "goes with a rate, not with a limit chooser")
            return cls((), check_cost(cost), rate)
        limits = _parse(rate, burst, name, rates=rates)
        cost = check_cost(cost)
        _fits(cost, limits)
        return cls(limits, cost)

    # -- choosers -----------------------------------------------------------------------------
    def limits_for(self, *args: object, **kwargs: object) -> tuple[Limit, ...]:
        """The limits for one call: the plan's own, or what its chooser picks for these
        arguments (a sync chooser: an awaitable it returns is an error naming ``limit``)."""
        choose = self.choose
        if choose is None:
            return self.limits
        return self._chosen(choose, self._call(choose, args, kwargs))

    async def alimits_for(self, *args: object, **kwargs: object) -> tuple[Limit, ...]:
        """``limits_for`` in async code: the chooser may be a coroutine function."""
        choose = self.choose
        if choose is None:
            return self.limits
        value = self._call(choose, args, kwargs)
        if inspect.isawaitable(value):
            value = await value
        return self._chosen(choose, value)

    def for_calls_of(self, func: Callable[..., object]) -> LimitPlan:
        """This plan where it decorates ``func``: the chooser gets each call's arguments bound
        to ``func``'s parameters, defaults applied, as a key template does. An async chooser
        needs an async ``func``: a ConfigError naming ``limit`` now, not at the first call."""
        choose = self.choose
        if choose is None:
            return self
        if inspect.iscoroutinefunction(choose) and not inspect.iscoroutinefunction(func):
            raise ConfigTypeError(
                "limit",
                f"the async limit chooser {_name(choose)} needs an async def, "
                f"not the plain function {_name(func)}",
            )
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):  # no signature to bind to: the call's own arguments
            return self
        return dataclasses.replace(self, signature=signature)

    def _call(
        self, choose: Chooser, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> LimitChoice | Awaitable[LimitChoice]:
        if self.signature is not None:
            bound = bound_arguments(self.signature, args, kwargs)
            args, kwargs = bound.args, bound.kwargs
        return choose(*args, **kwargs)

    def _chosen(self, choose: Chooser, value: object) -> tuple[Limit, ...]:
        if type(value) is Limit and self.cost <= value.burst:  # the common choice, at a glance
            return (value,)
        limits = chosen_limits(choose, value)
        _fits(self.cost, limits, chosen=True)
        return limits


def bound_arguments(
    signature: inspect.Signature, args: tuple[object, ...], kwargs: dict[str, object]
) -> inspect.BoundArguments:
    """A call's arguments bound to ``signature``, defaults applied: what key templates are
    filled from and decorators' choosers called with. A call that does not bind raises a
    ``TypeError``, as calling the function would."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def _parse(value: object, burst: int | None, param: str, *, rates: bool) -> tuple[Limit, ...]:
    """The limits ``value`` spells; ``rates``: a number is tokens per second (with ``burst``)."""
    if isinstance(value, str):
        parts = split_limits(value)
        if len(parts) > 1:
            if burst is not None:
                raise ConfigError(
                    "burst",
                    f"goes with one limit, and {shown(value)} is {len(parts)}: "
                    "give each its own, as in [Limit.parse('10/hour', burst=5), '100/day']",
                )
            return coerce_limits(value, param)
        return (Limit._parse(value, burst, None, param),)
    if rates and isinstance(value, (int, float)):  # a bool too: Limit refuses it by name
        return (_rate(value, burst, param),)
    if burst is not None:
        raise ConfigError("burst", "goes with a number or a string rate, not a Limit or a list")
    listed = isinstance(value, (Limit, Sequence)) and not isinstance(value, (bytes, bytearray))
    if rates and not listed:
        raise ConfigTypeError(param, f"must be {_SPELLINGS}, not {type(value).__name__}")
    return coerce_limits(value, param)


def _rate(rate: float, burst: int | None, param: str) -> Limit:
    """``Limit(rate, burst)``, an error in ``rate`` naming ``param``."""
    try:
        return Limit(rate) if burst is None else Limit(rate, burst)
    except ConfigError as exc:
        if exc.param != "rate" or param == "rate":
            raise
        raise type(exc)(param, str(exc).removeprefix("rate: ")) from None


def _fits(cost: int, limits: tuple[Limit, ...], *, chosen: bool = False) -> None:
    """Refuse a cost above the smallest burst: it could never be admitted."""
    smallest = min(limit.burst for limit in limits)
    if cost > smallest:
        burst = "the chosen burst" if chosen else "the burst"
        raise ConfigError(
            "cost", f"{shown(cost)} exceeds {burst} {smallest}; it could never be admitted"
        )


def _name(function: object) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


def chosen_limits(choose: Chooser, value: object) -> tuple[Limit, ...]:
    """What the limit chooser ``choose`` returned, as limits; an error naming ``limit`` if it is
    not a ``Limit``, a string like ``"100/minute"`` or a list of them."""
    if type(value) is Limit:
        return (value,)
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: no "coroutine was never awaited" warning
        raise ConfigTypeError(
            "limit",
            f"{_name(choose)} returned an awaitable; an async limit chooser needs "
            "async code (AsyncRateLimiter, an async def, an async view)",
        )
    try:
        return coerce_limits(value)
    except ConfigError as exc:
        reason = str(exc).removeprefix(f"{exc.param}: ")
        raise type(exc)(
            "limit", f"{_name(choose)} returned {value!r}, not a usable limit: {reason}"
        ) from None
