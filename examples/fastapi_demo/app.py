"""The demo service: ``/v1/hello`` limited per API key, user or IP; ``/health``; ``/metrics``.

    REDIS_URL=redis://localhost:6379/0 python -m uvicorn examples.fastapi_demo.app:app

Without ``REDIS_URL`` the limiter is ``memory://`` (one process only). Try it:

    curl -i localhost:8000/v1/hello                                         # per client IP
    curl -i -H 'X-API-Key: k-123' localhost:8000/v1/hello                   # per API key
    curl -i -H 'Authorization: Bearer alice-token' localhost:8000/v1/hello  # per user
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' annotations against
# module globals, and ``hello_limit`` is local to ``create_app``.

import os
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection

from tokenlimit import AsyncRateLimiter, Decision, Limit
from tokenlimit.integrations.fastapi import RateLimit, install_handlers

# A stand-in for a real token check: bearer token -> user name.
DEMO_TOKENS = {"alice-token": "alice", "bob-token": "bob"}


class DemoAuth(AuthenticationBackend):
    """``Authorization: Bearer <token>`` from ``DEMO_TOKENS``; anyone else is anonymous."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        name = DEMO_TOKENS.get(token) if scheme.lower() == "bearer" else None
        if name is None:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(name)


class DemoMetrics:
    """Decisions and storage errors counted on a Prometheus registry this app owns.

    Labelled by outcome and limit name only, never by key. A stand-in until the
    ``tokenlimit[prometheus]`` sink lands.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "tokenlimit_decisions",
            "Rate-limit decisions",
            ["limit", "result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "tokenlimit_storage_errors",
            "Storage failures",
            ["reason", "failed_open"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tokenlimit_decision_seconds", "Time spent deciding", registry=self.registry
        )

    def record_decision(self, limits: Sequence[Limit], decision: Decision, seconds: float) -> None:
        label = decision.policy.label if decision.policy is not None else "unknown"
        result = "allowed" if decision.allowed else "refused"
        self.decisions.labels(label, result).inc()
        self.latency.observe(seconds)

    def record_error(self, limits: Sequence[Limit], reason: str, failed_open: bool) -> None:
        self.errors.labels(reason, str(failed_open).lower()).inc()

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def _metrics() -> DemoMetrics | None:
    try:
        return DemoMetrics()
    except ImportError:
        return None


def create_app(url: str | None = None) -> FastAPI:
    """The demo app on ``url``, else ``$REDIS_URL``, else ``memory://``."""
    url = url or os.environ.get("REDIS_URL") or "memory://"
    metrics = _metrics()
    options: dict[str, Any] = {"metrics": metrics} if metrics is not None else {}
    limiter = AsyncRateLimiter.from_url(url, **options)
    # 5 per second with bursts of 10: per API key, else per signed-in user, else per client IP.
    hello_limit = RateLimit("5/second", burst=10, limiter=limiter)

    app = FastAPI(title="tokenlimit demo")
    app.add_middleware(AuthenticationMiddleware, backend=DemoAuth())
    install_handlers(app)

    @app.get("/v1/hello")
    async def hello(decision: Annotated[Decision, Depends(hello_limit)]) -> dict[str, Any]:
        return {"message": "hello", "remaining": decision.remaining}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_page() -> str:
        if metrics is None:
            return "# metrics arrive with prometheus_client: pip install 'tokenlimit[prometheus]'\n"
        return metrics.render()

    return app


app = create_app()
