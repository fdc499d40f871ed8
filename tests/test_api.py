"""The public surface of ``tokenlimit`` as DESIGN.md promises it: names, Limit, Decision, errors,
the ``rate_limit`` / ``limiter.limit`` decorator and context manager, and ``configure``."""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import importlib.resources
import inspect
import os
import subprocess
import sys
import textwrap
import time
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tokenlimit
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    ConfigError,
    Decision,
    Limit,
    RateLimiter,
    RateLimitExceeded,
    TokenLimitError,
    configure,
    rate_limit,
)

PACKAGE_PARENT = str(Path(tokenlimit.__file__).resolve().parent.parent)


@pytest.fixture
def mem() -> Iterator[RateLimiter]:
    lim = RateLimiter.from_url("memory://")
    yield lim
    lim.close()


@pytest.fixture
def amem() -> AsyncRateLimiter:
    return AsyncRateLimiter.from_url("memory://")


# -- package surface ---------------------------------------------------------------------------


def test_all_is_pinned() -> None:
    assert tokenlimit.__all__ == [
        "AsyncConcurrency",
        "AsyncRateLimiter",
        "BackendError",
        "Breaker",
        "Chooser",
        "Concurrency",
        "ConfigError",
        "Decision",
        "Guard",
        "Limit",
        "LimitSpec",
        "MemoryBackend",
        "MetricsSink",
        "RateLimitExceeded",
        "RateLimiter",
        "TokenLimitError",
        "__version__",
        "configure",
        "rate_limit",
    ]
    assert tokenlimit.__all__ == sorted(tokenlimit.__all__)
    for name in tokenlimit.__all__:
        assert hasattr(tokenlimit, name), name


def test_the_types_users_annotate_with_are_exported(
    mem: RateLimiter, amem: AsyncRateLimiter
) -> None:
    """What ``concurrency()`` returns, and the limit spellings (a chooser among them)."""
    assert type(mem.concurrency("k", 1)) is tokenlimit.Concurrency
    assert type(amem.concurrency("k", 1)) is tokenlimit.AsyncConcurrency
    spellings = typing.get_args(tokenlimit.LimitSpec)
    assert {Limit, str, tokenlimit.Chooser} <= set(spellings)
    assert typing.get_origin(tokenlimit.Chooser) is collections.abc.Callable


LIMIT_TAKERS = [
    rate_limit,
    tokenlimit.Guard.__init__,
    *(getattr(cls, name) for cls in (RateLimiter, AsyncRateLimiter)
      for name in ("try_acquire", "acquire", "peek", "reset", "hold_back", "refund", "limit")),
]  # fmt: skip


def _mentions_any(hint: Any) -> bool:
    return hint is Any or any(_mentions_any(arg) for arg in typing.get_args(hint))


@pytest.mark.parametrize("function", LIMIT_TAKERS, ids=lambda f: f.__qualname__)
def test_limit_parameters_are_typed_with_the_plan_types(function: Any) -> None:
    """The public seam is typed (no ``Any``): ``limit`` (and ``rate``) with ``LimitSpec``."""
    from tokenlimit import _decorator

    module = sys.modules[function.__module__]
    names = {**vars(tokenlimit), **vars(_decorator), **vars(module)}  # theirs: TYPE_CHECKING
    hints = typing.get_type_hints(function, globalns=names)
    spellings = set(typing.get_args(tokenlimit.LimitSpec))
    assert spellings <= set(typing.get_args(hints["limit"]))
    if "rate" in hints:
        assert spellings | {float, type(None)} == set(typing.get_args(hints["rate"]))
    assert not [name for name, hint in hints.items() if _mentions_any(hint)]


