"""The input table, completing tests/test_validation.py: every bad value at every public entry
point raises ConfigError (a TypeError too for a wrong type) whose ``param`` is the parameter
that received it, at the call that received it, and nothing is consumed.

test_validation.py holds the table for ``Limit``, ``Limit.parse``, ``per_*``, the limiter
methods, ``from_url`` options, ``rate_limit`` and ``limiter.limit``; this file adds the
limiters' constructors, ``configure``, server URLs (bad ports, databases, query values),
``local_cache``, limit strings at every entry point, keys that a decorator computes per call,
the exact ``param`` of every case in both tables, and "nothing consumed" on a real server.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import Target
from test_validation import CASES

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
from tokenlimit._url import parse_url

OK = Limit(0.001, 3)
TYPE = (TypeError, ConfigError)
VALUE = (ConfigError,)
Kinds = tuple[type[BaseException], ...]
Case = tuple[str, Callable[[], Any], str, Kinds]

BAD_LIMIT_STRINGS = [
    "", " ", "10", "10/", "/second", "10/fortnight", "0/second", "-5/minute", "1.5/second",
    "10/0s", "ten/second", "10/second/day", "10//second", "1e3/second", "10/second\x00",
    "99999999999999999999/second",  # a rate beyond 1e9/s
    "2000000000/day",  # a burst beyond 1e9
    "1/99999999999d",  # a token per 3e6 years
]  # fmt: skip

BAD_SERVER_URLS = [
    "redis://127.0.0.1:notaport/0",
    "redis://127.0.0.1:99999/0",
    "redis://127.0.0.1:-1/0",
    "redis://[::1/0",
    "redis://127.0.0.1:6379/notadb",
    "redis://127.0.0.1:6379/1O",  # a typo for 10: not database 0
    "redis://127.0.0.1:6379/0?socket_timeout=abc",
    "redis://127.0.0.1:6379/0?max_connections=abc",
    "unix://",
    "redis+cluster://",
    "redis+cluster://127.0.0.1:abc",
    "ftp://127.0.0.1/0",
    "127.0.0.1:6379",
]


def _constructor_cases() -> Iterator[Case]:
    for cls in (RateLimiter, AsyncRateLimiter):
        n = cls.__name__
        yield f"{n}(5)", lambda cls=cls: cls(5), "client", TYPE
        yield f"{n}('redis://')", lambda cls=cls: cls("redis://x"), "client", TYPE
        yield f"{n}(None)", lambda cls=cls: cls(None), "client", TYPE
        options: list[tuple[str, Any, Kinds]] = [
            ("prefix", "a{b", VALUE), ("prefix", 5, TYPE), ("prefix", None, TYPE),
            ("timeout", 0, VALUE), ("timeout", -1, VALUE), ("timeout", math.nan, VALUE),
            ("timeout", math.inf, VALUE), ("timeout", "1", TYPE), ("timeout", True, TYPE),
            ("failure_mode", "maybe", VALUE), ("failure_mode", None, VALUE),
            ("failure_mode", 1, TYPE), ("local_cache", -1, VALUE), ("local_cache", 1.5, TYPE),
            ("local_cache", "100", TYPE), ("local_cache", None, TYPE),
            ("metrics", object(), TYPE),
        ]  # fmt: skip
        for name, value, kind in options:
            yield (
                f"{n}(MemoryBackend(), {name}={value!r})",
                lambda cls=cls, name=name, value=value: cls(MemoryBackend(), **{name: value}),
                name,
                kind,
            )
            yield (
                f"{n}.from_url(memory://, {name}={value!r})",
                lambda cls=cls, name=name, value=value: cls.from_url("memory://", **{name: value}),
                name,
                kind,
            )
            yield (
                f"configure(memory://, {name}={value!r}) via {n}",
                lambda name=name, value=value: configure("memory://", **{name: value}),
                name,
                kind,
            )
        for url in BAD_SERVER_URLS:
            yield f"{n}.from_url({url!r})", lambda cls=cls, url=url: cls.from_url(url), "url", VALUE
    for url in BAD_SERVER_URLS:
        yield f"configure({url!r})", lambda url=url: configure(url), "url", VALUE
    for value in (5, b"redis://x", object()):
        yield f"configure({value!r})", lambda value=value: configure(value), "url_or_limiter", TYPE


MEM = RateLimiter.from_url("memory://")
AMEM = AsyncRateLimiter.from_url("memory://")


def _limit_string_cases() -> Iterator[Case]:
    """Each bad limit string at every entry point that takes one, named as it was received."""
    for text in BAD_LIMIT_STRINGS:
        yield f"Limit.parse({text!r})", lambda t=text: Limit.parse(t), "limit", VALUE
        for meth in ("try_acquire", "acquire", "peek", "reset"):
            yield (
                f"{meth}('k', {text!r})",
                lambda t=text, m=meth: getattr(MEM, m)("k", t),
                "limit",
                VALUE,
            )
            yield (
                f"async {meth}('k', {text!r})",
                lambda t=text, m=meth: asyncio.run(getattr(AMEM, m)("k", t)),
                "limit",
                VALUE,
            )
            yield (
                f"{meth}('k', [OK, {text!r}])",
                lambda t=text, m=meth: getattr(MEM, m)("k", [OK, t]),
                "limit",
                VALUE,
            )
        yield f"rate_limit({text!r})", lambda t=text: rate_limit(t, limiter=MEM), "rate", VALUE
        yield (
            f"rate_limit(limit={text!r})",
            lambda t=text: rate_limit(limit=t, limiter=MEM),
            "limit",
            VALUE,
        )
        yield f"MEM.limit({text!r})", lambda t=text: MEM.limit(t), "rate", VALUE
        yield (
            f"AMEM.limit(limit=[{text!r}])",
            lambda t=text: AMEM.limit(limit=[t]),
            "limit",
            VALUE,
        )


NEW_CASES = [*_constructor_cases(), *_limit_string_cases()]


@pytest.mark.parametrize(
    ("call", "param", "kinds"), [c[1:] for c in NEW_CASES], ids=[c[0] for c in NEW_CASES]
)
def test_bad_argument_names_the_parameter(
    call: Callable[[], Any], param: str, kinds: Kinds
) -> None:
    with pytest.raises(kinds) as info:
        call()
    assert isinstance(info.value, ConfigError), repr(info.value)
    assert info.value.param == param, str(info.value)
    assert str(info.value).startswith(f"{param}: ")
    assert "pw-secret" not in str(info.value)


@pytest.mark.parametrize(("call", "param"), [c[1:3] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_table_names_exactly_the_parameter(call: Callable[[], Any], param: str) -> None:
    """test_validation.py checks that the message mentions the parameter; here, that the
    error's ``param`` is exactly that parameter."""
    with pytest.raises(TokenLimitError) as info:
        call()
    assert isinstance(info.value, ConfigError)
    assert info.value.param == param, str(info.value)


