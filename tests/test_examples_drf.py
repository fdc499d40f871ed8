"""examples/drf_project: its settings pass the system checks, its views are throttled as its
README says (on memory:// and on a real server), and ``compare.py`` shows DRF's own throttle
over-admitting where tokenlimit's admits the burst. Django's settings are process-global, so
the project runs in subprocesses of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent / "examples" / "drf_project"

SCRIPT = """
import json, logging
import django

django.setup()
logging.getLogger("django.request").setLevel(logging.ERROR)
from django.test import Client

def run(path, n, token=None, addr="127.0.0.1"):
    headers = {"Authorization": f"Token {token}"} if token else {}
    client = Client(REMOTE_ADDR=addr, headers=headers)
    responses = [client.get(path) for _ in range(n)]
    return [r.status_code for r in responses], responses[-1].get("Retry-After")

print(json.dumps({
    "anon": run("/hello", 6),
    "anon_elsewhere": run("/hello", 1, addr="10.0.0.2"),
    "alice": run("/hello", 11, "alice"),
    "bob": run("/hello", 1, "bob"),
    "upload": run("/upload", 3, "alice"),
    "search": run("/search", 4, "bob"),
    "unknown": run("/hello", 1, "mallory"),
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
        timeout=120,
        check=False,
    )


def test_manage_check_passes() -> None:
    result = run("manage.py", "check")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_views_are_throttled_in_memory() -> None:
    check_views(None)


def test_views_are_throttled_on_a_server(standalone: Any) -> None:
    check_views(standalone.url)


def check_views(redis_url: str | None) -> None:
    result = run("-c", SCRIPT, redis_url=redis_url)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["anon"] == [[200] * 5 + [429], "12"]  # "5/min": the next in 12 s
    assert out["anon_elsewhere"] == [[200], None]
    assert out["alice"] == [[200] * 10 + [429], "6"]  # "10/min", per user
    assert out["bob"] == [[200], None]
    assert out["upload"] == [[200, 200, 429], "30"]  # scope "uploads": "2/min"
    assert out["search"] == [[200, 200, 200, 429], "1"]  # 1/s, bursts of 3
    assert out["unknown"] == [[401], None]  # the app's authentication, before the throttles


def test_compare_shows_drf_over_admitting(standalone: Any) -> None:
    result = run("compare.py", redis_url=standalone.url)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tokenlimit"] == [10] * 5
    assert max(out["drf"]) > 10, out  # see tests/test_drf.py for why this holds
    assert "DRF UserRateThrottle" in result.stdout
