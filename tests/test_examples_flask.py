"""examples/flask_app.py: the app factory, its default limit, its search limit, its probe."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flask")

from flask import Flask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import flask_app


@pytest.fixture
def app(url: str) -> Iterator[Flask]:
    app = flask_app.create_app(url)
    yield app
    app.extensions["tokenlimit"].limiter.close()


def test_search_has_its_own_limit(app: Flask) -> None:
    client = app.test_client()
    codes = [client.get("/search").status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    refused = client.get("/search")
    assert refused.headers["Retry-After"] == "12"  # one search every 12 s
    assert refused.get_json() == {"detail": "rate limit exceeded", "retry_after": 12}
    assert client.get("/").status_code == 200  # the default bucket is untouched


def test_default_limit_and_exempt_health(app: Flask) -> None:
    client = app.test_client()
    codes = [client.get("/").status_code for _ in range(40)]
    # The 10/second burst, then refusals (a token may come back while a slow machine sends).
    assert codes[:10] == [200] * 10
    assert 429 in codes
    first = client.get("/health")
    assert first.status_code == 200
    assert "X-RateLimit-Limit" not in first.headers
    assert all(client.get("/health").status_code == 200 for _ in range(20))
    ok = client.get("/", environ_base={"REMOTE_ADDR": "198.51.100.9"})
    assert ok.headers["RateLimit-Policy"] == '"burst";q=10;w=1, "minute";q=100;w=60'


def test_factory_reads_tokenlimit_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENLIMIT_URL", "memory://")
    app = flask_app.create_app()
    assert app.config["TOKENLIMIT_URL"] == "memory://"
    assert app.test_client().get("/").status_code == 200
