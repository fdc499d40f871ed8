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
from typing import TYPE_CHECKING, ParamSpec, TypeAlias, TypeVar, cast

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

P = ParamSpec("P")
R = TypeVar("R")
KeyOf = Callable[[tuple[object, ...], dict[str, object]], str | bytes]
"""How a decorator makes a call's key from the call's ``(args, kwargs)``."""
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


def is_per_call(key: object) -> bool:
    """Whether ``key`` is made at each call (a callable, or a str template such as
    ``"user:{user_id}"``) rather than literal."""
    return callable(key) or (isinstance(key, str) and "{" in key)


def needs_a_call() -> ConfigError:
    """The error for a template or callable key where there is no call (a ``with`` block)."""
    return ConfigError(
        "key", "a 'with' block needs a literal key (templates and callables need a call)"
    )


def key_function(key: KeySpec, func: Callable[..., object]) -> KeyOf:
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

    def from_template(args: tuple[object, ...], kwargs: dict[str, object]) -> str:
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
        self._limiter = limiter
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
    def _sync_limiter(self) -> RateLimiter:
        limiter = self._limiter or self._default_limiter(for_async=False)
        if limiter.is_async:
            raise TypeError("an AsyncRateLimiter cannot guard a plain def or a plain 'with'")
        return limiter

    def _async_limiter(self) -> RateLimiter | AsyncRateLimiter:
        return self._limiter or self._default_limiter(for_async=True)

    def _default_limiter(self, *, for_async: bool) -> RateLimiter | AsyncRateLimiter:
        if self._default is None:
            raise TypeError("this guard has neither a limiter nor a default to look up")
        return self._default(for_async)

    # -- decorator ----------------------------------------------------------------------------
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        if not callable(func):
            raise ConfigTypeError("func", f"rate_limit decorates a callable, not {func!r}")
        # ``func`` typed as the coroutine function it is (None: a plain function).
        coroutine_function = func if inspect.iscoroutinefunction(func) else None
        if coroutine_function is None and self._limiter is not None and self._limiter.is_async:
            raise TypeError(
                f"AsyncRateLimiter.limit cannot decorate the plain function {func.__qualname__}; "
                "use RateLimiter, or make it async def"
            )
        key_of = self._key_function(func)
        guard = self
        plan = self.plan.for_calls_of(func)
        limits = plan.limits  # () when a chooser picks them per call

        if coroutine_function is not None:

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> object:
                key = key_of(args, kwargs)
                await guard._acheck(key, limits or await plan.alimits_for(*args, **kwargs))
                return await coroutine_function(*args, **kwargs)

            # Called like ``func``, it returns what ``func`` does (R): a coroutine of its result.
            return cast("Callable[P, R]", async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            key = key_of(args, kwargs)
            guard._check(key, limits or plan.limits_for(*args, **kwargs))
            return func(*args, **kwargs)

        return wrapper

    def _key_function(self, func: Callable[..., object]) -> KeyOf:
        if self.key is None:
            fixed = f"{func.__module__}.{func.__qualname__}"
            return lambda args, kwargs: fixed
        return key_function(self.key, func)

    # -- context manager ----------------------------------------------------------------------
    def _literal_key(self) -> str | bytes:
        key = self.key
        if key is None:
            return self._site
        if callable(key) or (isinstance(key, str) and "{" in key):  # is_per_call(key)
            raise needs_a_call()
        return key

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
    def _check(self, key: str | bytes, limits: tuple[Limit, ...]) -> Decision:
        limiter = self._sync_limiter()
        return limiter.acquire(key, limits, cost=self.cost, timeout=self.timeout)

    async def _acheck(self, key: str | bytes, limits: tuple[Limit, ...]) -> Decision:
        limiter = self._async_limiter()
        if limiter.is_async:
            return await limiter.acquire(key, limits, cost=self.cost, timeout=self.timeout)
        return await _acquire_off_loop(limiter, key, limits, self.cost, self.timeout)


async def _acquire_off_loop(
    limiter: RateLimiter,
    key: str | bytes,
    limits: tuple[Limit, ...],
    cost: int,
    timeout: float | None,
) -> Decision:
    """``acquire`` with a sync limiter from async code: the network call runs in a worker thread
    and the waiting is ``asyncio.sleep``, so the event loop never blocks."""
    in_process = not is_remote(limiter.backend)
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    while True:
        if in_process:
            decision = limiter.try_acquire(key, limits, cost=cost)
        else:
            decision = await asyncio.to_thread(limiter.try_acquire, key, limits, cost=cost)
        if decision.allowed:
            return decision
        await asyncio.sleep(limiter._pause(decision, deadline))
