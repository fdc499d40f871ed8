"""tokenlimit.integrations.fastapi through FastAPI's own TestClient, on memory and real servers:
the RateLimit dependency (Depends and Annotated, def and async def routes), the pure ASGI
middleware (FastAPI and plain Starlette), the handlers, identities, trusted proxies, headers as
structured fields, storage failures, and deciding off the event loop."""

import asyncio
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import http_sfv
import pytest
import redis
from conftest import Target
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import WebSocketDenialResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

import tokenlimit
import tokenlimit.testing
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
from tokenlimit._overrides import REFRESH
from tokenlimit.integrations import fastapi as tl_fastapi
from tokenlimit.integrations._common import api_key_identity
from tokenlimit.integrations.fastapi import (
    RateLimit,
    RateLimited,
    RateLimitMiddleware,
    install_handlers,
)
from tokenlimit.testing import FakeClock

SLOW = 0.01  # tokens per second: one token per 100 s, so nothing refills during a test
THREE = Limit(SLOW, 3)  # label "3-per-300s": q=3, w=300; each token adds 100 s to t
LIMIT_FIELDS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
                "ratelimit-policy", "ratelimit")  # fmt: skip


# -- helpers ----------------------------------------------------------------------------------
def sf_list(value: str) -> list[tuple[Any, dict[str, Any]]]:
    """Parse an RFC 8941 List; raises if the field is not one."""
    items = http_sfv.List()
    items.parse(value.encode())
    return [(item.value, dict(item.params)) for item in items]


def memory_limiter() -> RateLimiter:
    return RateLimiter(MemoryBackend())


def used(limiter: RateLimiter, identity: str, limit: Limit = THREE) -> int:
    """Tokens taken from ``identity``'s bucket so far."""
    return limit.burst - limiter.peek(identity, limit).remaining


def bucket(identity: str, route: str = "GET /async") -> str:
    """The bucket of a route's own limit: ``route:<method> <path template>|<identity>``."""
    return f"route:{route}|{identity}"


class FromPeer:
    """``app`` as seen from ``peer``: each HTTP and WebSocket scope's ``client`` is replaced.

    ``TestClient(app, client=...)`` does this only in newer Starlette; fastapi 0.110, the oldest
    we support, brings Starlette 0.37, whose TestClient always says ``("testclient", 50000)``.
    """

    def __init__(self, app: ASGIApp, peer: tuple[str, int] | None) -> None:
        self.app = app
        self.peer = peer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "client": self.peer}
        await self.app(scope, receive, send)


def peer_client(app: ASGIApp, peer: tuple[str, int] | None) -> TestClient:
    """A TestClient whose requests come from ``peer`` (None: a unix socket's, as uvicorn --uds)."""
    return TestClient(FromPeer(app, peer))


def dependency_app(dependency: RateLimit, *, handlers: bool = True, **app: Any) -> FastAPI:
    """``/async`` and ``/sync`` routes guarded by ``dependency``, plus an unguarded ``/open``."""
    api = FastAPI(**app)
    if handlers:
        install_handlers(api)

    @api.get("/async")
    async def async_route(decision: Annotated[Decision, Depends(dependency)]) -> dict[str, int]:
        return {"remaining": decision.remaining}

    @api.get("/sync", dependencies=[Depends(dependency)])
    def sync_route() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/open")
    def open_route() -> dict[str, str]:
        return {"ok": "yes"}

    return api


def middleware_app(**options: Any) -> FastAPI:
    api = FastAPI()
    api.add_middleware(RateLimitMiddleware, **options)

    @api.get("/{path:path}")
    async def anything(path: str) -> dict[str, str]:
        return {"path": path}

    return api


@pytest.fixture(params=["async", "sync"])
def any_limiter(
    request: pytest.FixtureRequest, url: str
) -> Iterator[RateLimiter | AsyncRateLimiter]:
    """An AsyncRateLimiter, and a sync RateLimiter (decided off the loop), on every backend."""
    if request.param == "async":
        # Its clients are per event loop and close with the TestClient's loop.
        yield AsyncRateLimiter.from_url(url, timeout=5)
    else:
        with RateLimiter.from_url(url, timeout=5) as limiter:
            yield limiter


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# -- allowed, then refused at exactly the burst -----------------------------------------------
@pytest.mark.parametrize("route", ["/async", "/sync"])
def test_dependency_admits_exactly_the_burst(
    any_limiter: RateLimiter | AsyncRateLimiter, route: str
) -> None:
    api = dependency_app(RateLimit(THREE, limiter=any_limiter))
    with TestClient(api) as client:
        for n in (1, 2, 3):
            before = time.time()
            response = client.get(route)
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit"] == "3"
            assert response.headers["x-ratelimit-remaining"] == str(3 - n)
            # when the bucket is full again, in Unix seconds: n tokens owed at 100 s each
            reset = int(response.headers["x-ratelimit-reset"])
            assert before + 100 * n - 1 <= reset <= time.time() + 100 * n + 1
            assert sf_list(response.headers["ratelimit-policy"]) == [
                ("3-per-300s", {"q": 3, "w": 300})
            ]
            # t: seconds until full; n tokens owed at 100 s each, minus the few ms elapsed.
            assert sf_list(response.headers["ratelimit"]) == [
                ("3-per-300s", {"r": 3 - n, "t": 100 * n})
            ]
            assert "retry-after" not in response.headers
        refused = client.get(route)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/json"
        assert refused.json() == {"detail": "rate limit exceeded", "retry_after": 100}
        assert refused.headers["retry-after"] == "100"
        assert refused.headers["x-ratelimit-remaining"] == "0"
        assert sf_list(refused.headers["ratelimit"]) == [("3-per-300s", {"r": 0, "t": 300})]
        assert client.get("/open").status_code == 200


