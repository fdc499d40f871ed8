"""Memory and eviction: every key expires, an expired (or evicted) bucket reads as full, a full
server fails decisions by the failure mode and never refuses because of it, and a server whose
eviction policy can take buckets away is reported once, at the limiter's first decision."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from conftest import Target
from redis.cluster import ClusterNode, RedisCluster

from servers import Server, available_binaries
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    Decision,
    Limit,
    RateLimiter,
    RateLimitExceeded,
)
from tokenlimit._redis.server_check import eviction_warning, parse_info
from tokenlimit._request import build_request

FLAVOURS = sorted(available_binaries())
NEVER = 1e-6  # tokens per second: nothing refills during a test
SYNC_KINDS = ["sync-url", "sync-client"]
ASYNC_KINDS = ["async-url", "async-client"]


def primaries(target: Target) -> list[redis.Redis]:
    """A plain client per primary (one for standalone); the caller closes them."""
    if target.kind != "cluster":
        return [redis.Redis.from_url(target.url)]
    return [redis.Redis(host=h, port=p) for h, p in target.host_ports()]


def sync_limiter(kind: str, url: str, nodes: list[tuple[str, int]] | None, **options: Any) -> Any:
    """``(limiter, close)``: from a URL, or over a user's client with redis-py's defaults
    (a cluster client when ``nodes`` are given)."""
    options.setdefault("timeout", 5.0)
    if kind == "sync-url":
        limiter = RateLimiter.from_url(url, **options)
        return limiter, limiter.close
    if nodes:
        client: Any = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes])
    else:
        client = redis.Redis.from_url(url)
    limiter = RateLimiter(client, **options)

    def close() -> None:
        limiter.close()
        client.close()

    return limiter, close


async def async_limiter(kind: str, url: str, **options: Any) -> Any:
    """``(limiter, aclose)`` for a standalone server."""
    options.setdefault("timeout", 5.0)
    if kind == "async-url":
        limiter = AsyncRateLimiter.from_url(url, **options)
        return limiter, limiter.aclose
    client = redis.asyncio.Redis.from_url(url)
    limiter = AsyncRateLimiter(client, **options)

    async def aclose() -> None:
        await limiter.aclose()
        await client.aclose()

    return limiter, aclose


# -- every key has a TTL ----------------------------------------------------------------------
def _random_limits(rng: random.Random) -> list[Limit]:
    limits = []
    for i in range(rng.choice((1, 1, 1, 2, 3))):
        rate = 10 ** rng.uniform(-3, 3)  # one token per 17 minutes .. 1000 per second
        name = rng.choice((None, None, f"tier-{i}"))
        limits.append(Limit(rate, rng.randint(1, 40), name=name))
    return limits


def _plan(rng: random.Random, n: int) -> list[tuple[str, list[Limit], int, str]]:
    """``n`` random identities, each with its limits, a cost and what to do with it."""
    ops = ["take"] * 6 + ["peek", "peek", "reset", "acquire", "drain"]
    plan = []
    for i in range(n):
        identity = f"{rng.choice(('user', 'ip', 'apikey'))}:{rng.getrandbits(64):x}:{i}"
        limits = _random_limits(rng)
        cost = rng.randint(1, min(lim.burst for lim in limits))
        plan.append((identity, limits, cost, rng.choice(ops)))
    return plan


def _apply_sync(
    limiter: RateLimiter, identity: str, limits: list[Limit], cost: int, op: str
) -> None:
    if op == "take":
        limiter.try_acquire(identity, limits, cost=cost)
    elif op == "peek":
        limiter.peek(identity, limits, cost=cost)
    elif op == "reset":
        limiter.try_acquire(identity, limits, cost=cost)
        limiter.reset(identity, limits)
        if cost % 2:  # sometimes taken again after the reset, sometimes left deleted
            limiter.try_acquire(identity, limits, cost=cost)
    elif op == "acquire":
        try:
            limiter.acquire(identity, limits, cost=cost, timeout=0)
        except RateLimitExceeded:
            pass
    else:  # drain: taken until refused (a refusal writes nothing; the TTL must still stand)
        for _ in range(45):
            if not limiter.try_acquire(identity, limits, cost=cost).allowed:
                break


async def _apply_async(
    limiter: AsyncRateLimiter, identity: str, limits: list[Limit], cost: int, op: str
) -> None:
    if op == "peek":
        await limiter.peek(identity, limits, cost=cost)
    elif op == "reset":
        await limiter.try_acquire(identity, limits, cost=cost)
        await limiter.reset(identity, limits)
    else:
        for _ in range(45 if op == "drain" else 1):
            if not (await limiter.try_acquire(identity, limits, cost=cost)).allowed:
                break


def _keys_without_ttl(target: Target, prefix: str) -> tuple[int, list[bytes]]:
    """How many keys under ``prefix`` exist, and those with no expiry (PTTL -1)."""
    total, persistent = 0, []
    for client in primaries(target):
        with client:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            total += len(keys)
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                pipe = client.pipeline(transaction=False)
                for key in chunk:
                    pipe.pttl(key)
                persistent += [k for k, ttl in zip(chunk, pipe.execute(), strict=True) if ttl == -1]
    return total, persistent


@pytest.mark.slow
def test_every_key_has_a_ttl_after_a_fuzz(target: Target) -> None:
    """10,000 random identities with random limits (one to three, named or not), costs, peeks,
    resets, acquires and drains, sync and async: afterwards no key lacks an expiry."""
    rng = random.Random(f"ttl-fuzz-{target.kind}-{target.flavour}")
    plan = _plan(rng, 10_000)
    prefix = "fz:"
    sync_part, async_part = plan[:7_500], plan[7_500:]
    with RateLimiter.from_url(target.url, prefix=prefix, timeout=5.0) as limiter:
        for identity, limits, cost, op in sync_part:
            _apply_sync(limiter, identity, limits, cost, op)

    async def main() -> None:
        limiter = AsyncRateLimiter.from_url(target.url, prefix=prefix, timeout=5.0)
        try:
            for start in range(0, len(async_part), 100):
                await asyncio.gather(
                    *(_apply_async(limiter, *step) for step in async_part[start : start + 100])
                )
        finally:
            await limiter.aclose()

    asyncio.run(main())
    total, persistent = _keys_without_ttl(target, prefix)
    assert total > 5_000  # most identities left a bucket behind (fast ones may have expired)
    assert persistent == []


def test_an_expired_bucket_reads_as_full(target: Target) -> None:
    """A bucket whose key expired, by its own TTL or early (as an eviction would remove it),
    is a full bucket: the next decisions see the whole burst."""
    fast, never = Limit(20, 4), Limit(NEVER, 4)  # 200 ms to refill; never refills
    fast_key = build_request("tl:", "expire-fast", fast).keys[0]
    never_key = build_request("tl:", "expire-never", never).keys[0]
    client = target.client()
    try:
        with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
            assert limiter.try_acquire("expire-fast", fast, cost=4).allowed
            assert 0 < client.pttl(fast_key) <= 200
            deadline = time.monotonic() + 5
            while client.exists(fast_key):  # gone once its time to refill has passed
                assert time.monotonic() < deadline
                time.sleep(0.02)
            full = limiter.peek("expire-fast", fast)
            assert (full.remaining, full.reset_after) == (4, 0.0)

            assert limiter.try_acquire("expire-never", never, cost=4).allowed
            assert not limiter.try_acquire("expire-never", never).allowed
            client.pexpire(never_key, 1)  # expired long before its time, like an eviction
            deadline = time.monotonic() + 5
            while client.exists(never_key):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        # A limiter with no memory of the refusal (this one may answer it locally until its
        # retry_after: tokens cannot appear early unless the server loses the bucket).
        with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
            assert limiter.peek("expire-never", never).remaining == 4
            again = limiter.try_acquire("expire-never", never)
            assert (again.allowed, again.remaining) == (True, 3)
    finally:
        client.close()


# -- a full server under noeviction -----------------------------------------------------------
@pytest.fixture(params=FLAVOURS)
def full_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A server of this test's own at its ``maxmemory`` under ``noeviction``: every write that
    needs memory is refused with OOM."""
    server = Server(available_binaries()[request.param]).start()
    try:
        with server.client() as admin:
            admin.config_set("maxmemory-policy", "noeviction")
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", used + 2 * 1024 * 1024)
            filler = b"x" * 4096
            for batch in range(10_000):
                pipe = admin.pipeline(transaction=False)
                for i in range(64):
                    pipe.set(f"fill:{batch}:{i}", filler)
                try:
                    pipe.execute()
                except redis.exceptions.OutOfMemoryError:
                    break
            else:
                raise AssertionError("the server never filled up")
            # Full, and then some: the memory freed after the fill (client buffers) must not
            # make room for the small writes of the test.
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", used - 1024 * 1024)
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                admin.set("one-more", b"x")
        yield server
    finally:
        server.stop()


