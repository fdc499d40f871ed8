"""``RateLimiter`` and ``AsyncRateLimiter``: thin twins over one IO-free base."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from . import _switch
from ._backend import AsyncBackend, AsyncOverrideStore, OverrideStore, SyncBackend, is_remote
from ._base import DEFAULT_PREFIX, DEFAULT_TIMEOUT, LimiterBase
from ._breaker import Breaker
from ._concurrency import AsyncConcurrency, Concurrency
from ._decision import Decision, fail_open_decision
from ._decorator import Guard
from ._errors import BackendError, ConfigTypeError
from ._leasing import async_settler, decide_leased, decide_leased_async, thread_settler
from ._limit import Limit
from ._memory import AsyncMemoryBackend, MemoryBackend
from ._metrics import MetricsSink
from ._overrides import READER, LiveOverrides, Override, check_name
from ._plan import Chooser, LimitPlan, LimitSpec
from ._request import Request
from ._settle import LoopSettler, ThreadSettler
from ._validate import check_deadline, check_hold, check_key, check_timeout

if TYPE_CHECKING:
    from typing import ClassVar, Literal, Unpack

    from redis import Redis
    from redis.asyncio import Redis as AsyncRedis
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    from ._base import LimiterOptions
    from ._decorator import KeySpec

__all__ = ["AsyncRateLimiter", "RateLimiter"]


def _sync_backend(client: Redis | RedisCluster | SyncBackend, timeout: float) -> SyncBackend:
    from redis import Redis
    from redis.cluster import RedisCluster

    if isinstance(client, (Redis, RedisCluster)):
        from ._redis.sync import RedisBackend

        return RedisBackend(client, timeout=timeout)
    if _has(client, "decide", "reset", "close"):  # a backend: ours or a third party's
        return client
    raise ConfigTypeError(
        "client",
        "expected redis.Redis, redis.cluster.RedisCluster or a backend, "
        f"not {type(client).__name__} (use AsyncRateLimiter for asyncio clients)",
    )


def _async_backend(
    client: AsyncRedis | AsyncRedisCluster | MemoryBackend | AsyncBackend,
) -> AsyncBackend:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, (Redis, RedisCluster)):
        from ._redis.aio import AsyncRedisBackend

        return AsyncRedisBackend(client)
    if isinstance(client, MemoryBackend):
        return AsyncMemoryBackend(client)
    if _has(client, "decide", "reset", "aclose"):
        return client
    raise ConfigTypeError(
        "client",
        "expected redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster or an async backend,"
        f" not {type(client).__name__} (use RateLimiter for sync clients)",
    )


def _has(obj: object, *names: str) -> bool:
    return all(callable(getattr(obj, name, None)) for name in names)


class RateLimiter(LimiterBase[SyncBackend]):
    """Sync limiter: ``RateLimiter(redis.Redis(...))`` or ``RateLimiter.from_url(url)``.

    ``shadow=True``: decide and count as usual but admit every call (see ``as_shadow``).
    ``hash_secret=``: keys the hash of identities into bucket keys (docs/reliability.md).
    """

    is_async: ClassVar[Literal[False]]

    __slots__ = ()

    def __init__(
        self,
        client: Redis | RedisCluster | SyncBackend,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        failure_mode: str = "closed",
        expected_processes: int | None = None,
        metrics: MetricsSink | None = None,
        local_cache: bool | int = True,
        shadow: bool = False,
        breaker: bool | Breaker = True,
        hash_secret: str | bytes | None = None,
        overrides: bool = True,
    ) -> None:
        backend = _sync_backend(client, check_deadline(timeout))
        super().__init__(
            backend,
            prefix=prefix,
            timeout=timeout,
            failure_mode=failure_mode,
            expected_processes=expected_processes,
            metrics=metrics,
            local_cache=local_cache,
            shadow=shadow,
            breaker=breaker,
            hash_secret=hash_secret,
            remote=is_remote(backend),
            overrides=overrides,
        )
        if self._leases is not None:
            self._settler = thread_settler(self, self._leases)

    @classmethod
    def from_url(cls, url: str, **options: Unpack[LimiterOptions]) -> RateLimiter:
        """``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://h:p[,h:p]``,
        ``redis+sentinel://h:p[,h:p]/service[/db]`` or ``memory://``."""
        from ._url import sync_backend_from_url

        timeout = check_deadline(options.get("timeout", DEFAULT_TIMEOUT))
        return cls(sync_backend_from_url(url, timeout=timeout), **options)

    # -- decisions ----------------------------------------------------------------------------
    def try_acquire(self, key: str | bytes, limit: LimitSpec, *, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from every limit, all or none. Never raises on refusal."""
        return self._decide(self._request(key, limit, cost), consume=True)

    def acquire(
        self, key: str | bytes, limit: LimitSpec, *, cost: int = 1, timeout: float | None = None
    ) -> Decision:
        """Wait until admitted. Raises ``RateLimitExceeded`` at once, consuming nothing, when the
        wait needed is longer than ``timeout`` (``0``: do not wait; ``None``: no bound)."""
        wait = check_timeout("timeout", timeout)
        request = self._request(key, limit, cost)
        deadline = math.inf if wait is None else time.monotonic() + wait
        while True:
            decision = self._decide(request, consume=True)
            if decision.allowed:
                return decision
            time.sleep(self._pause(decision, deadline))

    def peek(self, key: str | bytes, limit: LimitSpec, *, cost: int = 1) -> Decision:
        """What ``try_acquire`` would answer now, consuming nothing."""
        return self._decide(self._request(key, limit, cost), consume=False)

    def reset(self, key: str | bytes, limit: LimitSpec) -> None:
        """Forget the bucket(s): full again."""
        request = self._to_reset(self._request(key, limit))
        try:
            self.backend.reset(request, timeout=self._timeout)
        finally:  # after the server's reset, so no refusal made before it is cached after
            self._forget(request, leases=True)

    def hold_back(self, key: str | bytes, limit: LimitSpec, seconds: float) -> Decision:
        """Refuse every caller of the bucket(s), in every process sharing the store, for
        ``seconds`` (> 0, at most a day: ``ConfigError`` naming ``seconds`` otherwise).

        Each limit's next token is then due ``seconds`` from now and the bucket refills at its
        rate after that; one already emptier is left as it is (a hold never adds tokens). All
        limits in one atomic step. Returns what ``peek`` would answer right after. Storage
        failures follow ``failure_mode``; ``shadow=True`` holds back all the same (it only
        admits its own calls)."""
        hold_us = check_hold(seconds)
        request = self._in_force(self._request(key, limit))
        self._check_can_hold()
        if _switch.DISABLED:  # tokenlimit.testing.disabled(): touch nothing
            return fail_open_decision(request.limits)
        circuit = self._circuit
        if circuit.tripped and not circuit.route():
            return self._held_elsewhere(request, None, hold_us)
        started = time.perf_counter()
        try:
            reply = self.backend.hold_back(request, hold_us, timeout=self._timeout)
        except BackendError as error:
            return self._held_elsewhere(request, error, hold_us)
        if circuit.tripped:
            self._recovered()
        return self._decoded(request, reply, started, consume=False)

    def refund(self, key: str | bytes, limit: LimitSpec, *, cost: int = 1) -> Decision:
        """Give back up to ``cost`` tokens that a call took from the bucket(s), for every
        process sharing the store: each limit gains ``cost`` tokens, never above a full bucket
        (``burst``), and an absent bucket (full) stays absent. All limits in one atomic step.

        For a call admitted before its outcome was known that turned out not to count (the
        integrations' ``deduct_when``). ``cost`` as for ``try_acquire``: a whole number of
        tokens from 1 to the smallest burst (``ConfigError`` naming ``cost`` otherwise).
        Returns what ``peek`` would answer right after. Storage failures follow
        ``failure_mode`` (open: logged, nothing given back)."""
        request = self._in_force(self._request(key, limit, cost))
        self._check_can_refund()
        if _switch.DISABLED:  # tokenlimit.testing.disabled(): touch nothing
            return fail_open_decision(request.limits)
        circuit = self._circuit  # failure_mode="local": tokens taken locally go back there
        if circuit.tripped and not circuit.route():
            return self._refunded_elsewhere(request, None)
        started = time.perf_counter()
        try:
            reply = self.backend.refund(request, timeout=self._timeout)
        except BackendError as error:
            return self._refunded_elsewhere(request, error)
        if circuit.tripped:
            self._recovered()
        self._forget(request)  # the refusals cached for these buckets may no longer hold
        return self._decoded(request, reply, started, consume=False)

    def _decide(self, request: Request, *, consume: bool) -> Decision:
        if _switch.DISABLED:  # tokenlimit.testing.disabled(): admit, touch nothing
            return fail_open_decision(request.limits)
        started = time.perf_counter()
        live = self._overrides
        if live is not None:
            if started >= live.due and live.claim(started):
                try:  # (the next read is due a second from now: this call does not come back)
                    return self._decide(request, consume=consume)
                finally:  # then read, off this caller's time, its connection given back
                    READER.submit(lambda: self._refresh_overrides(live, time.perf_counter()))
            if live.table:
                made = live.apply(request, started)
                if isinstance(made, Decision):  # a blocked limit: refused without the server
                    return self._answered(request, made, started, consume=consume)
                request = made
        if request.limits[0].lease and consume:  # leased tokens (_leasing.py)
            return decide_leased(self, request, started)
        refusals = self._refusals
        if refusals is not None:
            local = refusals.get(request.keys, request.cost, started, request.limits)
            if local is not None:
                return self._answered(request, local, started, consume=consume)
        if self._circuit.tripped:  # a storage call failed lately: the circuit routes this one
            return self._decide_tripped(request, started, consume=consume)
        try:
            reply = self.backend.decide(request, consume=consume, timeout=self._timeout)
        except BackendError as error:
            return self._undecided(request, error, started, consume=consume)
        return self._decoded(request, reply, started, consume=consume)

    def _decide_tripped(self, request: Request, started: float, *, consume: bool) -> Decision:
        """``_decide`` while the circuit is tripped: the server, or the failure mode at once."""
        if not self._circuit.route():
            return self._undecided(request, None, started, consume=consume)
        try:
            reply = self.backend.decide(request, consume=consume, timeout=self._timeout)
        except BackendError as error:
            return self._undecided(request, error, started, consume=consume)
        self._recovered()
        return self._decoded(request, reply, started, consume=consume)

    # -- live overrides (brownout; see _overrides.py) --------------------------------------
    def set_override(
        self,
        name: str,
        limit: str | Limit | None = None,
        *,
        seconds: float,
        burst: int | None = None,
        block: bool = False,
        reason: str = "",
    ) -> Override:
        """Decide the limit labelled ``name`` at ``limit`` (``"5/second"``, with ``burst``, or
        a ``Limit``), or refuse all its calls (``block=True``), for ``seconds`` (at most a
        week), in every process sharing the store: each applies it within a second of its next
        decision. The bucket stays the limit's own. Replaces an override of the same name.
        Raises ``BackendError`` if the store cannot be written: nothing is then changed."""
        live = self._live_overrides()
        args = self._override_args(name, limit, seconds, burst, block, reason)
        reply = self._override_store.overrides(self._overrides_at, args, timeout=self._timeout)
        return self._written(live, args[1], reply)

    def clear_override(self, name: str) -> bool:
        """End the override of the limit labelled ``name`` in every process sharing the store
        (within a second of their next decision); False if there was none."""
        live = self._live_overrides()
        args = ("clear", check_name(name))
        reply = self._override_store.overrides(self._overrides_at, args, timeout=self._timeout)
        return self._read_overrides(live, reply)[0]

    def list_overrides(self) -> tuple[Override, ...]:
        """The overrides in force in the store now (read from it, not this process's copy)."""
        live = self._live_overrides()
        reply = self._override_store.overrides(self._overrides_at, ("list",), timeout=self._timeout)
        return self._read_overrides(live, reply)[1]

    @property
    def _override_store(self) -> OverrideStore:
        return cast("OverrideStore", self.backend)  # overrides are on: can_override said so

    def _refresh_overrides(self, live: LiveOverrides, now: float) -> None:
        if live.closed:
            return
        if self._circuit.tripped:  # storage failed lately: keep the last table, ask no deadline
            live.expire(now)
            return
        try:
            reply = self._override_store.overrides(
                self._overrides_at, ("list",), timeout=self._timeout
            )
        except BackendError as error:
            self._override_unread(live, error, now)
        else:
            self._read_overrides(live, reply)

    # -- decorator / context manager ----------------------------------------------------------
    def limit(
        self,
        rate: float | LimitSpec | None = None,
        burst: int | None = None,
        *,
        limit: LimitSpec | None = None,
        key: KeySpec | None = None,
        cost: int = 1,
        timeout: float | None = 0,
    ) -> Guard:
        """A decorator (``def`` or ``async def``) and context manager bound to this limiter."""
        return Guard(rate, burst, limit=limit, key=key, cost=cost, timeout=timeout, limiter=self)

    def concurrency(
        self,
        key: str | bytes | Callable[..., str | bytes],
        max_in_flight: int,
        *,
        lease: float = 60.0,
        timeout: float = 0,
    ) -> Concurrency:
        """At most ``max_in_flight`` holders of ``key`` at once: a context manager (``with``)
        and decorator holding one slot, raising ``RateLimitExceeded`` when all are held after
        waiting up to ``timeout`` seconds; a holder that never exits loses its slot after
        ``lease`` seconds. As a decorator, ``key`` may be a template over the call's arguments
        (``"export:{user_id}"``) or a callable of them, as for ``rate_limit``."""
        return Concurrency(self, key, max_in_flight, lease=lease, timeout=timeout)

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Give leased tokens back, and close the client if this limiter made it
        (``from_url``)."""
        if isinstance(self._settler, ThreadSettler):
            self._settler.close()
        if self._overrides is not None:
            self._overrides.close()
        self.backend.close()

    def __enter__(self) -> RateLimiter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRateLimiter(LimiterBase[AsyncBackend]):
    """Async limiter: ``AsyncRateLimiter(redis.asyncio.Redis(...))`` or ``.from_url(url)``.

    ``shadow=True``: decide and count as usual but admit every call (see ``as_shadow``).
    ``hash_secret=``: keys the hash of identities into bucket keys (docs/reliability.md).
    """

    is_async: ClassVar[Literal[True]] = True

    __slots__ = ()

    def __init__(
        self,
        client: AsyncRedis | AsyncRedisCluster | MemoryBackend | AsyncBackend,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        failure_mode: str = "closed",
        expected_processes: int | None = None,
        metrics: MetricsSink | None = None,
        local_cache: bool | int = True,
        shadow: bool = False,
        breaker: bool | Breaker = True,
        hash_secret: str | bytes | None = None,
        overrides: bool = True,
    ) -> None:
        backend = _async_backend(client)
        super().__init__(
            backend,
            prefix=prefix,
            timeout=timeout,
            failure_mode=failure_mode,
            expected_processes=expected_processes,
            metrics=metrics,
            local_cache=local_cache,
            shadow=shadow,
            breaker=breaker,
            hash_secret=hash_secret,
            remote=is_remote(backend),
            overrides=overrides,
        )
        if self._leases is not None:
            self._settler = async_settler(self, self._leases)

    @classmethod
    def from_url(cls, url: str, **options: Unpack[LimiterOptions]) -> AsyncRateLimiter:
        """``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://h:p[,h:p]``,
        ``redis+sentinel://h:p[,h:p]/service[/db]`` or ``memory://``."""
        from ._url import async_backend_from_url

        timeout = check_deadline(options.get("timeout", DEFAULT_TIMEOUT))
        return cls(async_backend_from_url(url, timeout=timeout), **options)

    async def try_acquire(self, key: str | bytes, limit: LimitSpec, *, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from every limit, all or none. Never raises on refusal."""
        if callable(limit):  # a limit chooser, maybe async: await what it chooses
            limit = await self._choose(key, limit, cost)
        return await self._decide(self._request(key, limit, cost), consume=True)

    async def acquire(
        self, key: str | bytes, limit: LimitSpec, *, cost: int = 1, timeout: float | None = None
    ) -> Decision:
        """Wait until admitted. Raises ``RateLimitExceeded`` at once, consuming nothing, when the
        wait needed is longer than ``timeout`` (``0``: do not wait; ``None``: no bound)."""
        wait = check_timeout("timeout", timeout)
        if callable(limit):
            limit = await self._choose(key, limit, cost)
        request = self._request(key, limit, cost)
        deadline = math.inf if wait is None else time.monotonic() + wait
        while True:
            decision = await self._decide(request, consume=True)
            if decision.allowed:
                return decision
            await asyncio.sleep(self._pause(decision, deadline))

    async def peek(self, key: str | bytes, limit: LimitSpec, *, cost: int = 1) -> Decision:
        """What ``try_acquire`` would answer now, consuming nothing."""
        if callable(limit):
            limit = await self._choose(key, limit, cost)
        return await self._decide(self._request(key, limit, cost), consume=False)

    async def reset(self, key: str | bytes, limit: LimitSpec) -> None:
        """Forget the bucket(s): full again."""
        if callable(limit):
            limit = await self._choose(key, limit)
        request = self._to_reset(self._request(key, limit))
        try:
            await self.backend.reset(request, timeout=self._timeout)
        finally:  # after the server's reset, so no refusal made before it is cached after
            self._forget(request, leases=True)

    async def hold_back(self, key: str | bytes, limit: LimitSpec, seconds: float) -> Decision:
        """Refuse every caller of the bucket(s) for ``seconds`` (see ``RateLimiter.hold_back``)."""
        hold_us = check_hold(seconds)
        if callable(limit):
            limit = await self._choose(key, limit)
        request = self._in_force(self._request(key, limit))
        self._check_can_hold()
        if _switch.DISABLED:  # tokenlimit.testing.disabled(): touch nothing
            return fail_open_decision(request.limits)
        circuit = self._circuit
        if circuit.tripped and not circuit.route():
            await asyncio.sleep(0)  # yield once, as a round trip would
            return self._held_elsewhere(request, None, hold_us)
        started = time.perf_counter()
        try:
            reply = await self.backend.hold_back(request, hold_us, timeout=self._timeout)
        except BackendError as error:
            return self._held_elsewhere(request, error, hold_us)
        if circuit.tripped:
            self._recovered()
        return self._decoded(request, reply, started, consume=False)

    async def refund(self, key: str | bytes, limit: LimitSpec, *, cost: int = 1) -> Decision:
        """Give back up to ``cost`` tokens a call took (see ``RateLimiter.refund``)."""
        if callable(limit):
            limit = await self._choose(key, limit, cost)
        request = self._in_force(self._request(key, limit, cost))
        self._check_can_refund()
        if _switch.DISABLED:  # tokenlimit.testing.disabled(): touch nothing
            return fail_open_decision(request.limits)
        circuit = self._circuit  # failure_mode="local": tokens taken locally go back there
        if circuit.tripped and not circuit.route():
            await asyncio.sleep(0)  # yield once, as a round trip would
            return self._refunded_elsewhere(request, None)
        started = time.perf_counter()
        try:
            reply = await self.backend.refund(request, timeout=self._timeout)
        except BackendError as error:
            return self._refunded_elsewhere(request, error)
        if circuit.tripped:
            self._recovered()
        self._forget(request)  # the refusals cached for these buckets may no longer hold
        return self._decoded(request, reply, started, consume=False)

    @staticmethod
    async def _choose(key: str | bytes, choose: Chooser, cost: int = 1) -> tuple[Limit, ...]:
        """``choose(key)``, awaited if it is async: the limit(s) for this call (tiers)."""
        check_key(key)  # a bad key fails as one before the chooser sees it
        return await LimitPlan.of(limit=choose, cost=cost).alimits_for(key)

    async def _decide(self, request: Request, *, consume: bool) -> Decision:
        if _switch.DISABLED:  # tokenlimit.testing.disabled(): admit, touch nothing
            return fail_open_decision(request.limits)
        started = time.perf_counter()
        live = self._overrides
        if live is not None:
            if started >= live.due and live.claim(started):
                try:  # (the next read is due a second from now: this call does not come back)
                    return await self._decide(request, consume=consume)
                finally:  # then read, off this caller's time, its connection given back
                    live.read_in_task(lambda: self._refresh_overrides(live, time.perf_counter()))
            if live.table:
                made = live.apply(request, started)
                if isinstance(made, Decision):  # a blocked limit: refused without the server
                    await asyncio.sleep(0)  # yield, as a round trip would (see below)
                    return self._answered(request, made, started, consume=consume)
                request = made
        if request.limits[0].lease and consume:  # leased tokens (_leasing.py)
            return await decide_leased_async(self, request, started)
        refusals = self._refusals
        if refusals is not None:
            local = refusals.get(request.keys, request.cost, started, request.limits)
            if local is not None:
                # Yield once, as a round trip would: a caller that retries refusals in a loop
                # must not hold the event loop (the benchmark's 64 tasks starved the batch
                # reader until other decisions missed their deadline).
                await asyncio.sleep(0)
                return self._answered(request, local, started, consume=consume)
        if self._circuit.tripped:  # a storage call failed lately: the circuit routes this one
            return await self._decide_tripped(request, started, consume=consume)
        try:
            reply = await self.backend.decide(request, consume=consume, timeout=self._timeout)
        except BackendError as error:
            return self._undecided(request, error, started, consume=consume)
        return self._decoded(request, reply, started, consume=consume)

    async def _decide_tripped(self, request: Request, started: float, *, consume: bool) -> Decision:
        """``_decide`` while the circuit is tripped (see ``RateLimiter._decide_tripped``)."""
        if not self._circuit.route():
            # Yield once, as a round trip would (see the refusal cache above).
            await asyncio.sleep(0)
            return self._undecided(request, None, started, consume=consume)
        try:
            reply = await self.backend.decide(request, consume=consume, timeout=self._timeout)
        except BackendError as error:
            return self._undecided(request, error, started, consume=consume)
        self._recovered()
        return self._decoded(request, reply, started, consume=consume)

    # -- live overrides (brownout; see _overrides.py) --------------------------------------
    async def set_override(
        self,
        name: str,
        limit: str | Limit | None = None,
        *,
        seconds: float,
        burst: int | None = None,
        block: bool = False,
        reason: str = "",
    ) -> Override:
        """Decide the limit labelled ``name`` at ``limit`` (``"5/second"``, with ``burst``, or
        a ``Limit``), or refuse all its calls (``block=True``), for ``seconds`` (at most a
        week), in every process sharing the store: each applies it within a second of its next
        decision. The bucket stays the limit's own. Replaces an override of the same name.
        Raises ``BackendError`` if the store cannot be written: nothing is then changed."""
        live = self._live_overrides()
        args = self._override_args(name, limit, seconds, burst, block, reason)
        reply = await self._override_store.overrides(
            self._overrides_at, args, timeout=self._timeout
        )
        return self._written(live, args[1], reply)

    async def clear_override(self, name: str) -> bool:
        """End the override of the limit labelled ``name`` in every process sharing the store
        (within a second of their next decision); False if there was none."""
        live = self._live_overrides()
        args = ("clear", check_name(name))
        reply = await self._override_store.overrides(
            self._overrides_at, args, timeout=self._timeout
        )
        return self._read_overrides(live, reply)[0]

    async def list_overrides(self) -> tuple[Override, ...]:
        """The overrides in force in the store now (read from it, not this process's copy)."""
        live = self._live_overrides()
        reply = await self._override_store.overrides(
            self._overrides_at, ("list",), timeout=self._timeout
        )
        return self._read_overrides(live, reply)[1]

    @property
    def _override_store(self) -> AsyncOverrideStore:
        return cast("AsyncOverrideStore", self.backend)  # overrides are on: can_override said so

    async def _refresh_overrides(self, live: LiveOverrides, now: float) -> None:
        if live.closed:
            return
        if self._circuit.tripped:  # storage failed lately: keep the last table, ask no deadline
            live.expire(now)
            return
        try:
            reply = await self._override_store.overrides(
                self._overrides_at, ("list",), timeout=self._timeout
            )
        except BackendError as error:
            self._override_unread(live, error, now)
        else:
            self._read_overrides(live, reply)

    def limit(
        self,
        rate: float | LimitSpec | None = None,
        burst: int | None = None,
        *,
        limit: LimitSpec | None = None,
        key: KeySpec | None = None,
        cost: int = 1,
        timeout: float | None = 0,
    ) -> Guard:
        """A decorator (``async def`` only) and ``async with`` context manager."""
        return Guard(rate, burst, limit=limit, key=key, cost=cost, timeout=timeout, limiter=self)

    def concurrency(
        self,
        key: str | bytes | Callable[..., str | bytes],
        max_in_flight: int,
        *,
        lease: float = 60.0,
        timeout: float = 0,
    ) -> AsyncConcurrency:
        """At most ``max_in_flight`` holders of ``key`` at once: ``async with`` and a decorator
        of ``async def`` holding one slot (see ``RateLimiter.concurrency``)."""
        return AsyncConcurrency(self, key, max_in_flight, lease=lease, timeout=timeout)

    async def aclose(self) -> None:
        """Give leased tokens back, and close the client if this limiter made it
        (``from_url``)."""
        if isinstance(self._settler, LoopSettler):
            await self._settler.aclose()
        if self._overrides is not None:
            self._overrides.close()
        await self.backend.aclose()

    async def __aenter__(self) -> AsyncRateLimiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
