"""``rate_limit`` / ``limiter.limit``: one object that is a decorator and a context manager."""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import string
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

from ._backend import is_remote
from ._base import LimiterBase
from ._decision import Decision
from ._errors import ConfigError, ConfigTypeError
from ._limit import Limit
from ._plan import Chooser, LimitPlan, LimitSpec, bound_arguments
from ._validate import check_timeout

if TYPE_CHECKING:
    from ._limiter import AsyncRateLimiter, RateLimiter

__all__ = ["Guard", "KeyOf", "KeySpec", "is_per_call", "key_function", "needs_a_call"]

F = TypeVar("F", bound=Callable[..., Any])
KeyOf = Callable[[tuple[Any, ...], dict[str, Any]], Any]
KeySpec: TypeAlias = str | bytes | Callable[..., str | bytes]
"""A decorator's key: a literal, a template such as ``"user:{user_id}"`` filled from the
call's bound arguments, or a callable taking the call's arguments."""


def _template_fields(template: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError("key", f"bad template {template!r}: {exc}") from None
    names = set()
    for _, field, _, _ in parsed:
        if field is None:
            continue
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise ConfigError(
                "key", f"template {template!r} must name parameters, like '{{user_id}}'"
            )
        names.add(root)
    return names


def is_per_call(key: Any) -> bool:
    """Whether ``key`` is made at each call (a callable, or a str template such as
    ``"user:{user_id}"``) rather than literal."""
    return callable(key) or (isinstance(key, str) and "{" in key)


def needs_a_call() -> ConfigError:
    """The error for a template or callable key where there is no call (a ``with`` block)."""
    return ConfigError(
        "key", "a 'with' block needs a literal key (templates and callables need a call)"
    )


def key_function(key: Any, func: Callable[..., Any]) -> KeyOf:
    """How a decorator of ``func`` makes its key from a call's ``(args, kwargs)``: ``key``
    called with them, a str template filled from them (its fields must name parameters of
    ``func``: a ConfigError naming ``key`` now, not at the first call), or ``key`` itself."""
    if callable(key):
        return lambda args, kwargs: key(*args, **kwargs)
    if isinstance(key, bytes) or "{" not in key:
        return lambda args, kwargs: key
    signature = inspect.signature(func)
    params = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    missing = sorted(name for name in _template_fields(key) if name not in params)
    if missing and not takes_any:
        raise ConfigError(
            "key",
            f"template {key!r} names {', '.join(missing)}, not parameters of {func.__qualname__}",
        )

    def from_template(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        values = dict(bound_arguments(signature, args, kwargs).arguments)
        for p in params.values():
            if p.kind is p.VAR_KEYWORD:
                values.update(values.pop(p.name, {}))
        return str(key.format(**values))

    return from_template


def _call_site() -> str:
    """``module:line`` of the first frame outside tokenlimit (where the guard was written)."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        "tokenlimit."
    ):
        frame = frame.f_back
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_lineno}"


class Guard:
    """Returned by ``rate_limit(...)`` and ``limiter.limit(...)``.

    As a decorator it checks the limit before each call (raising ``RateLimitExceeded`` or
    waiting up to ``timeout``); as ``with``/``async with`` it checks once on entry.

    ``limit`` may be a callable choosing the limit(s) per call (tiers): the decorator calls it
    with the decorated call's arguments bound to its parameters, defaults applied (as a key
    template is filled), ``with``/``async with`` with none. It returns a
    ``Limit``, a string like ``"100/minute"`` or a list of them; for an ``async def`` (and in
    ``async with``) it may be a coroutine function. ``limits`` is then ``()`` and ``choose`` the
    callable.
    """

    def __init__(
        self,
        rate: float | LimitSpec | None = None,
        burst: int | None = None,
        *,
        limit: LimitSpec | None = None,
        key: KeySpec | None = None,
        cost: int = 1,
        timeout: float | None = 0,
        limiter: RateLimiter | AsyncRateLimiter | None = None,
        default: Callable[[bool], RateLimiter | AsyncRateLimiter] | None = None,
    ) -> None:
        self.plan = LimitPlan.of(rate, burst, limit=limit, cost=cost)
        self.timeout = check_timeout("timeout", timeout)
        given: object = key  # checked at run time, as every argument is
        if given is not None and not isinstance(given, (str, bytes)) and not callable(given):
            raise ConfigTypeError("key", f"must be a str template, a callable or None, not {key!r}")
        self.key = key
        given = limiter
        if given is not None and not isinstance(given, LimiterBase):
            raise ConfigTypeError(
                "limiter", f"must be a RateLimiter or AsyncRateLimiter, not {limiter!r}"
            )
        self._limiter: Any = limiter
        # The default limiter, looked up at each call (configure() may change it): ``default(
        # for_async)``, given by ``rate_limit`` (the facade), so guards never import _config.
        self._default = default
        # The bucket a bare ``with rate_limit(...)`` uses: where it was written, the same in every
        # process running this code.
        self._site = _call_site()

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits every check takes; ``()`` when ``choose`` picks them per call."""
        return self.plan.limits

    @property
    def choose(self) -> Chooser | None:
        """The limit chooser, if one was given."""
        return self.plan.choose

    @property
    def cost(self) -> int:
        return self.plan.cost

    # -- limiter resolution -------------------------------------------------------------------
    def _sync_limiter(self) -> Any:
        limiter = self._limiter or self._default_limiter(for_async=False)
        if limiter.is_async:
            raise TypeError("an AsyncRateLimiter cannot guard a plain def or a plain 'with'")
        return limiter

    def _async_limiter(self) -> Any:
        return self._limiter or self._default_limiter(for_async=True)

    def _default_limiter(self, *, for_async: bool) -> Any:
        if self._default is None:
            raise TypeError("this guard has neither a limiter nor a default to look up")
        return self._default(for_async)

    # -- decorator ----------------------------------------------------------------------------
    def __call__(self, func: F) -> F:
        if not callable(func):
            raise ConfigTypeError("func", f"rate_limit decorates a callable, not {func!r}")
        is_async = inspect.iscoroutinefunction(func)
        if not is_async and self._limiter is not None and self._limiter.is_async:
            raise TypeError(
                f"AsyncRateLimiter.limit cannot decorate the plain function {func.__qualname__}; "
                "use RateLimiter, or make it async def"
            )
        key_of = self._key_function(func)
        guard = self
        plan = self.plan.for_calls_of(func)
        limits = plan.limits  # () when a chooser picks them per call

        if is_async:

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                key = key_of(args, kwargs)
                await guard._acheck(key, limits or await plan.alimits_for(*args, **kwargs))
                return await func(*args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            guard._check(key, limits or plan.limits_for(*args, **kwargs))
            return func(*args, **kwargs)

        return cast(F, wrapper)

    def _key_function(self, func: Callable[..., Any]) -> KeyOf:
        if self.key is None:
            fixed = f"{func.__module__}.{func.__qualname__}"
            return lambda args, kwargs: fixed
        return key_function(self.key, func)

    # -- context manager ----------------------------------------------------------------------
    def _literal_key(self) -> str | bytes:
        key = self.key
        if key is None:
            return self._site
        if is_per_call(key):
            raise needs_a_call()
        return cast("str | bytes", key)

    # A block has no call arguments: a limit chooser is called with none.
    def __enter__(self) -> Decision:
        key = self._literal_key()
        return self._check(key, self.plan.limits_for())

    def __exit__(self, *exc_info: object) -> None:
        return None

    async def __aenter__(self) -> Decision:
        key = self._literal_key()
        return await self._acheck(key, await self.plan.alimits_for())

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    # -- the check itself ---------------------------------------------------------------------
    def _check(self, key: Any, limits: tuple[Limit, ...]) -> Decision:
        limiter = self._sync_limiter()
        decision: Decision = limiter.acquire(key, limits, cost=self.cost, timeout=self.timeout)
        return decision

    async def _acheck(self, key: Any, limits: tuple[Limit, ...]) -> Decision:
        limiter = self._async_limiter()
        if limiter.is_async:
            decision: Decision = await limiter.acquire(
                key, limits, cost=self.cost, timeout=self.timeout
            )
            return decision
        return await _acquire_off_loop(limiter, key, limits, self.cost, self.timeout)


async def _acquire_off_loop(
    limiter: Any, key: Any, limits: tuple[Limit, ...], cost: int, timeout: float | None
) -> Decision:
    """``acquire`` with a sync limiter from async code: the network call runs in a worker thread
    and the waiting is ``asyncio.sleep``, so the event loop never blocks."""
    in_process = not is_remote(limiter.backend)
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    while True:
        if in_process:
            decision: Decision = limiter.try_acquire(key, limits, cost=cost)
        else:
            decision = await asyncio.to_thread(limiter.try_acquire, key, limits, cost=cost)
        if decision.allowed:
            return decision
        await asyncio.sleep(limiter._pause(decision, deadline))
