"""Shadow mode: limiters and integrations decide and count as usual but never refuse. A would-be
refusal is an admitted Decision with ``shadowed=True`` that took no token, counted as allowed
plus once in ``shadow_refusals_total``, logged (throttled, without the key); storage failures
admit whatever ``failure_mode`` says. On memory and on every real server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import django_project
import pytest
from django.http import HttpResponse
from django.test import AsyncClient, Client, RequestFactory, override_settings
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from flask import Flask
from prometheus_client import CollectorRegistry

import tokenlimit
from servers import free_port
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    ConfigError,
    Decision,
    Limit,
    MemoryBackend,
    RateLimiter,
)
from tokenlimit._request import Request
from tokenlimit.integrations import django as tl_django
from tokenlimit.integrations.fastapi import RateLimit, RateLimitMiddleware, install_handlers
from tokenlimit.integrations.flask import TokenLimit
from tokenlimit.metrics import PrometheusMetrics
from tokenlimit.testing import FakeClock, memory_limiter

django_project.setup()

SLOW = Limit(0.01, 2)  # burst 2, one token per 100 s: nothing refills during a test
SECRET = "user-7f3a-secret"
DECISIONS = "tokenlimit_decisions_total"
SHADOWED = "tokenlimit_shadow_refusals_total"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def dead_url() -> str:
    """A Redis URL nothing listens on: every decision fails with a connection error."""
    return f"redis://127.0.0.1:{free_port()}/0"


class BrokenBackend:
    """A backend whose storage always fails."""

    def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        raise BackendError("storage down", reason="connection")

    def reset(self, request: Request, *, timeout: float) -> None:
        raise BackendError("storage down", reason="connection")

    def close(self) -> None:
        pass


# -- the limiters ------------------------------------------------------------------------------
def test_shadow_admits_marks_and_takes_no_token_for_would_be_refusals(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5.0, shadow=True) as limiter:
        assert limiter.shadow
        got = [limiter.try_acquire(SECRET, SLOW) for _ in range(5)]
        assert all(got)
        assert [d.allowed for d in got] == [True] * 5
        assert [d.shadowed for d in got] == [False, False, True, True, True]
        assert [d.remaining for d in got] == [1, 0, 0, 0, 0]
        # What enforcement would have told the caller; had a would-be refusal taken a token,
        # each later wait would be 100 s longer than the one before.
        assert 90 < got[2].retry_after <= 100
        assert got[4].retry_after <= got[2].retry_after
        peeked = limiter.peek(SECRET, SLOW)
        assert (peeked.allowed, peeked.remaining, peeked.shadowed) == (False, 0, False)
        assert peeked.retry_after <= got[2].retry_after


def test_would_be_refusals_take_nothing_exactly() -> None:
    """On a fake clock: after the would-be refusals, one token's refill admits exactly one."""
    clock = FakeClock()
    limiter = memory_limiter(clock)
    shadow = limiter.as_shadow()
    limit = Limit(1, 2)  # one token per second
    assert shadow.try_acquire("k", limit, cost=2)
    for _ in range(10):
        assert shadow.try_acquire("k", limit).shadowed
    clock.advance(1.0)
    assert limiter.try_acquire("k", limit).allowed
    refused = limiter.try_acquire("k", limit)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(1.0)


def test_shadow_acquire_and_decorators_never_wait_nor_raise(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5.0, shadow=True) as limiter:
        calls = []

        @limiter.limit(limit=SLOW, key="fn", timeout=None)  # would wait 100 s when enforcing
        def work() -> None:
            calls.append(1)

        started = time.monotonic()
        for _ in range(4):
            work()
            assert limiter.acquire("acq", SLOW, timeout=None)
        with limiter.limit(limit=SLOW, key="block", timeout=0) as decision:
            assert decision
        with limiter.limit(limit=SLOW, key="block", timeout=0):
            pass
        with limiter.limit(limit=SLOW, key="block", timeout=0) as decision:
            assert decision.shadowed
        tokenlimit.configure(limiter)
        for _ in range(3):
            with tokenlimit.rate_limit(limit=SLOW, key="global"):
                pass
        assert time.monotonic() - started < 30  # nothing waited 100 s
        assert len(calls) == 4
        assert limiter.peek("fn", SLOW).remaining == 0


