"""docs/migrating.md: the "after" apps do what the "before" apps they replace did, request by
request, on a real server (tests/test_docs.py runs every block; here the apps are driven)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_docs import blocks_of

from tokenlimit import Limit, RateLimiter

MIGRATING = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "RateLimit-Policy", "RateLimit")


def run_after(library: str, url: str) -> dict[str, Any]:
    """The namespace the ``# after: <library>`` block leaves, on the server at ``url``."""
    (block,) = [b for b in blocks_of(MIGRATING) if b.first_line == f"# after: {library}"]
    namespace: dict[str, Any] = {"__name__": "migrating_block"}
    code = block.code.replace("redis://localhost:6379/0", url)
    exec(compile(code, str(MIGRATING), "exec"), namespace)
    return namespace


def test_every_incumbent_has_a_before_and_an_after() -> None:
    blocks = blocks_of(MIGRATING)
    befores = [b.first_line.removeprefix("# before: ") for b in blocks if b.before]
    assert befores == ["flask-limiter", "slowapi", "fastapi-limiter", "django-ratelimit",
                       "limits", "DRF's throttles"]  # fmt: skip
    for index, block in enumerate(blocks):
        if block.before:  # each is followed by ours
            assert not blocks[index + 1].before, block.id


def test_flask_limiter_app(standalone: Any) -> None:
    pytest.importorskip("flask")
    app = run_after("flask-limiter", standalone.url)["app"]
    client = app.test_client()
    try:
        # /slow: its own "1 per day", in place of the defaults.
        assert [client.get("/slow").status_code for _ in range(2)] == [200, 429]
        refused = client.get("/slow")
        assert refused.headers["Retry-After"] == "86400"
        assert refused.headers["X-RateLimit-Limit"] == "1"
        # /fast: both defaults, the hourly one the tighter: 50 admitted, then 429.
        fast = client.get("/fast")
        assert fast.headers["X-RateLimit-Limit"] == "50"
        assert fast.headers["RateLimit-Policy"].count(";q=") == 2  # both limits reported
        assert [client.get("/fast").status_code for _ in range(50)] == [200] * 49 + [429]
        # /ping: exempt, never limited, no headers.
        pings = [client.get("/ping") for _ in range(60)]
        assert all(r.status_code == 200 and r.text == "PONG" for r in pings)
        assert not any(name in pings[0].headers for name in RATE_HEADERS)
        with RateLimiter.from_url(standalone.url) as shared:  # on the server, per client
            hourly = Limit.parse("50 per hour")
            assert shared.peek("ip:127.0.0.1", [Limit.parse("200 per day"), hourly]).remaining == 0
    finally:
        app.extensions["tokenlimit"].limiter.close()


def test_slowapi_app(standalone: Any) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    app = run_after("slowapi", standalone.url)["app"]
    with TestClient(app) as client:
        home = [client.get("/home") for _ in range(6)]
        assert [r.status_code for r in home] == [200] * 5 + [429]
        assert home[0].headers["X-RateLimit-Limit"] == "5"  # the route's limit speaks
        assert home[-1].headers["Retry-After"] == "12"  # "5/minute": a token every 12 s
        assert home[-1].json() == {"detail": "rate limit exceeded", "retry_after": 12}
        health = [client.get("/health") for _ in range(20)]
        assert all(r.status_code == 200 for r in health)
        assert not any(name in health[0].headers for name in RATE_HEADERS)
    with RateLimiter.from_url(standalone.url) as shared:
        # The middleware's "200/day" counted every /home request, refused or not by the route.
        assert shared.peek("ip:unknown", "200/day").remaining == 200 - 6
