"""One adapter per library: how each makes one decision ("is this call allowed?") on Redis.

Every adapter turns a ``Workload`` (``amount`` per ``period`` seconds, a burst of ``amount``)
into the library's closest equivalent of a token bucket, and hands out a sync decider
``(key) -> bool`` and, where the library has an async API, an async one. Peers are optional:
a library that does not import becomes a ``Missing`` row and the run goes on.

Only public APIs: tokenlimit's ``RateLimiter`` / ``AsyncRateLimiter``; limits' strategies and
storages; throttled-py's ``Throttled``; PyrateLimiter's ``Limiter`` with a ``BucketFactory``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

SyncDecider = Callable[[str], bool]
AsyncDecider = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True)
class Workload:
    """``amount`` decisions allowed per ``period`` seconds, burst ``amount``."""

    name: str
    title: str
    amount: int
    period: int = 1

    @property
    def rate(self) -> float:
        return self.amount / self.period


HOT = Workload("hot", "one hot key, all allowed", 1_000_000)
REFUSED = Workload("refused", "one hot key, mostly refused", 1)
KEYS = Workload("keys", "100k distinct keys", 10)
# For the memory table: a long horizon (one token takes 86.4 s to come back, which is how long
# a token bucket's key must live), so that no key expires while the table is filled.
MEMORY = Workload("memory", "memory: distinct keys, 1000/day", 1000, 86400)
WORKLOADS = (HOT, REFUSED, KEYS)


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass
class Missing:
    """A peer that could not be imported: its rows say why."""

    name: str
    reason: str
    algorithm: str = "-"
    version: str = "-"
    async_note: str = "-"


class Adapter:
    """Base: a library's name, version, chosen algorithm and its deciders."""

    name = ""
    dist = ""
    algorithm = ""
    async_note = ""  # how the async API talks to Redis

    def __init__(self, url: str) -> None:
        self.url = url
        self.version = version_of(self.dist)

    def sync_decider(self, workload: Workload) -> SyncDecider:
        raise NotImplementedError

    async def async_decider(self, workload: Workload) -> AsyncDecider | None:
        """None: the library has no async API ("n/a")."""
        return None

    def close(self) -> None:
        """Release sync resources."""

    async def aclose(self) -> None:
        """Release async resources (inside the benchmark's event loop)."""


class TokenlimitAdapter(Adapter):
    name = "tokenlimit"
    dist = "tokenlimit"
    algorithm = "token bucket (GCRA state), try_acquire"
    async_note = "AsyncRateLimiter (redis.asyncio)"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        from tokenlimit import RateLimiter

        self._sync = RateLimiter.from_url(url)
        self._async: Any = None

    @staticmethod
    def _limit(workload: Workload) -> Any:
        from tokenlimit import Limit

        return Limit(workload.rate, workload.amount)

    def sync_decider(self, workload: Workload) -> SyncDecider:
        limit = self._limit(workload)
        acquire = self._sync.try_acquire

        def decide(key: str) -> bool:
            return acquire(key, limit).allowed

        return decide

    async def async_decider(self, workload: Workload) -> AsyncDecider:
        from tokenlimit import AsyncRateLimiter

        if self._async is None:
            self._async = AsyncRateLimiter.from_url(self.url)
        limit = self._limit(workload)
        acquire = self._async.try_acquire

        async def decide(key: str) -> bool:
            return (await acquire(key, limit)).allowed

        return decide

    def close(self) -> None:
        self._sync.close()

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None


class LimitsAdapter(Adapter):
    name = "limits"
    dist = "limits"
    algorithm = "SlidingWindowCounter (hit)"
    # implementation="redispy" (documented since limits 4.2): about 1.5x the default coredis
    # bridge on this workload, so the peer's best.
    async_note = "limits.aio, implementation=redispy (redis.asyncio)"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        from limits import storage, strategies

        self._storage = storage.RedisStorage(url)
        self._strategy = strategies.SlidingWindowCounterRateLimiter(self._storage)
        self._async: Any = None

    @staticmethod
    def _item(workload: Workload) -> Any:
        from limits import RateLimitItemPerSecond

        return RateLimitItemPerSecond(workload.amount, workload.period)

    def sync_decider(self, workload: Workload) -> SyncDecider:
        item = self._item(workload)
        hit = self._strategy.hit

        def decide(key: str) -> bool:
            return bool(hit(item, key))

        return decide

    async def async_decider(self, workload: Workload) -> AsyncDecider | None:
        from limits.aio import strategies
        from limits.storage import storage_from_string

        if self._async is None:
            store = storage_from_string("async+" + self.url, implementation="redispy")
            self._async = strategies.SlidingWindowCounterRateLimiter(store)
        item = self._item(workload)
        hit = self._async.hit

        async def decide(key: str) -> bool:
            return bool(await hit(item, key))

        return decide


