"""examples/fastapi_demo: the demo service limits /v1/hello per API key, user or IP, and never
/health or /metrics."""

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from servers import free_port

APP = Path(__file__).resolve().parent.parent / "examples" / "fastapi_demo" / "app.py"


def load_demo() -> ModuleType:
    """Import the demo by path: the tests run against the installed package, not the checkout."""
    spec = importlib.util.spec_from_file_location("fastapi_demo_app", APP)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


demo = load_demo()


def test_hello_is_limited_per_api_key_and_health_never(url: str) -> None:
    with TestClient(demo.create_app(url)) as client:
        key_one = {"X-API-Key": "key-one"}
        started = time.monotonic()
        first = [client.get("/v1/hello", headers=key_one) for _ in range(10)]
        while (last := client.get("/v1/hello", headers=key_one)).status_code == 200:
            first.append(last)
        elapsed = time.monotonic() - started
        # A burst of 10, then refusals; at 5/s a slow machine may earn a token or two meanwhile.
        assert all(r.status_code == 200 for r in first)
        assert 10 <= len(first) <= 10 + int(5 * elapsed) + 1
        assert first[0].json() == {"message": "hello", "remaining": 9}
        assert last.status_code == 429
        assert last.json() == {"detail": "rate limit exceeded", "retry_after": 1}
        assert last.headers["retry-after"] == "1"
        # Another key, a signed-in user and an anonymous client each have their own bucket.
        assert client.get("/v1/hello", headers={"X-API-Key": "key-two"}).status_code == 200
        alice = {"Authorization": "Bearer alice-token"}
        assert client.get("/v1/hello", headers=alice).status_code == 200
        assert client.get("/v1/hello").status_code == 200
        assert all(client.get("/health").status_code == 200 for _ in range(30))
        assert all(client.get("/metrics").status_code == 200 for _ in range(15))


def test_metrics_page_counts_decisions_without_keys() -> None:
    with TestClient(demo.create_app("memory://")) as client:
        statuses = [
            client.get("/v1/hello", headers={"X-API-Key": "secret-key"}).status_code
            for _ in range(12)
        ]
        page = client.get("/metrics")
    allowed, refused = statuses.count(200), statuses.count(429)
    assert allowed + refused == 12
    assert refused >= 1
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        assert "prometheus" in page.text
        return
    series = 'tokenlimit_decisions_total{{limit="10-per-2s",result="{}"}} {}.0'
    assert series.format("allowed", allowed) in page.text
    assert series.format("refused", refused) in page.text
    assert "secret-key" not in page.text


@pytest.mark.parametrize("name", ["TOKENLIMIT_URL", "REDIS_URL"])  # REDIS_URL: the old name
def test_url_from_the_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that is not there: the demo must be using it, and answers 503 (closed mode).
    monkeypatch.delenv("TOKENLIMIT_URL", raising=False)
    monkeypatch.setenv(name, f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(demo.create_app()) as client:
        response = client.get("/v1/hello")
        assert response.status_code == 503
        assert response.json() == {"detail": "rate limiter unavailable"}
        assert client.get("/health").status_code == 200
