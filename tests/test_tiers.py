"""Tiers: a callable stands in for the limit and chooses it per call (the caller's plan).

On the limiters (memory and every standalone server, sync and async, sync and async choosers),
the decorator and ``with`` blocks, the FastAPI, Flask and Django integrations, and the FastAPI
demo's two tiers. The chosen limit is part of the bucket's identity, so a plan change applies to
the very next call and leaves the old plan's bucket as it was.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import FLAVOURS

import tokenlimit
from tokenlimit import (
    AsyncRateLimiter,
    ConfigError,
    Decision,
    Limit,
    MemoryBackend,
    RateLimiter,
    RateLimitExceeded,
    _request,
    rate_limit,
)

# Slow refills (one token every 20 minutes at most): nothing comes back during a test.
FREE = Limit.per_hour(3, name="free")
PRO = Limit.per_hour(6, name="pro")
TIERS = {"free": FREE, "pro": PRO}


class Plans:
    """A stand-in customer database: key -> plan (Free when unknown), counting its lookups."""

    def __init__(self, **plans: str) -> None:
        self.plans = dict(plans)
        self.calls: list[tuple[Any, ...]] = []

    def limit(self, key: Any) -> Limit:
        self.calls.append((key,))
        return TIERS[self.plans.get(key, "free")]

    async def alimit(self, key: Any) -> Limit:
        await asyncio.sleep(0)  # a real await, as a database lookup would make
        return self.limit(key)


def chooser(plans: Plans, kind: str) -> Callable[[Any], Any]:
    return plans.limit if kind == "sync" else plans.alimit


@pytest.fixture(params=["memory", *FLAVOURS])
def store(request: pytest.FixtureRequest, testbed: Any) -> str:
    """memory://, and each flavour of standalone server (flushed)."""
    if request.param == "memory":
        return "memory://"
    target = testbed.get("standalone", request.param)
    target.flush()
    return target.url


def server_keys(url: str) -> int:
    """How many keys the server holds (0 for memory://: nothing to look at)."""
    if url.startswith("memory"):
        return 0
    with redis.Redis.from_url(url) as client:
        return int(client.dbsize())


def allowed(decisions: list[Decision]) -> list[bool]:
    return [d.allowed for d in decisions]


# -- the sync limiter ------------------------------------------------------------------------------
def test_sync_chooser_picks_the_limit_per_key(store: str) -> None:
    plans = Plans(acme="pro")
    with RateLimiter.from_url(store, timeout=5.0) as lim:
        free = [lim.try_acquire("solo", plans.limit) for _ in range(4)]
        pro = [lim.try_acquire("acme", plans.limit) for _ in range(7)]
    assert allowed(free) == [True] * 3 + [False]
    assert allowed(pro) == [True] * 6 + [False]
    assert {d.policy for d in free} == {FREE}
    assert {d.policy for d in pro} == {PRO}
    assert (free[0].limit, pro[0].limit) == (3, 6)
    assert plans.calls == [("solo",)] * 4 + [("acme",)] * 7  # called with the key, every time


def test_upgrade_takes_effect_at_once_and_leaves_free_untouched(store: str) -> None:
    plans = Plans()
    with RateLimiter.from_url(store, timeout=5.0) as lim:
        assert allowed([lim.try_acquire("acme", plans.limit) for _ in range(4)]) == [
            True, True, True, False,
        ]  # fmt: skip
        plans.plans["acme"] = "pro"
        upgraded = lim.try_acquire("acme", plans.limit)
        assert upgraded.allowed
        assert upgraded.policy == PRO
        assert upgraded.remaining == 5
        # Free's bucket is as the upgrade found it: still empty.
        assert lim.peek("acme", FREE).remaining == 0
        plans.plans["acme"] = "free"  # and a downgrade applies at once too
        assert not lim.try_acquire("acme", plans.limit).allowed
        assert lim.peek("acme", PRO).remaining == 5


def test_peek_acquire_and_reset_call_the_chooser(store: str) -> None:
    plans = Plans(acme="pro")
    with RateLimiter.from_url(store, timeout=5.0) as lim:
        assert lim.acquire("acme", plans.limit, timeout=0).remaining == 5
        assert lim.peek("acme", plans.limit).remaining == 5
        lim.reset("acme", plans.limit)
        assert lim.peek("acme", PRO).remaining == 6
        assert plans.calls == [("acme",)] * 3