def _decide_all(url: str, failure_mode: str, identity: str) -> dict[str, Decision | BackendError]:
    """A fresh bucket's first decision from each kind of limiter."""
    limit = Limit(NEVER, 5)
    out: dict[str, Decision | BackendError] = {}
    for kind in SYNC_KINDS:
        limiter, close = sync_limiter(kind, url, None, failure_mode=failure_mode)
        try:
            out[kind] = limiter.try_acquire(f"{identity}:{kind}", limit)
        except BackendError as error:
            out[kind] = error
        finally:
            close()

    async def main() -> None:
        for kind in ASYNC_KINDS:
            limiter, aclose = await async_limiter(kind, url, failure_mode=failure_mode)
            try:
                out[kind] = await limiter.try_acquire(f"{identity}:{kind}", limit)
            except BackendError as error:
                out[kind] = error
            finally:
                await aclose()

    asyncio.run(main())
    return out


def test_a_full_server_follows_the_failure_mode(full_server: Server) -> None:
    """At ``maxmemory`` under ``noeviction`` the script's write is refused with OOM: closed
    raises ``BackendError`` (reason ``"server"``, the OOM as its cause), open admits; neither
    ever answers a refusal. Reads still work, and once memory is freed decisions resume."""
    for kind, outcome in _decide_all(full_server.url, "closed", "oom").items():
        assert isinstance(outcome, BackendError), (kind, outcome)
        assert outcome.reason == "server"
        assert isinstance(outcome.__cause__, redis.exceptions.OutOfMemoryError), kind
    for kind, outcome in _decide_all(full_server.url, "open", "oom").items():
        assert isinstance(outcome, Decision), (kind, outcome)
        assert outcome.allowed, kind
    with RateLimiter.from_url(full_server.url, timeout=5.0) as limiter:
        assert limiter.peek("oom:peek", Limit(NEVER, 5)).remaining == 5  # a read needs no memory
    with full_server.client() as admin:
        admin.config_set("maxmemory", 0)
    for kind, outcome in _decide_all(full_server.url, "closed", "freed").items():
        assert isinstance(outcome, Decision), (kind, outcome)
        assert (outcome.allowed, outcome.remaining) == (True, 4), kind