def test_middleware_admits_exactly_the_burst(url: str) -> None:
    api = middleware_app(limit=THREE, limiter=AsyncRateLimiter.from_url(url, timeout=5))
    with TestClient(api) as client:
        statuses = [client.get("/v1/x").status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        refused = client.get("/v1/y")
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/json"
        assert refused.json() == {"detail": "rate limit exceeded", "retry_after": 100}
        assert refused.headers["retry-after"] == "100"
        assert sf_list(refused.headers["ratelimit-policy"]) == [("3-per-300s", {"q": 3, "w": 300})]
        assert sf_list(refused.headers["ratelimit"]) == [("3-per-300s", {"r": 0, "t": 300})]
        assert client.get("/health").status_code == 200


def test_headers_name_limits_as_written(url: str) -> None:
    """The IETF fields name each limit as the app wrote it ("10/second" with burst 20, a name
    with quotes, a backslash and non-ASCII), always a valid structured field; a limit spelled
    twice (the middleware's string, a route's numbers) is one bucket per place, each named as
    written there."""
    limiter = AsyncRateLimiter.from_url(url, timeout=5)
    odd = Limit(SLOW, 2, name='plan "gold" \\ caf\u00e9')
    api = FastAPI()
    api.add_middleware(RateLimitMiddleware, limit="10/second", burst=20, limiter=limiter)

    @api.get("/odd", dependencies=[Depends(RateLimit(odd, limiter=limiter))])
    async def odd_route() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/numbers", dependencies=[Depends(RateLimit(10, burst=20, limiter=limiter))])
    async def numbers_route() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/plain")
    async def plain_route() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(api) as client:
        plain = client.get("/plain")
        assert sf_list(plain.headers["ratelimit-policy"]) == [("10/second", {"q": 20, "w": 2})]
        assert sf_list(plain.headers["ratelimit"]) == [("10/second", {"r": 19, "t": 1})]
        numbers = client.get("/numbers")  # the route's own fields win over the middleware's
        assert sf_list(numbers.headers["ratelimit-policy"]) == [("20-per-2s", {"q": 20, "w": 2})]
        odd_fields = client.get("/odd").headers
        assert sf_list(odd_fields["ratelimit-policy"]) == [
            ('plan "gold" \\ caf?', {"q": 2, "w": 200})
        ]
        assert sf_list(odd_fields["ratelimit"]) == [('plan "gold" \\ caf?', {"r": 1, "t": 100})]


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    limiter = memory_limiter()
    seen: list[RateLimited] = []
    api = dependency_app(RateLimit(Limit(2, 1), limiter=limiter), handlers=False)

    @api.exception_handler(RateLimited)
    async def capture(request: Request, exc: RateLimited) -> JSONResponse:
        seen.append(exc)
        return JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)

    with TestClient(api) as client:
        assert client.get("/async").status_code == 200
        refused = client.get("/async")
    assert refused.status_code == 429
    (exc,) = seen
    assert 0 < exc.retry_after <= 0.5  # a token every 0.5 s
    assert exc.retry_after == exc.decision.retry_after
    assert refused.headers["retry-after"] == str(math.ceil(exc.retry_after)) == "1"


def test_without_install_handlers_a_refusal_is_still_a_429_with_headers() -> None:
    api = dependency_app(RateLimit(Limit(SLOW, 1), limiter=memory_limiter()), handlers=False)
    with TestClient(api) as client:
        assert client.get("/async").status_code == 200
        refused = client.get("/async")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "100"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.json() == {"detail": "rate limit exceeded"}  # FastAPI's own HTTPException body


# -- forms, several limits, cost --------------------------------------------------------------
def test_annotated_alias_and_router_dependencies() -> None:
    limiter = memory_limiter()
    Limited = Annotated[Decision, Depends(RateLimit("3/second", limiter=limiter))]
    api = FastAPI()

    @api.get("/a")
    async def a(decision: Limited) -> dict[str, Any]:
        return {"allowed": decision.allowed, "remaining": decision.remaining}

    with TestClient(api) as client:
        assert client.get("/a").json() == {"allowed": True, "remaining": 2}


def test_limit_string_with_burst() -> None:
    dependency = RateLimit("10/second", burst=20, limiter=memory_limiter())
    (limit,) = dependency.policy.limits
    assert (limit.rate, limit.burst) == (10, 20)
    with TestClient(dependency_app(dependency)) as client:
        assert client.get("/async").headers["x-ratelimit-limit"] == "20"


def test_several_limits_all_or_nothing() -> None:
    limiter = memory_limiter()
    short, long = Limit(SLOW, 3, name="short"), Limit(SLOW / 10, 5, name="long")
    api = dependency_app(RateLimit([short, long], limiter=limiter))
    with TestClient(api) as client:
        first = client.get("/async")
        assert first.headers["x-ratelimit-limit"] == "3"  # the most restrictive one
        assert sf_list(first.headers["ratelimit-policy"]) == [
            ("short", {"q": 3, "w": 300}),
            ("long", {"q": 5, "w": 5000}),
        ]
        assert sf_list(first.headers["ratelimit"]) == [
            ("short", {"r": 2, "t": 100}),
            ("long", {"r": 4, "t": 1000}),
        ]
        assert [client.get("/async").status_code for _ in range(3)] == [200, 200, 429]
    # The refusal took nothing from either bucket. (TestClient's peer, "testclient", is no IP.)
    assert used(limiter, bucket("ip:unknown"), short) == 3
    assert used(limiter, bucket("ip:unknown"), long) == 3


def test_cost() -> None:
    limiter = memory_limiter()
    api = dependency_app(RateLimit(Limit(SLOW, 5), cost=2, limiter=limiter))
    with TestClient(api) as client:
        remaining = [client.get("/async").json().get("remaining") for _ in range(3)]
    assert remaining == [3, 1, None]
    with pytest.raises(ConfigError, match="cost"):
        RateLimit(Limit(SLOW, 5), cost=6)


def test_bad_arguments_fail_where_written() -> None:
    with pytest.raises(TypeError, match="limiter"):
        RateLimit("1/second", limiter="redis://localhost")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="burst"):
        RateLimit(Limit(1), burst=5)
    with pytest.raises(ConfigError, match="limit"):
        RateLimit("ten per fortnight")
    with pytest.raises(TypeError, match="key"):
        RateLimit("1/second", key="user:{id}")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="exempt"):
        RateLimitMiddleware(FastAPI(), limit="1/second", exempt=["health"])
    with pytest.raises(ConfigError, match="trusted_proxies"):
        RateLimitMiddleware(FastAPI(), limit="1/second", trusted_proxies=["not-a-network"])


def test_default_limiter_is_resolved_per_request() -> None:
    dependency = RateLimit(THREE)
    limiter = memory_limiter()
    tokenlimit.configure(limiter)  # after the dependency was made
    with TestClient(dependency_app(dependency)) as client:
        client.get("/async")
        client.get("/sync")
    assert used(limiter, bucket("ip:unknown")) == 1
    assert used(limiter, bucket("ip:unknown", "GET /sync")) == 1


# -- exemptions -------------------------------------------------------------------------------
def test_middleware_exempt_paths() -> None:
    limiter = memory_limiter()
    api = middleware_app(limit=Limit(SLOW, 1), limiter=limiter, exempt=["/health", "/internal"])
    with TestClient(api) as client:
        assert client.get("/v1/a").status_code == 200
        assert client.get("/v1/a").status_code == 429
        for path in ("/health", "/health/deep", "/internal", "/internal/jobs/1"):
            response = client.get(path)
            assert response.status_code == 200, path
            assert not any(field in response.headers for field in LIMIT_FIELDS)
        assert client.get("/healthz").status_code == 429  # a prefix only up to a "/"
        assert client.get("/internals").status_code == 429
        assert client.get("/metrics").status_code == 429  # exempt= replaces the default