def test_the_request_cache_keeps_chosen_limits_never_the_chooser() -> None:
    plans = Plans()
    lim = RateLimiter(MemoryBackend())
    lim.try_acquire("cached", plans.limit)
    plans.plans["cached"] = "pro"
    assert lim.try_acquire("cached", plans.limit).policy == PRO
    assert not any(callable(entry[2]) for entry in _request._cache)
    assert any(entry[1] == "cached" and entry[2] == (PRO,) for entry in _request._cache)


def test_async_chooser_on_a_sync_limiter_is_an_error_naming_limit() -> None:
    plans = Plans()
    lim = RateLimiter(MemoryBackend())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="alimit") as info:
            lim.try_acquire("acme", plans.alimit)
        gc.collect()
    assert info.value.param == "limit"
    assert isinstance(info.value, TypeError)
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert lim.peek("acme", FREE).remaining == 3


BAD_CHOICES = [
    pytest.param(5, id="int"),
    pytest.param(None, id="None"),
    pytest.param("lots", id="unparsable"),
    pytest.param([], id="empty"),
    pytest.param([FREE, 7], id="list-with-a-bad-item"),
    pytest.param(Plans().limit, id="a-callable"),
]


@pytest.mark.parametrize("value", BAD_CHOICES)
def test_a_bad_choice_names_limit_and_consumes_nothing(store: str, value: Any) -> None:
    def choose(key: str) -> Any:
        return value

    with RateLimiter.from_url(store, timeout=5.0) as lim:
        with pytest.raises(ConfigError, match="choose") as info:
            lim.try_acquire("acme", choose)
        assert info.value.param == "limit"
        assert str(info.value).startswith("limit: ")
        assert server_keys(store) == 0
        assert lim.peek("acme", FREE).remaining == 3


def test_a_bad_key_fails_before_the_chooser_is_called() -> None:
    plans = Plans()
    lim = RateLimiter(MemoryBackend())
    with pytest.raises(ConfigError) as info:
        lim.try_acquire("", plans.limit)
    assert info.value.param == "key"
    assert plans.calls == []


def test_a_cost_above_the_chosen_burst_names_cost(store: str) -> None:
    plans = Plans()
    with RateLimiter.from_url(store, timeout=5.0) as lim:
        with pytest.raises(ConfigError) as info:
            lim.try_acquire("acme", plans.limit, cost=4)
        assert info.value.param == "cost"
        assert lim.try_acquire("acme", plans.limit, cost=3).allowed
        plans.plans["acme"] = "pro"
        assert lim.try_acquire("acme", plans.limit, cost=6).allowed


def test_a_chooser_may_return_strings_and_lists() -> None:
    lim = RateLimiter(MemoryBackend())
    one = lim.try_acquire("s", lambda key: "2/hour")
    assert (one.limit, one.remaining) == (2, 1)
    both = lim.try_acquire("l", lambda key: ["2/hour", Limit.per_minute(1)])
    assert len(both.details) == 2
    assert both.remaining == 0
    assert not lim.try_acquire("l", lambda key: ("2/hour", Limit.per_minute(1))).allowed


