"""Async batching (``tokenlimit._redis.batch``): decisions made concurrently in one event loop share
one pipelined write, and each is still one atomic script call, run at most once, bounded by its
own deadline, answered with its own reply, whatever happens to the callers around it.

What the server ran is read from the server itself (``INFO commandstats``, on an admin client);
how many batches went out, from the backend's counters (``batch_counts``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
import redis.asyncio
from faultproxy import FaultProxy
from pools import in_use_after_linger

from servers import Server, free_port
from tokenlimit import AsyncRateLimiter, BackendError, Decision, Limit
from tokenlimit._redis.aio import AsyncRedisBackend
from tokenlimit._redis.batch import give_back
from tokenlimit._redis.resp import ReplyError, ReplyReader
from tokenlimit._request import build_request
from tokenlimit._scripts import acquire_script, peek_script

SLOW = 0.001  # tokens per second: nothing refills during a test
MARGIN = 0.25  # scheduling on a loaded 2-core machine


def commandstats(admin: redis.Redis) -> dict[str, tuple[int, int]]:
    """``{"evalsha": (calls, failed_calls), "eval": (...)}`` as the server counts them."""
    stats = admin.info("commandstats")
    out = {}
    for name in ("evalsha", "eval"):
        entry = stats.get(f"cmdstat_{name}", {})
        out[name] = (int(entry.get("calls", 0)), int(entry.get("failed_calls", 0)))
    return out


def calls_since(admin: redis.Redis, before: dict[str, tuple[int, int]]) -> dict[str, int]:
    now = commandstats(admin)
    return {
        "evalsha": now["evalsha"][0] - before["evalsha"][0],
        "evalsha failed": now["evalsha"][1] - before["evalsha"][1],
        "eval": now["eval"][0] - before["eval"][0],
    }


@pytest.fixture
def admin(standalone: Any) -> Iterator[redis.Redis]:
    """A sync client on the same server, for counting and for breaking things; the scripts
    are loaded, so the counts see no NOSCRIPT unless a test asks for one."""
    with redis.Redis.from_url(standalone.url) as client:
        client.script_load(acquire_script().body)
        client.script_load(peek_script().body)
        yield client


@asynccontextmanager
async def batched(url: str, **options: Any) -> AsyncIterator[AsyncRateLimiter]:
    """A limiter on a user's ``redis.asyncio.Redis``, so its backend is at hand."""
    client = redis.asyncio.Redis.from_url(url)
    options.setdefault("timeout", 5.0)
    # These tests count script calls per decision: the overrides read (one a second) is none.
    options.setdefault("overrides", False)
    try:
        limiter = AsyncRateLimiter(client, **options)
        assert isinstance(limiter.backend, AsyncRedisBackend)
        yield limiter
    finally:
        await client.aclose()


def backend(limiter: AsyncRateLimiter) -> AsyncRedisBackend:
    got = limiter.backend
    assert isinstance(got, AsyncRedisBackend)
    return got


def expect(decision: object, burst: int, remaining: int) -> None:
    """A reply that belongs to this call: its own limit, exactly the tokens it left."""
    assert isinstance(decision, Decision), decision
    assert decision.allowed
    assert (decision.limit, decision.remaining) == (burst, remaining)


async def own_replies(limiter: AsyncRateLimiter, tag: str, n: int = 40) -> None:
    """``n`` concurrent calls on fresh buckets with distinct bursts and costs: a reply meant
    for another call would show another caller's numbers."""
    limits = [Limit(SLOW, 200 + i) for i in range(n)]
    got = await asyncio.gather(
        *(limiter.try_acquire(f"{tag}:{i}", limits[i], cost=1 + i % 7) for i in range(n))
    )
    for i, decision in enumerate(got):
        expect(decision, 200 + i, 200 + i - (1 + i % 7))


# -- reading replies that arrive in pieces ---------------------------------------------------
STREAM = (
    b"*6\r\n:1722000000123456\r\n:1\r\n:1\r\n:99\r\n:0\r\n:10000\r\n"
    b"-NOSCRIPT No matching script.\r\n"
    b"*0\r\n"
    b":-7\r\n"
    b"+OK\r\n"
    b"*2\r\n:0\r\n:-1\r\n"
)
PARSED: list[object] = [[1722000000123456, 1, 1, 99, 0, 10000], "NOSCRIPT", [], -7, b"OK", [0, -1]]