def test_a_url_with_a_password_is_never_echoed() -> None:
    for url in ("redis://user:pw-secret@127.0.0.1:notaport/0",
                "ftp://user:pw-secret@127.0.0.1/0",
                "redis://user:pw-secret@127.0.0.1:6379/notadb"):  # fmt: skip
        for build in (RateLimiter.from_url, AsyncRateLimiter.from_url, configure):
            with pytest.raises(ConfigError) as info:
                build(url)
            assert info.value.param == "url"
            assert "pw-secret" not in str(info.value)
            assert "pw-secret" not in repr(info.value.__cause__)


def test_upper_case_schemes_work_everywhere() -> None:
    """The scheme is case-insensitive (RFC 3986), for the sync limiter as for the async one."""
    for url in ("REDIS://127.0.0.1:6379/0", "Redis://127.0.0.1:6379/0", "MEMORY://"):
        RateLimiter.from_url(url).close()
        AsyncRateLimiter.from_url(url)
        configure(url)


def test_valkey_schemes_name_the_redis_ones(target: Target) -> None:
    """``valkey://`` is ``redis://``, ``valkey+cluster://`` is ``redis+cluster://`` (and the TLS
    and Sentinel spellings alike): the same server, the same buckets, sync and async."""
    assert target.url.startswith("redis")
    alias = "valkey" + target.url[len("redis") :]
    assert parse_url(alias) == parse_url(target.url)
    assert parse_url("VALKEYS+sentinel://h:26379/primary")[0] == "rediss+sentinel"
    with RateLimiter.from_url(alias) as via_alias, RateLimiter.from_url(target.url) as plain:
        assert via_alias.try_acquire("valkey-alias", "1/minute").allowed
        assert not plain.try_acquire("valkey-alias", "1/minute").allowed

    async def main() -> bool:
        limiter = AsyncRateLimiter.from_url(alias)
        try:
            return (await limiter.try_acquire("valkey-alias", "1/minute")).allowed
        finally:
            await limiter.aclose()

    assert asyncio.run(main()) is False


