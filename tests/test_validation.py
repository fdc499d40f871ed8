"""Every bad argument raises an error that names the parameter, and nothing is half-applied."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenlimit import (
    AsyncRateLimiter,
    ConfigError,
    Limit,
    MemoryBackend,
    RateLimiter,
    RateLimitExceeded,
    TokenLimitError,
    configure,
    rate_limit,
)

OK = Limit(0.001, 3)
MEM = RateLimiter.from_url("memory://")
AMEM = AsyncRateLimiter.from_url("memory://")

# TYPE: a wrong type, which may raise TypeError or ConfigError (DESIGN: "Wrong types ... raise
# TypeError or ConfigError"). VALUE: a bad value, which must raise ConfigError.
TYPE = (TypeError, ConfigError)
VALUE = (ConfigError,)

Case = tuple[str, Callable[[], Any], str, tuple[type[BaseException], ...]]


def _cases() -> Iterator[Case]:
    # Limit(rate, burst, name)
    bad_rates = [
        (0, VALUE),
        (-1, VALUE),
        (math.nan, VALUE),
        (math.inf, VALUE),
        (-math.inf, VALUE),
        (True, TYPE),
        (False, TYPE),
        ("5", TYPE),
        (None, TYPE),
    ]
    for v, kind in bad_rates:
        yield f"Limit rate={v!r}", lambda v=v: Limit(v), "rate", kind
    # the bucket counts whole nanoseconds per token: at least 1, and a fill time up to 1e12 s
    yield "Limit rate=2e9 burst=1", lambda: Limit(2e9, 1), "rate", VALUE
    yield "Limit rate=1e-13 burst=1", lambda: Limit(1e-13, 1), "rate", VALUE
    for v, kind in [(0, VALUE), (-1, VALUE), (1.5, TYPE), (True, TYPE), ("3", TYPE)]:
        yield f"Limit burst={v!r}", lambda v=v: Limit(1, v), "burst", kind
    yield "Limit name=3", lambda: Limit(1, name=3), "name", TYPE  # type: ignore[arg-type]
    yield "Limit name=b'x'", lambda: Limit(1, name=b"x"), "name", TYPE  # type: ignore[arg-type]

    # Limit.parse(text): the message names the limit being parsed
    for v in ["", "abc", "10/fortnight", "0/minute", "-1/second", "1.5/second", "10/0s", "/s"]:
        yield f"parse {v!r}", lambda v=v: Limit.parse(v), "limit", VALUE
    yield "parse 5", lambda: Limit.parse(5), "limit", TYPE  # type: ignore[arg-type]
    yield "parse burst=0", lambda: Limit.parse("5/second", burst=0), "burst", VALUE

    # per_* constructors: their parameter is ``n``
    yield "per_minute(0)", lambda: Limit.per_minute(0), "n", VALUE
    yield "per_second(-1)", lambda: Limit.per_second(-1), "n", VALUE
    yield "per_hour(nan)", lambda: Limit.per_hour(math.nan), "n", VALUE
    yield "per_day(True)", lambda: Limit.per_day(True), "n", TYPE
    yield "per_day('5')", lambda: Limit.per_day("5"), "n", TYPE  # type: ignore[arg-type]
    yield "per_minute(5, burst=0)", lambda: Limit.per_minute(5, 0), "burst", VALUE

    # limiter methods, sync and async
    def method_cases(name: str, call: Callable[..., Any]) -> Iterator[Case]:
        for k, kind in [(None, TYPE), ("", VALUE), (3, TYPE), (b"", VALUE), (["k"], TYPE)]:
            yield f"{name} key={k!r}", lambda k=k: call(k, OK), "key", kind
        for lim, kind in [(None, TYPE), ([], VALUE), ((), VALUE), ("garbage", VALUE),
                          (5, TYPE), ([OK, 5], TYPE), (b"1/s", TYPE)]:  # fmt: skip
            yield f"{name} limit={lim!r}", lambda lim=lim: call("k", lim), "limit", kind
        if name.endswith("reset"):
            return
        for c, kind in [(0, VALUE), (-1, VALUE), (1.5, TYPE), (True, TYPE), ("1", TYPE),
                        (4, VALUE), (None, TYPE)]:  # fmt: skip
            yield f"{name} cost={c!r}", lambda c=c: call("k", OK, cost=c), "cost", kind
        yield (
            f"{name} cost > smallest burst",
            lambda: call("k", [Limit(1, 10), OK], cost=4),
            "cost",
            VALUE,
        )

    for meth in ["try_acquire", "acquire", "peek", "reset"]:
        yield from method_cases(meth, getattr(MEM, meth))

        def run_async(*args: Any, meth: str = meth, **kwargs: Any) -> Any:
            return asyncio.run(getattr(AMEM, meth)(*args, **kwargs))

        yield from method_cases(f"async {meth}", run_async)

    for t, kind in [(-1, VALUE), (math.nan, VALUE), (math.inf, VALUE), ("1", TYPE), (True, TYPE)]:
        yield f"acquire timeout={t!r}", lambda t=t: MEM.acquire("k", OK, timeout=t), "timeout", kind
        yield (
            f"async acquire timeout={t!r}",
            lambda t=t: asyncio.run(AMEM.acquire("k", OK, timeout=t)),
            "timeout",
            kind,
        )

    # constructing limiters
    for cls in (RateLimiter, AsyncRateLimiter):
        n = cls.__name__
        for u, kind in [("ftp://x", VALUE), ("", VALUE), (5, TYPE), ("nonsense", VALUE),
                        (None, TYPE)]:  # fmt: skip
            yield f"{n}.from_url({u!r})", lambda u=u, cls=cls: cls.from_url(u), "url", kind
        for p, kind in [("a{b", VALUE), ("a}b", VALUE), (5, TYPE), (None, TYPE)]:
            yield (
                f"{n} prefix={p!r}",
                lambda p=p, cls=cls: cls.from_url("memory://", prefix=p),
                "prefix",
                kind,
            )
        for t, kind in [(0, VALUE), (-1, VALUE), (math.nan, VALUE), (math.inf, VALUE),
                        ("1", TYPE), (True, TYPE)]:  # fmt: skip
            yield (
                f"{n} timeout={t!r}",
                lambda t=t, cls=cls: cls.from_url("memory://", timeout=t),
                "timeout",
                kind,
            )
        for m, kind in [("maybe", VALUE), (None, VALUE), ("OPEN ", VALUE)]:
            yield (
                f"{n} failure_mode={m!r}",
                lambda m=m, cls=cls: cls.from_url("memory://", failure_mode=m),
                "failure_mode",
                kind,
            )
        yield (
            f"{n} metrics=object()",
            lambda cls=cls: cls.from_url("memory://", metrics=object()),
            "metrics",
            TYPE,
        )

    # the decorator / context manager factory
    rl_cases: list[tuple[str, dict[str, Any], str, tuple[type[BaseException], ...]]] = [
        ("no rate", {}, "rate", VALUE),
        ("rate=0", {"rate": 0}, "rate", VALUE),
        ("rate=-1", {"rate": -1}, "rate", VALUE),
        ("rate=nan", {"rate": math.nan}, "rate", VALUE),
        ("rate=True", {"rate": True}, "rate", TYPE),
        ("rate='5/fortnight'", {"rate": "5/fortnight"}, "rate", VALUE),
        ("burst=0", {"rate": 1, "burst": 0}, "burst", VALUE),
        ("burst=1.5", {"rate": 1, "burst": 1.5}, "burst", TYPE),
        ("cost=0", {"rate": 1, "cost": 0}, "cost", VALUE),
        ("cost=True", {"rate": 1, "cost": True}, "cost", TYPE),
        ("cost > burst", {"rate": 1, "burst": 2, "cost": 3}, "cost", VALUE),
        ("timeout=-1", {"rate": 1, "timeout": -1}, "timeout", VALUE),
        ("timeout=nan", {"rate": 1, "timeout": math.nan}, "timeout", VALUE),
        ("timeout='1'", {"rate": 1, "timeout": "1"}, "timeout", TYPE),
        ("key=5", {"rate": 1, "key": 5}, "key", TYPE),
        ("limit=5", {"limit": 5}, "limit", TYPE),
        ("limit=[]", {"limit": []}, "limit", VALUE),
        ("limit='garbage'", {"limit": "garbage"}, "limit", VALUE),
    ]
    for label, kwargs, param, kind in rl_cases:
        yield (
            f"rate_limit {label}",
            lambda kwargs=kwargs: rate_limit(**kwargs, limiter=MEM),
            param,
            kind,
        )
        yield f"limiter.limit {label}", lambda kwargs=kwargs: MEM.limit(**kwargs), param, kind
    yield "rate_limit limiter='x'", lambda: rate_limit(1, limiter="x"), "limiter", TYPE  # type: ignore[arg-type]
    yield "rate_limit limiter=object()", lambda: rate_limit(1, limiter=object()), "limiter", TYPE  # type: ignore[arg-type]
    yield from _range_cases()


HUGE = 10**400  # beyond a double: float() raises OverflowError
HUGER = 10**5000  # beyond what str() converts (4300 digits): a message must not print it
TINY = 1e-300  # 1e9 / TINY is inf: the nanoseconds per token cannot be counted


def _n(value: float) -> str:
    """A short label for a number in a test id."""
    if isinstance(value, int) and abs(value) > 10**300:
        return f"{'-' if value < 0 else ''}1e{round(math.log10(abs(value)))}"
    return f"{value:.0e}"


def _range_cases() -> Iterator[Case]:
    """Numbers of the right type but beyond what the arithmetic can hold (issue 13 defect 7):
    each a ConfigError naming the parameter, never an OverflowError or a ValueError from
    printing a huge int."""
    for v in (TINY, 5e-324, HUGE, -HUGE, HUGER, 1e300):
        yield f"Limit rate={_n(v)}", lambda v=v: Limit(v), "rate", VALUE
        yield f"Limit rate={_n(v)} burst=1", lambda v=v: Limit(v, 1), "rate", VALUE
        yield f"rate_limit rate={_n(v)}", lambda v=v: rate_limit(v, limiter=MEM), "rate", VALUE
    for v in (HUGE, HUGER):
        yield f"Limit burst={_n(v)}", lambda v=v: Limit(1, v), "burst", VALUE
        yield f"parse burst={_n(v)}", lambda v=v: Limit.parse("5/second", burst=v), "burst", VALUE
        yield f"per_hour burst={_n(v)}", lambda v=v: Limit.per_hour(5, v), "burst", VALUE
        yield f"rate_limit burst={_n(v)}", lambda v=v: rate_limit(1, v, limiter=MEM), "burst", VALUE
    for text in ("1" + "0" * 400 + "/second", "1/1" + "0" * 400 + "s", "1" * 5000 + "/second",
                 "5/" + "9" * 5000 + "s", "1" + "0" * 400 + "/second;1/s"):  # fmt: skip
        yield f"parse {text[:12]}..{len(text)}", lambda t=text: Limit.parse(t), "limit", VALUE
        yield f"try_acquire {text[:12]}..", lambda t=text: MEM.try_acquire("k", t), "limit", VALUE
        yield f"rate_limit {text[:12]}..", lambda t=text: rate_limit(t, limiter=MEM), "rate", VALUE
    for v in (HUGE, -HUGE, TINY / 1e10, 1e300, HUGER):
        yield f"per_second({_n(v)})", lambda v=v: Limit.per_second(v), "n", VALUE
        yield f"per_day({_n(v)})", lambda v=v: Limit.per_day(v), "n", VALUE
    for c in (HUGE, HUGER, -HUGE):
        yield (
            f"try_acquire cost={_n(c)}",
            lambda c=c: MEM.try_acquire("k", OK, cost=c),
            "cost",
            VALUE,
        )
        yield f"peek cost={_n(c)}", lambda c=c: MEM.peek("k", [OK, OK], cost=c), "cost", VALUE
        yield (
            f"async try_acquire cost={_n(c)}",
            lambda c=c: asyncio.run(AMEM.try_acquire("k", OK, cost=c)),
            "cost",
            VALUE,
        )
        yield (
            f"rate_limit cost={_n(c)}",
            lambda c=c: rate_limit(1, cost=c, limiter=MEM),
            "cost",
            VALUE,
        )
        yield f"limiter.limit cost={_n(c)}", lambda c=c: AMEM.limit(1, cost=c), "cost", VALUE
    for t in (HUGE, HUGER, -HUGE):
        yield (
            f"acquire timeout={_n(t)}",
            lambda t=t: MEM.acquire("k", OK, timeout=t),
            "timeout",
            VALUE,
        )
        yield (
            f"async acquire timeout={_n(t)}",
            lambda t=t: asyncio.run(AMEM.acquire("k", OK, timeout=t)),
            "timeout",
            VALUE,
        )
        yield (
            f"rate_limit timeout={_n(t)}",
            lambda t=t: rate_limit(1, timeout=t, limiter=MEM),
            "timeout",
            VALUE,
        )
        yield (
            f"limiter.limit timeout={_n(t)}",
            lambda t=t: MEM.limit(1, timeout=t),
            "timeout",
            VALUE,
        )
        yield (
            f"concurrency timeout={_n(t)}",
            lambda t=t: MEM.concurrency("k", 1, timeout=t),
            "timeout",
            VALUE,
        )
    for v in (HUGE, HUGER, 1e300, math.nan, -1.0):
        yield (
            f"concurrency lease={_n(v)}",
            lambda v=v: MEM.concurrency("k", 1, lease=v),
            "lease",
            VALUE,
        )
        yield (
            f"async concurrency lease={_n(v)}",
            lambda v=v: AMEM.concurrency("k", 1, lease=v),
            "lease",
            VALUE,
        )
    for v in (HUGE, HUGER):
        yield (
            f"concurrency max_in_flight={_n(v)}",
            lambda v=v: MEM.concurrency("k", v),
            "max_in_flight",
            VALUE,
        )
    # the limiter's deadline for one decision: socket and poll timeouts overflow past ~24 days
    for t in (HUGE, HUGER, 1e300, 1e10):
        for cls in (RateLimiter, AsyncRateLimiter):
            n = cls.__name__
            yield (
                f"{n}(MemoryBackend(), timeout={_n(t)})",
                lambda cls=cls, t=t: cls(MemoryBackend(), timeout=t),
                "timeout",
                VALUE,
            )
            yield (
                f"{n}.from_url(redis://, timeout={_n(t)})",
                lambda cls=cls, t=t: cls.from_url("redis://127.0.0.1:6379/0", timeout=t),
                "timeout",
                VALUE,
            )
        yield (
            f"configure(timeout={_n(t)})",
            lambda t=t: configure("memory://", timeout=t),
            "timeout",
            VALUE,
        )


CASES = list(_cases())


@pytest.mark.parametrize(
    ("call", "param", "kinds"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_argument_names_the_parameter(
    call: Callable[[], Any], param: str, kinds: tuple[type[BaseException], ...]
) -> None:
    with pytest.raises(kinds) as info:
        call()
    assert param in str(info.value), f"{param!r} not named in {str(info.value)!r}"
    # every deliberate error is a TokenLimitError (a TypeError from us is a ConfigError too)
    assert isinstance(info.value, TokenLimitError)


def test_both_rate_and_limit() -> None:
    for kwargs in ({"rate": 1, "limit": OK}, {"burst": 2, "limit": OK}):
        with pytest.raises(ConfigError) as info:
            rate_limit(**kwargs, limiter=MEM)  # type: ignore[arg-type]
        assert "limit" in str(info.value)


def test_template_naming_non_parameter() -> None:
    def f(a: int) -> None:
        pass

    with pytest.raises(ConfigError) as info:
        rate_limit(1, key="{b}", limiter=MEM)(f)
    assert "key" in str(info.value)
    assert "b" in str(info.value)


def test_positional_template_field_is_rejected() -> None:
    def f(a: int) -> None:
        pass

    with pytest.raises(ConfigError, match="key"):
        rate_limit(1, key="a{", limiter=MEM)(f)  # malformed template

    with pytest.raises(ConfigError, match="key"):
        rate_limit(1, key="x:{}", limiter=MEM)(f)
    with pytest.raises(ConfigError, match="key"):
        rate_limit(1, key="x:{0}", limiter=MEM)(f)


def test_decorating_a_non_callable() -> None:
    with pytest.raises(TypeError):
        rate_limit(1, limiter=MEM)(5)  # type: ignore[arg-type]


# -- nothing is half-applied ------------------------------------------------------------------


def test_invalid_calls_consume_nothing(limiter: RateLimiter) -> None:
    a, b = Limit(0.001, 5), Limit(0.001, 3)
    assert limiter.try_acquire("h", [a, b]).allowed
    before = (limiter.peek("h", a).remaining, limiter.peek("h", b).remaining)
    assert before == (4, 2)
    bad_calls: list[Callable[[], Any]] = [
        lambda: limiter.try_acquire("h", [a, b], cost=4),  # exceeds b's burst
        lambda: limiter.try_acquire("h", [a, 5]),  # type: ignore[list-item]
        lambda: limiter.try_acquire("h", [a, "garbage"]),
        lambda: limiter.try_acquire("h", [a, b], cost=0),
        lambda: limiter.try_acquire("h", [a, b], cost=True),
        lambda: limiter.acquire("h", [a, b], timeout=-1),
        lambda: limiter.acquire("h", [a, b], cost=4, timeout=5),
        lambda: limiter.reset("h", [a, 5]),  # type: ignore[list-item]
        lambda: limiter.try_acquire("h", (a, "garbage")),  # type: ignore[arg-type]
    ]
    for call in bad_calls:
        with pytest.raises((ConfigError, TypeError)):
            call()
    # An unhashable item in a tuple of limits (the request cache's key): named like any other.
    with pytest.raises(ConfigError, match="limit") as info:
        limiter.try_acquire("h", (a, []))  # type: ignore[arg-type]
    assert info.value.param == "limit"
    after = (limiter.peek("h", a).remaining, limiter.peek("h", b).remaining)
    assert after == before


def test_refused_calls_consume_nothing(limiter: RateLimiter) -> None:
    roomy, tight = Limit(0.001, 10), Limit(0.001, 2)
    assert limiter.try_acquire("r", [roomy, tight], cost=2).allowed
    assert limiter.peek("r", roomy).remaining == 8
    # the tight bucket is empty: every refusal leaves the roomy one untouched
    refused = limiter.try_acquire("r", [roomy, tight])
    assert not refused.allowed
    assert refused.limit == 2
    assert refused.remaining == 0
    with pytest.raises(RateLimitExceeded):
        limiter.acquire("r", [roomy, tight], timeout=0)
    with pytest.raises(RateLimitExceeded):
        limiter.acquire("r", [roomy, tight], timeout=1.0)  # needs ~1000 s: refused at once
    assert not limiter.peek("r", [roomy, tight]).allowed
    assert limiter.peek("r", roomy).remaining == 8
    assert limiter.peek("r", tight).remaining == 0
    # the roomy limit alone still admits exactly its 8
    assert [limiter.try_acquire("r", roomy).allowed for _ in range(9)] == [True] * 8 + [False]


def test_refused_decorated_call_consumes_nothing() -> None:
    lim = RateLimiter.from_url("memory://")
    roomy, tight = Limit(0.001, 10), Limit(0.001, 1)
    calls = []

    @lim.limit(limit=[roomy, tight], key="d", timeout=0.5)
    def work() -> None:
        calls.append(1)

    work()
    for _ in range(3):
        with pytest.raises(RateLimitExceeded):
            work()
    assert calls == [1]
    assert lim.peek("d", roomy).remaining == 9


def test_failed_decoration_leaves_no_state() -> None:
    lim = RateLimiter.from_url("memory://")
    with pytest.raises(ConfigError):
        lim.limit(1, 2, cost=3, key="z")
    with pytest.raises(ConfigError):

        @lim.limit(1, 2, key="z:{nope}")
        def f(a: int) -> None:
            pass

    assert lim.peek("z", Limit(1, 2)).remaining == 2


# -- limits too large to count exactly ---------------------------------------------------------


@pytest.mark.parametrize("rate", [1e9, 1e15, 1e16])
def test_huge_limits_are_refused_or_exact(limiter: RateLimiter, rate: float) -> None:
    """``remaining`` is a whole number of tokens and the Lua script refuses bursts above 2**53:
    a limit the backends cannot count exactly must be refused on construction (ConfigError
    naming the parameter), not accepted and then miscounted or failed as a storage error."""
    try:
        lim = Limit(rate)
    except ConfigError as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        assert "rate" in message or "burst" in message
        return
    # fresh buckets, so refill between calls cannot blur the count
    assert limiter.try_acquire("huge-1", lim, cost=1).remaining == lim.burst - 1
    assert limiter.try_acquire("huge-2", lim, cost=2).remaining == lim.burst - 2


# -- numbers out of range: the one validation path --------------------------------------------


def test_a_refused_number_changes_nothing() -> None:
    """A number out of range is refused before anything is taken or installed."""
    lim = RateLimiter.from_url("memory://")
    assert lim.try_acquire("n", OK).remaining == 2
    for call in (
        lambda: lim.acquire("n", OK, timeout=HUGE),
        lambda: lim.try_acquire("n", OK, cost=HUGE),
        lambda: lim.try_acquire("n", [OK, Limit(1, HUGE)]),
    ):
        with pytest.raises(ConfigError):
            call()
    assert lim.peek("n", OK).remaining == 2
    configure(lim)
    try:
        with pytest.raises(ConfigError):
            configure("memory://", timeout=HUGE)
        from tokenlimit._config import default_sync_limiter

        assert default_sync_limiter() is lim
    finally:
        configure(None)


def test_a_wait_longer_than_sleep_takes_is_slept_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """``acquire`` sleeps ``retry_after`` between tries, and a limit may take up to 1e12 s to
    refill, more than ``time.sleep`` takes (OverflowError): each sleep is bounded, and the next
    try finds the wait that is left."""
    slept: list[float] = []

    class Slept(Exception):
        pass

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        raise Slept

    lim = RateLimiter.from_url("memory://")
    slow = Limit(1.2e-7, 2000)  # 2000 tokens take 1.7e10 s to refill
    assert lim.try_acquire("s", slow, cost=2000).allowed
    monkeypatch.setattr("time.sleep", sleep)
    with pytest.raises(Slept):
        lim.acquire("s", slow, cost=2000)
    assert 0 < slept[0] <= 86_400


NUMBERS = st.one_of(
    st.integers(),
    st.floats(),  # NaN, infinities, subnormals included
    st.builds(lambda e, sign: sign * 10**e, st.integers(300, 5000), st.sampled_from([1, -1])),
    st.builds(lambda e: 10.0**-e, st.integers(0, 330)),
)


def _ours_or_fine(call: Callable[[], Any]) -> Any:
    """``call()``'s result, or None if it raised a ConfigError: nothing else may escape."""
    try:
        return call()
    except ConfigError:
        return None