def _plain(replies: list[object]) -> list[object]:
    return [r.args[0].split()[0] if isinstance(r, ReplyError) else r for r in replies]


@pytest.mark.parametrize("use_hiredis", [True, False])
def test_replies_split_anywhere_read_the_same(use_hiredis: bool) -> None:
    for cut in range(len(STREAM) + 1):
        for cut2 in (cut, min(len(STREAM), cut + 7)):
            reader = ReplyReader(use_hiredis=use_hiredis)
            got: list[object] = []
            for chunk in (STREAM[:cut], STREAM[cut:cut2], STREAM[cut2:]):
                got += reader.take(chunk, len(PARSED) - len(got))
            assert _plain(got) == PARSED, cut
            assert not reader.leftover()


@pytest.mark.parametrize("use_hiredis", [True, False])
def test_replies_of_kinds_never_asked_for_are_refused(use_hiredis: bool) -> None:
    for odd in (b"*2\r\n:1\r\n$1\r\nx\r\n", b">2\r\n$3\r\nabc\r\n:1\r\n", b"_\r\n", b"*-1\r\n"):
        with pytest.raises(redis.exceptions.InvalidResponse):
            ReplyReader(use_hiredis=use_hiredis).take(odd, 1)
    reader = ReplyReader(use_hiredis=use_hiredis)
    assert reader.take(b":1\r\n:2\r\n", 1) == [1]
    assert reader.leftover()  # the second reply was nobody's


# -- one write for many decisions, each exact -------------------------------------------------
def test_500_concurrent_on_one_key_admit_exactly_the_burst_in_few_batches(
    standalone: Any, admin: redis.Redis
) -> None:
    async def main() -> tuple[list[Decision], tuple[int, int]]:
        async with batched(standalone.url) as limiter:
            before = backend(limiter).batch_counts()
            got = await asyncio.gather(
                *(limiter.try_acquire("hot", Limit(SLOW, 100)) for _ in range(500))
            )
            after = backend(limiter).batch_counts()
            return got, (after[0] - before[0], after[1] - before[1])

    stats = commandstats(admin)
    decisions, (batches, commands) = asyncio.run(main())
    ran = calls_since(admin, stats)
    assert sum(d.allowed for d in decisions) == 100
    # Every admitted call saw a distinct count: no reply went to two callers.
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(100))
    assert all(d.retry_after > 0 for d in decisions if not d.allowed)
    # One script call per decision, on the server, and far fewer writes than decisions.
    assert ran == {"evalsha": 500, "evalsha failed": 0, "eval": 0}
    assert commands == 500
    assert batches <= 500 // 10
    print(f"[500 at once] {batches} batches")


def test_each_decision_runs_exactly_once(standalone: Any, admin: redis.Redis) -> None:
    """Waves of concurrent calls, sequential calls between them, several keys and costs: the
    server ran one script per call, and each bucket lost exactly what its calls took."""
    keys, burst = 10, 100_000
    limit = Limit(SLOW, burst)

    async def main() -> tuple[dict[int, int], int]:
        taken = dict.fromkeys(range(keys), 0)
        calls = 0
        async with batched(standalone.url) as limiter:
            for wave in range(6):
                size = 1 + wave * 97
                costs = [(i % keys, 1 + (i + wave) % 5) for i in range(size)]
                got = await asyncio.gather(
                    *(limiter.try_acquire(f"once:{k}", limit, cost=c) for k, c in costs)
                )
                assert all(d.allowed for d in got)
                for k, c in costs:
                    taken[k] += c
                calls += size
                await limiter.try_acquire("once:0", limit)  # one alone, in its own batch
                taken[0] += 1
                calls += 1
            left = {k: (await limiter.peek(f"once:{k}", limit)).remaining for k in range(keys)}
        return {k: burst - left[k] for k in range(keys)}, calls + keys

    stats = commandstats(admin)
    used, calls = asyncio.run(main())
    ran = calls_since(admin, stats)
    assert ran == {"evalsha": calls, "evalsha failed": 0, "eval": 0}
    wanted = dict.fromkeys(range(keys), 0)
    for wave in range(6):
        for i in range(1 + wave * 97):
            wanted[i % keys] += 1 + (i + wave) % 5
    wanted[0] += 6
    assert used == wanted


