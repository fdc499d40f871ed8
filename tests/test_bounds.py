"""Bounded local state: whatever a process keeps per identity stays within a configured bound
under a million distinct identities (an attacker rotating API keys, a scan of IP addresses).

Driven on the pure objects, without a server: ``MemoryBackend(max_keys=N)``, the refusal cache
behind ``local_cache=N``, the limiters' own request cache, and the integrations' address cache.
Each test prints the time taken and the growth of the process's resident memory.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import pytest

from tokenlimit import Decision, Limit, MemoryBackend, RateLimiter
from tokenlimit._base import LimiterBase
from tokenlimit._cache import RefusalCache
from tokenlimit._request import Request

MILLION = 1_000_000
SLOW = 0.001  # tokens per second: a bucket stays far from full for the whole test


def _rss() -> float:
    """The process's resident memory now, in MB (Linux; 0 elsewhere), after a collection."""
    gc.collect()
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 0.0


def fill_memory_backend(bound: int) -> dict[str, float]:
    """In a fresh process: a million identities through ``MemoryBackend(max_keys=bound)``."""
    now = [0.0]
    backend = MemoryBackend(clock=lambda: now[0], max_keys=bound)
    limits = (Limit(SLOW, 5),)
    before, started = _rss(), time.perf_counter()
    most = heap = 0
    for i in range(MILLION):
        now[0] += 1e-6  # a million decisions in one simulated second: nobody refills
        reply = backend.decide(Request((f"id:{i}",), (), limits, 1), consume=True)
        assert reply[1] == 1  # a new identity: a full bucket
        if i % 1024 == 0:
            most = max(most, len(backend))
            heap = max(heap, len(backend._expiry))
    elapsed, grown = time.perf_counter() - started, _rss() - before
    newest = backend.decide(Request((f"id:{MILLION - 1}",), (), limits, 1), consume=False)
    oldest = backend.decide(Request(("id:0",), (), limits, 1), consume=False)
    return {"seconds": elapsed, "rss_mb": grown, "kept": len(backend), "most": most,
            "heap": heap, "newest": newest[3], "oldest": oldest[3]}  # fmt: skip


def fill_refusal_cache(bound: int) -> dict[str, float]:
    """In a fresh process: a million identities' refusals into ``RefusalCache(bound)``."""
    cache = RefusalCache(bound)
    lim = Limit(SLOW, 5)
    refusal = Decision(False, 5, 0, 3600.0, 3600.0, policy=lim)
    before, started = _rss(), time.perf_counter()
    most = 0
    for i in range(MILLION):
        cache.put((f"id:{i}",), 1, i * 1e-6, refusal)
        if i % 1024 == 0:
            most = max(most, len(cache))
    elapsed, grown = time.perf_counter() - started, _rss() - before
    return {
        "seconds": elapsed, "rss_mb": grown, "kept": len(cache), "most": most,
        "newest": cache.get((f"id:{MILLION - 1}",), 1, 1.0) is not None,
        "oldest": cache.get(("id:0",), 1, 1.0) is not None,
    }  # fmt: skip


BOUND = 10_000