def test_async_shadow(url: str) -> None:
    async def run() -> list[Decision]:
        limiter = AsyncRateLimiter.from_url(url, timeout=5.0, shadow=True)
        try:
            got = [await limiter.try_acquire(SECRET, SLOW) for _ in range(3)]
            got.append(await limiter.acquire(SECRET, SLOW, timeout=None))

            @limiter.limit(limit=SLOW, key="fn", timeout=None)
            async def work() -> int:
                return 1

            assert [await work() for _ in range(3)] == [1, 1, 1]
            async with limiter.limit(limit=SLOW, key="fn") as decision:
                assert decision.shadowed
            peeked = await limiter.peek(SECRET, SLOW)
            assert (peeked.allowed, peeked.remaining) == (False, 0)
            return got
        finally:
            await limiter.aclose()

    got = asyncio.run(asyncio.wait_for(run(), 30))
    assert all(d.allowed for d in got)
    assert [d.shadowed for d in got] == [False, False, True, True]
    assert got[3].retry_after <= got[2].retry_after  # the refusals took nothing


def test_shadow_off_is_unchanged() -> None:
    limiter = RateLimiter.from_url("memory://")
    assert not limiter.shadow
    limiter.try_acquire("k", SLOW, cost=2)
    refused = limiter.try_acquire("k", SLOW)
    assert not refused
    assert not refused.shadowed
    with pytest.raises(tokenlimit.RateLimitExceeded):
        limiter.acquire("k", SLOW, timeout=0)


def test_as_shadow_shares_buckets_and_leaves_enforcement_alone() -> None:
    limiter = RateLimiter.from_url("memory://")
    twin = limiter.as_shadow()
    assert twin is limiter.as_shadow()
    assert twin.shadow
    assert not limiter.shadow
    assert twin.backend is limiter.backend
    assert twin.as_shadow() is twin
    assert "shadow=True" in repr(twin)
    assert limiter.try_acquire("k", SLOW, cost=2)
    shadowed = twin.try_acquire("k", SLOW)
    assert shadowed.allowed
    assert shadowed.shadowed
    assert not limiter.try_acquire("k", SLOW).allowed  # the original still enforces


