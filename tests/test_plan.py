"""One limit syntax at every entry point, and choosers called as key templates are filled.

Every entry point that takes a limit (``rate_limit``, ``limiter.limit`` sync and async, FastAPI's
``RateLimit`` and ``RateLimitMiddleware``, Flask's ``TokenLimit`` and ``.limit``, Django's
``ratelimit``) accepts the same spellings: a number or a string rate with ``burst=``, a
``Limit``, a list of them, or a chooser. A decorator's chooser gets the call's bound arguments
with the defaults applied, as a key template does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tokenlimit import (
    AsyncRateLimiter,
    ConfigError,
    Limit,
    RateLimiter,
    RateLimitExceeded,
    rate_limit,
)

SLOW = Limit(0.001, 3)  # what every spelling below means: 3 tokens, one back every 1000 s


def _chooser(*args: Any, **kwargs: Any) -> Limit:
    return SLOW


# (args, kwargs) for the first (rate-like) parameter, and the burst they must give
SPELLINGS: list[Any] = [
    pytest.param((0.001,), {"burst": 3}, 3, id="number-burst"),
    pytest.param((0.001,), {}, 1, id="number"),  # one second's worth, at least 1
    pytest.param(("1/1000s",), {"burst": 3}, 3, id="string-burst"),
    pytest.param(("3/3000s",), {}, 3, id="string"),
    pytest.param((SLOW,), {}, 3, id="Limit"),
    pytest.param(([SLOW],), {}, 3, id="list"),
    pytest.param((["3/3000s"],), {}, 3, id="list-of-strings"),
    pytest.param((_chooser,), {}, 3, id="chooser"),
    # the ``limits`` syntax flask-limiter and slowapi users bring: several limits in one string
    pytest.param(("3/3000s;100/day",), {}, 3, id="limits-semicolon"),
    pytest.param(("100/year, 3 per 3000 seconds",), {}, 3, id="limits-comma-per"),
    pytest.param(("3/month",), {}, 3, id="month"),
]


def admitted(call: Callable[[], Any], n: int = 6) -> int:
    """How many of ``n`` calls pass before the first refusal (an exception or a 429)."""
    for i in range(n):
        try:
            outcome = call()
        except RateLimitExceeded:
            return i
        if getattr(outcome, "status_code", 200) == 429:
            return i
    return n


@pytest.mark.parametrize(("args", "kwargs", "burst"), SPELLINGS)
def test_rate_limit_and_limiter_limit(args: Any, kwargs: Any, burst: int) -> None:
    lim = RateLimiter.from_url("memory://")
    assert admitted(rate_limit(*args, **kwargs, key="a", limiter=lim)(lambda: None)) == burst
    assert admitted(lim.limit(*args, **kwargs, key="b")(lambda: None)) == burst

    alim = AsyncRateLimiter.from_url("memory://")

    async def work() -> None:
        return None

    guarded = alim.limit(*args, **kwargs, key="c")(work)
    assert admitted(lambda: asyncio.run(guarded())) == burst


@pytest.mark.parametrize(("args", "kwargs", "burst"), SPELLINGS)
def test_fastapi_dependency_and_middleware(args: Any, kwargs: Any, burst: int) -> None:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from tokenlimit.integrations.fastapi import RateLimit, RateLimitMiddleware, install_handlers

    app = FastAPI()
    install_handlers(app)
    guard = RateLimit(*args, **kwargs, limiter=AsyncRateLimiter.from_url("memory://"))

    @app.get("/d", dependencies=[Depends(guard)])
    async def dependency_route() -> str:
        return "ok"

    with TestClient(app) as client:
        assert admitted(lambda: client.get("/d")) == burst

    (limit,) = args
    middleware = FastAPI()
    middleware.add_middleware(
        RateLimitMiddleware, limit=limit, **kwargs, limiter=AsyncRateLimiter.from_url("memory://")
    )

    @middleware.get("/m")
    async def middleware_route() -> str:
        return "ok"

    with TestClient(middleware) as client:
        assert admitted(lambda: client.get("/m")) == burst


@pytest.mark.parametrize(("args", "kwargs", "burst"), SPELLINGS)
def test_flask_default_and_view_limits(args: Any, kwargs: Any, burst: int) -> None:
    from flask import Flask

    from tokenlimit.integrations.flask import TokenLimit

    app = Flask(__name__)
    (limit,) = args
    ext = TokenLimit(app, limit=limit, **kwargs, limiter=RateLimiter.from_url("memory://"))

    @app.get("/")
    def index() -> str:
        return "ok"

    @app.get("/view")
    @ext.limit(*args, **kwargs)
    def view() -> str:
        return "ok"

    client = app.test_client()
    assert admitted(lambda: client.get("/")) == burst
    assert admitted(lambda: client.get("/view")) == burst


@pytest.mark.parametrize(("args", "kwargs", "burst"), SPELLINGS)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_django_ratelimit(args: Any, kwargs: Any, burst: int, kind: str) -> None:
    import django_project
    from django.http import HttpResponse
    from django.test import RequestFactory, override_settings

    from tokenlimit.integrations.django import ratelimit

    django_project.setup()

    @ratelimit(*args, **kwargs)
    def view(request: Any) -> Any:
        return HttpResponse("ok")

    @ratelimit(*args, **kwargs)
    async def aview(request: Any) -> Any:
        return HttpResponse("ok")

    def call() -> Any:
        request = RequestFactory().get("/", REMOTE_ADDR="192.0.2.1")
        return view(request) if kind == "sync" else asyncio.run(aview(request))

    with override_settings(**{**django_project.BASE, "TOKENLIMIT": {"URL": "memory://"}}):
        assert admitted(call) == burst


@pytest.mark.parametrize(
    ("call", "param"),
    [
        pytest.param(lambda: rate_limit(SLOW, burst=3), "burst", id="rate_limit-Limit-burst"),
        pytest.param(lambda: rate_limit(_chooser, burst=3), "burst", id="rate_limit-chooser-burst"),
        pytest.param(lambda: rate_limit(0.001, limit=SLOW), "limit", id="rate_limit-both"),
        pytest.param(lambda: rate_limit(0), "rate", id="rate_limit-zero"),
        pytest.param(lambda: rate_limit(True), "rate", id="rate_limit-bool"),
        pytest.param(lambda: rate_limit(b"1/s"), "rate", id="rate_limit-bytes"),
        pytest.param(lambda: rate_limit(0.001, burst=0), "burst", id="rate_limit-burst-0"),
        pytest.param(lambda: rate_limit(0.001, 3, cost=4), "cost", id="rate_limit-cost"),
    ],
)
def test_one_set_of_errors(call: Callable[[], Any], param: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.param == param


@pytest.mark.parametrize(
    ("limit", "burst", "param"),
    [
        (SLOW, 3, "burst"),
        ([SLOW], 3, "burst"),
        (_chooser, 3, "burst"),
        (0, None, "limit"),
        (True, None, "limit"),
        (b"1/s", None, "limit"),
        (0.001, 0, "burst"),
        ("1/1000s", 0, "burst"),
        ("lots", None, "limit"),
    ],
)
def test_integration_errors_name_their_parameters(limit: Any, burst: Any, param: str) -> None:
    from tokenlimit.integrations.django import ratelimit
    from tokenlimit.integrations.fastapi import RateLimit
    from tokenlimit.integrations.flask import TokenLimit

    for make in (
        lambda: RateLimit(limit, burst=burst),
        lambda: TokenLimit(limit=limit, burst=burst),
        lambda: TokenLimit().limit(limit, burst=burst),
        lambda: ratelimit(limit, burst=burst),
    ):
        with pytest.raises(ConfigError) as info:
            make()
        assert info.value.param == param


# -- a decorator's chooser gets the bound arguments, defaults applied ---------------------------
FREE = Limit.per_hour(1, name="free")
PRO = Limit.per_hour(3, name="pro")


def plans(user: str, plan: str) -> Limit:
    return PRO if plan == "pro" else FREE


async def aplans(user: str, plan: str) -> Limit:
    await asyncio.sleep(0)
    return plans(user, plan)


def test_sync_chooser_on_a_def_gets_defaults() -> None:
    lim = RateLimiter.from_url("memory://")
    seen: list[tuple[Any, ...]] = []

    def choose(user: str, plan: str, *, region: str) -> Limit:
        seen.append((user, plan, region))
        return plans(user, plan)

    @lim.limit(limit=choose, key="u:{user}")
    def handler(user: str, plan: str = "free", *, region: str = "eu") -> str:
        return user

    assert handler("a") == "a"
    with pytest.raises(RateLimitExceeded) as info:
        handler("a")
    assert info.value.decision.policy == FREE
    assert handler("b", "pro", region="us") == "b"
    assert handler(user="b", plan="pro") == "b"
    assert seen == [
        ("a", "free", "eu"),
        ("a", "free", "eu"),
        ("b", "pro", "us"),
        ("b", "pro", "eu"),
    ]
    assert lim.peek("u:b", PRO).remaining == 1


@pytest.mark.parametrize("chooser_kind", ["sync", "async"])
@pytest.mark.parametrize("limiter_kind", ["sync", "async"])
def test_chooser_on_an_async_def_gets_defaults(chooser_kind: str, limiter_kind: str) -> None:
    lim: Any = (RateLimiter if limiter_kind == "sync" else AsyncRateLimiter).from_url("memory://")
    choose = plans if chooser_kind == "sync" else aplans

    @rate_limit(limit=choose, key="u:{user}", limiter=lim)
    async def handler(user: str, plan: str = "free") -> str:
        return user

    async def main() -> None:
        assert await handler("a") == "a"
        with pytest.raises(RateLimitExceeded) as info:
            await handler("a")
        assert info.value.decision.policy == FREE
        for _ in range(3):
            assert await handler("b", plan="pro") == "b"
        with pytest.raises(RateLimitExceeded):
            await handler("b", "pro")

    asyncio.run(main())


def test_chooser_gets_var_positional_and_var_keyword_arguments() -> None:
    lim = RateLimiter.from_url("memory://")
    seen: list[Any] = []

    def choose(first: str, *rest: Any, scale: int, **extra: Any) -> Limit:
        seen.append((first, rest, scale, extra))
        return PRO

    @lim.limit(limit=choose, key="k")
    def handler(first: str, *rest: Any, scale: int = 1, **extra: Any) -> None:
        return None

    handler("x", 1, 2, tag="t")
    assert seen == [("x", (1, 2), 1, {"tag": "t"})]


def test_a_call_that_does_not_bind_is_the_functions_own_type_error() -> None:
    lim = RateLimiter.from_url("memory://")
    chosen: list[Any] = []

    @lim.limit(limit=lambda user, plan: chosen.append(user) or FREE, key="k")
    def handler(user: str, plan: str = "free") -> None:
        return None

    with pytest.raises(TypeError):
        handler()  # type: ignore[call-arg]
    assert chosen == []
    assert lim.peek("k", FREE).remaining == 1


# -- the plan itself ---------------------------------------------------------------------------
def test_every_spelling_makes_one_plan() -> None:
    from tokenlimit._plan import LimitPlan

    plans = {
        LimitPlan.of(0.001, 3),
        LimitPlan.of("1/1000s", 3),
        LimitPlan.of(SLOW),
        LimitPlan.of([SLOW, SLOW]),  # the same limit twice would take its tokens twice
        LimitPlan.of(limit=SLOW),
        LimitPlan.of(limit="3/3000s"),
        LimitPlan.of(limit=("3/3000s",), name="limit"),
    }
    assert plans == {LimitPlan((SLOW,), 1)}
    chooser = LimitPlan.of(limit=_chooser, cost=2)
    assert (chooser.limits, chooser.cost, chooser.choose) == ((), 2, _chooser)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_chosen_limit_is_checked_against_the_cost(kind: str) -> None:
    """Wherever a chooser runs (here an integration's policy), a cost above the chosen burst is
    a ConfigError naming ``cost``, raised before anything is taken."""
    from tokenlimit.integrations._common import Policy

    free = Limit.per_hour(1)
    policy = Policy.build(lambda request: free, cost=2)

    def choose() -> Any:
        if kind == "sync":
            return policy.limits_for(object())
        return asyncio.run(policy.alimits_for(object()))

    with pytest.raises(ConfigError) as info:
        choose()
    assert info.value.param == "cost"
    assert "chosen burst 1" in str(info.value)
    assert Policy.build(lambda request: Limit.per_hour(2), cost=2).limits_for(object())


def test_units_count_as_the_limits_package_counts_them() -> None:
    """A migrated "1000/month" keeps its rate: a month is 30 days, a year 360, as in ``limits``."""
    day = 86400
    for text, seconds in [("1/week", 7 * day), ("1/month", 30 * day), ("1/mo", 30 * day),
                          ("1/year", 360 * day), ("2/3 years", 3 * 360 * day / 2),
                          ("1 per minute", 60), ("1/2 hours", 7200)]:  # fmt: skip
        assert Limit.parse(text).rate == pytest.approx(1 / seconds), text


def test_several_limits_in_one_string_are_all_checked() -> None:
    lim = RateLimiter.from_url("memory://")
    decision = lim.try_acquire("k", "5/second;2/day")
    assert len(decision.details) == 2
    assert admitted(lambda: lim.acquire("k", "5/second | 2/day", timeout=0)) == 1  # 2 per day


@pytest.mark.parametrize(
    ("call", "param", "says"),
    [
        (lambda: Limit.parse("10/hour;100/day"), "limit", "several limits"),
        (lambda: Limit.parse("10/fortnight"), "limit", "units: second, minute"),
        (lambda: rate_limit("10/hour;100/day", burst=3), "burst", "is 2"),
        (lambda: RateLimiter.from_url("memory://").try_acquire("k", "10/hour;;x"), "limit", "x"),
    ],
)
def test_several_limits_errors_say_what_to_write(
    call: Callable[[], Any], param: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.param == param
    assert says in str(info.value)