def test_middleware_default_exemptions() -> None:
    api = middleware_app(limit=Limit(SLOW, 1), limiter=memory_limiter())
    with TestClient(api) as client:
        assert [client.get("/x").status_code for _ in range(2)] == [200, 429]
        assert [client.get("/health").status_code for _ in range(3)] == [200] * 3
        assert [client.get("/metrics").status_code for _ in range(3)] == [200] * 3


def test_route_dependency_wins_over_the_middleware_headers() -> None:
    limiter = memory_limiter()
    api = dependency_app(RateLimit(THREE, limiter=limiter))
    api.add_middleware(RateLimitMiddleware, limit=Limit(SLOW, 100), limiter=limiter)
    with TestClient(api) as client:
        guarded = client.get("/async")
        unguarded = client.get("/open")
    assert guarded.headers.get_list("x-ratelimit-limit") == ["3"]
    assert unguarded.headers.get_list("x-ratelimit-limit") == ["100"]


# -- buckets: one per route, shared only by scope=, never charged twice -----------------------
def test_a_route_limit_has_a_bucket_per_route() -> None:
    # One RateLimit on two routes: each route has its own bucket (issue 14: they shared one).
    limiter = memory_limiter()
    limited = RateLimit("2/minute", limiter=limiter)
    api = FastAPI()

    async def endpoint() -> dict[str, str]:  # one function behind every route: the route counts
        return {"ok": "yes"}

    for method, path in (("GET", "/search"), ("GET", "/export"), ("POST", "/search")):
        api.add_api_route(path, endpoint, methods=[method], dependencies=[Depends(limited)])
    with TestClient(api) as client:
        paths = ["/search", "/search", "/export", "/search", "/export", "/export"]
        assert [client.get(path).status_code for path in paths] == [200, 200, 200, 429, 200, 429]
        # Another method on the same path is another route.
        assert [client.post("/search").status_code for _ in range(3)] == [200, 200, 429]
    two = Limit.parse("2/minute")
    for route in ("GET /search", "GET /export", "POST /search"):
        assert limiter.peek(bucket("ip:unknown", route), two).remaining == 0, route
    assert limiter.peek("ip:unknown", two).remaining == 2  # the app-wide bucket is untouched


def test_the_bucket_follows_the_route_template_not_the_path() -> None:
    limiter = memory_limiter()
    api = FastAPI()

    @api.get("/items/{item_id}", dependencies=[Depends(RateLimit(THREE, limiter=limiter))])
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    with TestClient(api) as client:
        assert [client.get(f"/items/{n}").status_code for n in range(4)] == [200, 200, 200, 429]
    assert used(limiter, bucket("ip:unknown", "GET /items/{item_id}")) == 3


def test_scope_shares_one_bucket_across_routes() -> None:
    limiter = memory_limiter()
    api = FastAPI()
    reports = RateLimit(THREE, limiter=limiter, scope="reports")

    @api.get("/daily", dependencies=[Depends(reports)])
    async def daily() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/weekly", dependencies=[Depends(RateLimit(THREE, limiter=limiter, scope="reports"))])
    async def weekly() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/other", dependencies=[Depends(RateLimit(THREE, limiter=limiter, scope="other"))])
    async def other() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(api) as client:
        paths = ["/daily", "/weekly", "/daily", "/weekly", "/other"]
        assert [client.get(path).status_code for path in paths] == [200, 200, 200, 429, 200]
    assert used(limiter, "scope:reports|ip:unknown") == 3
    assert used(limiter, "scope:other|ip:unknown") == 1


@pytest.mark.parametrize("scope", ["", "a|b", 5])
def test_bad_scope_names_the_parameter(scope: Any) -> None:
    with pytest.raises((ConfigError, TypeError), match=r"^scope\b"):
        RateLimit("1/second", scope=scope)


def test_middleware_and_route_limits_charge_different_buckets_once_each() -> None:
    # The same Limit in the middleware and on a route: two buckets (app-wide and the route's),
    # each charged once per request, never one bucket twice.
    limiter = memory_limiter()
    api = dependency_app(RateLimit(THREE, limiter=limiter))
    api.add_middleware(RateLimitMiddleware, limit=THREE, limiter=limiter)
    with TestClient(api) as client:
        assert client.get("/async").status_code == 200
        assert used(limiter, "ip:unknown") == 1
        assert used(limiter, bucket("ip:unknown")) == 1
        assert [client.get("/async").status_code for _ in range(3)] == [200, 200, 429]


def test_one_bucket_is_charged_once_per_request() -> None:
    # Two limits that name the same bucket on one route (a router's and the route's own, or one
    # scope twice) take one token per request, not two.
    limiter = memory_limiter()
    api = FastAPI()
    router = APIRouter(dependencies=[Depends(RateLimit(THREE, limiter=limiter))])

    @router.get("/twice", dependencies=[Depends(RateLimit(THREE, limiter=limiter))])
    async def twice() -> dict[str, str]:
        return {"ok": "yes"}

    shared = [Depends(RateLimit(THREE, limiter=limiter, scope="s")) for _ in range(2)]

    @router.get("/scoped", dependencies=shared)
    async def scoped() -> dict[str, str]:
        return {"ok": "yes"}

    api.include_router(router)
    with TestClient(api) as client:
        assert [client.get("/twice").status_code for _ in range(4)] == [200, 200, 200, 429]
        scoped_codes = [client.get("/scoped").status_code for _ in range(4)]
    assert used(limiter, bucket("ip:unknown", "GET /twice")) == 3
    # /scoped: the router's own per-route limit and the shared scope, each once.
    assert scoped_codes == [200, 200, 200, 429]
    assert used(limiter, "scope:s|ip:unknown") == 3


# -- identity ---------------------------------------------------------------------------------
def test_custom_key_sync_and_async_replaces_the_default() -> None:
    limiter = memory_limiter()

    def by_tenant(request: Request) -> str | None:
        tenant = request.headers.get("x-tenant")
        return None if tenant is None else f"tenant:{tenant}"

    async def by_tenant_async(request: Request) -> str | None:
        await asyncio.sleep(0)
        return by_tenant(request)

    for key in (by_tenant, by_tenant_async):
        api = dependency_app(RateLimit(THREE, key=key, limiter=limiter))
        with TestClient(api) as client:
            response = client.get("/async", headers={"x-tenant": "acme-secret-42"})
            assert response.status_code == 200
            assert "acme-secret-42" not in str(response.headers) + response.text
            client.get("/sync", headers={"x-tenant": "acme-secret-42", "x-api-key": "k"})
            client.get("/async")  # no tenant: the default identity
    assert used(limiter, bucket("tenant:acme-secret-42")) == 2
    assert used(limiter, bucket("tenant:acme-secret-42", "GET /sync")) == 2  # beat the API key
    assert used(limiter, bucket("ip:unknown")) == 2
    assert used(limiter, bucket(api_key_identity("k"), "GET /sync")) == 0

    # The middleware hands the key function a Request too.
    api = middleware_app(limit=THREE, key=by_tenant_async, limiter=limiter)
    with TestClient(api) as client:
        assert [
            client.get("/x", headers={"x-tenant": "acme-secret-42"}).status_code for _ in range(4)
        ] == [200, 200, 200, 429]
    assert used(limiter, "tenant:acme-secret-42") == 3


