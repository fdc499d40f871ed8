"""The shipped Lua script against real servers (Valkey and Redis, standalone and cluster).

The script must agree with the reference model integer for integer, use the server's clock,
refuse bad arguments without touching state, give every key a TTL, keep keys injective, short
and slot-local, and survive a flushed script cache.
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
from tokenlimit._core import Request, build_request
from tokenlimit._model import SLACK, State, decide
from tokenlimit._scripts import acquire_script, peek_script

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
    states: list[State | None], request: Request, now: int, *, consume: bool
) -> tuple[list[int], list[State | None]]:
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

    @settings(
        max_examples=50,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(limits=limit_sets, ops=operations)
    def run(limits: list[Limit], ops: list[tuple[str, int]]) -> None:
        key = fresh_id("model")
        smallest = min(lim.burst for lim in limits)
        states: list[State | None] = [None] * len(build_request(PREFIX, key, limits).keys)
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
            checked["replies"] += 1
            checked["admitted" if reply[1] else "refused"] += 1

    run()
    # the sequences really exercised both answers
    assert checked["admitted"] > 0
    assert checked["refused"] > 0


# (debt µs, cost, consume) -> (allowed, remaining, retry_us, reset_us, debt written or None);
# interval 1000 µs, burst 5, so the slack is 0.001 µs: each row sits on a boundary.
BOUNDARIES = [
    ((4000.0, 1, True), (1, 0, 0, 5000, "5000")),
    ((4000.0005, 1, True), (1, 0, 0, 5001, "5000.0005000000001")),  # inside the slack
    ((4000.002, 1, True), (0, 0, 1, 4001, None)),  # just past it: refused, wait 1 µs
    ((4999.0, 1, True), (0, 0, 999, 4999, None)),
    ((0.0, 5, True), (1, 0, 0, 5000, "5000")),
    ((0.5, 5, True), (0, 4, 1, 1, None)),
    ((1000.0005, 1, False), (1, 4, 0, 1001, None)),  # 3.9999995 tokens count as 4
    ((1000.002, 1, False), (1, 3, 0, 1001, None)),
    ((2500.0, 3, False), (0, 2, 500, 2500, None)),
]


@pytest.mark.parametrize(("given_", "expected"), BOUNDARIES)
def test_script_boundaries_on_frozen_state(
    target: Target, given_: tuple[float, int, bool], expected: tuple[int, int, int, int, str | None]
) -> None:
    """A state stamped in the future does not refill (the clock-back rule), so its debt is
    exact whatever the server's time: the script's rounding and slack are checked to the µs."""
    debt, cost, consume = given_
    request = build_request(PREFIX, fresh_id("frozen"), Limit(1000, 5), cost)
    (key,) = request.keys
    script = acquire_script() if consume else peek_script()
    client = target.client()
    try:
        node = node_client(client, key)
        seconds, micros = node.time()
        stamp = seconds * 1_000_000 + micros + 3_600_000_000  # an hour ahead
        state = f"{debt!r} {stamp}"
        node.set(key, state, px=3_600_000)
        reply = node.eval(script.body, 1, key, *request.args)
        assert reply[1:] == [expected[0], expected[0], *expected[1:4]]
        model, _ = model_reply([State(debt, stamp)], request, reply[0], consume=consume)
        assert reply == model
        written = expected[4]
        if written is None:
            assert node.get(key) == state.encode()
        else:
            assert node.get(key) == f"{written} {stamp}".encode()  # the stamp stays ahead
            assert 0 < node.pttl(key) <= math.ceil(float(written) / 1000)
    finally:
        client.close()


def test_script_matches_model_fixed_sequence(sync_limiter: RateLimiter) -> None:
    """A deterministic run: burst, refusal with exact wait, refill, reset."""
    backend = sync_limiter.backend
    key = fresh_id("fixed")
    limits = [Limit(4000, 3), Limit(2, 2)]  # 250 µs per token; 0.5 s per token
    states: list[State | None] = [None, None]
    verdicts = []
    for cost, consume in [(1, True), (1, False), (1, True), (1, True), (2, False), (1, True)]:
        request = build_request(PREFIX, key, limits, cost)
        reply = list(backend.decide(request, consume=consume, timeout=5.0))
        expected, states = model_reply(states, request, reply[0], consume=consume)
        assert reply == expected
        verdicts.append(reply[1])
    assert verdicts == [1, 1, 1, 0, 0, 0]
    sync_limiter.reset(key, limits)
    request = build_request(PREFIX, key, limits, 2)
    reply = list(backend.decide(request, consume=True, timeout=5.0))
    assert reply == model_reply([None, None], request, reply[0], consume=True)[0]
    assert reply[1:] == [1, 1, 1, 0, 500, 1, 0, 0, 1_000_000]


EXTREME_LIMITS = [
    (1e12, 1),  # 1e-6 µs per token
    (1.7e308, 5),  # the interval is a tiny double written with an exponent
    (1e-9, 1),  # 1e15 µs per token
    (3e-9, 2),  # a non-integral interval of 3.3e14 µs
    (0.001, 10**9),  # the longest fill time Limit allows (1e12 s)
    (1e6, 10**6),
    (1e7, 2**53),
    (1e7, 2**53 + 1),  # fill time 9e8 s: within Limit's bound
    (1e7, 2**60),  # fill time 1.2e11 s: within Limit's bound
]


@pytest.mark.parametrize(("rate", "burst"), EXTREME_LIMITS)
def test_script_accepts_every_limit_python_accepts(target: Target, rate: float, burst: int) -> None:
    """Python validates first and the script again: whatever ``Limit`` accepts, the script
    must decide (not answer an error reply), exactly as the model does."""
    try:
        lim = Limit(rate, burst)
    except tokenlimit.ConfigError:
        return  # refused up front, naming the parameter: consistent too
    with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
        key = fresh_id("extreme")
        states: list[State | None] = [None]
        for cost in (1, 1, min(lim.burst, 3)):
            request = build_request(PREFIX, key, lim, cost)
            reply = list(limiter.backend.decide(request, consume=True, timeout=5.0))
            expected, states = model_reply(states, request, reply[0], consume=True)
            assert reply == expected
            assert reply[1] == 1 or lim.burst < 5


# -- the server's clock, not the client's ---------------------------------------------------------


@pytest.mark.parametrize("skew", [30.0, -30.0])
def test_client_clock_skew_does_not_matter(
    sync_limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    lim = Limit(1, 3)

    def run(key: str) -> list[tuple[bool, int]]:
        out = []
        for _ in range(5):
            d = sync_limiter.try_acquire(key, lim)
            out.append((d.allowed, d.remaining))
            if not d.allowed:
                assert 0.5 < d.retry_after <= 1.0  # 1 s per token, less the time since
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


# -- the script defends itself --------------------------------------------------------------------

BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "0x10", "1e400", "", " 1", "1 ", "abc", "-0"]
BAD_WHOLE = [*BAD_NUMBERS, "1.5", "1e3", "99999999999999999999", "18014398509481984"]


def _bad_calls(request: Request) -> list[tuple[list[str], list[str], str]]:
    """(keys, args, expected error) for every bad argument in every position."""
    keys, args = list(request.keys), list(request.args)
    calls = []
    for value in BAD_WHOLE:
        calls.append((keys, [value, *args[1:]], "tokenlimit: bad cost"))
    for limit_index in range(len(keys)):
        for value in [*BAD_NUMBERS, "1e-400", "00"]:
            bad = list(args)
            bad[1 + 2 * limit_index] = value
            calls.append((keys, bad, "tokenlimit: bad interval"))
        for value in BAD_WHOLE:
            bad = list(args)
            bad[2 + 2 * limit_index] = value
            calls.append((keys, bad, "tokenlimit: bad burst"))
    # cost above any one burst
    too_much = list(args)
    too_much[0] = "4"
    calls.append((keys, too_much, "tokenlimit: cost exceeds burst"))
    # wrong argument counts
    for count in (0, 1, 2, 3, 4, 6, 7):
        calls.append((keys, args[:count] + ["1"] * max(0, count - len(args)),
                      "tokenlimit: wrong number of arguments"))  # fmt: skip
    calls.append((keys[:1], args, "tokenlimit: wrong number of arguments"))
    calls.append(([], args[:3], "tokenlimit: wrong number of arguments"))
    calls.append(([], [], "tokenlimit: wrong number of arguments"))
    return calls


def test_script_rejects_bad_arguments_and_touches_nothing(
    target: Target, sync_limiter: RateLimiter
) -> None:
    key = fresh_id("defence")
    limits = [Limit(0.5, 5), Limit(0.1, 3)]
    for _ in range(2):
        assert sync_limiter.try_acquire(key, limits).allowed
    request = build_request(PREFIX, key, limits, 1)
    assert request.args[0] == "1"
    client = target.client()
    try:
        node = node_client(client, request.keys[0])
        before = {k: node.get(k) for k in request.keys}
        ttls = {k: node.pttl(k) for k in request.keys}
        assert all(v is not None for v in before.values())
        assert all(t > 0 for t in ttls.values())
        calls = _bad_calls(request)
        assert len(calls) > 80
        for script in (acquire_script(), peek_script()):
            for keys, args, message in calls:
                with pytest.raises(redis.ResponseError) as info:
                    node.eval(script.body, len(keys), *keys, *args)
                assert message in str(info.value), (script.name, keys, args)
        for k in request.keys:
            assert node.get(k) == before[k]
            ttl = node.pttl(k)
            assert 0 < ttl <= ttls[k]
        # and the good call still works on that state: 5-2=3 and 3-2=1 tokens left, then taken
        reply = node.eval(acquire_script().body, len(request.keys), *request.keys, *request.args)
        assert reply[1:] == [1, 1, 2, reply[4], reply[5], 1, 0, reply[8], reply[9]]
    finally:
        client.close()


@pytest.mark.parametrize("position", ["cost", "burst"])
def test_script_rejects_whole_numbers_beyond_2_53(target: Target, position: str) -> None:
    """The script promises to refuse whole numbers above 2**53 (MAX_EXACT). 2**53 + 1 is the
    first one, but as a double it rounds down to 2**53 and slips past ``v > MAX_EXACT``."""
    request = build_request(PREFIX, fresh_id("exact"), Limit(0.5, 5), 2)
    (key,) = request.keys
    args = list(request.args)
    args[0 if position == "cost" else 2] = str(2**53 + 1)
    client = target.client()
    try:
        node = node_client(client, key)
        node.eval(acquire_script().body, 1, key, *request.args)  # real state first
        before, ttl_before = node.get(key), node.pttl(key)
        # (as a cost it is refused either way: it also exceeds every burst the script accepts)
        message = "bad burst" if position == "burst" else "(bad cost|cost exceeds burst)"
        with pytest.raises(redis.ResponseError, match=f"tokenlimit: {message}"):
            node.eval(acquire_script().body, 1, key, *args)
        assert node.get(key) == before
        assert 0 < node.pttl(key) <= ttl_before
    finally:
        client.close()


@pytest.mark.parametrize(
    "value", [b"garbage", b"nan 1", b"1 nan", b"-1 1", b"inf 1", b"1", b"", b"1 2 3"]
)
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
            interval = lim.interval
            bound_ms = math.ceil((lim.burst * interval + interval * SLACK) / 1000)
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
    while len(identities) < 20_000:
        identities.add(rng.randbytes(rng.randint(1, 40)))
    identities.update(as_bytes(h) for h in HOSTILE)
    identities.update({b"{a}" * n for n in range(1, 20)} | {b"\x00" * n for n in range(1, 20)})
    seen: dict[str, bytes] = {}
    for identity in identities:
        request = build_request(PREFIX, identity, limits)
        assert len(request.keys) == len(limits)
        assert len(set(request.keys)) == len(limits)  # two limits never share a key
        for k in request.keys:
            assert len(k.encode()) < 64
            assert k.isascii()
            owner = seen.setdefault(k, identity)
            assert owner == identity, (owner, identity)  # two identities never share a key
    assert len(seen) == len(identities) * len(limits)
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