def test_a_batch_never_exceeds_its_cap(standalone: Any) -> None:
    from tokenlimit._redis.batch import MAX_BATCH

    n = MAX_BATCH * 3 + 5

    async def main() -> tuple[int, int]:
        async with batched(standalone.url) as limiter:
            got = await asyncio.gather(
                *(limiter.try_acquire(f"cap:{i % 3}", Limit(SLOW, 10_000)) for i in range(n))
            )
            assert all(d.allowed for d in got)
            return backend(limiter).batch_counts()

    batches, commands = asyncio.run(main())
    assert commands == n
    assert batches >= 4  # n / MAX_BATCH, rounded up


# -- cancellation -----------------------------------------------------------------------------
def test_cancelling_half_of_1000_callers_poisons_nothing(
    standalone: Any, admin: redis.Redis
) -> None:
    """1000 calls in flight on 20 buckets, every other one cancelled at a different point
    (before its batch is written, while it is on the wire, after its reply has come): the
    others get their own replies, every script ran at most once and took exactly its tokens,
    and every later call gets its own reply."""
    keys, burst = 20, 100_000
    limit = Limit(SLOW, burst)

    async def main() -> tuple[int, int, list[int]]:
        async with batched(standalone.url) as limiter:
            await limiter.try_acquire("warm", limit)
            tasks = [
                asyncio.ensure_future(limiter.try_acquire(f"half:{i % keys}", limit, cost=2))
                for i in range(1000)
            ]
            asked = 0
            for turn in range(12):  # every other call, cancelled over a few loop turns
                for i in range(1 + 2 * turn, 1000, 24):
                    asked += tasks[i].cancel()  # False: it had its reply already
                await asyncio.sleep(0)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            decided = sum(isinstance(r, Decision) for r in results)
            cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
            assert decided + cancelled == 1000, [r for r in results if isinstance(r, Exception)]
            assert cancelled == asked
            assert asked > 250  # most were cancelled in flight
            await own_replies(limiter, "after")
            left = [(await limiter.peek(f"half:{k}", limit)).remaining for k in range(keys)]
            return decided, cancelled, left

    stats = commandstats(admin)
    decided, cancelled, left = asyncio.run(main())
    ran = calls_since(admin, stats)
    assert ran["evalsha failed"] == 0
    half_scripts = ran["evalsha"] - 1 - 40 - 20  # minus warm-up, own_replies and peeks
    assert decided <= half_scripts <= 1000  # cancelled calls ran at most once, or not at all
    assert sum(burst - r for r in left) == 2 * half_scripts  # each took its two tokens once
    print(f"[cancel half] decided {decided}, cancelled {cancelled}, ran {half_scripts}")


def test_a_caller_timing_out_leaves_the_others_their_replies(standalone: Any) -> None:
    """Two limiters on one backend, one with a deadline too short to be met: its calls fail
    with "timeout", the others in the same batches get their own replies."""

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(standalone.url)
        try:
            patient = AsyncRateLimiter(client, timeout=5.0)
            hasty = AsyncRateLimiter(client, timeout=1e-6, breaker=False)  # every call tried
            hasty.backend = patient.backend  # one backend, so one batcher for both
            for round_ in range(5):
                limits = [Limit(SLOW, 300 + i) for i in range(30)]
                calls = []
                for i in range(30):
                    calls.append(patient.try_acquire(f"p{round_}:{i}", limits[i], cost=1 + i % 3))
                    calls.append(hasty.try_acquire(f"h{round_}:{i}", Limit(SLOW, 5)))
                got = await asyncio.gather(*calls, return_exceptions=True)
                for i in range(30):
                    expect(got[2 * i], 300 + i, 300 + i - (1 + i % 3))
                    late = got[2 * i + 1]
                    assert isinstance(late, BackendError), late
                    assert late.reason == "timeout"
            await own_replies(patient, "after")
        finally:
            await client.aclose()

    asyncio.run(main())