def test_custom_key_returning_empty_means_the_default_identity() -> None:
    # One rule in every integration: None or "" from a key function means the default identity.
    limiter = memory_limiter()

    def empty(request: Request) -> str:
        return ""

    async def aempty(request: Request) -> str:
        return ""

    peer = ("203.0.113.9", 1234)
    for key in (empty, aempty):
        for api, path, where in both_ways(limiter, key=key):
            limiter.reset(where("ip:203.0.113.9"), THREE)
            with peer_client(api, peer) as client:
                statuses = [client.get(path).status_code for _ in range(4)]
            assert statuses == [200, 200, 200, 429]
            assert used(limiter, where("ip:203.0.113.9")) == 3


KNOWN_KEYS = {"sk-known-1", "sk-known-2"}


def made_up_keys(client: TestClient, path: str, n: int = 6) -> list[int]:
    """``n`` requests, each with an API key never seen before (one client minting buckets)."""
    return [
        client.get(path, headers={"X-API-Key": secrets.token_hex(8)}).status_code for _ in range(n)
    ]


def both_ways(
    limiter: RateLimiter, **options: Any
) -> list[tuple[FastAPI, str, Callable[[str], str]]]:
    """The dependency's app and the middleware's, each with ``options``: the app, a path, and
    the bucket it charges for an identity (the route's own, or the identity's app-wide one)."""
    return [
        (dependency_app(RateLimit(THREE, limiter=limiter, **options)), "/async", bucket),
        (middleware_app(limit=THREE, limiter=limiter, **options), "/x", str),
    ]


def test_made_up_api_keys_choose_no_bucket_by_default() -> None:
    # The API-key step is off unless the app vouches for keys: one client, one bucket.
    limiter = memory_limiter()
    for api, path, where in both_ways(limiter):
        with peer_client(api, ("203.0.113.9", 1234)) as client:
            assert made_up_keys(client, path) == [200, 200, 200, 429, 429, 429]
        assert used(limiter, where("ip:203.0.113.9")) == 3


def test_api_key_header_opt_in_makes_the_key_the_identity() -> None:
    limiter = memory_limiter()
    for api, path, where in both_ways(limiter, api_key_header="X-API-Key"):
        with peer_client(api, ("203.0.113.9", 1234)) as client:
            one = [client.get(path, headers={"X-API-Key": "k-one"}) for _ in range(4)]
            two = client.get(path, headers={"X-API-Key": "k-two"})
        assert [r.status_code for r in one] + [two.status_code] == [200, 200, 200, 429, 200]
        assert used(limiter, where(api_key_identity("k-one"))) == 3
        assert used(limiter, where("ip:203.0.113.9")) == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_api_key_validator_sends_unknown_keys_to_the_ip(kind: str) -> None:
    seen: list[str] = []

    def known(key: str) -> bool:
        seen.append(key)
        return key in KNOWN_KEYS

    async def aknown(key: str) -> bool:
        await asyncio.sleep(0)
        return known(key)

    validator = known if kind == "sync" else aknown
    limiter = memory_limiter()
    # With a validator and no header name, the header is X-API-Key.
    for api, path, where in both_ways(limiter, api_key_validator=validator):
        with peer_client(api, ("203.0.113.9", 1234)) as client:
            assert made_up_keys(client, path) == [200, 200, 200, 429, 429, 429]
            statuses = [
                client.get(path, headers={"X-API-Key": "sk-known-1"}).status_code for _ in range(4)
            ]
            assert statuses == [200, 200, 200, 429]
        assert used(limiter, where(api_key_identity("sk-known-1"))) == 3
    assert len(seen) == 20  # once per request that carried a key
    assert "sk-known-1" in seen
    # Another header name, given explicitly.
    api = dependency_app(
        RateLimit(THREE, limiter=limiter, api_key_header="X-Key", api_key_validator=known)
    )
    with peer_client(api, ("198.51.100.3", 1234)) as client:
        client.get("/async", headers={"X-Key": "sk-known-2", "X-API-Key": "sk-known-1"})
    assert used(limiter, bucket(api_key_identity("sk-known-2"))) == 1
    with pytest.raises(TypeError, match="api_key_validator"):
        RateLimit(THREE, api_key_validator="not callable")  # type: ignore[arg-type]


def test_api_key_is_hashed_everywhere(standalone: Any) -> None:
    raw = "sk-live-very-secret-0123456789"
    with RateLimiter.from_url(standalone.url, timeout=5) as limiter:
        opt_in = {"limiter": limiter, "api_key_header": "X-API-Key"}
        api = dependency_app(RateLimit(THREE, **opt_in))
        api.add_middleware(RateLimitMiddleware, limit=Limit(SLOW, 10), **opt_in)
        with TestClient(api) as client:
            responses = [client.get("/async", headers={"X-API-Key": raw}) for _ in range(4)]
            responses.append(client.get("/open", headers={"x-api-key": raw}))
        assert [r.status_code for r in responses] == [200, 200, 200, 429, 200]
        for response in responses:
            assert raw not in str(response.headers) + response.text
        assert used(limiter, bucket(api_key_identity(raw))) == 3
        assert used(limiter, bucket("ip:unknown")) == 0
    with redis.Redis.from_url(standalone.url) as client:
        keys = list(client.scan_iter(count=1000))
        assert keys  # the buckets are there...
        for key in keys:  # ...and none names the key
            assert raw.encode() not in key
            assert b"sk-live" not in key