def test_import_does_not_import_web_frameworks(tmp_path: Path) -> None:
    # Make every framework importable (as a stub that records being imported), so that the check
    # means something even where the real frameworks are not installed.
    frameworks = ["fastapi", "flask", "django", "starlette", "rest_framework"]
    for name in frameworks:
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text("import sys\nsys.stderr.write('IMPORTED ' + __name__)\n")
    code = textwrap.dedent(
        f"""
        import sys
        import tokenlimit
        assert tokenlimit.__file__.startswith({PACKAGE_PARENT!r}), tokenlimit.__file__
        roots = {{m.split(".")[0] for m in sys.modules}}
        print(sorted(roots & {set(frameworks)!r}))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_PARENT, str(tmp_path)]))
    env.pop("TOKENLIMIT_URL", None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=tmp_path,  # not the checkout: `-c` puts the working directory first on sys.path
    )
    assert out.stdout.strip() == "[]"
    assert "IMPORTED" not in out.stderr


def test_py_typed_is_shipped() -> None:
    assert importlib.resources.files("tokenlimit").joinpath("py.typed").is_file()


def test_version_is_a_string() -> None:
    assert isinstance(tokenlimit.__version__, str)
    assert tokenlimit.__version__


# -- Limit -------------------------------------------------------------------------------------


def test_limit_construction() -> None:
    lim = Limit(10, 20, name="api")
    assert (lim.rate, lim.burst, lim.name) == (10.0, 20, "api")
    assert isinstance(lim.rate, float)
    assert isinstance(lim.burst, int)
    assert Limit(2.5, 3).rate == 2.5
    assert Limit(10).name is None


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(1, 1), (0.5, 1), (0.001, 1), (2.5, 2), (10, 10), (10.99, 10), (100, 100)],
)
def test_limit_default_burst(rate: float, burst: int) -> None:
    assert Limit(rate).burst == burst


@pytest.mark.parametrize(
    ("make", "rate", "burst"),
    [
        (lambda: Limit.per_second(7), 7.0, 7),
        (lambda: Limit.per_minute(100), 100 / 60, 100),
        (lambda: Limit.per_hour(3600), 1.0, 3600),
        (lambda: Limit.per_day(86400), 1.0, 86400),
        (lambda: Limit.per_hour(5), 5 / 3600, 5),
        (lambda: Limit.per_day(2), 2 / 86400, 2),
        (lambda: Limit.per_minute(100, 10), 100 / 60, 10),
        (lambda: Limit.per_second(1, burst=50), 1.0, 50),
    ],
)
def test_limit_per_unit_constructors(make, rate: float, burst: int) -> None:  # type: ignore[no-untyped-def]
    lim = make()
    assert lim.rate == pytest.approx(rate, rel=1e-15)
    assert lim.burst == burst
    assert lim.name is None


def test_limit_per_unit_name() -> None:
    assert Limit.per_minute(5, name="x").name == "x"


@pytest.mark.parametrize(
    ("text", "rate", "burst"),
    [
        ("100/minute", 100 / 60, 100),
        ("100/min", 100 / 60, 100),
        ("100/m", 100 / 60, 100),
        ("100/minutes", 100 / 60, 100),
        ("10 per second", 10.0, 10),
        ("10/second", 10.0, 10),
        ("10/s", 10.0, 10),
        ("10/sec", 10.0, 10),
        ("5/10s", 0.5, 5),
        ("5/10 seconds", 0.5, 5),
        ("30/5m", 30 / 300, 30),
        ("1000/day", 1000 / 86400, 1000),
        ("1000/d", 1000 / 86400, 1000),
        ("2/hour", 2 / 3600, 2),
        ("2/h", 2 / 3600, 2),
        ("2/hr", 2 / 3600, 2),
        ("  7 / Minute ", 7 / 60, 7),
        ("1/SECOND", 1.0, 1),
    ],
)
def test_limit_parse(text: str, rate: float, burst: int) -> None:
    lim = Limit.parse(text)
    assert lim.rate == pytest.approx(rate, rel=1e-15)
    assert lim.burst == burst
    assert lim.name is None


def test_limit_parse_burst_and_name() -> None:
    lim = Limit.parse("100/minute", burst=5, name="n")
    assert (lim.burst, lim.name) == (5, "n")
    assert lim.rate == pytest.approx(100 / 60)


def test_limit_equality_and_hash() -> None:
    assert Limit.parse("100/minute") == Limit.per_minute(100)
    assert hash(Limit.parse("100/minute")) == hash(Limit.per_minute(100))
    assert Limit.parse("10/second") == Limit(10) == Limit(10.0, 10) == Limit.per_second(10)
    assert Limit(10, 10) != Limit(10, 11)
    assert Limit(10, 10) != Limit(11, 10)
    assert len({Limit(1), Limit(1.0), Limit(1, 1), Limit.parse("1/s")}) == 1


def test_limit_name_distinguishes() -> None:
    a, b, plain = Limit(1, 1, name="a"), Limit(1, 1, name="b"), Limit(1, 1)
    assert a != b
    assert a != plain
    assert len({a, b, plain}) == 3


def test_limit_name_distinguishes_buckets(mem: RateLimiter) -> None:
    a, b = Limit(0.001, 1, name="a"), Limit(0.001, 1, name="b")
    assert mem.try_acquire("k", a).allowed
    assert not mem.try_acquire("k", a).allowed
    assert mem.try_acquire("k", b).allowed
    assert mem.try_acquire("k", Limit(0.001, 1)).allowed


def test_limit_label_is_what_was_written() -> None:
    """A string's limit is labelled as written, a name wins, numbers get a made-up label; the
    label is no part of the limit's identity (==, hash, bucket id)."""
    from tokenlimit._limit import coerce_limits

    written = Limit.parse(" 10/second ", burst=20)
    numbers = Limit(10, 20)
    assert (written.label, numbers.label) == ("10/second", "20-per-2s")
    assert Limit.parse("10/second", burst=20, name="api").label == "api"
    assert Limit(10, 20, name="api").label == "api"
    assert Limit.per_minute(100).label == "100-per-60s"  # numbers: made from them
    assert written == numbers
    assert hash(written) == hash(numbers)
    assert written._id == numbers._id  # one bucket key
    assert repr(written) == repr(numbers)
    split = coerce_limits("10/hour; 100 per day")
    assert [lim.label for lim in split] == ["10/hour", "100 per day"]


def test_two_spellings_share_a_bucket_each_with_its_label(limiter: RateLimiter) -> None:
    """Equal limits spelled apart charge one bucket, and each decision (also a refusal the
    local cache answers, and several limits at once) reports the caller's own label."""
    written, numbers = Limit.parse("2/minute"), Limit(2 / 60, 2)
    first = limiter.try_acquire("k", written)
    second = limiter.try_acquire("k", numbers)
    assert (first.remaining, second.remaining) == (1, 0)
    assert first.policy is written
    assert second.policy is numbers
    for spelling in (written, numbers, written, numbers):  # refused: server, then local cache
        refused = limiter.try_acquire("k", spelling)
        assert not refused.allowed
        assert refused.policy is not None
        assert refused.policy.label == spelling.label
    hourly = Limit.per_hour(5)
    for pair in ((written, hourly), (numbers, hourly)):
        refused = limiter.try_acquire("k", pair)
        assert [part.policy for part in refused.details] == list(pair)


@pytest.mark.parametrize("attr", ["rate", "burst", "name"])
def test_limit_is_frozen(attr: str) -> None:
    lim = Limit(1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(lim, attr, 2)
    assert (lim.rate, lim.burst, lim.name) == (1.0, 1, None)


# -- Decision and errors ---------------------------------------------------------------------


def test_decision_fields_and_frozen(mem: RateLimiter) -> None:
    names = [f.name for f in dataclasses.fields(Decision)]
    assert names[:5] == ["allowed", "limit", "remaining", "retry_after", "reset_after"]
    d = mem.try_acquire("d", Limit(1, 3))
    assert d.allowed is True
    assert (d.limit, d.remaining, d.retry_after) == (3, 2, 0.0)
    assert isinstance(d.limit, int)
    assert isinstance(d.remaining, int)
    assert isinstance(d.retry_after, float)
    assert isinstance(d.reset_after, float)
    assert d.reset_after == pytest.approx(1.0, abs=0.05)
    for name in ["allowed", "limit", "remaining", "retry_after", "reset_after"]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(d, name, 0)
    made = Decision(allowed=False, limit=5, remaining=0, retry_after=1.5, reset_after=2.0)
    assert (made.allowed, made.limit, made.remaining, made.retry_after, made.reset_after) == (
        False,
        5,
        0,
        1.5,
        2.0,
    )


def test_fast_decisions_are_whole_decisions() -> None:
    """The hot paths build one-limit Decisions through the slots' setters: every field is set
    (a field added to Decision must be added there too) and the result is an ordinary one."""
    from tokenlimit._decision import decision

    lim = Limit(2, 5)
    fast = decision(False, 5, 0, 0.25, 1.5, lim)
    slow = Decision(False, 5, 0, 0.25, 1.5, policy=lim)
    for field in dataclasses.fields(Decision):
        assert getattr(fast, field.name) == getattr(slow, field.name), field.name
    assert fast == slow
    assert repr(fast) == repr(slow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.allowed = True  # type: ignore[misc]
    assert dataclasses.replace(fast, shadowed=True).shadowed


def test_limit_hash_is_the_fields_hash() -> None:
    """A Limit's hash is computed once, and is what dataclass would compute from its fields."""
    for lim in (Limit(1), Limit(2.5, 7), Limit(3, 3, name="api")):
        assert hash(lim) == hash((lim.rate, lim.burst, lim.name))


def test_error_tree() -> None:
    for cls in (RateLimitExceeded, BackendError, ConfigError):
        assert issubclass(cls, TokenLimitError)
    assert issubclass(TokenLimitError, Exception)
    assert issubclass(ConfigError, ValueError)
    assert not issubclass(RateLimitExceeded, ValueError)
    assert not issubclass(BackendError, ConfigError)


def test_rate_limit_exceeded_carries_decision(mem: RateLimiter) -> None:
    lim = Limit(1, 1)
    mem.try_acquire("e", lim)
    with pytest.raises(RateLimitExceeded) as info:
        mem.acquire("e", lim, timeout=0)
    assert isinstance(info.value.decision, Decision)
    assert info.value.decision.allowed is False
    assert info.value.retry_after == info.value.decision.retry_after
    assert 0.5 < info.value.retry_after <= 1.0


# -- decorator: shape ------------------------------------------------------------------------


def test_async_decoration_keeps_shape(mem: RateLimiter, amem: AsyncRateLimiter) -> None:
    async def fetch(user_id: int, *, region: str = "eu") -> str:
        """Fetch a thing."""
        return f"{user_id}-{region}"

    for guard in (
        rate_limit(5, limiter=mem),
        rate_limit(5, limiter=amem),
        mem.limit(5),
        amem.limit(5),
    ):
        wrapped = guard(fetch)
        assert inspect.iscoroutinefunction(wrapped)
        assert inspect.signature(wrapped) == inspect.signature(fetch)
        assert wrapped.__name__ == "fetch"
        assert wrapped.__qualname__ == fetch.__qualname__
        assert wrapped.__doc__ == "Fetch a thing."
        assert wrapped.__wrapped__ is fetch
        assert asyncio.run(wrapped(1)) == "1-eu"


def test_sync_decoration_keeps_shape(mem: RateLimiter) -> None:
    def compute(a: int, b: int = 2) -> int:
        """Add."""
        return a + b

    for guard in (rate_limit(5, limiter=mem), mem.limit(5)):
        wrapped = guard(compute)
        assert not inspect.iscoroutinefunction(wrapped)
        assert inspect.signature(wrapped) == inspect.signature(compute)
        assert wrapped.__name__ == "compute"
        assert wrapped.__doc__ == "Add."
        assert wrapped.__wrapped__ is compute
        assert wrapped(1) == 3
        assert wrapped(1, b=5) == 6


def test_async_limiter_refuses_plain_def_at_decoration(amem: AsyncRateLimiter) -> None:
    def plain() -> None:
        pass

    with pytest.raises(TypeError):
        amem.limit(5)(plain)
    with pytest.raises(TypeError):
        rate_limit(5, limiter=amem)(plain)


# -- decorator: keys -------------------------------------------------------------------------


def test_template_key_binds_defaults_and_keywords(mem: RateLimiter) -> None:
    lim = Limit(0.001, 10)

    @mem.limit(limit=lim, key="user:{user_id}:{region}")
    def handler(user_id: int, region: str = "eu") -> str:
        return region

    handler(1)
    handler(user_id=1)
    handler(1, "us")
    handler(1, region="us")
    handler(user_id=2, region="ap")
    assert mem.peek("user:1:eu", lim).remaining == 8
    assert mem.peek("user:1:us", lim).remaining == 8
    assert mem.peek("user:2:ap", lim).remaining == 9
    assert mem.peek("user:2:eu", lim).remaining == 10


def test_template_key_async(amem: AsyncRateLimiter) -> None:
    lim = Limit(0.001, 10)

    @amem.limit(limit=lim, key="user:{user_id}:{region}")
    async def handler(user_id: int, region: str = "eu") -> str:
        return region

    async def main() -> tuple[int, int]:
        await handler(1)
        await handler(1, region="us")
        await handler(user_id=1, region="us")
        eu = await amem.peek("user:1:eu", lim)
        us = await amem.peek("user:1:us", lim)
        return eu.remaining, us.remaining

    assert asyncio.run(main()) == (9, 8)


def test_template_key_with_var_keyword(mem: RateLimiter) -> None:
    lim = Limit(0.001, 10)

    @mem.limit(limit=lim, key="t:{tenant}")
    def handler(**kwargs: object) -> None:
        pass

    handler(tenant="acme")
    assert mem.peek("t:acme", lim).remaining == 9


def test_callable_key_receives_the_call_arguments(mem: RateLimiter) -> None:
    lim = Limit(0.001, 10)
    seen: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def key_of(*args: object, **kwargs: object) -> str:
        seen.append((args, kwargs))
        return f"cb:{args[0]}:{kwargs.get('region', 'eu')}"

    @mem.limit(limit=lim, key=key_of)
    def handler(user_id: int, region: str = "eu") -> None:
        pass

    handler(7)
    handler(7, region="us")
    assert seen == [((7,), {}), ((7,), {"region": "us"})]
    assert mem.peek("cb:7:eu", lim).remaining == 9
    assert mem.peek("cb:7:us", lim).remaining == 9


def test_callable_key_async(amem: AsyncRateLimiter) -> None:
    lim = Limit(0.001, 10)

    @amem.limit(limit=lim, key=lambda user_id: f"u{user_id}")
    async def handler(user_id: int) -> int:
        return user_id

    async def main() -> int:
        await handler(3)
        await handler(user_id=3)
        return (await amem.peek("u3", lim)).remaining

    assert asyncio.run(main()) == 8


def test_key_none_one_bucket_per_function(mem: RateLimiter) -> None:
    @mem.limit(0.001, 2)
    def first() -> None:
        pass

    @mem.limit(0.001, 2)
    def second() -> None:
        pass

    first()
    first()
    with pytest.raises(RateLimitExceeded):
        first()
    second()  # its own bucket, untouched by first()
    second()
    with pytest.raises(RateLimitExceeded):
        second()


def test_literal_key_shared_across_functions(mem: RateLimiter) -> None:
    lim = Limit(0.001, 2)

    @mem.limit(limit=lim, key="shared")
    def a() -> None:
        pass

    @mem.limit(limit=lim, key="shared")
    def b() -> None:
        pass

    a()
    b()
    with pytest.raises(RateLimitExceeded):
        a()
    assert mem.peek("shared", lim).remaining == 0


def test_template_naming_unknown_parameter_fails_at_decoration(mem: RateLimiter) -> None:
    def handler(user_id: int) -> None:
        pass

    with pytest.raises(ConfigError, match="key"):
        mem.limit(5, key="user:{user}")(handler)
    with pytest.raises(ConfigError, match="key"):
        rate_limit(5, key="{user_id}:{nope}", limiter=mem)(handler)

    async def ahandler(user_id: int) -> None:
        pass

    with pytest.raises(ConfigError, match="key"):
        mem.limit(5, key="user:{user}")(ahandler)


# -- decorator: refusal, waiting ------------------------------------------------------------


def test_refusal_raises(mem: RateLimiter) -> None:
    calls = []

    @rate_limit(0.001, 2, key="r", limiter=mem)
    def work() -> None:
        calls.append(1)

    work()
    work()
    with pytest.raises(RateLimitExceeded) as info:
        work()
    assert len(calls) == 2  # the refused call did not run
    assert info.value.retry_after > 0


@pytest.mark.parametrize("which", ["sync", "async"])
def test_refusal_raises_async(amem: AsyncRateLimiter, mem: RateLimiter, which: str) -> None:
    lim = mem if which == "sync" else amem
    calls = []

    @lim.limit(0.001, 1, key="r")
    async def work() -> None:
        calls.append(1)

    async def main() -> None:
        await work()
        with pytest.raises(RateLimitExceeded):
            await work()

    asyncio.run(main())
    assert len(calls) == 1


def test_decorator_timeout_waits_then_succeeds(mem: RateLimiter) -> None:
    @rate_limit(20, 1, key="w", timeout=1, limiter=mem)
    def work() -> str:
        return "ok"

    assert work() == "ok"
    start = time.monotonic()
    assert work() == "ok"
    elapsed = time.monotonic() - start
    assert 0.03 <= elapsed < 0.5


def test_decorator_timeout_waits_then_succeeds_async(
    mem: RateLimiter, amem: AsyncRateLimiter
) -> None:
    for lim in (mem, amem):

        @lim.limit(20, 1, key="w", timeout=1)
        async def work() -> str:
            return "ok"

        async def main() -> float:
            await work()
            start = time.monotonic()
            assert await work() == "ok"
            return time.monotonic() - start

        assert 0.03 <= asyncio.run(main()) < 0.5


def test_decorator_timeout_too_short_refuses_at_once(mem: RateLimiter) -> None:
    lim = Limit(1, 1)

    @mem.limit(limit=lim, key="short", timeout=0.2)
    def work() -> None:
        pass

    work()
    start = time.monotonic()
    with pytest.raises(RateLimitExceeded):
        work()
    assert time.monotonic() - start < 0.15
    assert mem.peek("short", lim).remaining == 0


# -- decorator: how the limit is given ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"rate": "5/second"}, Limit(5, 5)),
        ({"rate": 5}, Limit(5, 5)),
        ({"rate": 5.0}, Limit(5, 5)),
        ({"rate": 5, "burst": 3}, Limit(5, 3)),
        ({"rate": "100/minute"}, Limit.per_minute(100)),
        ({"rate": "100/minute", "burst": 4}, Limit.per_minute(100, 4)),
        ({"limit": Limit(2, 4)}, Limit(2, 4)),
        ({"limit": "10/hour"}, Limit.per_hour(10)),
    ],
)
def test_rate_spellings(mem: RateLimiter, kwargs: dict[str, object], expect: Limit) -> None:
    @rate_limit(**kwargs, key="spell", limiter=mem)  # type: ignore[arg-type]
    def work() -> None:
        pass

    work()
    d = mem.peek("spell", expect)
    assert d.remaining == expect.burst - 1
    assert d.limit == expect.burst


def test_limit_list_all_taken(mem: RateLimiter) -> None:
    fast, daily = Limit(10, 10), Limit.per_day(3)

    @mem.limit(limit=[fast, daily], key="multi")
    def work() -> None:
        pass

    for _ in range(3):
        work()
    with pytest.raises(RateLimitExceeded):
        work()
    assert mem.peek("multi", fast).remaining == 7
    assert mem.peek("multi", daily).remaining == 0


def test_limit_list_of_strings(mem: RateLimiter) -> None:
    @rate_limit(limit=["10/second", "2/minute"], key="ms", limiter=mem)
    def work() -> None:
        pass

    work()
    work()
    with pytest.raises(RateLimitExceeded):
        work()
    assert mem.peek("ms", Limit.parse("10/second")).remaining == 8


def test_rate_and_limit_together_is_config_error(mem: RateLimiter) -> None:
    with pytest.raises(ConfigError):
        rate_limit(5, limit=Limit(5), limiter=mem)
    with pytest.raises(ConfigError):
        mem.limit("5/second", limit="5/second")


# -- context manager ---------------------------------------------------------------------------


def test_with_block(mem: RateLimiter) -> None:
    lim = Limit(0.001, 2)
    entered = 0
    for _ in range(2):
        with rate_limit(limit=lim, key="k", limiter=mem) as decision:
            entered += 1
            assert decision.allowed
    with pytest.raises(RateLimitExceeded), mem.limit(limit=lim, key="k"):
        entered += 1
    assert entered == 2
    assert mem.peek("k", lim).remaining == 0


@pytest.mark.parametrize("which", ["sync", "async"])
def test_async_with_block(mem: RateLimiter, amem: AsyncRateLimiter, which: str) -> None:
    limiter = mem if which == "sync" else amem
    lim = Limit(0.001, 2)

    async def main() -> int:
        entered = 0
        for _ in range(2):
            async with rate_limit(limit=lim, key="k", limiter=limiter):
                entered += 1
        with pytest.raises(RateLimitExceeded):
            async with limiter.limit(limit=lim, key="k"):
                entered += 1
        return entered

    assert asyncio.run(main()) == 2


def test_with_block_rejects_template_and_callable_keys(mem: RateLimiter) -> None:
    lim = Limit(1, 2)
    with (
        pytest.raises(ConfigError, match="key"),
        rate_limit(limit=lim, key="user:{user_id}", limiter=mem),
    ):
        pass

    async def main() -> None:
        async with mem.limit(limit=lim, key="user:{user_id}"):
            pass

    with pytest.raises(ConfigError, match="key"):
        asyncio.run(main())
    with pytest.raises(ConfigError, match="key"), mem.limit(limit=lim, key=lambda: "x"):
        pass
    assert mem.peek("user:{user_id}", lim).remaining == 2


# -- sync limiter on async def: the loop keeps running -----------------------------------------


def _loop_progress_while_waiting(limiter: RateLimiter) -> tuple[int, float]:
    @limiter.limit(5, 1, key="loop", timeout=2)
    async def work() -> str:
        return "done"

    async def main() -> tuple[int, float]:
        assert await work() == "done"  # takes the only token
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = time.monotonic()
        assert await work() == "done"  # must wait ~0.2 s for a token
        elapsed = time.monotonic() - start
        stop = True
        await task
        return ticks, elapsed

    return asyncio.run(main())


def test_sync_limiter_on_async_def_does_not_block_loop_memory(mem: RateLimiter) -> None:
    ticks, elapsed = _loop_progress_while_waiting(mem)
    assert 0.1 <= elapsed < 1.5
    assert ticks >= 10


def test_sync_limiter_on_async_def_does_not_block_loop_redis(standalone) -> None:  # type: ignore[no-untyped-def]
    with RateLimiter.from_url(standalone.url, timeout=5.0) as limiter:
        ticks, elapsed = _loop_progress_while_waiting(limiter)
        assert limiter.peek("loop", Limit(5, 1)).remaining == 0
    assert 0.1 <= elapsed < 1.5
    assert ticks >= 10


def test_sync_limiter_on_async_def_network_call_off_loop(standalone) -> None:  # type: ignore[no-untyped-def]
    """Each decision is a network round trip: it must not run on the event-loop thread."""
    import threading

    with RateLimiter.from_url(standalone.url, timeout=5.0) as limiter:
        threads: list[int] = []
        original = limiter.backend.decide

        def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
            threads.append(threading.get_ident())
            return original(*args, **kwargs)

        limiter.backend.decide = spy

        @limiter.limit(100, key="off")
        async def work() -> int:
            return threading.get_ident()

        loop_thread = asyncio.run(work())
        assert threads
        assert all(t != loop_thread for t in threads)
        assert limiter.peek("off", Limit(100)).remaining == 99


# -- configure() and the default limiter --------------------------------------------------------


def test_configure_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENLIMIT_URL", raising=False)
    configure("memory://")
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @rate_limit(0.001, 1, key="c")
        def work() -> None:
            pass

        work()
        with pytest.raises(RateLimitExceeded):
            work()


def test_configure_limiter(mem: RateLimiter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENLIMIT_URL", raising=False)
    configure(mem)
    lim = Limit(0.001, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @rate_limit(limit=lim, key="cl")
        def work() -> None:
            pass

        work()
        with rate_limit(limit=lim, key="cl"):
            pass
    assert mem.peek("cl", lim).remaining == 1


def test_configure_async_limiter(amem: AsyncRateLimiter) -> None:
    configure(amem)
    lim = Limit(0.001, 3)

    @rate_limit(limit=lim, key="ca")
    async def work() -> None:
        pass

    async def main() -> int:
        await work()
        return (await amem.peek("ca", lim)).remaining

    assert asyncio.run(main()) == 2


def test_unconfigured_warns_and_uses_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENLIMIT_URL", raising=False)
    configure(None)

    @rate_limit(0.001, 1, key="warned")
    def work() -> None:
        pass

    with pytest.warns(RuntimeWarning, match="memory"):
        work()
    with pytest.raises(RateLimitExceeded):
        work()


def test_unconfigured_warns_async(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENLIMIT_URL", raising=False)
    configure(None)

    @rate_limit(0.001, 1, key="warned-async")
    async def work() -> None:
        pass

    with pytest.warns(RuntimeWarning, match="memory"):
        asyncio.run(work())


def test_tokenlimit_url_is_honoured(standalone, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TOKENLIMIT_URL", standalone.url)
    configure(None)
    lim = Limit(0.001, 5)

    @rate_limit(limit=lim, key="env")
    def work() -> None:
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        work()
        work()
        with rate_limit(limit=lim, key="env"):
            pass
    with RateLimiter.from_url(standalone.url) as other:
        assert other.peek("env", lim).remaining == 2


def test_tokenlimit_url_async_default_limiter(standalone) -> None:  # type: ignore[no-untyped-def]
    """The default async limiter honours TOKENLIMIT_URL too, and closes what it opens: running
    decorated coroutines in several event loops (``asyncio.run`` per job, Django's
    ``async_to_sync`` per request) must not leak one unclosed connection per loop.

    Run in a subprocess: a leaked connection is only reported when it is garbage-collected,
    which in-process would fail some unrelated later test."""
    code = textwrap.dedent(
        """
        import asyncio, gc, sys
        import tokenlimit

        lim = tokenlimit.Limit(0.001, 5)

        @tokenlimit.rate_limit(limit=lim, key="env-async")
        async def work():
            return "ok"

        for _ in range(3):
            assert asyncio.run(work()) == "ok"
        tokenlimit.configure(None)
        gc.collect()
        with tokenlimit.RateLimiter.from_url(sys.argv[1]) as other:
            print(other.peek("env-async", lim).remaining)
        """
    )
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, TOKENLIMIT_URL=standalone.url)
    out = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", code, standalone.url],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"
    assert "RuntimeWarning" not in out.stderr  # TOKENLIMIT_URL was set: no memory:// warning
    assert "ResourceWarning" not in out.stderr, out.stderr


@pytest.mark.parametrize("how", ["configured", "fallback"])
def test_sync_and_async_share_the_default_memory_bucket(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENLIMIT_URL", raising=False)
    configure("memory://" if how == "configured" else None)
    lim = Limit(0.001, 3)

    @rate_limit(limit=lim, key="both")
    def sync_work() -> None:
        pass

    @rate_limit(limit=lim, key="both")
    async def async_work() -> None:
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sync_work()
        asyncio.run(async_work())
        sync_work()
        with pytest.raises(RateLimitExceeded):
            asyncio.run(async_work())
        with pytest.raises(RateLimitExceeded):
            sync_work()


def test_guard_is_usable_directly_at_script_top_level() -> None:
    """``Guard`` is a public name (in ``__all__``): constructing it where the call stack is
    shallow (the top level of a script) must work like ``rate_limit(...)`` does."""
    code = textwrap.dedent(
        """
        from tokenlimit import Guard, Limit, RateLimiter, rate_limit
        lim = RateLimiter.from_url("memory://")
        rate_limit(1, key="a", limiter=lim)
        with Guard(1, key="g", limiter=lim):
            pass
        print(lim.peek("g", Limit(1)).remaining)
        """
    )
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_the_twins_have_the_same_public_methods() -> None:
    """``RateLimiter`` and ``AsyncRateLimiter`` offer the same names (``close``/``aclose`` and
    the context-manager protocols aside), ``hold_back`` and ``refund`` among them."""

    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_")} - {"close", "aclose"}

    assert public(RateLimiter) == public(AsyncRateLimiter)
    assert {"hold_back", "refund"} <= public(RateLimiter)
