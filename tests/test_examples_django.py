"""examples/django_project: its settings pass the system checks, and its views are limited as
its README says, on memory:// and on a real server. Django settings are process-global, so the
project runs in a subprocess of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent / "examples" / "django_project"

SCRIPT = """
import asyncio, json
import django

django.setup()
from django.test import AsyncClient, Client

async def from_async(path, n):
    client = AsyncClient()
    return [await client.get(path) for _ in range(n)]

client = Client()
health = [client.get("/health") for _ in range(8)]
index = [client.get("/") for _ in range(3)]
index_async = asyncio.run(from_async("/async", 3))
search = [Client(REMOTE_ADDR="10.0.0.2").get("/search") for _ in range(3)]
print(json.dumps({
    "health": [r.status_code for r in health],
    "health_headers": sorted(k for k in health[0].headers if "ratelimit" in k.lower()),
    "index": [r.status_code for r in index + index_async],
    "first": [index[0]["X-RateLimit-Limit"], index[0]["X-RateLimit-Remaining"]],
    "refused": [index_async[-1]["Retry-After"], json.loads(index_async[-1].content)],
    "search": [r.status_code for r in search],
    "search_limit": search[0]["X-RateLimit-Limit"],
}))
"""


def run(*args: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "settings"}
    env.pop("TOKENLIMIT_URL", None)
    if redis_url is not None:
        env["TOKENLIMIT_URL"] = redis_url
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_manage_check_passes() -> None:
    result = run("manage.py", "check")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_manage_check_reports_a_bad_url() -> None:
    result = run("manage.py", "check", redis_url="mysql://db.internal/0")
    assert result.returncode != 0
    assert "tokenlimit.E002" in result.stderr


def test_views_are_limited_in_memory() -> None:
    check_views(None)  # the settings' default: memory://


def test_views_are_limited_on_a_server(standalone: Any) -> None:
    check_views(standalone.url)


def check_views(redis_url: str | None) -> None:
    result = run("-c", SCRIPT, redis_url=redis_url)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["health"] == [200] * 8
    assert out["health_headers"] == []
    # 5/minute per client, sync and async views alike: one budget.
    assert out["index"] == [200, 200, 200, 200, 200, 429]
    assert out["first"] == ["5", "4"]
    assert out["refused"] == ["12", {"detail": "rate limit exceeded", "retry_after": 12}]
    # The decorated view: 2/minute in a bucket of its own (another client here).
    assert out["search"] == [200, 200, 429]
    assert out["search_limit"] == "2"