# -- the script cache and error replies -------------------------------------------------------
def test_noscript_in_the_middle_of_a_batch(standalone: Any, admin: redis.Redis) -> None:
    """The script cache emptied, then only the peek script loaded again: in one batch of
    peeks and takes, the takes get NOSCRIPT (they did not run), go again as EVAL, and every
    call gets its own reply."""
    limit = Limit(SLOW, 1000)

    async def main() -> None:
        async with batched(standalone.url) as limiter:
            await limiter.try_acquire("ns:0", limit)
            for _ in range(3):
                admin.script_flush()
                admin.script_load(peek_script().body)
                n = 60
                got = await asyncio.gather(
                    *(
                        limiter.try_acquire(f"ns:{i % 6}", limit, cost=1)
                        if i % 2
                        else limiter.peek(f"ns:{i % 6}", limit)
                        for i in range(n)
                    )
                )
                assert all(isinstance(d, Decision) and d.allowed for d in got)
                # The takes on each key saw distinct counts: each ran once, with its own reply.
                for k in range(6):
                    seen = [d.remaining for i, d in enumerate(got) if i % 2 and i % 6 == k]
                    assert len(set(seen)) == len(seen)
            left = [(await limiter.peek(f"ns:{k}", limit)).remaining for k in range(6)]
            # ns:0's first call, then 30 takes per round over the odd keys (10 each).
            taken = [1000 - r for r in left]
            assert taken == [1, 30, 0, 30, 0, 30]
            await own_replies(limiter, "after")

    stats = commandstats(admin)
    asyncio.run(main())
    ran = calls_since(admin, stats)
    assert ran["eval"] >= 3  # at least one EVAL per round: the takes that met NOSCRIPT


def test_leases_refunds_and_holds_share_the_batches(standalone: Any, admin: redis.Redis) -> None:
    """A lease refill, a refund and a hold-back are script calls like a decision: they go in
    the loop's batches (one write with the decisions around them), each run once, and one
    that meets NOSCRIPT (the lease script is not loaded) goes again as EVAL."""
    leased = Limit(SLOW, 1000, lease=64)
    plain = Limit(SLOW, 1000)

    async def main() -> tuple[int, int, int]:
        async with batched(standalone.url) as limiter:
            before = backend(limiter).batch_counts()
            admitted = 0
            for _ in range(40):  # a lease that grows: 1, 2, 4 ... tokens per refill
                got = await asyncio.gather(
                    limiter.try_acquire("share:leased", leased),
                    limiter.try_acquire("share:plain", plain),
                )
                assert all(d.allowed for d in got)
                admitted += 1
            await asyncio.gather(
                limiter.refund("share:plain", plain, cost=5),
                limiter.hold_back("share:plain", plain, 0.001),
                limiter.try_acquire("share:plain", plain),
            )
            held = limiter._leases.held() if limiter._leases is not None else 0
            assert held > 0  # tokens are held: closing gives them back, in a batch too
            await limiter._settler.aclose()  # type: ignore[union-attr]
            after = backend(limiter).batch_counts()
            left = (await limiter.peek("share:leased", leased)).remaining
        return after[1] - before[1], 1000 - left, admitted

    stats = commandstats(admin)
    commands, used, admitted = asyncio.run(main())
    ran = calls_since(admin, stats)
    # Every script call the server saw went in a batch (and the peek after the count).
    assert ran["evalsha"] + ran["eval"] == commands + 1
    # The lease, refund and hold-back scripts were not loaded: each met NOSCRIPT once and
    # went again as EVAL.
    assert ran["evalsha failed"] == ran["eval"] == 3
    # The leased bucket lost exactly what was admitted from it: the rest came back.
    assert used == admitted


def test_an_error_reply_fails_only_its_own_decision(standalone: Any, admin: redis.Redis) -> None:
    """A corrupt bucket makes the script answer an error: in the same batch, only that call
    fails (reason "server"), and the others get their own replies."""
    limit = Limit(SLOW, 500)
    corrupt = build_request("tl:", "corrupt", limit).keys[0]

    async def main() -> None:
        async with batched(standalone.url) as limiter:
            await limiter.try_acquire("corrupt", limit)
            admin.set(corrupt, b"not a bucket")
            for round_ in range(3):
                calls = [
                    limiter.try_acquire("corrupt", limit)
                    if i % 10 == 5
                    else limiter.try_acquire(f"fine{round_}:{i}", Limit(SLOW, 100 + i), cost=2)
                    for i in range(50)
                ]
                got = await asyncio.gather(*calls, return_exceptions=True)
                for i, result in enumerate(got):
                    if i % 10 == 5:
                        assert isinstance(result, BackendError), result
                        assert result.reason == "server"
                        assert "corrupt" in str(result)
                    else:
                        expect(result, 100 + i, 100 + i - 2)
            assert admin.get(corrupt) == b"not a bucket"  # an error reply touched nothing
            await own_replies(limiter, "after")

    asyncio.run(main())