# -- the eviction-policy warning --------------------------------------------------------------
MB = 1024 * 1024


@pytest.mark.parametrize(
    ("policy", "maxmemory", "warns"),
    [
        ("noeviction", 100 * MB, False),
        ("allkeys-lru", 100 * MB, True),
        ("allkeys-lfu", 100 * MB, True),
        ("allkeys-random", 100 * MB, True),
        ("volatile-lru", 100 * MB, True),  # our keys all have a TTL: volatile-* takes them too
        ("volatile-lfu", 100 * MB, True),
        ("volatile-random", 100 * MB, True),
        ("volatile-ttl", 100 * MB, True),
        ("allkeys-lru", 0, False),  # no maxmemory: nothing is ever evicted
        ("volatile-ttl", 0, False),
        ("some-future-policy", 1, True),  # unknown: it may evict, so say so
        ("", 100 * MB, False),  # a server that does not say: no guessing
    ],
)
def test_eviction_warning(policy: str, maxmemory: int, warns: bool) -> None:
    message = eviction_warning(
        {"maxmemory": str(maxmemory), "maxmemory_policy": policy}, "10.0.0.1:6379"
    )
    if not warns:
        assert message is None
        return
    assert message is not None
    assert "10.0.0.1:6379" in message
    assert repr(policy) in message
    assert "noeviction" in message


def test_eviction_warning_reads_info_text() -> None:
    info = (
        b"# Memory\r\nused_memory:1000000\r\nused_memory_human:976.56K\r\n"
        b"maxmemory:104857600\r\nmaxmemory_human:100.00M\r\nmaxmemory_policy:allkeys-lru\r\n"
    )
    fields = parse_info(info)
    assert fields["maxmemory"] == "104857600"
    assert fields["maxmemory_policy"] == "allkeys-lru"
    message = eviction_warning(fields, "s")
    assert message is not None
    assert "100mb" in message
    assert eviction_warning({"maxmemory": "nonsense", "maxmemory_policy": "allkeys-lru"}) is None
    assert eviction_warning({}) is None


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tokenlimit" and r.levelno == logging.WARNING and "maxmemory" in r.getMessage()
    ]


