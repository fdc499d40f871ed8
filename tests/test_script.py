"""The shipped Lua script against real servers (Valkey and Redis, standalone and cluster).

The script must agree with the reference model integer for integer in its reply and byte for
byte in what it stores (one decimal integer per bucket: the TAT in ns), use the server's clock,
refuse bad arguments and corrupt state without touching anything, give every key a TTL, keep
keys injective, short and slot-local, and survive a flushed script cache.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from conftest import Target
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster
from redis.crc import key_slot

import tokenlimit
from tokenlimit import AsyncRateLimiter, Limit, RateLimiter
from tokenlimit._model import SLACK, decide
from tokenlimit._request import Request, build_request
from tokenlimit._scripts import Script, acquire_script, peek_script

PREFIX = "tl:"
_ids = itertools.count()


def fresh_id(label: str = "id") -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}-{next(_ids)}"


@pytest.fixture
def sync_limiter(target: Target) -> Iterator[RateLimiter]:
    lim = RateLimiter.from_url(target.url, timeout=5.0)
    yield lim
    lim.close()


def model_reply(
    states: list[int | None], request: Request, now: int, *, consume: bool
) -> tuple[list[int], list[int | None]]:
    """What the model answers, in the script's reply layout, and the states afterwards."""
    out = decide(states, request.params, request.cost, now, consume=consume)
    reply = [out.now, int(out.allowed)]
    for r in out.results:
        reply += [int(r.allowed), r.remaining, r.retry_us, r.reset_us]
    return reply, (list(out.new_states) if out.new_states is not None else states)


def node_client(client: redis.Redis | RedisCluster, key: str) -> redis.Redis:
    """The plain client of the server that owns ``key``."""
    if isinstance(client, RedisCluster):
        return client.get_redis_connection(client.get_node_from_key(key))
    return client


def primaries(client: redis.Redis | RedisCluster) -> list[redis.Redis]:
    if isinstance(client, RedisCluster):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def all_keys(client: redis.Redis | RedisCluster) -> list[bytes]:
    return [k for node in primaries(client) for k in node.scan_iter(count=1000)]


def server_ns(node: redis.Redis) -> int:
    """The server's ``TIME`` in ns (it has µs)."""
    seconds, micros = node.time()
    return (seconds * 1_000_000 + micros) * 1000


def assert_stored(node: redis.Redis, keys: tuple[str, ...], states: list[int | None]) -> None:
    """Byte for byte, each key holds ``str(TAT)`` as the model has it: nothing where the model
    has nothing, and nothing once its TTL ran out (only after its TAT: the bucket is full)."""
    for key, tat in zip(keys, states, strict=True):
        raw = node.get(key)
        if tat is None:
            assert raw is None, key
        elif raw is None:  # expired; the TTL is the time until full, rounded up to the ms
            assert tat <= server_ns(node) + 1_000_000, (key, tat)
        else:
            assert raw == str(tat).encode(), (key, raw, tat)


def frozen(script: Script, now_us: int) -> bytes:
    """The script with the server's ``TIME`` pinned to ``now_us``: the same arithmetic on the
    real server, at a chosen instant, so boundaries and clock steps are exact to the ns. (A
    local ``redis`` shadows the global for the whole chunk; TTLs still run in real time.)"""
    seconds, micros = divmod(now_us, 1_000_000)
    return (
        b"local tl_server = redis\n"
        b"local redis = setmetatable({call = function(cmd, ...)\n"
        + f"    if cmd == 'TIME' then return {{'{seconds}', '{micros}'}} end\n".encode()
        + b"    return tl_server.call(cmd, ...)\nend}, {__index = tl_server})\n"
        + script.body
    )


def is_valkey(node: redis.Redis) -> bool:
    return node.info("server").get("server_name") == "valkey"


# -- the script agrees with the model, integer for integer ----------------------------------------

fast_limits = st.builds(
    Limit,
    st.one_of(st.integers(1000, 20000), st.floats(1000.0, 20000.0)),
    st.integers(1, 10),
)
slow_limits = st.builds(
    Limit, st.one_of(st.integers(1, 50), st.floats(0.5, 50.0)), st.integers(1, 10)
)
limit_sets = st.lists(st.one_of(fast_limits, slow_limits), min_size=1, max_size=2)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.integers(1, 10)),
        st.tuples(st.just("peek"), st.integers(1, 10)),
        st.tuples(st.just("reset"), st.just(0)),
        st.tuples(st.just("sleep"), st.integers(0, 3)),
    ),
    min_size=1,
    max_size=30,
)