# -- the async limiter -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_async_limiter_upgrade(store: str, kind: str) -> None:
    plans = Plans()
    choose = chooser(plans, kind)

    async def main() -> None:
        lim = AsyncRateLimiter.from_url(store, timeout=5.0)
        try:
            tries = [await lim.try_acquire("acme", choose) for _ in range(4)]
            assert allowed(tries) == [True, True, True, False]
            assert {d.policy for d in tries} == {FREE}
            plans.plans["acme"] = "pro"
            upgraded = await lim.try_acquire("acme", choose)
            assert (upgraded.allowed, upgraded.policy, upgraded.remaining) == (True, PRO, 5)
            assert (await lim.peek("acme", FREE)).remaining == 0
            assert (await lim.peek("acme", choose)).remaining == 5
            assert (await lim.acquire("acme", choose, timeout=0)).remaining == 4
            await lim.reset("acme", choose)
            assert (await lim.peek("acme", PRO)).remaining == 6
            assert (await lim.peek("acme", FREE)).remaining == 0
            plans.plans["acme"] = "free"
            with pytest.raises(RateLimitExceeded):
                await lim.acquire("acme", choose, timeout=0)
        finally:
            await lim.aclose()

    asyncio.run(main())
    assert set(plans.calls) == {("acme",)}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_async_limiter_bad_choice_names_limit(store: str, kind: str) -> None:
    async def achoose(key: str) -> Any:
        return "often"

    def choose(key: str) -> Any:
        return 1.5

    async def main() -> None:
        lim = AsyncRateLimiter.from_url(store, timeout=5.0)
        try:
            with pytest.raises(ConfigError) as info:
                await lim.try_acquire("acme", achoose if kind == "async" else choose)
            assert info.value.param == "limit"
            assert (await lim.peek("acme", FREE)).remaining == 3
        finally:
            await lim.aclose()

    asyncio.run(main())
    assert server_keys(store) == 0


# -- the decorator and the guard -------------------------------------------------------------------
def test_decorator_calls_the_chooser_with_the_call_arguments() -> None:
    lim = RateLimiter(MemoryBackend())
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    plans = {"acme": "pro"}

    def choose(customer: str, *args: Any, **kwargs: Any) -> Limit:
        seen.append(((customer, *args), kwargs))
        return TIERS[plans.get(customer, "free")]

    @rate_limit(limit=choose, key="c:{customer}", limiter=lim)
    def report(customer: str, size: int = 1, *, fmt: str = "csv") -> str:
        return f"{customer}:{size}:{fmt}"

    assert report("solo", 2, fmt="pdf") == "solo:2:pdf"
    assert seen == [(("solo", 2), {"fmt": "pdf"})]

    policies: set[Limit | None] = set()

    def run(customer: str, n: int) -> list[bool]:
        out = []
        for _ in range(n):
            try:
                report(customer)
                out.append(True)
            except RateLimitExceeded as exc:
                policies.add(exc.decision.policy)
                out.append(False)
        return out

    assert run("solo", 3) == [True, True, False]  # one token went to the first call
    assert run("acme", 7) == [True] * 6 + [False]
    plans["solo"] = "pro"
    assert run("solo", 1) == [True]
    assert lim.peek("c:solo", FREE).remaining == 0
    assert policies == {FREE, PRO}  # each refusal reports the chosen limit


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("limiter_kind", ["async", "sync"])
def test_async_def_with_sync_and_async_choosers(kind: str, limiter_kind: str) -> None:
    plans = Plans(acme="pro")
    backend = MemoryBackend()
    lim: Any = AsyncRateLimiter(backend) if limiter_kind == "async" else RateLimiter(backend)
    choose = chooser(plans, kind)

    @lim.limit(limit=choose, key=lambda customer: f"c:{customer}")
    async def fetch(customer: str) -> str:
        return customer

    async def run(customer: str, n: int) -> list[bool]:
        out = []
        for _ in range(n):
            try:
                await fetch(customer)
                out.append(True)
            except RateLimitExceeded:
                out.append(False)
        return out

    async def main() -> None:
        assert await run("solo", 4) == [True] * 3 + [False]
        assert await run("acme", 7) == [True] * 6 + [False]
        plans.plans["solo"] = "pro"
        assert await run("solo", 1) == [True]

    asyncio.run(main())
    assert plans.calls[:4] == [("solo",)] * 4  # the call's arguments


def test_with_blocks_call_the_chooser_without_arguments() -> None:
    lim = RateLimiter(MemoryBackend())
    calls: list[tuple[Any, ...]] = []

    def choose(*args: Any) -> Limit:
        calls.append(args)
        return PRO

    with lim.limit(limit=choose, key="block") as decision:
        assert (decision.policy, decision.remaining) == (PRO, 5)
    assert calls == [()]

    async def achoose() -> Limit:
        return FREE

    async def main() -> None:
        alim = AsyncRateLimiter(MemoryBackend())
        async with alim.limit(limit=achoose, key="block") as first:
            assert (first.policy, first.remaining) == (FREE, 2)
        async with rate_limit(limit=achoose, key="b2", limiter=lim) as second:
            assert second.policy == FREE

    asyncio.run(main())