class HeaderAuth(AuthenticationBackend):
    """``X-User: <name>`` signs in as that user (a stand-in for real authentication)."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, Any] | None:
        name = conn.headers.get("x-user")
        if name is None:
            return None
        if name.isdigit():
            return AuthCredentials(["authenticated"]), IdUser(int(name))
        return AuthCredentials(["authenticated"]), SimpleUser(name)


class IdUser:
    """A user model with only ``id`` (as ORMs have it)."""

    is_authenticated = True

    def __init__(self, user_id: int) -> None:
        self.id = user_id


def test_authenticated_user_then_ip() -> None:
    limiter = memory_limiter()
    dependency = RateLimit(THREE, limiter=limiter, api_key_header="X-API-Key")
    api = dependency_app(
        dependency, middleware=[Middleware(AuthenticationMiddleware, backend=HeaderAuth())]
    )
    with peer_client(api, ("203.0.113.9", 1234)) as client:
        client.get("/async", headers={"x-user": "alice"})
        client.get("/sync", headers={"x-user": "alice"})
        client.get("/async", headers={"x-user": "42"})
        client.get("/async", headers={"x-user": "alice", "x-api-key": "k"})  # API key first
        client.get("/async")  # anonymous: the client IP
    assert used(limiter, bucket("user:alice")) == 1
    assert used(limiter, bucket("user:alice", "GET /sync")) == 1
    assert used(limiter, bucket("user:42")) == 1
    assert used(limiter, bucket(api_key_identity("k"))) == 1
    assert used(limiter, bucket("ip:203.0.113.9")) == 1

    # The middleware sees the user when authentication runs before it (added after it).
    api = middleware_app(limit=THREE, limiter=limiter)
    api.add_middleware(AuthenticationMiddleware, backend=HeaderAuth())
    with TestClient(api) as client:
        client.get("/x", headers={"x-user": "bob"})
    assert used(limiter, "user:bob") == 1


# -- client IP and trusted proxies ------------------------------------------------------------
PEER = ("203.0.113.9", 1234)
PROXY = ("10.0.0.5", 1234)


def charged_ip(trusted: Any, peer: tuple[str, int], forwarded_for: str | None) -> str:
    """Send one request through the dependency and the middleware; return the ``ip:`` charged."""
    limiter = memory_limiter()
    headers = {} if forwarded_for is None else {"x-forwarded-for": forwarded_for}
    dependency = RateLimit(THREE, limiter=limiter, trusted_proxies=trusted)
    with peer_client(dependency_app(dependency), peer) as client:
        assert client.get("/async", headers=headers).status_code == 200
    other = memory_limiter()
    api = middleware_app(limit=THREE, limiter=other, trusted_proxies=trusted)
    with peer_client(api, peer) as client:
        assert client.get("/x", headers=headers).status_code == 200
    for candidate in ("203.0.113.9", "10.0.0.5", "198.51.100.7", "6.6.6.6", "10.0.0.2"):
        if used(limiter, bucket(f"ip:{candidate}")) == 1:
            assert used(other, f"ip:{candidate}") == 1  # both paths agree
            return candidate
    raise AssertionError("no ip: bucket was charged")


def test_client_ip_is_the_peer() -> None:
    assert charged_ip(None, PEER, None) == "203.0.113.9"


def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    assert charged_ip(None, PEER, "198.51.100.7") == "203.0.113.9"
    assert charged_ip(["10.0.0.0/8"], PEER, "198.51.100.7") == "203.0.113.9"


def test_trusted_hop_count() -> None:
    # One proxy: the client is the last entry, whatever the client put before it.
    assert charged_ip(1, PROXY, "6.6.6.6, 198.51.100.7") == "198.51.100.7"


def test_trusted_cidrs() -> None:
    assert charged_ip(["10.0.0.0/8"], PROXY, "6.6.6.6, 198.51.100.7, 10.0.0.2") == "198.51.100.7"


UNIX_PEERS = {"none": None, "empty": ("", 0), "path": ("/run/app.sock", 0)}


@pytest.mark.parametrize("trusted", [None, ["10.0.0.0/8"]], ids=["no-proxies", "cidrs"])
@pytest.mark.parametrize("peer", list(UNIX_PEERS))
def test_a_unix_socket_peer_is_a_local_proxy(peer: str, trusted: Any) -> None:
    # uvicorn --uds: the scope's client is None (other servers: "" or the socket's path).
    limiter = memory_limiter()
    for api, path, where in both_ways(limiter, trusted_proxies=trusted):
        with peer_client(api, UNIX_PEERS[peer]) as client:
            alice = {"x-forwarded-for": "198.51.100.7"}
            bob = {"x-forwarded-for": "6.6.6.6, 203.0.113.5"}  # what bob wrote is not believed
            statuses = [client.get(path, headers=alice).status_code for _ in range(4)]
            statuses += [client.get(path, headers=bob).status_code for _ in range(3)]
        assert statuses == [200, 200, 200, 429, 200, 200, 200], path
        assert used(limiter, where("ip:198.51.100.7")) == 3
        assert used(limiter, where("ip:203.0.113.5")) == 3
        assert used(limiter, where("ip:6.6.6.6")) == 0
        assert used(limiter, where("ip:unknown")) == 0


def test_forwarded_for_split_over_several_lines_is_one_list() -> None:
    limiter = memory_limiter()
    api = dependency_app(RateLimit(THREE, limiter=limiter, trusted_proxies=1))
    headers = [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "198.51.100.7")]
    with peer_client(api, PROXY) as client:
        client.get("/async", headers=headers)
    assert used(limiter, bucket("ip:198.51.100.7")) == 1
    assert used(limiter, bucket("ip:6.6.6.6")) == 0


def test_ipv6_clients_share_a_bucket_per_64() -> None:
    limiter = memory_limiter()
    api = dependency_app(RateLimit(Limit(SLOW, 2), limiter=limiter))
    statuses = []
    for host in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2::77", "2001:db8:1:3::1"):
        with peer_client(api, (host, 1234)) as client:
            statuses.append(client.get("/async").status_code)
    assert statuses == [200, 200, 429, 200]


# -- headers off, storage failures ------------------------------------------------------------
def test_headers_can_be_turned_off() -> None:
    limiter = memory_limiter()
    for api, path in (
        (dependency_app(RateLimit(Limit(SLOW, 1), limiter=limiter, headers=False)), "/async"),
        (middleware_app(limit=Limit(SLOW, 1), limiter=limiter, headers=False), "/x"),
    ):
        limiter.reset("ip:unknown", Limit(SLOW, 1))
        with TestClient(api) as client:
            allowed, refused = client.get(path), client.get(path)
        assert (allowed.status_code, refused.status_code) == (200, 429)
        for response in (allowed, refused):
            assert not any(field in response.headers for field in LIMIT_FIELDS)
        # Retry-After is HTTP's own answer to a 429: kept, as in Flask and Django.
        assert "retry-after" not in allowed.headers
        assert refused.headers["retry-after"] == "100"
        assert refused.json() == {"detail": "rate limit exceeded", "retry_after": 100}


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_closed_mode_answers_503_and_leaks_nothing(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = dead_url()
    port = url.rsplit(":", 1)[1].split("/")[0]
    cls = AsyncRateLimiter if kind == "async" else RateLimiter
    limiter = cls.from_url(url, timeout=1)
    responses = []
    with TestClient(dependency_app(RateLimit(THREE, limiter=limiter))) as client:
        responses += [client.get("/async"), client.get("/sync")]
    with TestClient(middleware_app(limit=THREE, limiter=limiter)) as client:
        responses.append(client.get("/x"))
    for response in responses:
        assert response.status_code == 503
        assert response.json() == {"detail": "rate limiter unavailable"}
        assert "retry-after" not in response.headers
        assert not any(field in response.headers for field in LIMIT_FIELDS)
        text = str(response.headers) + response.text
        assert "127.0.0.1" not in text
        assert port not in text
    # Operators hear of it, once per dependency or middleware, not once per request.
    warnings = [r for r in caplog.records if "answering 503" in r.getMessage()]
    assert len(warnings) == 2


def test_open_mode_admits() -> None:
    limiter = AsyncRateLimiter.from_url(dead_url(), timeout=1, failure_mode="open")
    with TestClient(dependency_app(RateLimit(THREE, limiter=limiter))) as client:
        assert client.get("/async").status_code == 200
    with TestClient(middleware_app(limit=THREE, limiter=limiter)) as client:
        assert client.get("/x").status_code == 200


def test_install_handlers_answers_errors_raised_inside_routes() -> None:
    limiter = memory_limiter()
    api = FastAPI()
    install_handlers(api)

    @api.get("/decorated")
    @limiter.limit(limit=Limit(SLOW, 1), key="report")
    async def decorated() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/broken")
    async def broken() -> None:
        raise BackendError("storage failed (connection): 127.0.0.1:6379", reason="connection")

    with TestClient(api) as client:
        assert client.get("/decorated").status_code == 200
        refused = client.get("/decorated")
        broken_response = client.get("/broken")
    assert refused.status_code == 429
    assert refused.json() == {"detail": "rate limit exceeded", "retry_after": 100}
    assert refused.headers["retry-after"] == "100"
    assert sf_list(refused.headers["ratelimit"]) == [("1-per-100s", {"r": 0, "t": 100})]
    assert broken_response.status_code == 503
    assert broken_response.json() == {"detail": "rate limiter unavailable"}
    assert "127.0.0.1" not in broken_response.text


# -- plain Starlette, lifespan and websockets -------------------------------------------------
def test_starlette_app_lifespan_passes_untouched_and_websockets_share_the_bucket() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("home")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        for _ in range(3):
            await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    limiter = memory_limiter()
    api = Starlette(
        routes=[Route("/", home), WebSocketRoute("/ws", echo)],
        middleware=[Middleware(RateLimitMiddleware, limit=Limit(SLOW, 2), limiter=limiter)],
        lifespan=lifespan,
    )
    with TestClient(api) as client:
        assert events == ["startup"]
        home_response = client.get("/")
        assert home_response.text == "home"
        assert home_response.headers["x-ratelimit-remaining"] == "1"
        with client.websocket_connect("/ws") as ws:  # the last token of the identity's bucket
            for n in range(3):  # messages take nothing
                ws.send_text(f"hi {n}")
                assert ws.receive_text() == f"hi {n}"
        assert client.get("/").status_code == 429
        with pytest.raises(WebSocketDenialResponse) as refused:
            client.websocket_connect("/ws").__enter__()
        assert refused.value.status_code == 429
    assert events == ["startup", "shutdown"]


def without_denial(app: ASGIApp) -> ASGIApp:
    """``app`` behind a server without the ASGI ``websocket.http.response`` extension."""

    async def served(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            extensions = dict(scope.get("extensions") or {})
            extensions.pop("websocket.http.response", None)
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return served


def websocket_app(
    *, middleware: dict[str, Any] | None = None, dependency: RateLimit | None = None
) -> FastAPI:
    """``/rooms/{room}``: a WebSocket echoing the text it gets, then its ``Decision``'s
    ``remaining`` when ``dependency`` guards it; ``/ws-free`` unguarded; ``/health``."""
    api = FastAPI()
    install_handlers(api)
    if middleware is not None:
        api.add_middleware(RateLimitMiddleware, **middleware)
    guard = [] if dependency is None else [Depends(dependency)]

    @api.websocket("/rooms/{room}", dependencies=guard)
    async def room(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        await websocket.send_text(f"{room}: {await websocket.receive_text()}")
        await websocket.close()

    @api.websocket("/health")
    async def health(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    if dependency is not None:

        @api.websocket("/decision")
        async def decision(
            websocket: WebSocket, decided: Annotated[Decision, Depends(dependency)]
        ) -> None:
            await websocket.accept()
            await websocket.send_json({"remaining": decided.remaining})
            await websocket.close()

    return api


def talk(client: TestClient, path: str, text: str = "hi") -> str:
    """Connect to ``path``, send ``text`` and return the answer."""
    with client.websocket_connect(path) as ws:
        ws.send_text(text)
        return ws.receive_text()


def denied(client: TestClient, path: str) -> WebSocketDenialResponse:
    """The HTTP response a refused handshake to ``path`` gets."""
    with pytest.raises(WebSocketDenialResponse) as caught, client.websocket_connect(path):
        pass
    return caught.value


def closed(client: TestClient, path: str) -> WebSocketDisconnect:
    """The close a refused handshake to ``path`` gets, where no HTTP answer can be sent."""
    with pytest.raises(WebSocketDisconnect) as caught, client.websocket_connect(path):
        pass
    return caught.value


def test_middleware_limits_websocket_connections(url: str) -> None:
    """A token per handshake from the identity's bucket, whatever the messages: admitted, the
    accept carries the headers; refused, a 429 before accept. Exempt and unrouted paths take
    nothing."""
    limiter = AsyncRateLimiter.from_url(url, timeout=5)
    api = websocket_app(middleware={"limit": TWO, "limiter": limiter})
    with TestClient(api) as client:
        closed(client, "/nowhere")  # no such route: closed by the router, not charged
        with client.websocket_connect("/health"):  # exempt
            pass
        for n in (1, 2):
            with client.websocket_connect("/rooms/a") as ws:
                accepted = {name.decode(): value.decode() for name, value in ws.extra_headers}
                assert accepted["x-ratelimit-remaining"] == str(2 - n)
                assert sf_list(accepted["ratelimit-policy"]) == [("2-per-200s", {"q": 2, "w": 200})]
                ws.send_text("hi")
                assert ws.receive_text() == "a: hi"
        refused = denied(client, "/rooms/b")
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {"detail": "rate limit exceeded", "retry_after": 100}
    assert refused.headers["retry-after"] == "100"
    assert sf_list(refused.headers["ratelimit"]) == [("2-per-200s", {"r": 0, "t": 200})]


def test_without_the_denial_extension_a_refused_handshake_is_closed_with_1008() -> None:
    limiter = memory_limiter()
    api = websocket_app(middleware={"limit": Limit(SLOW, 1), "limiter": limiter})
    with TestClient(without_denial(api)) as client:
        assert talk(client, "/rooms/a") == "a: hi"
        refusal = closed(client, "/rooms/a")
    assert (refusal.code, refusal.reason) == (1008, "rate limit exceeded; retry after 100 s")
    assert used(limiter, "ip:unknown", Limit(SLOW, 1)) == 1


@pytest.mark.parametrize("denial", [True, False])
def test_dependency_limits_a_websocket_route(denial: bool) -> None:
    """``Depends(RateLimit(...))`` on a WebSocket route: a bucket per route (``WEBSOCKET
    <template>``), the ``Decision`` as its value, a refused handshake answered 429 (or closed
    with 1008 where the server takes no HTTP answer)."""
    limiter = memory_limiter()
    api = websocket_app(dependency=RateLimit(TWO, limiter=limiter))
    with TestClient(api if denial else without_denial(api)) as client:
        assert talk(client, "/rooms/a") == "a: hi"
        assert talk(client, "/rooms/b") == "b: hi"
        # Before Starlette 0.41 a dependency cannot answer a handshake over HTTP: it closes
        # (the next test forces that path on every version).
        if denial and tl_fastapi._HTTP_BEFORE_ACCEPT:
            refused = denied(client, "/rooms/c")
            assert refused.status_code == 429
            assert refused.json() == {"detail": "rate limit exceeded", "retry_after": 100}
            assert refused.headers["retry-after"] == "100"
        else:
            refusal = closed(client, "/rooms/c")
            assert refusal.code == 1008
            assert refusal.reason == "rate limit exceeded; retry after 100 s"
        with client.websocket_connect("/decision") as ws:
            assert ws.receive_json() == {"remaining": 1}
    assert used(limiter, bucket("ip:unknown", "WEBSOCKET /rooms/{room}"), TWO) == 2
    assert used(limiter, bucket("ip:unknown", "WEBSOCKET /decision"), TWO) == 1


def test_dependency_closes_with_1008_where_starlette_cannot_answer_a_handshake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before Starlette 0.41 an exception raised before ``accept`` cannot become an HTTP
    answer: the dependency then closes with 1008, extension or not."""
    monkeypatch.setattr(tl_fastapi, "_HTTP_BEFORE_ACCEPT", False)
    api = websocket_app(dependency=RateLimit(Limit(SLOW, 1), limiter=memory_limiter()))
    with TestClient(api) as client:
        assert talk(client, "/rooms/a") == "a: hi"
        refusal = closed(client, "/rooms/a")
    assert (refusal.code, refusal.reason) == (1008, "rate limit exceeded; retry after 100 s")


