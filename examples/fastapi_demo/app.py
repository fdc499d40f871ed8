"""The demo service: ``/v1/hello`` limited per API key, user or IP; ``/health``; ``/metrics``.

Two tiers: the API key ``demo-pro`` is on the Pro plan (50 per second, bursts of 100); ``demo``
and every other caller are on Free (5 per second, bursts of 10). A plan lookup chooses the limit
per request, and each plan has its own bucket, so an upgrade takes effect at once.

    TOKENLIMIT_URL=redis://localhost:6379/0 python -m uvicorn examples.fastapi_demo.app:app

Without ``TOKENLIMIT_URL`` the limiter is ``memory://`` (one process only), unless
``TOKENLIMIT_REQUIRE_URL=1`` (the Docker image sets it): then the app refuses to start. On
several workers, ``python -m examples.fastapi_demo --workers 2`` also sets up Prometheus's
multiprocess mode, so ``/metrics`` shows every worker's counts. Try it:

    curl -i localhost:8000/v1/hello                                         # per client IP
    curl -i -H 'X-API-Key: k-123' localhost:8000/v1/hello                   # per API key
    curl -i -H 'X-API-Key: demo-pro' localhost:8000/v1/hello                # Pro: burst 100
    curl -i -H 'Authorization: Bearer alice-token' localhost:8000/v1/hello  # per user
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' annotations against
# module globals, and ``hello_limit`` is local to ``create_app``.

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenlimit import AsyncRateLimiter, Decision, Limit
from tokenlimit.integrations.fastapi import RateLimit, install_handlers
from tokenlimit.metrics import PrometheusMetrics, exposition

# A stand-in for a real token check: bearer token -> user name.
DEMO_TOKENS = {"alice-token": "alice", "bob-token": "bob"}

# The tiers, and a stand-in for a customer database: API key -> plan. Anyone else is on Free.
TIERS = {
    "free": Limit.per_second(5, burst=10),
    "pro": Limit.per_second(50, burst=100),
}
DEMO_PLANS = {"demo": "free", "demo-pro": "pro"}


async def plan_limit(request: Request) -> Limit:
    """The limit of the caller's plan (async, as a database lookup would be).

    ``app.state.plans`` may change while the app runs: an upgrade applies to the next request.
    """
    plans: dict[str, str] = request.app.state.plans
    return TIERS[plans.get(request.headers.get("x-api-key", ""), "free")]


class MissingURL(RuntimeError):
    """No storage URL where one is required (``TOKENLIMIT_REQUIRE_URL=1``)."""


def storage_url(url: str | None = None) -> str:
    """``url``, else ``$TOKENLIMIT_URL``, else ``$REDIS_URL`` (the name this demo and its Docker
    setups read before), else ``memory://``: unless ``$TOKENLIMIT_REQUIRE_URL`` is ``1``, where a
    missing URL raises ``MissingURL``: ``memory://`` would give each worker its own buckets."""
    url = url or os.environ.get("TOKENLIMIT_URL") or os.environ.get("REDIS_URL")
    if url:
        return url
    if os.environ.get("TOKENLIMIT_REQUIRE_URL") == "1":
        raise MissingURL(
            "TOKENLIMIT_URL is not set (e.g. redis://redis:6379/0): refusing to start, since "
            "memory:// would give each worker process its own limits"
        )
    return "memory://"


class DemoAuth(AuthenticationBackend):
    """``Authorization: Bearer <token>`` from ``DEMO_TOKENS``; anyone else is anonymous."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        name = DEMO_TOKENS.get(token) if scheme.lower() == "bearer" else None
        if name is None:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(name)


class WorkerPid:
    """Pure ASGI middleware: ``X-Worker-PID`` on every response, so a load test (and
    ``examples/demo.py``) can see which worker process served each request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                pid = (b"x-worker-pid", str(os.getpid()).encode())
                message = {**message, "headers": [*message.get("headers", []), pid]}
            await send(message)

        await self.app(scope, receive, send_with_pid)


def _metrics() -> PrometheusMetrics | None:
    """tokenlimit's Prometheus sink on a registry this app owns (None without prometheus_client).

    Decisions by limit and result, latency, storage errors, fail-open admissions, and
    ``/v1/hello``'s checks by route template: never a key in a label.
    """
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        return None
    return PrometheusMetrics(CollectorRegistry())


def create_app(url: str | None = None) -> FastAPI:
    """The demo app on ``storage_url(url)``."""
    url = storage_url(url)
    metrics = _metrics()
    options: dict[str, Any] = {"metrics": metrics} if metrics is not None else {}
    limiter = AsyncRateLimiter.from_url(url, **options)
    # The caller's plan (Free: 5 per second with bursts of 10), per API key, else per signed-in
    # user, else per client IP. The API-key step is opted into here: this demo has no key store
    # and takes any X-API-Key as given, so a caller could mint buckets with made-up keys. A real
    # service authenticates keys before the limiter or passes api_key_validator=<key lookup>.
    hello_limit = RateLimit(plan_limit, limiter=limiter, api_key_header="X-API-Key")

    app = FastAPI(title="tokenlimit demo")
    app.state.plans = dict(DEMO_PLANS)
    app.add_middleware(AuthenticationMiddleware, backend=DemoAuth())
    app.add_middleware(WorkerPid)
    install_handlers(app)

    @app.get("/v1/hello")
    async def hello(decision: Annotated[Decision, Depends(hello_limit)]) -> dict[str, Any]:
        return {"message": "hello", "remaining": decision.remaining}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_page() -> Response:
        if metrics is None:
            note = "# metrics arrive with prometheus_client: pip install 'tokenlimit[prometheus]'\n"
            return Response(note, media_type="text/plain")
        # Every worker's series in multiprocess mode (PROMETHEUS_MULTIPROC_DIR), else this one's.
        body, content_type = exposition(metrics.registry)
        return Response(body, headers={"Content-Type": content_type})

    return app


app = create_app()