def test_decorator_errors_name_limit() -> None:
    lim = RateLimiter(MemoryBackend())
    plans = Plans()
    with pytest.raises(ConfigError) as info:

        @lim.limit(limit=plans.alimit)
        def plain(customer: str) -> None: ...

    assert info.value.param == "limit"
    with pytest.raises(ConfigError) as info:
        rate_limit("1/second", limit=plans.limit)
    assert info.value.param == "limit"

    ran = []

    @rate_limit(limit=lambda customer: {"plan": "free"}, key="k", limiter=lim)
    def guarded(customer: str) -> None:
        ran.append(customer)

    with pytest.raises(ConfigError) as info:
        guarded("x")
    assert info.value.param == "limit"
    assert ran == []


def test_rate_limit_uses_the_configured_limiter_with_a_chooser() -> None:
    tokenlimit.configure("memory://")
    plans = Plans()

    @rate_limit(limit=plans.limit, key="{customer}")
    def work(customer: str) -> str:
        return customer

    assert [work("x") for _ in range(3)] == ["x"] * 3
    with pytest.raises(RateLimitExceeded):
        work("x")


# -- FastAPI ---------------------------------------------------------------------------------------
def fastapi_app(limit: Any, *, middleware: bool) -> Any:
    from fastapi import Depends, FastAPI

    from tokenlimit.integrations.fastapi import RateLimit, RateLimitMiddleware, install_handlers

    lim = AsyncRateLimiter(MemoryBackend())
    app = FastAPI()
    install_handlers(app)
    if middleware:
        app.add_middleware(
            RateLimitMiddleware, limit=limit, limiter=lim, api_key_header="X-API-Key"
        )

        @app.get("/r")
        async def route_m() -> dict[str, str]:
            return {"ok": "yes"}

    else:
        guard = RateLimit(limit, limiter=lim, api_key_header="X-API-Key")
        assert "chosen by" in repr(guard)

        @app.get("/r")
        async def route_d(decision: Decision = Depends(guard)) -> dict[str, Any]:  # noqa: B008
            return {"remaining": decision.remaining}

    return app


def request_chooser(plans: dict[str, str], kind: str) -> Callable[[Any], Any]:
    def choose(request: Any) -> Limit:
        return TIERS[plans.get(request.headers.get("x-api-key", ""), "free")]

    async def achoose(request: Any) -> Limit:
        await asyncio.sleep(0)
        return choose(request)

    return choose if kind == "sync" else achoose


def assert_tier(response: Any, tier: Limit, remaining: int) -> None:
    assert response.headers["X-RateLimit-Limit"] == str(tier.burst)
    assert response.headers["X-RateLimit-Remaining"] == str(remaining)
    assert response.headers["RateLimit-Policy"] == f'"{tier.name}";q={tier.burst};w=3600'


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("middleware", [False, True], ids=["dependency", "middleware"])
def test_fastapi_chooses_per_request(kind: str, middleware: bool) -> None:
    from fastapi.testclient import TestClient

    plans = {"k-pro": "pro"}
    app = fastapi_app(request_chooser(plans, kind), middleware=middleware)
    with TestClient(app) as client:
        free = [client.get("/r", headers={"X-API-Key": "k-free"}) for _ in range(4)]
        assert [r.status_code for r in free] == [200, 200, 200, 429]
        assert_tier(free[0], FREE, 2)
        pro = [client.get("/r", headers={"X-API-Key": "k-pro"}) for _ in range(7)]
        assert [r.status_code for r in pro] == [200] * 6 + [429]
        assert_tier(pro[0], PRO, 5)
        assert_tier(pro[6], PRO, 0)
        plans["k-free"] = "pro"  # the upgrade: admitted at once, on Pro's own bucket
        upgraded = client.get("/r", headers={"X-API-Key": "k-free"})
        assert upgraded.status_code == 200
        assert_tier(upgraded, PRO, 5)