def _settle(caplog: pytest.LogCaptureFixture, words: str = "maxmemory") -> None:
    """Until a log line with ``words`` arrives (the check runs in the background), 5 s at most."""
    deadline = time.monotonic() + 5
    while not any(words in r.getMessage() for r in caplog.records):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _info_calls(admin: redis.Redis) -> int:
    return int(admin.info("commandstats").get("cmdstat_info", {}).get("calls", 0))


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_warns_once_when_the_server_can_evict_buckets(
    own_server: Server, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``allkeys-lru`` with a ``maxmemory``: one warning, at the first decision, however many
    decisions and limiters follow; and one ``INFO`` per limiter, never more."""
    caplog.set_level(logging.DEBUG, logger="tokenlimit")
    with own_server.client() as admin:
        admin.config_set("maxmemory", 256 * MB)
        admin.config_set("maxmemory-policy", "allkeys-lru")
        infos = _info_calls(admin)
        for _ in range(2):
            limiter, close = sync_limiter(kind, own_server.url, None)
            try:
                for i in range(5):
                    assert limiter.try_acquire(f"warn-{i}", Limit(NEVER, 5)).allowed
                _settle(caplog)
                time.sleep(0.1)  # the second limiter's check, which says nothing, ends too
            finally:
                close()
        assert _info_calls(admin) - infos - 1 == 2  # one per limiter (and ours just now)
    warned = _warnings(caplog)
    assert len(warned) == 1
    assert "allkeys-lru" in warned[0]
    assert f"127.0.0.1:{own_server.port}" in warned[0]


@pytest.mark.parametrize("kind", ASYNC_KINDS)
def test_async_limiters_warn_once_without_waiting_for_it(
    own_server: Server, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The async check runs in a task of its own, started by the first decision, which does
    not wait for it: the warning comes once, and one INFO per limiter."""
    caplog.set_level(logging.DEBUG, logger="tokenlimit")
    with own_server.client() as admin:
        admin.config_set("maxmemory", 256 * MB)
        admin.config_set("maxmemory-policy", "allkeys-lfu")

    def asked() -> int:
        """The checks made so far (each logs what the server said, at debug level)."""
        return sum("tokenlimit: asked" in r.getMessage() for r in caplog.records)

    async def main() -> None:
        for n in (1, 2):
            limiter, aclose = await async_limiter(kind, own_server.url)
            try:
                for i in range(5):
                    assert (await limiter.try_acquire(f"awarn-{i}", Limit(NEVER, 5))).allowed
                deadline = time.monotonic() + 5
                while asked() < n and time.monotonic() < deadline:  # the check, in its task
                    await asyncio.sleep(0.01)
            finally:
                await aclose()

    asyncio.run(main())
    assert asked() == 2  # one per limiter
    warned = _warnings(caplog)
    assert len(warned) == 1
    assert "allkeys-lfu" in warned[0]


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru"])
def test_no_warning_when_nothing_can_be_evicted(
    own_server: Server, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``noeviction``; or any policy without a ``maxmemory`` (the default): no warning."""
    caplog.set_level(logging.DEBUG, logger="tokenlimit")
    with own_server.client() as admin:
        admin.config_set("maxmemory-policy", policy)
        admin.config_set("maxmemory", 256 * MB if policy == "noeviction" else 0)
    with RateLimiter.from_url(own_server.url, timeout=5.0) as limiter:
        assert limiter.try_acquire("quiet", Limit(NEVER, 5)).allowed
    assert _warnings(caplog) == []
    assert any("tokenlimit: asked" in r.getMessage() for r in caplog.records)  # it did ask


def test_a_user_without_info_gets_decisions_and_no_warning(
    own_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user the server refuses INFO (NOPERM): decisions are unaffected, the check is
    dropped with a debug line, and nothing is retried."""
    caplog.set_level(logging.DEBUG, logger="tokenlimit")
    with own_server.client() as admin:
        admin.config_set("maxmemory", 256 * MB)
        admin.config_set("maxmemory-policy", "allkeys-lru")
        admin.execute_command(
            "ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "-info", "-config"
        )
    url = f"redis://limited:pw@127.0.0.1:{own_server.port}/0"
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        for i in range(3):
            assert limiter.try_acquire(f"noperm-{i}", Limit(NEVER, 5)).allowed
        _settle(caplog, "eviction policy")
    assert _warnings(caplog) == []
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("eviction policy" in m for m in debug) == 1


@pytest.mark.cluster
def test_warns_for_a_cluster_node(cluster: Target, caplog: pytest.LogCaptureFixture) -> None:
    """On a cluster the node that made the first decision is asked."""
    caplog.set_level(logging.WARNING, logger="tokenlimit")
    admins = primaries(cluster)
    try:
        for admin in admins:
            admin.config_set("maxmemory", 256 * MB)
            admin.config_set("maxmemory-policy", "volatile-ttl")
        for kind in SYNC_KINDS:
            limiter, close = sync_limiter(kind, cluster.url, cluster.host_ports())
            try:
                assert limiter.try_acquire(f"cluster-warn-{kind}", Limit(NEVER, 5)).allowed
                _settle(caplog)
            finally:
                close()
    finally:
        for admin in admins:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 0)
            admin.close()
    warned = _warnings(caplog)
    assert 1 <= len(warned) <= 2  # one per node asked: each kind may land on another node
    assert all("volatile-ttl" in m for m in warned)