def test_script_matches_model(target: Target, sync_limiter: RateLimiter) -> None:
    backend = sync_limiter.backend
    checked = {"replies": 0, "refused": 0, "admitted": 0}
    client = target.client()

    @settings(
        max_examples=50,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(limits=limit_sets, ops=operations)
    def run(limits: list[Limit], ops: list[tuple[str, int]]) -> None:
        key = fresh_id("model")
        smallest = min(lim.burst for lim in limits)
        keys = build_request(PREFIX, key, limits).keys
        node = node_client(client, keys[0])
        states: list[int | None] = [None] * len(keys)
        last_now = 0
        for op, arg in ops:
            if op == "sleep":
                time.sleep(arg / 1000)
                continue
            if op == "reset":
                sync_limiter.reset(key, limits)
                states = [None] * len(states)
                continue
            consume = op == "take"
            request = build_request(PREFIX, key, limits, min(arg, smallest))
            reply = list(backend.decide(request, consume=consume, timeout=5.0))
            assert all(type(x) is int for x in reply)
            now = reply[0]
            assert now >= last_now  # the server's clock, in µs
            last_now = now
            expected, states = model_reply(states, request, now, consume=consume)
            assert reply == expected, (op, request.args, states)
            assert_stored(node, keys, states)
            checked["replies"] += 1
            checked["admitted" if reply[1] else "refused"] += 1

    try:
        run()
    finally:
        client.close()
    # the sequences really exercised both answers
    assert checked["admitted"] > 0
    assert checked["refused"] > 0


# (debt ns, cost, consume) -> (allowed, remaining, retry_us, reset_us, TAT - now written or None);
# Limit(1, 5): 1e9 ns per token, burst 5, so the slack is 1000 ns: each row sits on a boundary.
BOUNDARIES = [
    ((4_000_000_000, 1, True), (1, 0, 0, 5_000_000, 5_000_000_000)),
    ((4_000_000_999, 1, True), (1, 0, 0, 5_000_001, 5_000_000_999)),  # inside the slack
    ((4_000_001_000, 1, True), (1, 0, 0, 5_000_001, 5_000_001_000)),  # the whole slack
    ((4_000_001_001, 1, True), (0, 0, 2, 4_000_002, None)),  # 1 ns past it: wait 1001 ns
    ((4_999_999_000, 1, True), (0, 0, 999_999, 4_999_999, None)),
    ((5_001_000_000, 1, True), (0, 0, 1_001_000, 5_001_000, None)),  # a clock step back
    ((0, 5, True), (1, 0, 0, 5_000_000, 5_000_000_000)),
    ((1_001, 5, True), (0, 4, 2, 2, None)),
    ((7, 1, False), (1, 5, 0, 1, None)),  # 4.999999993 tokens count as 5
    ((1_000_000_500, 1, False), (1, 4, 0, 1_000_001, None)),  # 3.9999995 count as 4
    ((1_000_002_000, 1, False), (1, 3, 0, 1_000_002, None)),
    ((2_500_000_000, 3, False), (0, 2, 500_000, 2_500_000, None)),
]


@pytest.mark.parametrize("micros", [0, 999_999])  # 999_999: every TAT carries into the second
@pytest.mark.parametrize(("given_", "expected"), BOUNDARIES)
def test_script_boundaries_at_a_pinned_time(
    target: Target,
    given_: tuple[int, int, bool],
    expected: tuple[int, int, int, int, int | None],
    micros: int,
) -> None:
    """With the server's TIME pinned, a state's debt is exact: the script's rounding and slack
    are checked to the ns, and what it stores to the byte."""
    debt, cost, consume = given_
    request = build_request(PREFIX, fresh_id("frozen"), Limit(1, 5), cost)
    (key,) = request.keys
    script = acquire_script() if consume else peek_script()
    client = target.client()
    try:
        node = node_client(client, key)
        seconds, _ = node.time()
        now = seconds * 1_000_000 + micros
        tat = now * 1000 + debt
        node.set(key, str(tat), px=3_600_000)
        reply = node.eval(frozen(script, now), 1, key, *request.args)
        assert reply == [now, expected[0], expected[0], *expected[1:4]]
        model, states = model_reply([tat], request, now, consume=consume)
        assert reply == model
        written = expected[4]
        if written is None:
            assert states == [tat]
            assert node.get(key) == str(tat).encode()
            assert 3_000_000 < node.pttl(key) <= 3_600_000
        else:
            assert states == [now * 1000 + written]
            assert node.get(key) == str(now * 1000 + written).encode()
            assert 0 < node.pttl(key) <= math.ceil(written / 1_000_000)
    finally:
        client.close()


def test_script_clock_step_back_matches_model(target: Target) -> None:
    """A backward step adds no tokens: the bucket looks emptier by the step, the refusal names
    the same moment; forward again, the answers are as before. Script and model alike."""
    lim = Limit(1, 5)  # 1 s per token: every TTL written outlasts the test
    request = build_request(PREFIX, fresh_id("back"), lim, 1)
    (key,) = request.keys
    client = target.client()
    try:
        node = node_client(client, key)
        t0 = server_ns(node) // 1000
        states: list[int | None] = [None]

        def call(offset: int, consume: bool) -> list[int]:
            nonlocal states
            script = acquire_script() if consume else peek_script()
            reply = node.eval(frozen(script, t0 + offset), 1, key, *request.args)
            expected, states = model_reply(states, request, t0 + offset, consume=consume)
            assert reply == expected, (offset, consume)
            assert_stored(node, request.keys, states)
            return reply

        for _ in range(5):
            assert call(0, True)[1] == 1
        assert states == [t0 * 1000 + 5 * 10**9]
        for back in (1, 1000, 10**6, 3600 * 10**6):
            # empty, and `back` µs emptier: the next token is still due at t0 + 1 s
            assert call(-back, True)[2:] == [0, 0, 10**6 + back, 5 * 10**6 + back]
        assert call(10**6 - 2, True)[1] == 0  # 2000 ns short
        assert call(10**6 - 1, True)[1] == 1  # 1000 ns short: within the slack
        for offset in (-1, -(10**6), 2 * 10**6, 2 * 10**6 + 1, -(5 * 10**6), 3 * 10**6):
            for consume in (False, True):
                call(offset, consume)
        assert states[0] is not None
        assert states[0] >= (t0 + 3 * 10**6) * 1000  # the TAT never moved back
    finally:
        client.close()


def test_script_matches_model_fixed_sequence(target: Target, sync_limiter: RateLimiter) -> None:
    """A deterministic run: burst, refusal with exact wait, refill, reset."""
    backend = sync_limiter.backend
    key = fresh_id("fixed")
    limits = [Limit(4000, 3), Limit(2, 2)]  # 250 µs per token; 0.5 s per token
    states: list[int | None] = [None, None]
    verdicts = []
    client = target.client()
    try:
        node = node_client(client, build_request(PREFIX, key, limits).keys[0])
        for cost, consume in [(1, True), (1, False), (1, True), (1, True), (2, False), (1, True)]:
            request = build_request(PREFIX, key, limits, cost)
            reply = list(backend.decide(request, consume=consume, timeout=5.0))
            expected, states = model_reply(states, request, reply[0], consume=consume)
            assert reply == expected
            assert_stored(node, request.keys, states)
            verdicts.append(reply[1])
        assert verdicts == [1, 1, 1, 0, 0, 0]
        sync_limiter.reset(key, limits)
        request = build_request(PREFIX, key, limits, 2)
        reply = list(backend.decide(request, consume=True, timeout=5.0))
        expected, states = model_reply([None, None], request, reply[0], consume=True)
        assert reply == expected
        assert reply[1:] == [1, 1, 1, 0, 500, 1, 0, 0, 1_000_000]
        assert states == [reply[0] * 1000 + 500_000, reply[0] * 1000 + 10**9]
        assert_stored(node, request.keys, states)
    finally:
        client.close()


EXTREME_LIMITS = [
    (1e9, 1),  # the fastest rate: 1 ns per token
    (1e9, 10**9),  # ... with the largest burst
    (999_999_999.9, 3),  # just under 1 ns per token: rounded up to 2
    (1.1102230246251567e-07, 1),  # the slowest rate: 2^53 - 1 ns per token (~104 days)
    (1.2e-07, 2),  # a fill time past 2^53 ns: sums round, alike on both sides
    (0.001, 10**9),  # the longest fill time Limit allows (1e12 s): a 22-digit TAT
    (3, 5),  # 333_333_334 ns per token: not a whole number of µs
    (1e6, 10**6),
    (1e12, 1),  # refused up front: faster than one token per ns
    (1.7e308, 5),
    (1e-9, 1),  # 1e18 ns per token: past 2^53, a whole number a double holds
    (1 / 31_104_000, 1),  # "1/year": rounded up to a whole number a double holds
    (1 / 31_104_000, 3),
    (1e-12, 1),  # the slowest rate: one token per 1e12 s
    (1e-13, 1),  # refused up front: slower than one token per 1e12 s
    (1e7, 2**53),  # refused up front: burst
]


@pytest.mark.parametrize(("rate", "burst"), EXTREME_LIMITS)
def test_script_accepts_every_limit_python_accepts(target: Target, rate: float, burst: int) -> None:
    """Python validates first and the script again: whatever ``Limit`` accepts, the script
    must decide (not answer an error reply), exactly as the model does, and store the same."""
    try:
        lim = Limit(rate, burst)
    except tokenlimit.ConfigError:
        return  # refused up front, naming the parameter: consistent too
    client = target.client()
    try:
        with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
            # a few small takes, then one bucket emptied at once and refused after
            for label, costs in (("small", (1, 1, min(lim.burst, 3))), ("all", (lim.burst, 1))):
                key = fresh_id(f"extreme-{label}")
                states: list[int | None] = [None]
                for cost in costs:
                    request = build_request(PREFIX, key, lim, cost)
                    reply = list(limiter.backend.decide(request, consume=True, timeout=5.0))
                    expected, states = model_reply(states, request, reply[0], consume=True)
                    assert reply == expected
                    assert_stored(node_client(client, request.keys[0]), request.keys, states)
                    if label == "small":
                        assert reply[1] == 1 or lim.burst < 5
    finally:
        client.close()


# -- the stored state: one integer ----------------------------------------------------------------


def test_state_is_the_tat_as_one_integer(target: Target, sync_limiter: RateLimiter) -> None:
    """Each bucket is one decimal integer: the server time (ns) when it is full again, i.e. the
    time of the decision plus reset_after; Redis keeps it with its ``int`` encoding."""
    lim = Limit(2, 4)  # 0.5 s per token
    key = fresh_id("tat")
    request = build_request(PREFIX, key, lim)
    (bucket,) = request.keys
    client = target.client()
    try:
        node = node_client(client, bucket)
        for taken in range(1, 5):
            before = server_ns(node)
            if taken % 2:
                decision = sync_limiter.try_acquire(key, lim)
                assert decision.allowed
                reset_ns = round(decision.reset_after * 1e9)
            else:  # the raw reply: its own now and reset_us
                reply = sync_limiter.backend.decide(request, consume=True, timeout=5.0)
                assert reply[1] == 1
                reset_ns = reply[5] * 1000
            after = server_ns(node)
            raw = node.get(bucket)
            assert raw == str(int(raw)).encode()  # plain decimal digits
            tat = int(raw)
            # the decision's own TIME lies between the two around it; reset_us is rounded up
            assert before + reset_ns - 1000 < tat <= after + reset_ns
            if taken % 2 == 0:  # whole µs: exact
                assert tat == reply[0] * 1000 + reset_ns
            assert 0 < node.pttl(bucket) <= math.ceil((tat - before) / 1_000_000)
        encoding = node.object("encoding", bucket)
        if encoding == b"embstr" and is_valkey(node):
            pytest.xfail(
                "Valkey 9 keeps a value SET by a script as a string (embstr); only a client's "
                "SET (or INCRBY) stores it as an int"
            )
        assert encoding == b"int"
    finally:
        client.close()


# -- the server's clock, not the client's ---------------------------------------------------------


@pytest.mark.parametrize("skew", [30.0, -30.0])
def test_client_clock_skew_does_not_matter(
    sync_limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    lim = Limit(1, 3)

    def run(key: str) -> list[tuple[bool, int]]:
        out = []
        started = time.monotonic()  # not patched: the real time these calls take
        for _ in range(5):
            d = sync_limiter.try_acquire(key, lim)
            out.append((d.allowed, d.remaining))
            if not d.allowed:  # 1 s per token, less the time since the first call
                assert 1.0 - (time.monotonic() - started) - 0.005 <= d.retry_after <= 1.0
        return out

    real_now = time.time()
    baseline = run(fresh_id("noskew"))
    monkeypatch.setattr(time, "time", lambda: real_now + skew)
    skewed = run(fresh_id("skew"))
    request = build_request(PREFIX, fresh_id("skew"), lim)
    server_now = sync_limiter.backend.decide(request, consume=False, timeout=5.0)[0]
    monkeypatch.undo()
    expected = [(True, 2), (True, 1), (True, 0), (False, 0), (False, 0)]
    assert baseline == expected
    assert skewed == expected
    assert abs(server_now / 1e6 - time.time()) < 10  # the reply carries the server's own time


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_clients_with_clocks_60s_apart_share_one_bucket(
    target: Target, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Two clients, one 30 s ahead and one 30 s behind, take turns on one bucket: the
    decisions are those of one client with a true clock, sync and async alike."""
    lim = Limit(1, 3)
    key = fresh_id(f"clocks-{mode}")
    real_time, real_ns = time.time, time.time_ns

    def skew(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real_time() + seconds)
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() + int(seconds * 1e9))

    first: list[float] = []  # when the first decision was asked for (time.monotonic())

    def check(d: tokenlimit.Decision) -> tuple[bool, int]:
        if not d.allowed:  # 1 s per token, less the time since the first call
            since = time.monotonic() - first[0]
            assert 1.0 - since - 0.005 <= d.retry_after <= 1.0
        return d.allowed, d.remaining

    out: list[tuple[bool, int]] = []
    if mode == "sync":
        # (no local refusal cache: every decision is the server's)
        ahead = RateLimiter.from_url(target.url, timeout=5.0, local_cache=False)
        behind = RateLimiter.from_url(target.url, timeout=5.0, local_cache=False)
        try:
            ahead.peek("warm", lim)  # connected (and the cluster discovered) beforehand
            behind.peek("warm", lim)
            first.append(time.monotonic())
            for i in range(6):
                skew(30.0 if i % 2 == 0 else -30.0)
                client = ahead if i % 2 == 0 else behind
                out.append(check(client.try_acquire(key, lim)))
        finally:
            monkeypatch.undo()
            ahead.close()
            behind.close()
    else:

        async def main() -> None:
            ahead = AsyncRateLimiter.from_url(target.url, timeout=5.0, local_cache=False)
            behind = AsyncRateLimiter.from_url(target.url, timeout=5.0, local_cache=False)
            try:
                await ahead.peek("warm", lim)
                await behind.peek("warm", lim)
                first.append(time.monotonic())
                for i in range(6):
                    skew(30.0 if i % 2 == 0 else -30.0)
                    client = ahead if i % 2 == 0 else behind
                    out.append(check(await client.try_acquire(key, lim)))
            finally:
                monkeypatch.undo()
                await ahead.aclose()
                await behind.aclose()

        asyncio.run(main())
    assert out == [(True, 2), (True, 1), (True, 0), (False, 0), (False, 0), (False, 0)]


# -- the script defends itself --------------------------------------------------------------------

BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "0x10", "1e400", "", " 1", "1 ", "abc", "-0"]
BAD_WHOLE = [*BAD_NUMBERS, "1.5", "1e3", "99999999999999999999", "18014398509481984",
             "9007199254740992"]  # fmt: skip


def _bad_calls(request: Request) -> list[tuple[list[str], list[str], str]]:
    """(keys, args, expected error) for every bad argument in every position."""
    keys, args = list(request.keys), list(request.args)
    calls = []
    for value in BAD_WHOLE:
        calls.append((keys, [value, *args[1:]], "tokenlimit: bad cost"))
    for limit_index in range(len(keys)):
        # the interval is whole ns, validated like cost and burst, except that past 2^53 it
        # may go up to 1e21 when a double holds it exactly (2^53 and 2^54 do)
        exact = ("9007199254740992", "18014398509481984")
        long = ["9007199254740993", "18014398509481985", "2000000000000000000000"]
        for value in [*(v for v in BAD_WHOLE if v not in exact), *long, "1e-400", "00", "1.0",
                      "+5", "1_000"]:  # fmt: skip
            bad = list(args)
            bad[1 + 2 * limit_index] = value
            calls.append((keys, bad, "tokenlimit: bad interval"))
        for value in BAD_WHOLE:
            bad = list(args)
            bad[2 + 2 * limit_index] = value
            calls.append((keys, bad, "tokenlimit: bad burst"))
    # a burst above 1e9, or a fill time above 1e12 s (1e21 ns)
    for interval, burst in (("1", "1000000001"), ("1000000000001", "1000000000")):
        bad = list(args)
        bad[1:3] = [interval, burst]
        calls.append((keys, bad, "tokenlimit: limit out of range"))
    # cost above any one burst
    too_much = list(args)
    too_much[0] = str(min(int(burst) for burst in args[2::2]) + 1)
    calls.append((keys, too_much, "tokenlimit: cost exceeds burst"))
    # wrong argument counts
    for count in (0, 1, 2, 3, 4, 5, 6, 7):
        if count != len(args):
            calls.append((keys, args[:count] + ["1"] * max(0, count - len(args)),
                          "tokenlimit: wrong number of arguments"))  # fmt: skip
    calls.append(([*keys, keys[0] + "x"], args, "tokenlimit: wrong number of arguments"))
    if len(keys) > 1:
        calls.append((keys[:1], args, "tokenlimit: wrong number of arguments"))
    calls.append(([], args[:3], "tokenlimit: wrong number of arguments"))
    calls.append(([], [], "tokenlimit: wrong number of arguments"))
    return calls


# One limit takes the script's flat path, two its general one: each validates on its own.
@pytest.mark.parametrize(
    "limits", [[Limit(0.5, 5)], [Limit(0.5, 5), Limit(0.1, 3)]], ids=["one-limit", "two-limits"]
)
def test_script_rejects_bad_arguments_and_touches_nothing(
    target: Target, sync_limiter: RateLimiter, limits: list[Limit]
) -> None:
    key = fresh_id("defence")
    for _ in range(2):
        assert sync_limiter.try_acquire(key, limits).allowed
    request = build_request(PREFIX, key, limits, 1)
    assert request.args[0] == "1"
    client = target.client()
    try:
        node = node_client(client, request.keys[0])
        before = {k: node.get(k) for k in request.keys}
        dumps = {k: node.dump(k) for k in request.keys}  # value and encoding, byte for byte
        keyspace = set(node.scan_iter(count=1000))
        ttls = {k: node.pttl(k) for k in request.keys}
        assert all(v is not None for v in before.values())
        assert all(t > 0 for t in ttls.values())
        calls = _bad_calls(request)
        assert len(calls) > 50 * len(limits)
        for script in (acquire_script(), peek_script()):
            for keys, args, message in calls:
                with pytest.raises(redis.ResponseError) as info:
                    node.eval(script.body, len(keys), *keys, *args)
                assert message in str(info.value), (script.name, keys, args)
        for k in request.keys:
            assert node.get(k) == before[k]
            assert node.dump(k) == dumps[k]
            ttl = node.pttl(k)
            assert 0 < ttl <= ttls[k]
        assert set(node.scan_iter(count=1000)) == keyspace  # no key created or removed
        # and the good call still works on that state: 5-2=3 (and 3-2=1) tokens left, then taken
        reply = node.eval(acquire_script().body, len(request.keys), *request.keys, *request.args)
        assert reply[1] == 1
        assert [reply[2 + 4 * i : 4 + 4 * i] for i in range(len(limits))] == [
            [1, limit.burst - 3] for limit in limits
        ]
    finally:
        client.close()


@pytest.mark.parametrize(
    ("interval", "ok"),
    [
        (2**60, True),  # a double holds it
        (2**60 + 1, False),  # it does not: the script would read another number
        (10**21, True),  # the longest interval (one token per 1e12 s)
        (10**21 + 2**20, False),  # past it
    ],
)
def test_script_takes_long_intervals_only_if_exact(target: Target, interval: int, ok: bool) -> None:
    key = build_request(PREFIX, fresh_id("long"), Limit(0.5, 5), 1).keys[0]
    client = target.client()
    try:
        node = node_client(client, key)
        call = lambda: node.eval(acquire_script().body, 1, key, "1", str(interval), "1")  # noqa: E731
        if ok:
            assert call()[1] == 1
            assert node.get(key) is not None
        else:
            with pytest.raises(redis.ResponseError, match="tokenlimit: bad interval"):
                call()
            assert node.get(key) is None
    finally:
        client.close()


@pytest.mark.parametrize("position", ["cost", "interval", "burst"])
def test_script_rejects_whole_numbers_beyond_2_53(target: Target, position: str) -> None:
    """The script promises to refuse whole numbers above 2**53 (MAX_EXACT). 2**53 + 1 is the
    first one, but as a double it rounds down to 2**53 and slips past ``v > MAX_EXACT``."""
    request = build_request(PREFIX, fresh_id("exact"), Limit(0.5, 5), 2)
    (key,) = request.keys
    args = list(request.args)
    args[{"cost": 0, "interval": 1, "burst": 2}[position]] = str(2**53 + 1)
    client = target.client()
    try:
        node = node_client(client, key)
        node.eval(acquire_script().body, 1, key, *request.args)  # real state first
        before, ttl_before = node.get(key), node.pttl(key)
        # (as a cost it is refused either way: it also exceeds every burst the script accepts)
        message = f"bad {position}" if position != "cost" else "(bad cost|cost exceeds burst)"
        with pytest.raises(redis.ResponseError, match=f"tokenlimit: {message}"):
            node.eval(acquire_script().body, 1, key, *args)
        assert node.get(key) == before
        assert 0 < node.pttl(key) <= ttl_before
    finally:
        client.close()


CORRUPT = [
    b"1 2",  # the old "<debt> <stamp>" format
    b"5000 1700000000000000",
    b"abc",
    b"-5",
    b"1.5",
    b"1" * 25,  # more digits than any TAT (24 at most)
    b"",
    b" 1",
    b"1 ",
    b"+5",
    b"0x10",
    b"1e3",
    b"nan",
    b"inf",
    b"1\n",
    b"\xff",
]


@pytest.mark.parametrize("value", CORRUPT)
def test_script_refuses_corrupt_state(target: Target, value: bytes) -> None:
    request = build_request(PREFIX, fresh_id("corrupt"), Limit(1, 3), 1)
    (key,) = request.keys
    client = target.client()
    try:
        node = node_client(client, key)
        node.set(key, value, px=60_000)
        for script in (acquire_script(), peek_script()):
            with pytest.raises(redis.ResponseError, match="tokenlimit: corrupt bucket state"):
                node.eval(script.body, 1, key, *request.args)
        assert node.get(key) == value
        assert 0 < node.pttl(key) <= 60_000
    finally:
        client.close()


# -- every key has a TTL, equal to its refill time ------------------------------------------------


def test_every_key_has_a_ttl_no_longer_than_its_fill_time(
    target: Target, sync_limiter: RateLimiter
) -> None:
    backend = sync_limiter.backend
    rng = random.Random(1234)
    limits = [Limit(0.01, 2), Limit(0.5, 5), Limit(3, 4), Limit(40, 10), Limit(1000, 7),
              Limit(7.3, 3, name="odd")]  # fmt: skip
    identities = [fresh_id("ttl") for _ in range(150)]
    # key -> (limit, TTL the script set in ms, monotonic time before the call, after the reply)
    written: dict[str, tuple[Limit, int, float, float]] = {}
    for _ in range(1000):
        chosen = rng.sample(limits, rng.randint(1, 3))
        cost = rng.randint(1, min(lim.burst for lim in chosen))
        request = build_request(PREFIX, rng.choice(identities), chosen, cost)
        sent = time.monotonic()
        reply = backend.decide(request, consume=True, timeout=5.0)
        got = time.monotonic()
        if reply[1] != 1:
            continue
        for i, (k, lim) in enumerate(zip(request.keys, request.limits, strict=True)):
            reset_us = reply[2 + 4 * i + 3]
            written[k] = (lim, max(1, math.ceil(reset_us / 1000)), sent, got)
    slow = {k for k, (lim, *_rest) in written.items() if lim.fill_time >= 60}
    assert len(slow) > 50

    client = target.client()
    try:
        found = {k.decode() for k in all_keys(client)}
        assert found <= set(written)  # nothing else was written
        assert slow <= found  # keys still inside their fill time are all there
        for k in sorted(found):
            lim, ttl_set, sent, got = written[k]
            before = time.monotonic()
            ttl = node_client(client, k).pttl(k)
            after = time.monotonic()
            assert ttl != -1, k  # never a key without expiry
            if ttl == -2:  # expired between SCAN and PTTL: only if its time was really up
                assert (after - sent) * 1000 >= ttl_set - 2, (k, ttl_set)
                continue
            assert ttl >= 0  # 0: under one ms left, not yet reaped
            interval = lim.interval_ns
            bound_ms = math.ceil((lim.burst * interval + interval * SLACK) / 1_000_000)
            assert ttl <= bound_ms  # at most the fill time (rounded up to the ms)
            # and it is exactly the time the bucket needs to be full, as the script reported
            assert ttl <= ttl_set - (before - got) * 1000 + 1
            assert ttl >= ttl_set - (after - sent) * 1000 - 1
    finally:
        client.close()


# -- keys: injective, short, slot-local -----------------------------------------------------------

HOSTILE = [
    "{a}", "a", "{a}b", "b{a}", "}{", "{}", "{", "}", "{{a}}", "a}{b", "{user:1}", "user:1",
    "x" * 10_000, "y" * 10_000 + "{z}", "line\nbreak", "line\r\nbreak", "nul\x00byte", "\x00",
    "ключ", "鍵🔑", "e\u0301", "\u00e9", "\ud800", b"\xff\xfe\xfd", b"\x80", b"{b}\xff", b"a\x00",
    "  ", "\t", "tl:{x}", "*", "?", "[a-z]",
]  # fmt: skip


def as_bytes(identity: str | bytes) -> bytes:
    if isinstance(identity, str):
        return identity.encode("utf-8", "surrogatepass")
    return identity


def test_keys_are_injective_over_many_identities() -> None:
    rng = random.Random(42)
    limits = (Limit(10, 5), Limit(10, 6), Limit(10.000001, 5), Limit(10, 5, name="x"),
              Limit(10, 5, name="y"), Limit(0.5, 5), Limit.parse("10/second"))  # fmt: skip
    identities: set[bytes] = {f"user:{i}".encode() for i in range(10_000)}
    while len(identities) < 100_000:
        identities.add(rng.randbytes(rng.randint(1, 40)))
    identities.update(as_bytes(h) for h in HOSTILE)
    identities.update({b"{a}" * n for n in range(1, 20)} | {b"\x00" * n for n in range(1, 20)})
    seen: dict[str, bytes] = {}
    for n, identity in enumerate(identities):
        # every limit for the first 10,000 (a key is the identity's tag and the limit's id), one
        # alternating limit for the rest: every identity's tag meets every other's
        chosen = limits if n < 10_000 else limits[n % 2]
        request = build_request(PREFIX, identity, chosen)
        assert len(set(request.keys)) == len(request.keys)  # two limits never share a key
        for k in request.keys:
            assert len(k.encode()) <= 40
            assert k.isascii()
            owner = seen.setdefault(k[: k.index("}") + 1], identity)
            assert owner == identity, (owner, identity)  # two identities never share a key
    assert len(seen) == len(identities)
    assert len({build_request(PREFIX, b"u", lim).keys[0] for lim in limits}) == len(limits)
    # a str identity is its UTF-8 bytes (surrogates kept)
    for h in HOSTILE:
        assert (
            build_request(PREFIX, h, limits).keys == build_request(PREFIX, as_bytes(h), limits).keys
        )
    # an equal limit is the same bucket
    assert (
        build_request(PREFIX, "u", Limit(10, 5)).keys
        == build_request(PREFIX, "u", Limit(10.0, 5)).keys
    )
    # a different prefix is a different key
    assert (
        build_request("a:", "u", Limit(10, 5)).keys != build_request("b:", "u", Limit(10, 5)).keys
    )


def test_hostile_identities_work_end_to_end(target: Target, sync_limiter: RateLimiter) -> None:
    lim = Limit(0.01, 2)
    for identity in HOSTILE:
        first = sync_limiter.try_acquire(identity, lim)  # type: ignore[arg-type]
        second = sync_limiter.try_acquire(identity, lim)  # type: ignore[arg-type]
        third = sync_limiter.try_acquire(identity, lim)  # type: ignore[arg-type]
        assert (first.allowed, first.remaining) == (True, 1), identity
        assert (second.allowed, second.remaining) == (True, 0), identity
        assert third.allowed is False, identity
        assert sync_limiter.peek(identity, lim).remaining == 0  # type: ignore[arg-type]
    sync_limiter.reset("{a}", lim)
    assert sync_limiter.peek("{a}", lim).remaining == 2
    assert sync_limiter.peek("a", lim).remaining == 0
    client = target.client()
    try:
        keys = all_keys(client)
    finally:
        client.close()
    # one key per identity ("{a}" was reset)
    assert len({as_bytes(h) for h in HOSTILE}) == len(HOSTILE)
    assert len(keys) == len(HOSTILE) - 1
    assert all(len(k) < 64 for k in keys)
    assert all(k.startswith(b"tl:{") for k in keys)


def test_cluster_keys_share_a_slot_and_spread(cluster: Target) -> None:
    limits = [Limit(0.01, 2), Limit(1, 5), Limit(100, 10, name="n")]
    identities = [f"{{tenant}}:{i}" for i in range(200)]
    slots = []
    for identity in identities:
        request = build_request(PREFIX, identity, limits)
        request_slots = {key_slot(k.encode()) for k in request.keys}
        assert len(request_slots) == 1  # one call, one slot
        slots.append(request_slots.pop())
    assert len(set(slots)) >= 150  # a caller's braces do not pin every identity to one slot
    client = cluster.client()
    try:
        owners = {client.get_node_from_key(build_request(PREFIX, i, limits).keys[0]).name
                  for i in identities}  # fmt: skip
        assert len(owners) == 3  # every master gets some
        sample = build_request(PREFIX, identities[0], limits).keys
        assert client.cluster_keyslot(sample[0]) == key_slot(sample[0].encode())
    finally:
        client.close()
    with RateLimiter.from_url(cluster.url, timeout=5.0) as lim:
        for identity in identities[:50]:
            d = lim.try_acquire(identity, limits, cost=2)  # three keys in one call: no CROSSSLOT
            assert (d.allowed, d.remaining) == (True, 0)


# -- the script cache can vanish ------------------------------------------------------------------


def _flush_scripts(target: Target, key: str) -> None:
    client = target.client()
    try:
        for node in primaries(client):
            node.script_flush()
        sha = acquire_script().sha
        assert node_client(client, key).script_exists(sha) == [False]
    finally:
        client.close()


def test_decision_after_script_flush_sync(target: Target, sync_limiter: RateLimiter) -> None:
    lim = Limit(0.01, 4)
    key = fresh_id("flush")
    request_key = build_request(PREFIX, key, lim).keys[0]
    assert sync_limiter.try_acquire(key, lim).remaining == 3
    _flush_scripts(target, request_key)
    assert sync_limiter.try_acquire(key, lim).remaining == 2
    _flush_scripts(target, request_key)
    assert sync_limiter.peek(key, lim).remaining == 2
    _flush_scripts(target, request_key)
    d = sync_limiter.try_acquire(key, lim, cost=2)
    assert (d.allowed, d.remaining) == (True, 0)
    assert sync_limiter.try_acquire(key, lim).allowed is False


def test_decision_after_script_flush_async(target: Target) -> None:
    lim = Limit(0.01, 4)
    key = fresh_id("aflush")
    request_key = build_request(PREFIX, key, lim).keys[0]

    async def main() -> list[int]:
        limiter = AsyncRateLimiter.from_url(target.url, timeout=5.0)
        try:
            out = [(await limiter.try_acquire(key, lim)).remaining]
            _flush_scripts(target, request_key)
            out.append((await limiter.try_acquire(key, lim)).remaining)
            _flush_scripts(target, request_key)
            out.append((await limiter.peek(key, lim)).remaining)
            _flush_scripts(target, request_key)
            out.append((await limiter.try_acquire(key, lim, cost=2)).remaining)
            out.append(int((await limiter.try_acquire(key, lim)).allowed))
            return out
        finally:
            await limiter.aclose()

    assert asyncio.run(main()) == [3, 2, 2, 0, 0]