def test_websocket_handshake_with_storage_down_is_503_or_1011() -> None:
    dead = RateLimiter.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    apps = [
        websocket_app(middleware={"limit": TWO, "limiter": dead}),
        websocket_app(dependency=RateLimit(TWO, limiter=dead)),
    ]
    for api, http in zip(apps, [True, tl_fastapi._HTTP_BEFORE_ACCEPT], strict=True):
        if http:  # the middleware always can; a dependency from Starlette 0.41 on
            with TestClient(api) as client:
                assert denied(client, "/rooms/a").status_code == 503
        with TestClient(without_denial(api)) as client:
            refusal = closed(client, "/rooms/a")
        assert (refusal.code, refusal.reason) == (1011, "rate limiter unavailable")
    dead.close()


def test_websocket_key_function_gets_the_websocket() -> None:
    """The same identity rules: a key function (here and in a dependency) is handed the
    ``WebSocket``, and names the middleware's bucket alone."""
    limiter = memory_limiter()
    seen: list[str] = []

    def key(connection: HTTPConnection) -> str | None:
        seen.append(type(connection).__name__)
        return connection.query_params.get("user")

    one = Limit(SLOW, 1)
    api = websocket_app(
        middleware={"limit": one, "limiter": limiter, "key": key},
        dependency=RateLimit(TWO, limiter=limiter, key=key),
    )
    with TestClient(api) as client:
        assert talk(client, "/rooms/a?user=ann") == "a: hi"
        assert talk(client, "/rooms/a?user=bob") == "a: hi"
        assert denied(client, "/rooms/a?user=ann").status_code == 429
    assert set(seen) == {"WebSocket"}
    assert used(limiter, "ann", one) == 1
    assert used(limiter, bucket("ann", "WEBSOCKET /rooms/{room}"), TWO) == 1


