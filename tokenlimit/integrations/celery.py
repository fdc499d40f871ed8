"""Celery: ``RateLimitedTask``, one budget for a task across every worker process and host.

    @app.task(base=RateLimitedTask, rate_limit_global="10/second", rate_limit_key="vendor:{vendor}")
    def fetch(vendor, item): ...

Celery's own ``rate_limit`` counts per worker instance; ``rate_limit_global`` is one bucket in
Redis/Valkey that every worker draws from. The check runs in the worker right before the body
(``__call__``). Admitted: the body runs. Refused: the task is sent again under the same id with
the same arguments, options and ``request.retries``, ``countdown`` = ``retry_after`` (capped at
``rate_limit_max_countdown``, plus up to ``rate_limit_jitter`` of it), and this attempt ends as
Celery's own retry does (``Retry``: state RETRY, ``on_retry``, the ``task_retry`` signal). The
worker slot is free at once, and ``max_retries`` is not consumed.

Eager runs (``task_always_eager``, ``apply()``) and direct calls have no queue to go back to:
they wait in ``acquire`` up to ``rate_limit_eager_timeout`` seconds, then raise
``RateLimitExceeded``. A storage failure follows the limiter's ``failure_mode``: ``"open"`` runs
the body, ``"closed"`` fails the task with ``BackendError``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import ClassVar, Protocol

from tokenlimit._errors import ConfigError, ConfigTypeError
from tokenlimit._extras import needs_extra

with needs_extra("celery", "celery", feature=__name__):
    from celery import Task
    from celery.exceptions import Reject, Retry

from tokenlimit._config import default_sync_limiter
from tokenlimit._decision import Decision
from tokenlimit._decorator import KeyOf, KeySpec, key_function
from tokenlimit._errors import RateLimitExceeded
from tokenlimit._limit import Limit
from tokenlimit._limiter import AsyncRateLimiter, RateLimiter
from tokenlimit._plan import LimitPlan, LimitSpec
from tokenlimit._validate import check_number, check_timeout

__all__ = ["RateLimitedTask"]

# A task option's name for each parameter the shared parsers name in their errors.
_OPTION = {
    "rate": "rate_limit_global",
    "limit": "rate_limit_global",
    "burst": "rate_limit_burst",
    "cost": "rate_limit_cost",
    "key": "rate_limit_key",
    "limiter": "rate_limit_limiter",
}


def countdown(
    retry_after: float, *, jitter: float, cap: float, draw: Callable[[], float] = random.random
) -> float:
    """Seconds until a refused task runs again: ``retry_after`` (at most ``cap``) stretched by
    up to ``jitter`` of itself, so tasks refused together do not all come back at once."""
    wait = min(retry_after, cap)
    return wait * (1.0 + jitter * draw())


@dataclass(frozen=True, slots=True)
class TaskLimit:
    """A task class's options, checked once (``TaskLimit.of``): what each run of it takes."""

    plan: LimitPlan
    key_of: KeyOf | None  # None: the task's name, one bucket for the task
    limiter: RateLimiter | None  # None: the default limiter, looked up per run
    jitter: float
    max_countdown: float
    eager_timeout: float | None

    @classmethod
    def of(cls, task: type[RateLimitedTask]) -> TaskLimit | None:
        """The limit a task class's options spell, or None where ``rate_limit_global`` is None
        (a plain task). A bad option is a ``ConfigError`` naming it."""
        if task.rate_limit_global is None:
            for option in ("rate_limit_burst", "rate_limit_key"):
                if getattr(task, option) is not None:
                    raise ConfigError(option, "goes with rate_limit_global, which is not set")
            return None
        signature_of = _call_target(task)
        key: object = task.rate_limit_key
        limiter: object = task.rate_limit_limiter
        try:
            plan = LimitPlan.of(
                task.rate_limit_global,
                task.rate_limit_burst,
                cost=task.rate_limit_cost,
                name="rate_limit_global",
            ).for_calls_of(signature_of)
            if key is not None and not isinstance(key, (str, bytes)) and not callable(key):
                raise ConfigTypeError("key", f"must be a str template or a callable, not {key!r}")
            key_of = None if key is None else key_function(key, signature_of)
        except ConfigError as exc:
            raise _renamed(exc) from None
        if limiter is not None and not isinstance(limiter, RateLimiter):
            kind = type(limiter).__name__
            raise ConfigTypeError("rate_limit_limiter", f"must be a sync RateLimiter, not {kind}")
        return cls(
            plan,
            key_of,
            limiter,
            check_number("rate_limit_jitter", task.rate_limit_jitter, allow_zero=True, maximum=1),
            check_number("rate_limit_max_countdown", task.rate_limit_max_countdown),
            check_timeout("rate_limit_eager_timeout", task.rate_limit_eager_timeout),
        )

    def limits(self, args: tuple[object, ...], kwargs: dict[str, object]) -> tuple[Limit, ...]:
        """The limits one run takes: the plan's own, or its chooser's for these arguments."""
        return self.plan.limits or self.plan.limits_for(*args, **kwargs)

    def sync_limiter(self) -> RateLimiter:
        """The limiter: the option's, else the default one (``configure()``,
        ``TOKENLIMIT_URL``)."""
        if self.limiter is not None:
            return self.limiter
        limiter = default_sync_limiter()
        if isinstance(limiter, AsyncRateLimiter):
            raise ConfigTypeError(
                "rate_limit_limiter",
                "the default limiter is an AsyncRateLimiter; tasks run sync code: "
                "configure() a URL or a RateLimiter, or give rate_limit_limiter=",
            )
        return limiter