class ThrottledAdapter(Adapter):
    name = "throttled-py"
    dist = "throttled-py"
    algorithm = "GCRA (limit); its TOKEN_BUCKET counts whole seconds"
    async_note = "throttled.asyncio (redis.asyncio)"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        import throttled

        self._store = throttled.RedisStore(server=url)
        self._astore: Any = None

    @staticmethod
    def _quota(module: Any, workload: Workload) -> Any:
        return module.per_duration(
            timedelta(seconds=workload.period), workload.amount, burst=workload.amount
        )

    def sync_decider(self, workload: Workload) -> SyncDecider:
        import throttled

        limiter = throttled.Throttled(
            using=throttled.RateLimiterType.GCRA.value,
            quota=self._quota(throttled, workload),
            store=self._store,
        )
        limit = limiter.limit

        def decide(key: str) -> bool:
            return not limit(key).limited

        return decide

    async def async_decider(self, workload: Workload) -> AsyncDecider | None:
        from throttled import asyncio as athrottled

        if self._astore is None:
            self._astore = athrottled.RedisStore(server=self.url)
        limiter = athrottled.Throttled(
            using=athrottled.RateLimiterType.GCRA.value,
            quota=self._quota(athrottled, workload),
            store=self._astore,
        )
        limit = limiter.limit

        async def decide(key: str) -> bool:
            return not (await limit(key)).limited

        return decide

    async def aclose(self) -> None:
        if self._astore is not None:
            # throttled-py has no close(); its backend's client and pool are what hold sockets.
            client = self._astore._backend.get_client()
            await client.connection_pool.disconnect()
            self._astore = None


class PyrateAdapter(Adapter):
    name = "pyrate-limiter"
    dist = "pyrate-limiter"
    algorithm = "TokenBucket on StateBucket + RedisStateStore"
    # Not try_acquire_async: it takes one asyncio.Lock per Limiter, so 64 tasks decide one at a
    # time (about half the rate here). try_acquire on an async bucket returns an awaitable
    # (documented) and lets them run concurrently: the peer's best.
    async_note = "await try_acquire(blocking=False) (redis.asyncio); not try_acquire_async"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        import pyrate_limiter  # noqa: F401 - missing: this peer is "not installed"
        import redis

        self._redis = redis.Redis.from_url(url)
        self._aredis: Any = None

    def _limiter(self, client: Any, workload: Workload) -> Any:
        import pyrate_limiter as pl

        rates = [pl.Rate(workload.amount, workload.period * 1000, burst=workload.amount)]

        class PerKeyFactory(pl.BucketFactory):  # type: ignore[misc]
            """One Redis-backed token bucket per key, as PyrateLimiter's README routes keys.

            ``StateBucket.leak`` is a no-op, so no background leak is scheduled.
            """

            def __init__(self) -> None:
                self.buckets: dict[str, Any] = {}
                self.clock = pl.WallClock()

            def wrap_item(self, name: str, weight: int = 1) -> Any:
                return pl.RateItem(name, self.clock.now(), weight=weight)

            def get(self, item: Any) -> Any:
                bucket = self.buckets.get(item.name)
                if bucket is None:
                    store = pl.RedisStateStore(client, f"pyrate:{workload.name}:{item.name}")
                    bucket = pl.StateBucket(rates, algorithm=pl.TokenBucket(), store=store)
                    self.buckets[item.name] = bucket
                return bucket

        return pl.Limiter(PerKeyFactory())

    def sync_decider(self, workload: Workload) -> SyncDecider:
        acquire = self._limiter(self._redis, workload).try_acquire

        def decide(key: str) -> bool:
            return bool(acquire(key, blocking=False))

        return decide

    async def async_decider(self, workload: Workload) -> AsyncDecider | None:
        import redis.asyncio

        if self._aredis is None:
            self._aredis = redis.asyncio.Redis.from_url(self.url)
        acquire = self._limiter(self._aredis, workload).try_acquire

        async def decide(key: str) -> bool:
            return bool(await acquire(key, blocking=False))

        return decide

    def close(self) -> None:
        self._redis.close()

    async def aclose(self) -> None:
        if self._aredis is not None:
            await self._aredis.aclose()
            self._aredis = None


PEERS: tuple[type[Adapter], ...] = (LimitsAdapter, ThrottledAdapter, PyrateAdapter)


LEASE = 1000  # tokens one lease may take (issue 18): 1 ms of the hot workload's rate


class TokenlimitLeasedAdapter(TokenlimitAdapter):
    """tokenlimit with leased tokens: ``Limit(rate, burst, lease=LEASE)`` (at most the burst),
    so a hot key is decided mostly in-process, from tokens taken on the server first."""

    name = "tokenlimit+lease"
    algorithm = f"token bucket (GCRA state), try_acquire, lease={LEASE}"

    @staticmethod
    def _limit(workload: Workload) -> Any:
        from tokenlimit import Limit

        return Limit(workload.rate, workload.amount, lease=min(LEASE, workload.amount))


def make_adapters(url: str, *, peers: bool = True, leases: bool = True) -> list[Adapter | Missing]:
    """tokenlimit first (it must work), with leases next, then each peer, or a ``Missing`` when
    it won't import."""
    found: list[Adapter | Missing] = [TokenlimitAdapter(url)]
    if leases:
        found.append(TokenlimitLeasedAdapter(url))
    for cls in PEERS if peers else ():
        try:
            found.append(cls(url))
        except ImportError as exc:
            found.append(Missing(cls.name, f"not installed ({exc.name or exc})"))
    return found