# -- a server that stops answering ------------------------------------------------------------
def test_a_silent_server_fails_every_caller_by_its_deadline(standalone: Any) -> None:
    """A blackholed connection: every caller of the batch gets BackendError ("timeout")
    within its deadline, and that connection is closed, never reused (it would stay silent:
    the calls after the heal would time out too).

    The calls before the fault and after the heal go through a second limiter on the same
    client, hence the same pool, with a deadline long enough for connecting and loading the
    script on a loaded machine (50 ms was not, twice in CI): a silent connection left in the
    pool would still fail them, whatever their deadline."""
    timeout = 0.05
    host, port = standalone.host_ports()[0]

    async def main(proxy: FaultProxy) -> list[float]:
        client = redis.asyncio.Redis(host=proxy.host, port=proxy.port)
        latencies: list[float] = []
        try:
            # The breaker off: every caller of every batch meets the silent connection.
            limiter = AsyncRateLimiter(client, timeout=timeout, breaker=False)
            patient = AsyncRateLimiter(client, timeout=5.0)
            await own_replies(patient, "before")
            check = backend(patient)._check  # its one server check: done before the fault
            if check is not None:
                await check

            async def timed(i: int) -> tuple[float, object]:
                started = time.monotonic()
                try:
                    result: object = await limiter.try_acquire(f"mute:{i}", Limit(SLOW, 9))
                except BackendError as error:
                    result = error
                return time.monotonic() - started, result

            proxy.blackhole()
            for _ in range(3):
                for elapsed, result in await asyncio.gather(*(timed(i) for i in range(50))):
                    assert isinstance(result, BackendError), result
                    assert result.reason == "timeout"
                    latencies.append(elapsed)
            proxy.heal()
            for round_ in range(3):
                await own_replies(patient, f"healed{round_}")
            # The overrides reads those decisions started (off their time) end too.
            reads = [lim._overrides._tasks for lim in (limiter, patient) if lim._overrides]
            await asyncio.gather(*(task for tasks in reads for task in list(tasks)))
            pool = client.connection_pool
            assert await in_use_after_linger(pool) == 0  # every connection went back
        finally:
            await client.aclose()
        return latencies

    with FaultProxy(port, host) as proxy:
        latencies = asyncio.run(main(proxy))
    assert max(latencies) < timeout + MARGIN, max(latencies)