TWO = Limit(SLOW, 2)


def unrouted_then_routed(client: TestClient, limiter: RateLimiter, routed: str) -> None:
    """Unrouted requests (404) take nothing; the routed path then has the whole burst."""
    assert [client.get(f"/nowhere/{n}").status_code for n in range(5)] == [404] * 5
    assert used(limiter, "ip:unknown", TWO) == 0
    assert [client.get(routed).status_code for _ in range(3)] == [200, 200, 429]
    assert client.get("/nowhere").status_code == 404  # an empty bucket hides no 404


def test_middleware_does_not_charge_unrouted_requests() -> None:
    # As Flask's extension: a request no route matches costs the client nothing.
    limiter = memory_limiter()
    api = FastAPI()
    api.add_middleware(RateLimitMiddleware, limit=TWO, limiter=limiter)

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    with TestClient(api) as client:
        unrouted_then_routed(client, limiter, "/items/1")
        # A method the route does not allow matched it in part (405): charged, and refused.
        assert client.post("/items/1").status_code == 429


def test_middleware_does_not_charge_unrouted_requests_on_starlette() -> None:
    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("home")

    for wrapped in (False, True):
        limiter = memory_limiter()
        options = {"limit": TWO, "limiter": limiter}
        if wrapped:  # the middleware around the app itself, as plain ASGI
            app: Any = RateLimitMiddleware(Starlette(routes=[Route("/", home)]), **options)
        else:
            app = Starlette(
                routes=[Route("/", home)], middleware=[Middleware(RateLimitMiddleware, **options)]
            )
        with TestClient(app) as client:
            unrouted_then_routed(client, limiter, "/")


