"""tokenlimit.metrics: Prometheus series for decisions, latency, storage errors, fail-open
admissions and the integrations' route counts, on a registry the caller passes; never a key in
a label, nothing registered at import time."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("prometheus_client")

import django_project
from django.core import checks
from django.test import AsyncClient, Client, override_settings
from fastapi import APIRouter, Depends, FastAPI, WebSocket
from fastapi.testclient import TestClient
from flask import Flask
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

import tokenlimit
from servers import free_port
from tokenlimit import AsyncRateLimiter, BackendError, ConfigError, Decision, Limit, RateLimiter
from tokenlimit._request import identity_tag
from tokenlimit.integrations import django as tl_django
from tokenlimit.integrations._common import api_key_identity
from tokenlimit.integrations.fastapi import RateLimit, RateLimitMiddleware, install_handlers
from tokenlimit.integrations.flask import TokenLimit
from tokenlimit.metrics import DEFAULT_BUCKETS, PrometheusMetrics

django_project.setup()

PACKAGE_PARENT = str(Path(tokenlimit.__file__).resolve().parent.parent)
DEMO = Path(__file__).resolve().parent.parent / "examples" / "fastapi_demo" / "app.py"

# Hour- and day-long windows: nothing refills while a test runs, so the counts are exact.
HOURLY = Limit.per_hour(3, name="hourly")
SECRET_KEY = "sk-live-7f3a9c-do-not-log"  # an API key: must never reach a label
IDENTITY = "user:secret-identity-7f3a9c"  # an identity: neither it nor its hash in a label


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0.0 when the series does not exist."""
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def decisions(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """``tokenlimit_decisions_total`` as ``{(limit, result): count}``."""
    return {
        (s.labels["limit"], s.labels["result"]): s.value
        for family in registry.collect()
        if family.name == "tokenlimit_decisions"
        for s in family.samples
        if s.name == "tokenlimit_decisions_total"
    }


def requests(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """``tokenlimit_http_requests_total`` as ``{(route, result): count}``."""
    return {
        (s.labels["route"], s.labels["result"]): s.value
        for family in registry.collect()
        if family.name == "tokenlimit_http_requests"
        for s in family.samples
        if s.name == "tokenlimit_http_requests_total"
    }


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def assert_no_secrets(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, secret


def identity_secrets(identity: str) -> tuple[str, ...]:
    """The identity, and the hash tag its Redis keys carry."""
    return identity, identity_tag(identity.encode())


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def sink(registry: CollectorRegistry) -> PrometheusMetrics:
    return PrometheusMetrics(registry)


# -- the limiter's decisions -------------------------------------------------------------------


def test_decisions_by_limit_and_result(url: str, registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry)
    unnamed = Limit.per_hour(2)  # label "2-per-3600s"
    with RateLimiter.from_url(url, timeout=5.0, metrics=sink) as limiter:
        assert limiter.metrics is sink
        answers = [limiter.try_acquire(IDENTITY, HOURLY).allowed for _ in range(5)]
        answers += [limiter.try_acquire(IDENTITY, unnamed).allowed for _ in range(3)]
        assert not limiter.peek(IDENTITY, HOURLY).allowed  # a peek decides nothing: not counted
    assert answers == [True] * 3 + [False] * 2 + [True] * 2 + [False]
    assert decisions(registry) == {
        ("hourly", "allowed"): 3,
        ("hourly", "refused"): 2,
        ("2-per-3600s", "allowed"): 2,
        ("2-per-3600s", "refused"): 1,
    }
    assert value(registry, "tokenlimit_decision_seconds_count") == 8
    assert value(registry, "tokenlimit_decision_seconds_sum") > 0
    assert value(registry, "tokenlimit_decision_seconds_bucket", le="+Inf") == 8
    # Healthy storage: every reason at zero, no fail-open admission.
    assert value(registry, "tokenlimit_storage_errors_total", reason="connection") == 0
    assert "tokenlimit_fail_open_total{" not in exposition(registry)
    assert_no_secrets(exposition(registry), *identity_secrets(IDENTITY))


def test_limits_are_labelled_as_written(registry: CollectorRegistry) -> None:
    """``limit`` is the string the limit was written as (or its name), never per identity:
    two spellings of one limit share the bucket and each counts under its own label."""
    written, numbers = Limit.parse("2/hour", burst=3), Limit(2 / 3600, 3)
    with RateLimiter.from_url("memory://", metrics=PrometheusMetrics(registry)) as limiter:
        for identity in ("user:1", "user:2"):
            limiter.try_acquire(identity, written)
            limiter.try_acquire(identity, numbers)
            limiter.try_acquire(identity, written)
            limiter.try_acquire(identity, numbers)  # the fourth token of a bucket of 3
    assert decisions(registry) == {
        ("2/hour", "allowed"): 4,
        ("3-per-5400s", "allowed"): 2,
        ("3-per-5400s", "refused"): 2,
    }


def test_async_limiter_counts_the_same(url: str, registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry)

    async def run() -> list[bool]:
        async with AsyncRateLimiter.from_url(url, timeout=5.0, metrics=sink) as limiter:
            assert limiter.metrics is sink
            return [(await limiter.try_acquire(IDENTITY, HOURLY)).allowed for _ in range(4)]

    assert asyncio.run(run()) == [True, True, True, False]
    assert decisions(registry) == {("hourly", "allowed"): 3, ("hourly", "refused"): 1}
    assert value(registry, "tokenlimit_decision_seconds_count") == 4


def test_several_limits_count_once_under_the_limit_the_decision_reports(
    url: str, registry: CollectorRegistry
) -> None:
    sink = PrometheusMetrics(registry)
    hourly, daily = Limit.per_hour(5, name="hourly"), Limit.per_day(2, name="daily")
    with RateLimiter.from_url(url, timeout=5.0, metrics=sink) as limiter:
        # The daily limit has the fewest tokens left, then refuses: every count is its own.
        first = [limiter.try_acquire("a", [hourly, daily]).allowed for _ in range(3)]
        # Here the hourly one is the tighter: admissions and the refusal count under it.
        tight = Limit.per_hour(2, name="tight")
        second = [limiter.try_acquire("b", [tight, Limit.per_day(9)]).allowed for _ in range(3)]
    assert first == second == [True, True, False]
    assert decisions(registry) == {
        ("daily", "allowed"): 2,
        ("daily", "refused"): 1,
        ("tight", "allowed"): 2,
        ("tight", "refused"): 1,
    }
    # One count per decision, whatever the number of limits in it.
    assert sum(decisions(registry).values()) == value(registry, "tokenlimit_decision_seconds_count")


def test_a_limiter_without_metrics_has_none() -> None:
    with RateLimiter.from_url("memory://") as limiter:
        assert limiter.metrics is None


# -- storage failures --------------------------------------------------------------------------


def test_storage_errors_and_fail_open_admissions(registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry)
    with RateLimiter.from_url(
        dead_url(), timeout=0.5, failure_mode="open", metrics=sink
    ) as limiter:
        assert all(limiter.try_acquire(IDENTITY, HOURLY).allowed for _ in range(3))
        # Several limits: counted once, under the limit the fail-open Decision reports.
        both = [Limit.per_hour(5, name="hourly"), Limit.per_day(2, name="daily")]
        assert limiter.try_acquire(IDENTITY, both).policy == both[1]
    # Three refused connections open the circuit breaker: the fourth call skips the server.
    assert value(registry, "tokenlimit_storage_errors_total", reason="connection") == 3
    assert value(registry, "tokenlimit_storage_errors_total", reason="circuit_open") == 1
    assert value(registry, "tokenlimit_fail_open_total", limit="hourly") == 3
    assert value(registry, "tokenlimit_fail_open_total", limit="daily") == 1
    # No decision was made: none counted, none timed.
    assert decisions(registry) == {}
    assert value(registry, "tokenlimit_decision_seconds_count") == 0
    assert_no_secrets(exposition(registry), *identity_secrets(IDENTITY))


def test_closed_mode_counts_errors_and_no_admission(registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry)

    async def run() -> None:
        async with AsyncRateLimiter.from_url(dead_url(), timeout=0.5, metrics=sink) as limiter:
            for _ in range(2):
                with pytest.raises(BackendError):
                    await limiter.try_acquire(IDENTITY, HOURLY)

    asyncio.run(run())
    assert value(registry, "tokenlimit_storage_errors_total", reason="connection") == 2
    assert "tokenlimit_fail_open_total{" not in exposition(registry)
    assert decisions(registry) == {}


def test_error_reasons_stay_bounded(sink: PrometheusMetrics, registry: CollectorRegistry) -> None:
    sink.record_error([HOURLY], "timeout", False)
    sink.record_error([HOURLY], f"something about {IDENTITY}", True)
    assert value(registry, "tokenlimit_storage_errors_total", reason="timeout") == 1
    assert value(registry, "tokenlimit_storage_errors_total", reason="other") == 1
    assert value(registry, "tokenlimit_fail_open_total", limit="hourly") == 1
    assert_no_secrets(exposition(registry), IDENTITY)


# -- construction ------------------------------------------------------------------------------


def test_the_registry_is_required() -> None:
    for missing in ((), (None,)):
        with pytest.raises(ConfigError, match="registry") as info:
            PrometheusMetrics(*missing)
        assert info.value.param == "registry"
        assert "prometheus_client.REGISTRY" in str(info.value)
    with pytest.raises(TypeError, match="registry") as wrong:
        PrometheusMetrics("default")  # type: ignore[arg-type]
    assert isinstance(wrong.value, ConfigError)
    assert wrong.value.param == "registry"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"namespace": ""}, "namespace"),
        ({"namespace": "my-app"}, "namespace"),
        ({"namespace": 7}, "namespace"),
        ({"buckets": []}, "buckets"),
        ({"buckets": [0.1, 0.05]}, "buckets"),
        ({"buckets": [0.1, 0.1]}, "buckets"),
        ({"buckets": [0, 1]}, "buckets"),
        ({"buckets": [float("nan")]}, "buckets"),
        ({"buckets": [float("inf")]}, "buckets"),
        ({"buckets": ["0.1"]}, "buckets"),
        ({"buckets": [True]}, "buckets"),
        ({"buckets": "0.1"}, "buckets"),
        ({"buckets": 0.1}, "buckets"),
    ],
)
def test_bad_options_name_the_parameter(
    registry: CollectorRegistry, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(ConfigError) as info:
        PrometheusMetrics(registry, **options)
    assert info.value.param == param
    assert list(registry.collect()) == []  # nothing half-registered


def test_custom_namespace_and_buckets(registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry, namespace="myapp", buckets=[0.001, 0.1, float("inf")])
    assert sink.registry is registry
    assert sink.namespace == "myapp"
    sink.record_decision([HOURLY], Decision(True, 3, 2, 0.0, 1.0, policy=HOURLY), 0.01)
    assert value(registry, "myapp_decisions_total", limit="hourly", result="allowed") == 1
    assert value(registry, "myapp_decision_seconds_bucket", le="0.001") == 0
    assert value(registry, "myapp_decision_seconds_bucket", le="0.1") == 1
    assert "tokenlimit_" not in exposition(registry)


def test_sinks_on_one_registry_share_their_series(registry: CollectorRegistry) -> None:
    first, second = PrometheusMetrics(registry), PrometheusMetrics(registry)
    with RateLimiter.from_url("memory://", metrics=first) as a:
        a.try_acquire("k", HOURLY)
    with RateLimiter.from_url("memory://", metrics=second) as b:
        b.try_acquire("k", HOURLY)
    assert decisions(registry) == {("hourly", "allowed"): 2}
    # Same registry, same names: the buckets must agree.
    with pytest.raises(ConfigError) as info:
        PrometheusMetrics(registry, buckets=[0.1, 1.0])
    assert info.value.param == "buckets"
    # Another namespace is another set of series; another registry starts from zero.
    PrometheusMetrics(registry, namespace="other").record_request("/", "allowed")
    assert value(registry, "other_http_requests_total", route="/", result="allowed") == 1
    assert decisions(PrometheusMetrics(CollectorRegistry()).registry) == {}
    assert tuple(sorted(DEFAULT_BUCKETS)) == DEFAULT_BUCKETS


def test_names_taken_by_another_collector(registry: CollectorRegistry) -> None:
    # The stop-gap the demo used to have, say: its names clash with ours.
    Counter("tokenlimit_fail_open", "someone else's", registry=registry)
    with pytest.raises(ConfigError, match="another collector") as info:
        PrometheusMetrics(registry)
    assert info.value.param == "registry"
    # What was registered before the clash is taken back out: the registry is as it was.
    assert [family.name for family in registry.collect()] == ["tokenlimit_fail_open"]
    PrometheusMetrics(registry, namespace="tl")  # and another namespace still fits


def test_record_request_checks_its_arguments(sink: PrometheusMetrics) -> None:
    with pytest.raises(ConfigError) as info:
        sink.record_request("/items/{item_id}", "ok")
    assert info.value.param == "result"
    with pytest.raises(TypeError):
        sink.record_request(42, "allowed")  # type: ignore[arg-type]


def test_importing_registers_nothing(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import tokenlimit, tokenlimit.metrics
        assert tokenlimit.__file__.startswith({PACKAGE_PARENT!r}), tokenlimit.__file__
        assert "prometheus_client" not in sys.modules, "imported by import tokenlimit.metrics"
        import tokenlimit.integrations.fastapi, tokenlimit.integrations.flask
        import prometheus_client
        from tokenlimit.metrics import PrometheusMetrics
        names = [family.name for family in prometheus_client.REGISTRY.collect()]
        assert not [name for name in names if "tokenlimit" in name], names
        # The default registry is used when asked for, and only then.
        sink = PrometheusMetrics(prometheus_client.REGISTRY)
        assert PrometheusMetrics(prometheus_client.REGISTRY) is not sink  # no clash either
        names = {{family.name for family in prometheus_client.REGISTRY.collect()}}
        assert "tokenlimit_decisions" in names, names
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    env.pop("TOKENLIMIT_URL", None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the checkout: `-c` puts the working directory first on sys.path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_an_older_sink_without_record_request_still_works() -> None:
    calls: list[str] = []

    class OldSink:
        def record_decision(self, limits: Sequence[Limit], decision: Decision, s: float) -> None:
            calls.append("decision")

        def record_error(self, limits: Sequence[Limit], reason: str, failed_open: bool) -> None:
            calls.append("error")

    limiter = RateLimiter.from_url("memory://", metrics=OldSink())
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limit=HOURLY, limiter=limiter)

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    with TestClient(app) as client:
        assert [client.get("/items/1").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert calls == ["decision"] * 4


# -- integrations: route templates, never paths ------------------------------------------------


def fastapi_app(limiter: RateLimiter | AsyncRateLimiter, *, middleware: bool) -> FastAPI:
    """``/items/{item_id}`` limited by a dependency (or the middleware), ``/health`` free."""
    app = FastAPI()
    install_handlers(app)
    opt_in = {"limiter": limiter, "api_key_header": "X-API-Key"}  # the key is the identity
    guard = [] if middleware else [Depends(RateLimit(Limit.per_hour(2, name="items"), **opt_in))]
    if middleware:
        app.add_middleware(RateLimitMiddleware, limit=HOURLY, **opt_in)

    @app.get("/items/{item_id}", dependencies=guard)
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def test_fastapi_dependency_counts_by_route_template(url: str, registry: CollectorRegistry) -> None:
    limiter = AsyncRateLimiter.from_url(url, timeout=5.0, metrics=PrometheusMetrics(registry))
    headers = {"X-API-Key": SECRET_KEY}
    with TestClient(fastapi_app(limiter, middleware=False)) as client:
        codes = [client.get(f"/items/{n}", headers=headers).status_code for n in (41, 42, 43)]
        assert client.get("/health").status_code == 200
    assert codes == [200, 200, 429]
    assert requests(registry) == {
        ("/items/{item_id}", "allowed"): 2,
        ("/items/{item_id}", "refused"): 1,
    }
    assert decisions(registry) == {("items", "allowed"): 2, ("items", "refused"): 1}
    identity = api_key_identity(SECRET_KEY)
    text = exposition(registry)
    assert_no_secrets(text, "/items/4", SECRET_KEY, *identity_secrets(identity))


def test_fastapi_middleware_counts_admissions_by_template(registry: CollectorRegistry) -> None:
    limiter = RateLimiter.from_url("memory://", metrics=PrometheusMetrics(registry))
    with TestClient(fastapi_app(limiter, middleware=True)) as client:
        paths = ("/items/1", "/nowhere", "/items/2", "/items/3", "/items/4")
        codes = [client.get(path).status_code for path in paths]
        assert client.get("/health").status_code == 200  # exempt: not a check
    assert codes == [200, 404, 200, 200, 429]
    # Admitted requests by the route the app matched; refusals happen before routing, so
    # their route is "*". Unrouted requests are neither charged nor counted.
    assert requests(registry) == {
        ("/items/{item_id}", "allowed"): 3,
        ("*", "refused"): 1,
    }
    assert_no_secrets(exposition(registry), "/items/1", "/nowhere")


def layered_fastapi_app(limiter: RateLimiter | AsyncRateLimiter) -> FastAPI:
    """The middleware (3 an hour) around a route with its own limit (2 an hour) and its own
    WebSocket route limit (2 an hour), ``/health`` exempt."""
    app = FastAPI()
    install_handlers(app)
    app.add_middleware(RateLimitMiddleware, limit=HOURLY, limiter=limiter)
    own = RateLimit(Limit.per_hour(2, name="items"), limiter=limiter)

    @app.get("/items/{item_id}", dependencies=[Depends(own)])
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.websocket("/rooms/{room}", dependencies=[Depends(own)])
    async def room(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        await websocket.close()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def test_fastapi_middleware_and_route_count_each_request_once(
    url: str, registry: CollectorRegistry
) -> None:
    """Checked by the middleware and the route: one count per request, with its outcome (a
    route's refusal is a refusal, not the middleware's admission)."""
    limiter = AsyncRateLimiter.from_url(url, timeout=5.0, metrics=PrometheusMetrics(registry))
    with TestClient(layered_fastapi_app(limiter)) as client:
        codes = [client.get(f"/items/{n}").status_code for n in (1, 2, 3)]
        assert client.get("/health").status_code == 200
    assert codes == [200, 200, 429]
    assert requests(registry) == {
        ("/items/{item_id}", "allowed"): 2,
        ("/items/{item_id}", "refused"): 1,
    }
    # Both checks decided each request: the middleware's 3 admissions, the route's 2 and 1.
    assert decisions(registry) == {
        ("hourly", "allowed"): 3,
        ("items", "allowed"): 2,
        ("items", "refused"): 1,
    }


def test_fastapi_websocket_connections_count_once(registry: CollectorRegistry) -> None:
    """A WebSocket handshake checked by the middleware and the route counts once, when the
    app answers it; the route's refusal counts as one refusal."""
    limiter = RateLimiter.from_url("memory://", metrics=PrometheusMetrics(registry))
    with TestClient(layered_fastapi_app(limiter)) as client:
        for room in ("a", "b"):
            with (
                client.websocket_connect(f"/rooms/{room}") as ws,
                pytest.raises(WebSocketDisconnect),
            ):
                ws.receive_text()  # accepted, then closed by the app
        with pytest.raises(WebSocketDenialResponse) as refused:
            client.websocket_connect("/rooms/c").__enter__()
    assert refused.value.status_code == 429
    assert requests(registry) == {
        ("/rooms/{room}", "allowed"): 2,
        ("/rooms/{room}", "refused"): 1,
    }


def test_fastapi_dependencies_alone_count_once(registry: CollectorRegistry) -> None:
    """Without the middleware: a route's limit counts its requests; a second limit on the route
    (a router's and the route's own) admitting too adds no count."""
    limiter = RateLimiter.from_url("memory://", metrics=PrometheusMetrics(registry))
    app = FastAPI()
    router = APIRouter(dependencies=[Depends(RateLimit(HOURLY, limiter=limiter))])

    @router.get("/items/{item_id}", dependencies=[Depends(RateLimit("2/hour", limiter=limiter))])
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    app.include_router(router)
    with TestClient(app) as client:
        assert [client.get(f"/items/{n}").status_code for n in (1, 2)] == [200, 200]
    assert requests(registry) == {("/items/{item_id}", "allowed"): 2}
    assert decisions(registry) == {("hourly", "allowed"): 2, ("2/hour", "allowed"): 2}


def test_fastapi_storage_down_counts_unavailable(registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry)
    for middleware in (False, True):
        with RateLimiter.from_url(dead_url(), timeout=0.5, metrics=sink) as limiter:
            app = fastapi_app(limiter, middleware=middleware)
            with TestClient(app) as client:
                assert client.get("/items/7").status_code == 503
    assert requests(registry) == {("/items/{item_id}", "unavailable"): 1, ("*", "unavailable"): 1}
    assert value(registry, "tokenlimit_storage_errors_total", reason="connection") == 2


def test_flask_counts_by_url_rule(url: str, registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry)
    with RateLimiter.from_url(url, timeout=5.0, metrics=sink) as limiter:
        app = Flask(__name__)
        ext = TokenLimit(
            app, limiter=limiter, limit=Limit.per_hour(2, name="site"), api_key_header="X-API-Key"
        )

        @app.get("/items/<int:item_id>")
        def item(item_id: int) -> dict[str, int]:
            return {"item": item_id}

        @app.get("/search/<term>")
        @ext.limit(Limit.per_hour(1, name="search"))
        def search(term: str) -> dict[str, str]:
            return {"term": term}

        client = app.test_client()
        headers = {"X-API-Key": SECRET_KEY}
        codes = [client.get(f"/items/{n}", headers=headers).status_code for n in (1, 2, 3)]
        codes += [client.get(f"/search/{IDENTITY}").status_code for _ in range(2)]
        assert client.get("/missing").status_code == 404  # unrouted: not limited, not counted
    assert codes == [200, 200, 429, 200, 429]
    assert requests(registry) == {
        ("/items/<int:item_id>", "allowed"): 2,
        ("/items/<int:item_id>", "refused"): 1,
        ("/search/<term>", "allowed"): 1,
        ("/search/<term>", "refused"): 1,
    }
    text = exposition(registry)
    assert_no_secrets(text, "/items/1", SECRET_KEY, *identity_secrets(api_key_identity(SECRET_KEY)))
    assert_no_secrets(text, *identity_secrets(IDENTITY))


def test_flask_storage_down_counts_unavailable(registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry)
    with RateLimiter.from_url(dead_url(), timeout=0.5, metrics=sink) as limiter:
        app = Flask(__name__)
        TokenLimit(app, limiter=limiter, limit=HOURLY)

        @app.get("/items/<int:item_id>")
        def item(item_id: int) -> dict[str, int]:
            return {"item": item_id}

        assert app.test_client().get("/items/5").status_code == 503
    assert requests(registry) == {("/items/<int:item_id>", "unavailable"): 1}


@contextmanager
def django_site(**tokenlimit_settings: Any) -> Iterator[None]:
    """The metrics test URLs, behind the rate-limit middleware unless MIDDLEWARE says else."""
    middleware = tokenlimit_settings.pop("MIDDLEWARE", [tl_django.MIDDLEWARE_PATH])
    settings = {
        **django_project.BASE,
        "ROOT_URLCONF": "django_project.metrics_urls",
        "MIDDLEWARE": middleware,
        "TOKENLIMIT": tokenlimit_settings,
    }
    with override_settings(**settings):
        yield


def django_get(mode: str, paths: Sequence[str]) -> list[int]:
    headers = {"X-API-Key": SECRET_KEY}
    if mode == "sync":
        client = Client()
        return [client.get(path, headers=headers).status_code for path in paths]

    async def run() -> list[int]:
        client = AsyncClient()
        return [(await client.get(path, headers=headers)).status_code for path in paths]

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_django_middleware_counts_by_url_pattern(
    mode: str, url: str, registry: CollectorRegistry
) -> None:
    sink = PrometheusMetrics(registry)
    prefix = "items" if mode == "sync" else "aitems"
    paths = [f"/{prefix}/1", "/nowhere", f"/{prefix}/2", f"/{prefix}/3"]
    with django_site(URL=url, LIMIT=HOURLY, TIMEOUT=5.0, METRICS=sink):
        assert django_get(mode, paths) == [200, 404, 200, 429]
    assert requests(registry) == {
        (f"{prefix}/<int:item_id>", "allowed"): 2,
        ("*", "allowed"): 1,
        ("*", "refused"): 1,
    }
    assert decisions(registry) == {("hourly", "allowed"): 3, ("hourly", "refused"): 1}
    text = exposition(registry)
    assert_no_secrets(
        text, f"/{prefix}/1", SECRET_KEY, *identity_secrets(api_key_identity(SECRET_KEY))
    )


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_django_decorator_counts_by_url_pattern(mode: str, registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry)
    prefix = "limited" if mode == "sync" else "alimited"
    with django_site(URL="memory://", METRICS=sink, MIDDLEWARE=[]):
        assert django_get(mode, [f"/{prefix}/{n}" for n in (1, 2, 3)]) == [200, 200, 429]
    assert requests(registry) == {
        (f"{prefix}/<int:item_id>", "allowed"): 2,
        (f"{prefix}/<int:item_id>", "refused"): 1,
    }


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_django_middleware_and_decorator_count_each_request_once(
    mode: str, url: str, registry: CollectorRegistry
) -> None:
    """The middleware (3 an hour) around a view's own limit (2 a minute): one count per
    request, the view's refusal a refusal."""
    sink = PrometheusMetrics(registry)
    prefix = "limited" if mode == "sync" else "alimited"
    with django_site(URL=url, LIMIT=HOURLY, TIMEOUT=5.0, METRICS=sink):
        assert django_get(mode, [f"/{prefix}/{n}" for n in (1, 2, 3)]) == [200, 200, 429]
    assert requests(registry) == {
        (f"{prefix}/<int:item_id>", "allowed"): 2,
        (f"{prefix}/<int:item_id>", "refused"): 1,
    }
    assert decisions(registry) == {
        ("hourly", "allowed"): 3,
        ("2/minute", "allowed"): 2,
        ("2/minute", "refused"): 1,
    }


def test_django_storage_down_counts_unavailable(registry: CollectorRegistry) -> None:
    sink = PrometheusMetrics(registry)
    with django_site(URL=dead_url(), LIMIT=HOURLY, METRICS=sink):
        assert django_get("sync", ["/items/1"]) == [503]
    assert requests(registry) == {("*", "unavailable"): 1}


def test_django_metrics_setting_is_checked(sink: PrometheusMetrics) -> None:
    with django_site(URL="memory://", METRICS=sink, MIDDLEWARE=[]):
        assert tl_django.check_settings() == []
    with django_site(URL="memory://", METRICS="django_project.nowhere.sink", MIDDLEWARE=[]):
        assert [m.id for m in tl_django.check_settings()] == ["tokenlimit.E013"]
    for bad in (object(), PrometheusMetrics):
        with django_site(URL="memory://", METRICS=bad, MIDDLEWARE=[]):
            found = tl_django.check_settings()
        assert [m.id for m in found] == ["tokenlimit.E013"]
        assert all(isinstance(m, checks.Error) for m in found)
        assert "MetricsSink" in found[0].msg


# -- the demo ----------------------------------------------------------------------------------


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_demo_for_metrics", DEMO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_demo_serves_the_metrics() -> None:
    import prometheus_client

    demo = load_demo()
    before = {family.name for family in prometheus_client.REGISTRY.collect()}
    with TestClient(demo.create_app("memory://")) as client:
        headers = {"X-API-Key": SECRET_KEY}
        assert [client.get("/v1/hello", headers=headers).status_code for _ in range(3)] == [200] * 3
        page = client.get("/metrics")
    with TestClient(demo.create_app("memory://")) as again:  # its own registry: no clash
        assert again.get("/metrics").status_code == 200
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page.text)
        for sample in family.samples
    }
    hello = (("result", "allowed"), ("route", "/v1/hello"))
    assert samples[("tokenlimit_decisions_total", (("limit", "10-per-2s"), hello[0]))] == 3
    assert samples[("tokenlimit_decision_seconds_count", ())] == 3
    assert samples[("tokenlimit_http_requests_total", hello)] == 3
    assert_no_secrets(page.text, SECRET_KEY, *identity_secrets(api_key_identity(SECRET_KEY)))
    # The app's own registry: the default one gains nothing.
    assert {family.name for family in prometheus_client.REGISTRY.collect()} == before
