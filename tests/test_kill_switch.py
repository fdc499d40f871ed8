"""TOKENLIMIT_ENABLED: an operator's kill switch, read from the environment at start-up."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from conftest import Target

from tokenlimit._switch import switched_off

PROGRAM = """
import json, sys
import tokenlimit
from tokenlimit import RateLimiter
limiter = RateLimiter.from_url(sys.argv[1])
got = [limiter.try_acquire("kill-switch", "1/minute").allowed for _ in range(3)]
print(json.dumps(got))
"""


def _run(url: str, value: str | None) -> tuple[list[bool], str]:
    env = {"PATH": "/usr/bin:/bin"}
    if value is not None:
        env["TOKENLIMIT_ENABLED"] = value
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, url], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout), done.stderr


@pytest.mark.parametrize("value", ["false", "0", "OFF", "no"])
def test_off_admits_everything_and_touches_no_storage(standalone: Target, value: str) -> None:
    got, log = _run(standalone.url, value)
    assert got == [True, True, True]
    assert "TOKENLIMIT_ENABLED is off" in log
    client = standalone.client()
    try:
        assert client.dbsize() == 0  # nothing reached the server
    finally:
        client.close()


@pytest.mark.parametrize("value", [None, "", "true", "1", "on"])
def test_on_or_unset_limits(standalone: Target, value: str | None) -> None:
    got, log = _run(standalone.url, value)
    assert got == [True, False, False]
    assert log == ""


def test_a_typo_keeps_limiting_on_and_says_so(
    standalone: Target, caplog: pytest.LogCaptureFixture
) -> None:
    got, log = _run(standalone.url, "flase")
    assert got == [True, False, False]
    assert "TOKENLIMIT_ENABLED='flase'" in log
    with caplog.at_level(logging.ERROR, logger="tokenlimit"):
        assert switched_off("flase") is False
    assert "rate limiting stays on" in caplog.text