def test_shadow_with_several_limits_keeps_the_details() -> None:
    limiter = RateLimiter.from_url("memory://", shadow=True)
    limits = [Limit(0.01, 1), Limit(100, 50)]
    limiter.try_acquire("k", limits)
    decision = limiter.try_acquire("k", limits)
    assert decision.allowed
    assert decision.shadowed
    assert decision.policy == limits[0]
    assert [d.allowed for d in decision.details] == [False, True]


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_shadow_must_be_a_bool(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        RateLimiter.from_url("memory://", shadow=bad)
    assert info.value.param == "shadow"
    with pytest.raises(ConfigError) as info:
        AsyncRateLimiter.from_url("memory://", shadow=bad)
    assert info.value.param == "shadow"
    with pytest.raises(ConfigError) as info:
        RateLimit("1/minute", shadow=bad)
    assert info.value.param == "shadow"


# -- metrics and logs --------------------------------------------------------------------------
def test_metrics_count_would_be_refusals_apart(url: str) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    with RateLimiter.from_url(url, timeout=5.0, shadow=True, metrics=metrics) as limiter:
        for _ in range(5):
            limiter.try_acquire(SECRET, SLOW)
        limiter.peek(SECRET, SLOW)  # a peek is never counted
    label = SLOW.label
    assert sample(registry, DECISIONS, limit=label, result="allowed") == 5
    assert sample(registry, DECISIONS, limit=label, result="refused") == 0
    assert sample(registry, SHADOWED, limit=label) == 3
    # An enforcing limiter on the same registry never counts a shadow refusal.
    enforcing = RateLimiter.from_url("memory://", metrics=PrometheusMetrics(registry))
    for _ in range(3):
        enforcing.try_acquire("k", SLOW)
    assert sample(registry, DECISIONS, limit=label, result="refused") == 1
    assert sample(registry, SHADOWED, limit=label) == 3


def test_would_be_refusals_are_logged_throttled_without_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RateLimiter.from_url("memory://", shadow=True)
    with caplog.at_level(logging.WARNING, logger="tokenlimit"):
        for _ in range(10):
            limiter.try_acquire(SECRET, SLOW)
    lines = [r.getMessage() for r in caplog.records if "shadow mode" in r.getMessage()]
    assert len(lines) == 1
    assert SLOW.label in lines[0]
    assert SECRET not in caplog.text


# -- storage failures: a shadow limiter admits, whatever failure_mode says -----------------------
def test_shadow_fails_open_on_storage_error() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    closed = RateLimiter(BrokenBackend(), failure_mode="closed", metrics=metrics)
    with pytest.raises(BackendError):
        closed.try_acquire("k", SLOW)
    shadow = closed.as_shadow()
    assert shadow.try_acquire("k", SLOW).allowed
    assert shadow.acquire("k", SLOW, timeout=0).allowed
    with shadow.limit(limit=SLOW, key="k"):
        pass
    label = SLOW.label
    assert sample(registry, "tokenlimit_fail_open_total", limit=label) == 3
    # Three failures open the circuit breaker: the fourth call skips the store.
    assert sample(registry, "tokenlimit_storage_errors_total", reason="connection") == 3
    assert sample(registry, "tokenlimit_storage_errors_total", reason="circuit_open") == 1


def test_shadow_fails_open_on_a_dead_server() -> None:
    url = dead_url()
    with RateLimiter.from_url(url, timeout=1.0) as enforcing, pytest.raises(BackendError):
        enforcing.try_acquire("k", SLOW)
    with RateLimiter.from_url(url, timeout=1.0, shadow=True, failure_mode="closed") as limiter:
        decision = limiter.try_acquire("k", SLOW)
        assert decision.allowed
        assert not decision.shadowed  # nothing was decided: nothing would have been refused

    async def run() -> Decision:
        limiter = AsyncRateLimiter.from_url(url, timeout=1.0, shadow=True)
        try:
            return await limiter.try_acquire("k", SLOW)
        finally:
            await limiter.aclose()

    assert asyncio.run(asyncio.wait_for(run(), 30)).allowed


# -- FastAPI -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shadow", [False, True])
def test_fastapi_dependency(url: str, shadow: bool) -> None:
    limiter = AsyncRateLimiter.from_url(url, timeout=5.0)
    api = FastAPI()
    install_handlers(api)
    seen: list[bool] = []

    @api.get("/")
    async def index(
        decision: Decision = Depends(RateLimit(SLOW, limiter=limiter, shadow=shadow)),  # noqa: B008
    ) -> dict[str, str]:
        seen.append(decision.shadowed)
        return {"ok": "yes"}

    with TestClient(api) as client:
        responses = [client.get("/") for _ in range(4)]
    codes = [r.status_code for r in responses]
    assert codes == ([200] * 4 if shadow else [200, 200, 429, 429])
    # The headers go out as usual: the would-be refusal shows 0 left. Only a real refusal
    # tells the client to come back later.
    assert responses[3].headers["x-ratelimit-remaining"] == "0"
    assert ("retry-after" in responses[3].headers) is not shadow
    assert seen == ([False, False, True, True] if shadow else [False, False])


@pytest.mark.parametrize("shadow", [False, True])
def test_fastapi_middleware(shadow: bool) -> None:
    limiter = RateLimiter.from_url("memory://")
    api = FastAPI()
    api.add_middleware(RateLimitMiddleware, limit=SLOW, limiter=limiter, shadow=shadow)

    @api.get("/")
    async def index() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(api) as client:
        codes = [client.get("/").status_code for _ in range(4)]
    assert codes == ([200] * 4 if shadow else [200, 200, 429, 429])


def test_fastapi_shadow_survives_storage_failure() -> None:
    limiter = AsyncRateLimiter.from_url(dead_url(), timeout=1.0)  # failure_mode="closed"
    api = FastAPI()
    install_handlers(api)

    @api.get("/shadow", dependencies=[Depends(RateLimit(SLOW, limiter=limiter, shadow=True))])
    async def shadowed() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/enforced", dependencies=[Depends(RateLimit(SLOW, limiter=limiter))])
    async def enforced() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(api) as client:
        assert client.get("/shadow").status_code == 200
        assert client.get("/enforced").status_code == 503


def test_fastapi_http_requests_counted_as_allowed() -> None:
    registry = CollectorRegistry()
    limiter = AsyncRateLimiter.from_url("memory://", metrics=PrometheusMetrics(registry))
    api = FastAPI()
    install_handlers(api)

    @api.get("/r", dependencies=[Depends(RateLimit(SLOW, limiter=limiter, shadow=True))])
    async def route() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(api) as client:
        for _ in range(4):
            client.get("/r")
    requests = "tokenlimit_http_requests_total"
    assert sample(registry, requests, route="/r", result="allowed") == 4
    assert sample(registry, requests, route="/r", result="refused") == 0
    assert sample(registry, SHADOWED, limit=SLOW.label) == 2


# -- Flask -------------------------------------------------------------------------------------
def flask_app(limiter: RateLimiter | None, **options: Any) -> tuple[Flask, TokenLimit]:
    app = Flask(__name__)
    ext = TokenLimit(app, limiter=limiter, **options)

    @app.get("/")
    def index() -> str:
        return "ok"

    return app, ext


@pytest.mark.parametrize("shadow", [False, True])
def test_flask_extension(url: str, shadow: bool) -> None:
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        app, _ = flask_app(limiter, limit=SLOW, shadow=shadow)
        client = app.test_client()
        responses = [client.get("/") for _ in range(4)]
        codes = [r.status_code for r in responses]
        assert codes == ([200] * 4 if shadow else [200, 200, 429, 429])
        assert responses[3].headers["X-RateLimit-Remaining"] == "0"


def test_flask_view_limit_overrides_the_extension() -> None:
    limiter = RateLimiter.from_url("memory://")
    app, ext = flask_app(limiter, shadow=True)

    @app.get("/strict")
    @ext.limit(SLOW, shadow=False)
    def strict() -> str:
        return "ok"

    @app.get("/inherits")
    @ext.limit(SLOW)
    def inherits() -> str:
        return "ok"

    client = app.test_client()
    assert [client.get("/strict").status_code for _ in range(3)] == [200, 200, 429]
    assert [client.get("/inherits").status_code for _ in range(3)] == [200] * 3
    with pytest.raises(ConfigError) as info:
        ext.limit(SLOW, shadow="no")  # type: ignore[arg-type]
    assert info.value.param == "shadow"


def test_flask_shadow_from_config_and_on_one_view() -> None:
    limiter = RateLimiter.from_url("memory://")
    app = Flask(__name__)
    app.config["TOKENLIMIT_SHADOW"] = True
    TokenLimit(app, limiter=limiter, limit=SLOW)

    @app.get("/")
    def index() -> str:
        return "ok"

    client = app.test_client()
    assert [client.get("/").status_code for _ in range(3)] == [200] * 3

    app2 = Flask(__name__)
    app2.config["TOKENLIMIT_SHADOW"] = "yes"
    with pytest.raises(ConfigError) as info:
        TokenLimit(app2, limiter=limiter, limit=SLOW)
    assert info.value.param == "TOKENLIMIT_SHADOW"

    app3, ext3 = flask_app(RateLimiter.from_url("memory://"))  # enforcing by default

    @app3.get("/watched")
    @ext3.limit(SLOW, shadow=True)
    def watched() -> str:
        return "ok"

    client3 = app3.test_client()
    assert [client3.get("/watched").status_code for _ in range(3)] == [200] * 3


def test_flask_shadow_survives_storage_failure() -> None:
    with RateLimiter.from_url(dead_url(), timeout=1.0) as limiter:
        app, _ = flask_app(limiter, limit=SLOW, shadow=True)
        assert app.test_client().get("/").status_code == 200
        app2, _ = flask_app(limiter, limit=SLOW)
        assert app2.test_client().get("/").status_code == 503


# -- Django ------------------------------------------------------------------------------------
@pytest.fixture
def django_settings() -> Iterator[None]:
    with override_settings(**django_project.BASE):
        yield


@pytest.mark.parametrize("shadow", [False, True])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_django_middleware(django_settings: None, shadow: bool, mode: str) -> None:
    settings = {"URL": "memory://", "LIMIT": "2/minute", "SHADOW": shadow}
    with override_settings(TOKENLIMIT=settings):
        if mode == "sync":
            client = Client()
            codes = [client.get("/plain").status_code for _ in range(4)]
        else:

            async def run() -> list[int]:
                aclient = AsyncClient()
                return [(await aclient.get("/aplain")).status_code for _ in range(4)]

            codes = asyncio.run(run())
    assert codes == ([200] * 4 if shadow else [200, 200, 429, 429])


def test_django_shadow_survives_storage_failure(django_settings: None) -> None:
    url = dead_url()
    with override_settings(TOKENLIMIT={"URL": url, "LIMIT": "2/minute", "SHADOW": True}):
        assert Client().get("/plain").status_code == 200
    with override_settings(TOKENLIMIT={"URL": url, "LIMIT": "2/minute"}):
        assert Client().get("/plain").status_code == 503


def test_django_bad_shadow_setting_is_a_check_error(django_settings: None) -> None:
    with override_settings(TOKENLIMIT={"URL": "memory://", "SHADOW": "yes"}):
        ids = [m.id for m in tl_django.check_settings()]
    assert "tokenlimit.E014" in ids


@pytest.mark.parametrize(
    ("setting", "per_view", "refused"),
    [(False, None, True), (True, None, False), (True, False, True), (False, True, False)],
)
def test_django_ratelimit(
    django_settings: None, setting: bool, per_view: bool | None, refused: bool
) -> None:
    @tl_django.ratelimit("2/minute", shadow=per_view)
    def view(request: Any) -> HttpResponse:
        return HttpResponse("ok")

    with override_settings(TOKENLIMIT={"URL": "memory://", "SHADOW": setting}):
        factory = RequestFactory()
        codes = [view(factory.get("/v", REMOTE_ADDR="198.51.100.9")).status_code for _ in range(3)]
    assert codes == ([200, 200, 429] if refused else [200] * 3)
    with pytest.raises(ConfigError):
        tl_django.ratelimit("2/minute", shadow="yes")  # type: ignore[arg-type]


def test_memory_backend_exposes_its_clock() -> None:
    clock = FakeClock(5.0)
    assert MemoryBackend(clock=clock).clock is clock