class _Request(Protocol):
    """What the check reads of Celery's ``Task.request`` (``celery.app.task.Context``)."""

    called_directly: bool  # no worker: a plain call of the task
    is_eager: bool  # apply(), task_always_eager


def _renamed(exc: ConfigError) -> ConfigError:
    """``exc`` naming the task option its parameter stands for."""
    option = _OPTION.get(exc.param)
    if option is None:
        return exc
    return type(exc)(option, str(exc).removeprefix(f"{exc.param}: "))


def _call_target(task_class: type) -> Callable[..., object]:
    """A callable with the signature the task is called with: its ``run`` without ``self``
    (a plain ``@app.task`` function is a staticmethod; a ``bind=True`` one and a class's own
    ``run`` take ``self``). Only its signature is used."""
    run = next(klass.__dict__["run"] for klass in task_class.__mro__ if "run" in klass.__dict__)
    if isinstance(run, staticmethod):
        function: Callable[..., object] = run.__func__
        return function
    return MethodType(run, task_class)


class RateLimitedTask(Task):  # type: ignore[misc]  # Celery ships no type hints
    """A Celery task base class whose runs share one budget across every worker.

    Task options (``@app.task(base=RateLimitedTask, ...)`` keywords, class attributes of a
    subclass, or ``task_annotations``):

    - ``rate_limit_global``: the limit, in every spelling tokenlimit takes (a number per second
      with ``rate_limit_burst``, a string such as ``"10/second"``, a ``Limit``, a list of them,
      or a chooser called with the task's arguments). None: no limit.
    - ``rate_limit_key``: the bucket: a template over the task's arguments, defaults applied
      (``"vendor:{vendor}"``), or a callable taking them. None: one bucket per task name.
    - ``rate_limit_cost``: tokens one run takes (default 1).
    - ``rate_limit_limiter``: a ``RateLimiter``; None: ``tokenlimit.configure()``'s, else
      ``TOKENLIMIT_URL``'s.
    - ``rate_limit_jitter``: a refused run comes back after ``retry_after`` plus up to this
      fraction of it (default 0.1).
    - ``rate_limit_max_countdown``: the longest a refused run is put off at once (default 600 s;
      a task held by a worker past the broker's visibility or consumer timeout is delivered
      again); a longer wait is several refusals.
    - ``rate_limit_eager_timeout``: how long an eager run or a direct call waits for a token
      before ``RateLimitExceeded`` (default 10 s; None: no bound).
    """

    rate_limit_global: ClassVar[float | LimitSpec | None] = None
    rate_limit_burst: ClassVar[int | None] = None
    rate_limit_key: ClassVar[KeySpec | None] = None
    rate_limit_cost: ClassVar[int] = 1
    rate_limit_limiter: ClassVar[RateLimiter | None] = None
    rate_limit_jitter: ClassVar[float] = 0.1
    rate_limit_max_countdown: ClassVar[float] = 600.0
    rate_limit_eager_timeout: ClassVar[float | None] = 10.0

    # The options checked, per task class (set when the class is bound to its app, after
    # ``task_annotations``; checked on first use where a class never is).
    _tokenlimit: ClassVar[TaskLimit | None] = None
    _tokenlimit_for: ClassVar[type | None] = None  # the class _tokenlimit was checked for

    @classmethod
    def on_bound(cls, app: object) -> None:
        super().on_bound(app)
        cls._tokenlimit = TaskLimit.of(cls)
        cls._tokenlimit_for = cls

    @classmethod
    def _task_limit(cls) -> TaskLimit | None:
        if cls.__dict__.get("_tokenlimit_for") is not cls:
            cls._tokenlimit = TaskLimit.of(cls)
            cls._tokenlimit_for = cls
        return cls._tokenlimit

    def __call__(self, *args: object, **kwargs: object) -> object:
        spec = self._task_limit()
        if spec is not None:
            self._admit(spec, args, kwargs)
        return super().__call__(*args, **kwargs)

    def _admit(self, spec: TaskLimit, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        """Return when this run may go ahead; raise ``Retry`` having sent the task again, or
        ``RateLimitExceeded`` where there is no queue (eager, direct call)."""
        key = self.name if spec.key_of is None else spec.key_of(args, kwargs)
        limits = spec.limits(args, kwargs)
        limiter = spec.sync_limiter()
        request: _Request = self.request
        if request.called_directly or request.is_eager:
            limiter.acquire(key, limits, cost=spec.plan.cost, timeout=spec.eager_timeout)
            return
        decision = limiter.try_acquire(key, limits, cost=spec.plan.cost)
        if not decision.allowed:
            raise self._defer(spec, request, decision)

    def _defer(self, spec: TaskLimit, request: _Request, decision: Decision) -> Retry:
        """Send this task again after the wait ``decision`` names, as ``Task.retry`` does but
        keeping ``request.retries``: the message carries the same id, arguments and options."""
        wait = countdown(decision.retry_after, jitter=spec.jitter, cap=spec.max_countdown)
        again = self.signature_from_request(request, countdown=wait)
        try:
            again.apply_async()
        except Exception as exc:
            # Not sent: with acks_late the message goes back to the queue; otherwise it was
            # acknowledged on delivery, and the task ends REJECTED as Celery's own retry does.
            raise Reject(exc, requeue=bool(self.acks_late)) from exc
        return Retry(exc=RateLimitExceeded(decision), when=wait, sig=again)