def test_an_unknown_scheme_lists_the_valkey_spellings() -> None:
    with pytest.raises(ConfigError, match="valkey://") as info:
        RateLimiter.from_url("valkey-cluster://127.0.0.1:6379")
    assert info.value.param == "url"


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ("redis+unix:///var/run/redis.sock", "write unix:///path/to/socket"),
        ("async+redis://localhost:6379", "write redis:// and use AsyncRateLimiter"),
        ("async+valkey://localhost:6379", "write valkey:// and use AsyncRateLimiter"),
        ("memcached://localhost:11211", "Redis and Valkey run (or memory://)"),
        ("mongodb://localhost:27017", "Redis and Valkey run (or memory://)"),
    ],
)
def test_the_limits_packages_schemes_name_ours(theirs: str, ours: str) -> None:
    """flask-limiter's and slowapi's storage URLs (the ``limits`` package's) say what to write."""
    with pytest.raises(ConfigError, match="url") as info:
        RateLimiter.from_url(theirs)
    assert str(info.value).endswith(ours), str(info.value)


# -- keys a decorator computes per call: refused at that call, before anything is taken ----------


@pytest.mark.parametrize(
    ("bad", "kind"),
    [(None, TYPE), ("", VALUE), (5, TYPE), (b"", VALUE), (["k"], TYPE), ("x" * (1 << 21), VALUE)],
    ids=["None", "empty", "int", "empty-bytes", "list", "2MB"],
)
def test_a_computed_key_is_checked_at_the_decorated_call(bad: Any, kind: Kinds) -> None:
    limiter = RateLimiter.from_url("memory://")
    ran: list[int] = []

    @limiter.limit(limit=OK, key=lambda n: bad if n else "good")
    def work(n: int) -> None:
        ran.append(n)

    work(0)
    with pytest.raises(kind) as info:
        work(1)
    assert isinstance(info.value, ConfigError)
    assert info.value.param == "key"
    assert ran == [0]  # the function did not run
    assert limiter.peek("good", OK).remaining == 2

    async def main() -> None:
        alimiter = AsyncRateLimiter.from_url("memory://")

        @alimiter.limit(limit=OK, key=lambda: bad)
        async def awork() -> None:
            ran.append(2)

        with pytest.raises(kind) as ainfo:
            await awork()
        assert isinstance(ainfo.value, ConfigError)
        assert ainfo.value.param == "key"

    asyncio.run(main())
    assert ran == [0]


# -- nothing is consumed: every bad method call, on a real server ---------------------------------


def _method_calls(limiter: RateLimiter) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Bad calls on ``limiter`` that name the bucket ("victim", OK) or include it."""
    for key in (None, "", 3, b"", ["victim"]):
        for meth in ("try_acquire", "acquire", "peek", "reset"):
            yield f"{meth} key={key!r}", lambda m=meth, k=key: getattr(limiter, m)(k, OK)
    for lim in (None, [], "garbage", 5, [OK, 5], [OK, "10/fortnight"], b"1/s"):
        for meth in ("try_acquire", "acquire", "peek", "reset"):
            yield f"{meth} limit={lim!r}", lambda m=meth, li=lim: getattr(limiter, m)("victim", li)
    for cost in (0, -1, 1.5, True, "1", None, 4):
        for meth in ("try_acquire", "acquire", "peek"):
            yield (
                f"{meth} cost={cost!r}",
                lambda m=meth, c=cost: getattr(limiter, m)(
                    "victim", [OK, Limit(0.001, 10)], cost=c
                ),
            )
    for t in (-1, math.nan, math.inf, "1", True):
        yield f"acquire timeout={t!r}", lambda t=t: limiter.acquire("victim", OK, timeout=t)


def test_bad_calls_consume_nothing_on_a_server(standalone: Target) -> None:
    wide = Limit(0.001, 10)
    with RateLimiter.from_url(standalone.url, timeout=5.0, local_cache=False) as limiter:
        assert limiter.try_acquire("victim", [OK, wide]).allowed
        calls = list(_method_calls(limiter))
        assert len(calls) >= 70
        for label, call in calls:
            with pytest.raises(ConfigError):
                call()
            assert limiter.peek("victim", OK).remaining == 2, label
            assert limiter.peek("victim", wide).remaining == 9, label
        with pytest.raises(RateLimitExceeded):  # a refusal takes nothing either
            limiter.acquire("victim", [OK, wide], cost=3, timeout=0)
        assert limiter.peek("victim", [OK, wide]).remaining == 2
    with redis.Redis.from_url(standalone.url) as client:
        keys = sorted(client.scan_iter(count=1000))
    assert len(keys) == 2  # the bucket's two keys; no bad call wrote anything