@pytest.fixture(scope="module")
def million() -> Iterator[dict[str, Future[dict[str, float]]]]:
    """Both million-identity runs at once, each in a fresh process of its own (so that its
    resident memory starts clean, and the two share the machine's cores)."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield {
            "memory": pool.submit(fill_memory_backend, BOUND),
            "cache": pool.submit(fill_refusal_cache, BOUND),
        }


@pytest.mark.slow
def test_memory_backend_stays_within_max_keys_under_a_million_identities(
    million: dict[str, Future[dict[str, float]]],
) -> None:
    got = million["memory"].result(timeout=300)
    print(
        f"\nMemoryBackend(max_keys={BOUND}): {MILLION:,} identities in {got['seconds']:.1f}s, "
        f"{got['kept']:,} kept (at most {got['most']:,}), RSS +{got['rss_mb']:.1f} MB"
    )
    assert got["kept"] == BOUND
    assert got["most"] <= BOUND
    assert got["heap"] <= 2 * BOUND + 1024  # stale expiry entries are swept too
    assert got["newest"] == 4  # the most recent identities are still counted...
    assert got["oldest"] == 5  # ...the oldest were forgotten (full again: only ever admits)
    assert got["rss_mb"] < 64  # a million kept buckets would take ~200 MB


@pytest.mark.slow
def test_refusal_cache_stays_within_its_bound_under_a_million_identities(
    million: dict[str, Future[dict[str, float]]],
) -> None:
    got = million["cache"].result(timeout=300)
    print(
        f"\nRefusalCache({BOUND}): {MILLION:,} identities in {got['seconds']:.1f}s, "
        f"{got['kept']:,} kept (at most {got['most']:,}), RSS +{got['rss_mb']:.1f} MB"
    )
    assert got["most"] <= BOUND
    assert got["kept"] <= BOUND
    assert got["newest"]  # the newest still answer locally
    assert not got["oldest"]  # the oldest made room
    assert got["rss_mb"] < 32


class RefusingBackend:
    """A stand-in for a server that refuses everything (the bucket is empty for an hour)."""

    def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        reply = [0, 0]
        for _ in request.limits:
            reply += [0, 0, 3_600_000_000, 3_600_000_000]
        return reply

    def reset(self, request: Request, *, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_limiters_local_state_is_bounded_through_the_public_api() -> None:
    """Through ``try_acquire``: the refusal cache stays within ``local_cache`` and the request
    cache (hot calls skip hashing) within its fixed size, whatever the number of identities."""
    from tokenlimit import _request

    limiter = RateLimiter.__new__(RateLimiter)
    LimiterBase.__init__(limiter, RefusingBackend(), local_cache=500, remote=True)
    assert limiter.local_cache == 500
    assert limiter._refusals is not None
    lim = Limit(SLOW, 5)
    before, started = _rss(), time.perf_counter()
    count = 50_000
    for i in range(count):
        assert not limiter.try_acquire(f"apikey:{i}", lim).allowed
        if i % 256 == 0:
            assert len(limiter._refusals) <= 500
            assert len(_request._cache) <= _request._CACHE_SIZE
    elapsed, grown = time.perf_counter() - started, _rss() - before
    print(
        f"\nRateLimiter(local_cache=500): {count:,} identities in {elapsed:.1f}s, "
        f"{len(limiter._refusals)} refusals and {len(_request._cache)} requests kept, "
        f"RSS +{grown:.1f} MB"
    )
    assert len(limiter._refusals) <= 500
    assert len(_request._cache) <= _request._CACHE_SIZE


def test_memory_limiter_bound_through_the_public_api() -> None:
    with RateLimiter(MemoryBackend(max_keys=300)) as limiter:
        lim = Limit(SLOW, 2)
        for i in range(5_000):
            assert limiter.try_acquire(f"user:{i}", lim).allowed
            assert len(limiter.backend) <= 300
        assert limiter.peek("user:4999", lim).remaining == 1


def test_the_integrations_address_cache_is_bounded() -> None:
    from tokenlimit.integrations import _common

    proxies = _common.TrustedProxies(None)
    maxsize = _common._ip_key.cache_info().maxsize
    assert maxsize is not None
    for i in range(maxsize + 5_000):
        peer = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        identity = _common.default_identity(
            api_key=None, user_id=None, peer=peer, forwarded_for=None, proxies=proxies
        )
        assert identity.startswith("ip:")
    assert _common._ip_key.cache_info().currsize <= maxsize


def _cached_key_chars() -> int:
    """The characters of caller keys the request cache holds."""
    from tokenlimit import _request

    return sum(len(entry[1]) for entry in _request._cache)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_the_request_cache_is_bounded_in_bytes_not_only_entries(flavour: str) -> None:
    """Issue 13 defect 5: the request cache kept every caller key whole, up to 1 MiB each
    (300 keys of 256 KB: +75 MB). A long key is built at each call instead (still one bucket);
    short keys are still cached."""
    import asyncio

    from tokenlimit import AsyncRateLimiter, _request

    _request._cache.clear()
    lim = Limit(SLOW, 5)
    keys = [f"{i:04d}:" + "x" * (256 * 1024) for i in range(300)]
    if flavour == "sync":
        limiter = RateLimiter.from_url("memory://")
        for key in keys:
            assert limiter.try_acquire(key, lim).allowed
        assert limiter.try_acquire(keys[0], lim).remaining == 3  # the same bucket again
        limiter.try_acquire("user:short", lim)
    else:
        alimiter = AsyncRateLimiter.from_url("memory://")

        async def main() -> None:
            for key in keys:
                assert (await alimiter.try_acquire(key, lim)).allowed
            assert (await alimiter.try_acquire(keys[0], lim)).remaining == 3
            await alimiter.try_acquire("user:short", lim)

        asyncio.run(main())
    assert _cached_key_chars() < 1 << 20, f"{_cached_key_chars():,} characters of keys kept"
    assert any(entry[1] == "user:short" for entry in _request._cache)


def test_the_request_cache_holds_at_most_a_mebibyte_of_keys() -> None:
    """Full of the longest keys it caches, the request cache holds at most its entries times
    that length: 1 MiB of characters."""
    from tokenlimit import _request

    _request._cache.clear()
    limiter = RateLimiter.from_url("memory://")
    lim = Limit(SLOW, 5)
    for i in range(_request._CACHE_SIZE + 100):
        limiter.try_acquire(f"{i:08d}".ljust(256, "k"), lim)
    assert len(_request._cache) > 0
    assert _cached_key_chars() <= 1 << 20