@settings(max_examples=300, deadline=None)
@given(rate=NUMBERS, burst=NUMBERS)
def test_any_number_makes_a_limit_or_a_config_error(rate: Any, burst: Any) -> None:
    for args in ((rate,), (rate, burst), (1, burst)):
        lim = _ours_or_fine(lambda args=args: Limit(*args))
        if lim is not None:  # what the script needs is finite and exact
            assert 1 <= lim.interval_ns <= 10**21
            assert int(float(lim.interval_ns)) == lim.interval_ns  # the script reads it exactly
            assert 1 <= lim.burst <= 10**9
            assert math.isfinite(lim.fill_time)
            assert lim.label
    for per in (Limit.per_second, Limit.per_day):
        _ours_or_fine(lambda per=per: per(rate))


@settings(max_examples=200, deadline=None)
@given(count=st.integers(0, 10**600), periods=st.integers(0, 10**600))
def test_any_limit_string_parses_or_is_a_config_error(count: int, periods: int) -> None:
    for text in (f"{count}/second", f"{count}/{periods}s", f"{count} per {periods} days"):
        _ours_or_fine(lambda text=text: Limit.parse(text))


@settings(max_examples=200, deadline=None)
@given(value=NUMBERS)
def test_any_number_is_a_cost_timeout_or_lease_or_a_config_error(value: Any) -> None:
    lim = RateLimiter.from_url("memory://")
    wide = Limit(1000, 10**9)
    _ours_or_fine(lambda: lim.try_acquire("k", wide, cost=value))
    _ours_or_fine(lambda: lim.acquire("k", wide, timeout=value))
    _ours_or_fine(lambda: RateLimiter(MemoryBackend(), timeout=value))
    _ours_or_fine(lambda: rate_limit(1, timeout=value, limiter=lim))
    _ours_or_fine(lambda: rate_limit(1, cost=value, limiter=lim))
    _ours_or_fine(lambda: lim.concurrency("c", value))
    _ours_or_fine(lambda: lim.concurrency("c", 1, lease=value))
    _ours_or_fine(lambda: lim.concurrency("c", 1, timeout=value))