def test_middleware_charges_every_request_to_an_app_without_a_router() -> None:
    async def not_found(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("no", 404)(scope, receive, send)

    limiter = memory_limiter()
    client = TestClient(RateLimitMiddleware(not_found, limit=TWO, limiter=limiter))  # no lifespan
    assert [client.get("/nowhere").status_code for _ in range(3)] == [404, 404, 429]


# -- never block the event loop ---------------------------------------------------------------
class SpyLimiter(RateLimiter):
    """Records the thread each decision ran on."""

    threads: list[int]

    def try_acquire(self, key: str, limit: Any, *, cost: int = 1) -> Decision:
        self.threads.append(threading.get_ident())
        return super().try_acquire(key, limit, cost=cost)


def test_sync_redis_limiter_decides_off_the_loop(standalone: Any) -> None:
    loop_threads: list[int] = []
    limiter = SpyLimiter.from_url(standalone.url, timeout=5)
    limiter.threads = []
    api = FastAPI()
    api.add_middleware(RateLimitMiddleware, limit=Limit(SLOW, 10), limiter=limiter)

    @api.get("/where", dependencies=[Depends(RateLimit(THREE, limiter=limiter))])
    async def where() -> None:
        loop_threads.append(threading.get_ident())

    try:
        with TestClient(api) as client:
            assert client.get("/where").status_code == 200
            assert client.get("/where").status_code == 200
    finally:
        limiter.close()
    assert len(limiter.threads) == 4  # the middleware's and the dependency's, twice
    assert len(set(loop_threads)) == 1
    assert loop_threads[0] not in limiter.threads


class SlowBackend:
    """A store that takes 0.3 s per decision, like a Redis under load."""

    def __init__(self) -> None:
        self.store = MemoryBackend()

    def decide(self, request: Any, *, consume: bool, timeout: float = 0.0) -> Sequence[int]:
        time.sleep(0.3)
        return self.store.decide(request, consume=consume)

    def reset(self, request: Any, *, timeout: float = 0.0) -> None:
        self.store.reset(request)

    def close(self) -> None:
        self.store.close()


@pytest.mark.parametrize("form", ["dependency", "middleware"])
def test_event_loop_keeps_ticking_during_a_slow_sync_decision(form: str) -> None:
    ticks: list[float] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        task = asyncio.create_task(tick())
        yield
        task.cancel()

    limiter = RateLimiter(SlowBackend())
    if form == "dependency":
        api = dependency_app(RateLimit(THREE, limiter=limiter), lifespan=lifespan)
    else:
        api = FastAPI(lifespan=lifespan)
        api.add_middleware(RateLimitMiddleware, limit=THREE, limiter=limiter)
        api.get("/async")(lambda: {"ok": "yes"})
    with TestClient(api) as client:
        started = time.monotonic()
        assert client.get("/async").status_code == 200
        finished = time.monotonic()
    during = [t for t in ticks if started <= t <= finished]
    assert finished - started >= 0.3
    assert len(during) >= 5  # a blocked loop would tick once, if at all


# -- request.state.tokenlimit -----------------------------------------------------------------
def test_request_state_holds_the_request_decision() -> None:
    limiter = memory_limiter()
    route_limit = RateLimit(Limit(SLOW, 2), limiter=limiter)

    def shown(request: Request) -> dict[str, Any] | None:
        decision = request.state.tokenlimit
        if decision is None:
            return None
        return {"limit": decision.limit, "remaining": decision.remaining,
                "parts": len(decision.details) or 1}  # fmt: skip

    def make(*, middleware: bool) -> FastAPI:
        api = FastAPI()
        if middleware:
            api.add_middleware(RateLimitMiddleware, limit=THREE, limiter=limiter)

        @api.get("/plain")
        async def plain(request: Request) -> dict[str, Any] | None:
            return shown(request)

        @api.get("/own", dependencies=[Depends(route_limit), Depends(route_limit)])
        def own(request: Request) -> dict[str, Any] | None:  # charged once: the same bucket
            return shown(request)

        @api.get("/health")
        async def health(request: Request) -> dict[str, Any] | None:
            return shown(request)

        return api

    with TestClient(make(middleware=False)) as client:  # the dependency alone
        assert client.get("/own").json() == {"limit": 2, "remaining": 1, "parts": 1}
    with TestClient(make(middleware=True)) as client:
        assert client.get("/plain").json() == {"limit": 3, "remaining": 2, "parts": 1}
        # The middleware's 3 (1 left) and the route's 2 (0 left): the route's is the worst.
        assert client.get("/own").json() == {"limit": 2, "remaining": 0, "parts": 2}
        assert client.get("/health").json() is None  # exempt: nothing decided


# -- leased limits ----------------------------------------------------------------------------
def leased_app(limit: Limit, limiter: AsyncRateLimiter) -> FastAPI:
    """``/global``: one bucket for every caller, on a leased limit."""
    api = FastAPI()
    install_handlers(api)
    dependency = RateLimit(limit, limiter=limiter, key=lambda request: "global")

    @api.get("/global", dependencies=[Depends(dependency)])
    async def global_route() -> dict[str, str]:
        return {"ok": "yes"}

    return api


def test_a_leased_route_admits_the_burst_exactly_mostly_from_held_tokens(
    standalone: Target,
) -> None:
    limit = Limit(SLOW, 20, lease=5)
    limiter = AsyncRateLimiter.from_url(standalone.url, timeout=5.0)
    table = limiter._leases
    assert table is not None
    with TestClient(leased_app(limit, limiter)) as client:
        answers = [client.get("/global") for _ in range(25)]
        assert [a.status_code for a in answers] == [200] * 20 + [429] * 5
        for answer in answers[:20]:
            assert int(answer.headers["x-ratelimit-remaining"]) <= 20
            assert all(name in answer.headers for name in LIMIT_FIELDS)
        assert answers[-1].headers["retry-after"]
        assert table.handed >= 10  # most admissions came from held tokens, none beyond the burst
    with RateLimiter.from_url(standalone.url, timeout=5.0) as sync:
        assert sync.peek(bucket("global", "GET /global"), limit).remaining == 0


def test_held_tokens_yield_to_the_kill_switch_and_to_a_live_override() -> None:
    """Held tokens answer without the store, but never past what would answer first: the
    kill switch, and a live override (here one that blocks the limit)."""
    store = MemoryBackend(clock=FakeClock())  # leases never expire: tokens stay held
    limiter, admin = AsyncRateLimiter(store), RateLimiter(store)
    table = limiter._leases
    assert table is not None
    with TestClient(leased_app(Limit(SLOW, 1000, lease=50, name="api"), limiter)) as client:
        for _ in range(40):  # the lease grows while used up
            assert client.get("/global").status_code == 200
        assert table.held() > 0
        handed = table.handed
        with tokenlimit.testing.disabled():  # admits, touching nothing: not the held tokens
            assert client.get("/global").status_code == 200
        assert table.handed == handed
        admin.set_override("api", block=True, seconds=600)
        time.sleep(REFRESH + 0.1)  # the next read is due: the next decision starts it
        deadline = time.monotonic() + 5.0
        while client.get("/global").status_code == 200:
            assert time.monotonic() < deadline, "the override was never applied"
            time.sleep(0.01)
        held, handed = table.held(), table.handed
        assert held > 0  # tokens are still held here, and not one is handed out while blocked
        assert [client.get("/global").status_code for _ in range(3)] == [429] * 3
        assert (table.held(), table.handed) == (held, handed)