def test_fastapi_bad_choice_is_a_config_error() -> None:
    from fastapi.testclient import TestClient

    app = fastapi_app(lambda request: "whenever", middleware=False)
    with TestClient(app) as client, pytest.raises(ConfigError) as info:
        client.get("/r")
    assert info.value.param == "limit"


# -- Flask -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_flask_default_and_view_limits_are_chosen_per_request(kind: str) -> None:
    from flask import Flask

    from tokenlimit.integrations.flask import TokenLimit

    plans = {"k-pro": "pro"}
    choose = request_chooser(plans, kind)
    app = Flask(__name__)
    ext = TokenLimit(
        app, limiter=RateLimiter(MemoryBackend()), limit=choose, api_key_header="X-API-Key"
    )

    @app.get("/")
    def index() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/search")
    @ext.limit(lambda request: PRO if request.args.get("plan") == "pro" else FREE)
    def search() -> dict[str, bool]:
        return {"ok": True}

    client = app.test_client()
    free = [client.get("/", headers={"X-API-Key": "k-free"}) for _ in range(4)]
    assert [r.status_code for r in free] == [200, 200, 200, 429]
    assert_tier(free[0], FREE, 2)
    pro = [client.get("/", headers={"X-API-Key": "k-pro"}) for _ in range(7)]
    assert [r.status_code for r in pro] == [200] * 6 + [429]
    assert_tier(pro[0], PRO, 5)
    plans["k-free"] = "pro"
    upgraded = client.get("/", headers={"X-API-Key": "k-free"})
    assert upgraded.status_code == 200
    assert_tier(upgraded, PRO, 5)

    assert_tier(client.get("/search?plan=pro", headers={"X-API-Key": "v"}), PRO, 5)
    assert_tier(client.get("/search", headers={"X-API-Key": "v"}), FREE, 2)


def test_flask_bad_choice_is_a_config_error() -> None:
    from flask import Flask

    from tokenlimit.integrations.flask import TokenLimit

    app = Flask(__name__)
    TokenLimit(app, limiter=RateLimiter(MemoryBackend()), limit=lambda request: 42)

    @app.get("/")
    def index() -> str:
        return "ok"

    app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(ConfigError) as info:
        app.test_client().get("/")
    assert info.value.param == "limit"


# -- Django ----------------------------------------------------------------------------------------
def django_plan(request: Any) -> Limit:
    """``TOKENLIMIT['LIMIT']`` by dotted path: the plan of the caller's API key."""
    return TIERS[DJANGO_PLANS.get(request.headers.get("X-API-Key", ""), "free")]


async def django_aplan(request: Any) -> Limit:
    await asyncio.sleep(0)
    return django_plan(request)


DJANGO_PLANS: dict[str, str] = {}


@pytest.fixture
def django_site() -> Iterator[Any]:
    """Django configured as tests/test_django.py does it, with this module's own two views."""
    import django_project
    from django.http import HttpResponse
    from django.test import override_settings
    from django.urls import path

    from tokenlimit.integrations.django import ratelimit

    django_project.setup()

    def plain(request: Any) -> Any:
        return HttpResponse("plain")

    @ratelimit(lambda request: PRO if request.GET.get("plan") == "pro" else FREE)
    def view(request: Any) -> Any:
        return HttpResponse("view")

    @ratelimit(django_aplan)
    async def aview(request: Any) -> Any:
        return HttpResponse("aview")

    urls = types.ModuleType("tiers_urls")  # hashable: Django caches a resolver per urlconf
    urls.urlpatterns = [path("plain", plain), path("view", view), path("aview", aview)]  # type: ignore[attr-defined]
    DJANGO_PLANS.clear()
    DJANGO_PLANS["k-pro"] = "pro"
    with override_settings(**{**django_project.BASE, "ROOT_URLCONF": urls}):
        yield django_project
    DJANGO_PLANS.clear()