def test_aclose_fails_what_is_in_flight_and_leaves_no_task_behind(
    standalone: Any, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = standalone.host_ports()[0]

    async def main(proxy: FaultProxy) -> list[object]:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        limiter = AsyncRateLimiter.from_url(proxy.url, timeout=5.0)
        await limiter.try_acquire("closing", Limit(SLOW, 100))
        proxy.blackhole()
        calls = [
            asyncio.ensure_future(limiter.try_acquire("closing", Limit(SLOW, 100)))
            for _ in range(20)
        ]
        await asyncio.sleep(0.05)  # written, never answered
        started = time.monotonic()
        await limiter.aclose()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert time.monotonic() - started < 1.0
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []  # no lane left running
        gc.collect()
        await asyncio.sleep(0)
        assert errors == []
        return results

    with caplog.at_level(logging.ERROR, logger="asyncio"), FaultProxy(port, host) as proxy:
        results = asyncio.run(main(proxy))
    assert all(isinstance(r, BackendError) and r.reason == "connection" for r in results), results
    assert "never retrieved" not in caplog.text


# -- clients of every kind ----------------------------------------------------------------------
CLIENTS = {
    "resp3": {"protocol": 3},
    "decode_responses": {"decode_responses": True},
    "pool of one": {"max_connections": 1},
    "python parser": {},
}


@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_clients_of_every_kind(standalone: Any, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches read their replies off the socket themselves: whatever the client's protocol,
    decoding, pool size or parser, every caller gets its own reply."""
    if kind == "python parser":
        monkeypatch.setattr("tokenlimit._redis.resp._HIREDIS", False)
    options = dict(CLIENTS[kind])

    async def main() -> None:
        if options.pop("max_connections", None):
            pool = redis.asyncio.BlockingConnectionPool.from_url(standalone.url, max_connections=1)
            client = redis.asyncio.Redis(connection_pool=pool)
        else:
            pool = None
            client = redis.asyncio.Redis.from_url(standalone.url, **options)
        try:
            limiter = AsyncRateLimiter(client, timeout=5.0)
            for round_ in range(3):
                await own_replies(limiter, f"{kind}:{round_}", n=300)
            assert await client.ping()  # and the client still serves its user
        finally:
            await client.aclose()
            if pool is not None:
                await pool.disconnect()

    asyncio.run(main())


# -- lingering lanes -------------------------------------------------------------------------
def test_a_lane_keeps_its_connection_for_decisions_that_follow_closely(
    standalone: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decisions a few milliseconds apart (a web app's requests) go out on the lane still
    lingering after the previous one: no pool checkout for any of them, each its own batch.
    The linger is stretched here so that a loaded machine cannot break the chain; the lane
    still gives its connection back once no decision comes."""
    monkeypatch.setattr("tokenlimit._redis.batch._LINGER", 0.5)

    async def main() -> None:
        async with batched(standalone.url) as limiter:
            pool = limiter.backend.client.connection_pool  # type: ignore[attr-defined]
            taken = 0
            get_connection = pool.get_connection

            async def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal taken
                taken += 1
                return await get_connection(*args, **kwargs)

            pool.get_connection = counted
            await limiter.try_acquire("close:first", Limit(SLOW, 5))  # loads the script
            check = backend(limiter)._check  # the one server check takes a connection too
            if check is not None:
                await check
            taken = 0
            before = backend(limiter).batch_counts()
            for i in range(20):
                expect(await limiter.try_acquire(f"close:{i}", Limit(SLOW, 5)), 5, 4)
                await asyncio.sleep(0.002)
            flushes, commands = backend(limiter).batch_counts()
            assert (flushes - before[0], commands - before[1]) == (20, 20)
            assert taken == 0  # the lane that sent the first kept its connection
            assert await in_use_after_linger(pool, within=5.0) == 0

    asyncio.run(main())


def _client_ids(server: Server) -> set[int]:
    with server.client(socket_timeout=5) as admin:
        return {int(entry["id"]) for entry in admin.client_list()}


def test_readonly_retires_the_connections_in_use_elsewhere(own_server: Server) -> None:
    """A server turned replica answers READONLY on every connection to it. The lane that gets
    it closes its own and the pool's idle ones; a connection in use elsewhere at that moment
    (a lingering lane's, the background server check's) is closed before its next use, and
    when one of our paths gives it back, so none carries another call to the replica."""
    primary = own_server
    limit = Limit(SLOW, 5)

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(primary.url)
        pool = client.connection_pool
        try:
            # Overrides off: no read borrows the connections this test follows.
            limiter = AsyncRateLimiter(client, timeout=5.0, overrides=False)
            expect(await limiter.try_acquire("before", limit), 5, 4)
            elsewhere = [await pool.get_connection() for _ in range(2)]  # in use by others
            ids = []
            for conn in elsewhere:
                await conn.send_command("CLIENT", "ID")
                ids.append(int(await conn.read_response()))
            with primary.client(socket_timeout=5) as admin:
                admin.replicaof("127.0.0.1", free_port())  # demoted: READONLY from now on
            with pytest.raises(BackendError) as info:
                await limiter.try_acquire("demoted", limit)
            assert isinstance(info.value.__cause__, redis.ReadOnlyError)
            with primary.client(socket_timeout=5) as admin:
                admin.replicaof("NO", "ONE")

            # One given back by redis-py (unchecked), then taken by the next decision: closed
            # before that decision and connected anew. The other given back by our own path:
            # closed at once.
            await pool.release(elsewhere[0])
            expect(await limiter.try_acquire("after", limit), 5, 4)
            await give_back(pool, elsewhere[1], clean=True)
            assert not elsewhere[1].is_connected
            assert not set(ids) & await asyncio.to_thread(_client_ids, primary)
            assert await client.ping()
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_lane_stopped_with_a_batch_on_the_wire_closes_its_connection(standalone: Any) -> None:
    """``aclose()`` in the same loop turn as a decision handed to a lingering lane (written at
    once, replies not read yet): the decision fails, and its connection is closed, never given
    back to the pool with the script's reply still to come (the client's next call would read
    it as its own)."""

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(standalone.url)
        try:
            await client.set("plain", "value")
            limiter = AsyncRateLimiter(client, timeout=5.0)
            for i in range(2):  # the second leaves its lane lingering, its connection held
                await limiter.try_acquire(f"warm:{i}", Limit(SLOW, 5))
            decided = asyncio.ensure_future(limiter.try_acquire("cut", Limit(SLOW, 5)))
            closed = asyncio.ensure_future(limiter.aclose())
            await closed
            with pytest.raises(BackendError):
                await decided
            await asyncio.sleep(0.05)  # the reply has come by now, if it was sent
            # No connection in the pool holds a reply nobody asked it for. (redis-py's own
            # check on checkout often throws such a connection away, but not always: not with
            # maintenance notifications on, for one.)
            pool = client.connection_pool
            for conn in pool._available_connections:
                can_read = getattr(conn, "can_read", None) or conn.can_read_destructive  # < 8.0
                assert not (conn.is_connected and await can_read())
            assert await client.get("plain") == b"value"
        finally:
            await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("size", [1, 2])
def test_a_stream_of_decisions_on_a_small_blocking_pool_never_starves(
    standalone: Any, size: int
) -> None:
    """Decisions a millisecond or two apart from 8 tasks, on a ``BlockingConnectionPool`` of one
    or two: a lane waiting for a connection is never kept waiting by another that lingers
    (which would take every new batch while the stream lasts, and the waiting lane's callers
    would reach their deadline with the server idle)."""
    rng = random.Random(size)

    async def main() -> list[object]:
        pool = redis.asyncio.BlockingConnectionPool.from_url(standalone.url, max_connections=size)
        client = redis.asyncio.Redis(connection_pool=pool)
        failed: list[object] = []
        end = time.monotonic() + 1.5
        try:
            limiter = AsyncRateLimiter(client, timeout=0.5)

            async def work(task: int) -> None:
                i = 0
                while time.monotonic() < end:
                    try:
                        await limiter.try_acquire(f"stream:{size}:{task}:{i}", Limit(SLOW, 5))
                    except BackendError as error:
                        failed.append(error)
                    i += 1
                    await asyncio.sleep(rng.uniform(0, 0.003))

            await asyncio.gather(*(work(task) for task in range(8)))
            assert await in_use_after_linger(pool) == 0
        finally:
            await client.aclose()
            await pool.disconnect()
        return failed

    assert asyncio.run(main()) == []


@pytest.mark.parametrize("size", [1, 2])
def test_a_small_plain_pool_stays_free_for_the_clients_other_calls(
    standalone: Any, size: int
) -> None:
    """On a plain ``ConnectionPool(max_connections=1 or 2)``, which raises when it has nothing
    to lend, as many of the client's own calls as the pool holds, made at once right after a
    decision, all get a connection: a lane does not linger on a pool with none to spare."""

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(standalone.url, max_connections=size)
        try:
            limiter = AsyncRateLimiter(client, timeout=5.0)
            await limiter.try_acquire("small:first", Limit(SLOW, 5))
            check = backend(limiter)._check  # the one server check takes a connection too
            if check is not None:
                await check
            # So does the overrides read the first decision started (one a second, off the
            # decisions' time): let it finish, as the check.
            live = limiter._overrides
            assert live is not None
            await asyncio.gather(*live._tasks)
            for i in range(30):
                await limiter.try_acquire(f"small:{i}", Limit(SLOW, 5))
                await asyncio.sleep(0.001)
                calls = (client.set(f"mine:{n}", i) for n in range(size))
                assert await asyncio.gather(*calls) == [True] * size
        finally:
            await client.aclose()

    asyncio.run(main())


def test_aclose_answers_a_decision_whose_lane_has_not_started(standalone: Any) -> None:
    """``aclose()`` right after a batch was handed to a new lane, before the lane's first step:
    its caller is told the limiter was closed at once, not timed out at its deadline."""

    async def main() -> None:
        async with batched(standalone.url, timeout=30.0) as limiter:
            decided = asyncio.ensure_future(limiter.try_acquire("early", Limit(SLOW, 5)))
            for _ in range(2):  # the decision is submitted, then flushed to a new lane
                await asyncio.sleep(0)
            await limiter.aclose()
            with pytest.raises(BackendError) as info:
                await asyncio.wait_for(decided, 5.0)
            assert info.value.reason == "connection"
            assert "closed" in str(info.value.__cause__)

    asyncio.run(main())