def django_get(mode: str, path: str, n: int, key: str) -> list[Any]:
    from django.test import AsyncClient, Client

    headers = {"X-API-Key": key}
    if mode == "sync":
        client = Client()
        return [client.get(path, headers=headers) for _ in range(n)]

    async def run() -> list[Any]:
        aclient = AsyncClient()
        return [await aclient.get(path, headers=headers) for _ in range(n)]

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    "limit", [f"{__name__}.django_plan", f"{__name__}.django_aplan", django_plan]
)
def test_django_middleware_limit_setting_may_choose(
    django_site: Any, mode: str, limit: Any
) -> None:
    from django.test import override_settings

    settings = {"URL": "memory://", "LIMIT": limit, "API_KEY_HEADER": "X-API-Key"}
    with override_settings(TOKENLIMIT=settings, MIDDLEWARE=[django_site.MIDDLEWARE]):
        free = django_get(mode, "/plain", 4, "k-free")
        assert [r.status_code for r in free] == [200, 200, 200, 429]
        assert_tier(free[0], FREE, 2)
        pro = django_get(mode, "/plain", 7, "k-pro")
        assert [r.status_code for r in pro] == [200] * 6 + [429]
        assert_tier(pro[0], PRO, 5)
        DJANGO_PLANS["k-free"] = "pro"
        (upgraded,) = django_get(mode, "/plain", 1, "k-free")
        assert upgraded.status_code == 200
        assert_tier(upgraded, PRO, 5)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_django_ratelimit_decorator_chooses(django_site: Any, mode: str) -> None:
    from django.test import override_settings

    with override_settings(MIDDLEWARE=[]):
        assert [r.status_code for r in django_get(mode, "/view", 4, "v")] == [200] * 3 + [429]
        pro = django_get(mode, "/view?plan=pro", 7, "v")
        assert [r.status_code for r in pro] == [200] * 6 + [429]
        assert_tier(pro[0], PRO, 5)
        DJANGO_PLANS["a"] = "pro"
        allowed_codes = [r.status_code for r in django_get(mode, "/aview", 7, "a")]
        assert allowed_codes == [200] * 6 + [429]


def test_django_limit_setting_errors_are_reported() -> None:
    from tokenlimit.integrations._settings import read

    _, problems = read({"LIMIT": f"{__name__}.FREE"})
    assert [p.id for p in problems] == ["tokenlimit.E003"]
    assert "not callable" in problems[0].message
    _, problems = read({"LIMIT": "nowhere.at_all"})
    assert [p.id for p in problems] == ["tokenlimit.E003"]
    options, problems = read({"LIMIT": f"{__name__}.django_plan"})
    assert problems == []
    assert options.limits is django_plan


# -- the FastAPI demo's two tiers ------------------------------------------------------------------
def load_demo() -> types.ModuleType:
    """The demo app, imported by path (the tests run against the installed package)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "fastapi_demo" / "app.py"
    spec = importlib.util.spec_from_file_location("fastapi_demo_tiers", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_demo_has_a_free_and_a_pro_tier(store: str) -> None:
    from fastapi.testclient import TestClient

    demo = load_demo()
    with TestClient(demo.create_app(store)) as client:

        def hello(key: str) -> Any:
            return client.get("/v1/hello", headers={"X-API-Key": key})

        pro = [hello("demo-pro") for _ in range(30)]  # far more than Free's burst
        assert [r.status_code for r in pro] == [200] * 30
        assert pro[0].headers["X-RateLimit-Limit"] == "100"
        assert pro[0].headers["X-RateLimit-Remaining"] == "99"
        assert pro[0].headers["RateLimit-Policy"] == '"100-per-2s";q=100;w=2'

        for key in ("demo", "demo-ce61db7f"):  # the demo key, and one like demo.py's: Free
            first = hello(key)
            assert first.status_code == 200
            assert first.headers["X-RateLimit-Limit"] == "10"
            assert first.headers["X-RateLimit-Remaining"] == "9"
            assert first.headers["RateLimit-Policy"] == '"10-per-2s";q=10;w=2'
            # Free refills 5 per second: a slow machine may earn a few more meanwhile.
            codes = [hello(key).status_code for _ in range(60)]
            assert 429 in codes

        client.app.state.plans["demo"] = "pro"  # type: ignore[attr-defined]
        upgraded = hello("demo")
        assert upgraded.status_code == 200
        assert upgraded.headers["X-RateLimit-Limit"] == "100"
        assert upgraded.headers["X-RateLimit-Remaining"] == "99"
