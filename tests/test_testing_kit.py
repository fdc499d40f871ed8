"""tokenlimit.testing: the fake clock refills exactly, reset_all empties every bucket (and only the
limiter's), the switch turns limiting off everywhere and always comes back, and the pytest
fixtures load through the pytest11 entry point."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from flask import Flask
from prometheus_client import CollectorRegistry

import tokenlimit
from servers import free_port
from tokenlimit import AsyncRateLimiter, ConfigError, Limit, RateLimiter, RateLimitExceeded
from tokenlimit.integrations.fastapi import RateLimit, install_handlers
from tokenlimit.integrations.flask import TokenLimit
from tokenlimit.metrics import PrometheusMetrics
from tokenlimit.testing import (
    FakeClock,
    areset_all,
    async_memory_limiter,
    disable,
    disabled,
    enable,
    is_disabled,
    memory_limiter,
    reset_all,
)

pytest_plugins = ["pytester"]

SLOW = Limit(0.01, 2)  # burst 2, one token per 100 s


@pytest.fixture(autouse=True)
def _switch_left_on() -> Iterator[None]:
    """No test may leave limiting off for the next one."""
    assert not is_disabled()
    yield
    enable()
    assert not is_disabled()


# -- the clock ---------------------------------------------------------------------------------
def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    assert clock() == 0.0
    assert clock.advance(1.5) == 1.5
    assert clock() == clock.now == 1.5
    clock.set(10)
    assert clock() == 10.0
    assert FakeClock(3)() == 3.0
    for bad in (-1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ConfigError) as info:
            clock.advance(bad)
        assert info.value.param == "seconds"
    with pytest.raises(ConfigError) as info:
        clock.set(9)  # backwards
    assert info.value.param == "now"
    assert clock() == 10.0


def test_clock_advance_refills_exactly() -> None:
    clock = FakeClock(100.0)
    limiter = memory_limiter(clock)
    assert limiter.backend.clock is clock
    limit = Limit(2, 3)  # one token every 0.5 s, burst 3
    assert [limiter.try_acquire("k", limit).allowed for _ in range(4)] == [True] * 3 + [False]
    refused = limiter.try_acquire("k", limit)
    assert refused.retry_after == pytest.approx(0.5)
    clock.advance(0.499)
    assert not limiter.try_acquire("k", limit).allowed
    clock.advance(0.001)  # exactly one token's time
    assert limiter.try_acquire("k", limit).allowed
    assert not limiter.try_acquire("k", limit).allowed
    clock.advance(1.5)  # three tokens: full again
    assert limiter.peek("k", limit).remaining == 3
    clock.advance(3600)  # never beyond the burst
    assert [limiter.try_acquire("k", limit).allowed for _ in range(4)] == [True] * 3 + [False]


def test_async_memory_limiter_on_the_clock() -> None:
    clock = FakeClock()
    limiter = async_memory_limiter(clock)

    async def run() -> list[bool]:
        got = [(await limiter.try_acquire("k", SLOW)).allowed for _ in range(3)]
        clock.advance(100)
        got.append((await limiter.try_acquire("k", SLOW)).allowed)
        got.append((await limiter.try_acquire("k", SLOW)).allowed)
        return got

    assert asyncio.run(run()) == [True, True, False, True, False]


# -- reset_all ---------------------------------------------------------------------------------
def test_reset_all_memory() -> None:
    limiter = memory_limiter()
    for key in ("a", "b", "c"):
        limiter.try_acquire(key, SLOW, cost=2)
    assert not limiter.try_acquire("a", SLOW).allowed
    assert reset_all(limiter) == 3
    assert all(limiter.try_acquire(key, SLOW, cost=2).allowed for key in ("a", "b", "c"))

    alimiter = async_memory_limiter()

    async def run() -> tuple[int, bool]:
        await alimiter.try_acquire("a", SLOW, cost=2)
        count = await areset_all(alimiter)
        return count, (await alimiter.try_acquire("a", SLOW, cost=2)).allowed

    assert asyncio.run(run()) == (1, True)
    with pytest.raises(ConfigError) as info:
        reset_all("memory://")  # type: ignore[arg-type]
    assert info.value.param == "limiter"


def test_reset_all_on_servers_keeps_other_keys(url: str) -> None:
    if url == "memory://":
        pytest.skip("the memory store is covered above")
    with RateLimiter.from_url(url, timeout=5.0, prefix="app:") as limiter:
        other = RateLimiter.from_url(url, timeout=5.0, prefix="other:")
        keys = [f"user:{i}" for i in range(40)]  # spread over the cluster's slots
        for key in keys:
            assert limiter.try_acquire(key, SLOW, cost=2).allowed
        other.try_acquire("user:0", SLOW, cost=2)
        client: Any = limiter.backend.client
        client.set("app:plain", "kept")  # under the prefix but not a bucket key
        # The refusal is cached in-process too (local_cache): reset_all forgets that as well.
        assert not limiter.try_acquire("user:0", SLOW).allowed
        assert reset_all(limiter) == 40
        assert all(limiter.try_acquire(key, SLOW, cost=2).allowed for key in keys)
        assert not other.try_acquire("user:0", SLOW).allowed  # another prefix: untouched
        assert client.get("app:plain") == b"kept"
        other.close()


def test_areset_all_on_servers(url: str) -> None:
    async def run() -> tuple[int, bool]:
        limiter = AsyncRateLimiter.from_url(url, timeout=5.0)
        try:
            for i in range(10):
                await limiter.try_acquire(f"u{i}", SLOW, cost=2)
            assert not (await limiter.try_acquire("u0", SLOW)).allowed
            count = await areset_all(limiter)
            return count, (await limiter.try_acquire("u0", SLOW, cost=2)).allowed
        finally:
            await limiter.aclose()

    assert asyncio.run(asyncio.wait_for(run(), 30)) == (10, True)


# -- the switch --------------------------------------------------------------------------------
def test_disabled_limiter_admits_and_touches_nothing() -> None:
    registry = CollectorRegistry()
    limiter = memory_limiter(metrics=PrometheusMetrics(registry))
    limiter.try_acquire("k", SLOW, cost=2)
    with disabled():
        assert is_disabled()
        got = [limiter.try_acquire("k", SLOW) for _ in range(5)]
        assert all(d.allowed and d.remaining == SLOW.burst for d in got)
        assert limiter.acquire("k", SLOW, timeout=0).allowed
        assert limiter.peek("k", SLOW).allowed
        assert limiter.try_acquire("fresh", SLOW).allowed
        assert len(limiter.backend) == 1  # "fresh" never reached the store
    assert not is_disabled()
    assert not limiter.try_acquire("k", SLOW).allowed  # enforcing again, nothing was taken
    decisions = "tokenlimit_decisions_total"
    labels = {"limit": SLOW.label}
    assert registry.get_sample_value(decisions, {**labels, "result": "allowed"}) == 1
    assert registry.get_sample_value(decisions, {**labels, "result": "refused"}) == 1


def test_disabled_never_reaches_a_dead_server() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with RateLimiter.from_url(url, timeout=1.0) as limiter, disabled():
        assert limiter.try_acquire("k", SLOW).allowed

    async def run() -> bool:
        alimiter = AsyncRateLimiter.from_url(url, timeout=1.0)
        try:
            return (await alimiter.try_acquire("k", SLOW)).allowed
        finally:
            await alimiter.aclose()

    with disabled():
        assert asyncio.run(run())


def test_disabled_affects_the_decorators() -> None:
    limiter = memory_limiter()
    tokenlimit.configure(limiter)

    @tokenlimit.rate_limit(limit=SLOW, key="fn")
    def work() -> int:
        return 1

    @limiter.limit(limit=SLOW, key="afn")
    async def awork() -> int:
        return 2

    async def twice() -> list[int]:
        return [await awork() for _ in range(2)]

    assert [work(), work()] == [1, 1]
    assert asyncio.run(twice()) == [2, 2]
    with disabled():
        assert [work() for _ in range(5)] == [1] * 5
        assert asyncio.run(twice()) == [2, 2]
        with tokenlimit.rate_limit(limit=SLOW, key="fn"):
            pass
    with pytest.raises(RateLimitExceeded):
        work()
    with pytest.raises(RateLimitExceeded):
        asyncio.run(awork())


def test_disabled_affects_the_integrations() -> None:
    limiter = memory_limiter()
    app = Flask(__name__)
    TokenLimit(app, limiter=limiter, limit=SLOW)

    @app.get("/")
    def index() -> str:
        return "ok"

    api = FastAPI()
    install_handlers(api)
    alimiter = async_memory_limiter()

    @api.get("/", dependencies=[Depends(RateLimit(SLOW, limiter=alimiter))])
    async def aindex() -> dict[str, str]:
        return {"ok": "yes"}

    client = app.test_client()
    with TestClient(api) as aclient:
        assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429]
        assert [aclient.get("/").status_code for _ in range(3)] == [200, 200, 429]
        with disabled():
            assert [client.get("/").status_code for _ in range(3)] == [200] * 3
            assert [aclient.get("/").status_code for _ in range(3)] == [200] * 3
        assert client.get("/").status_code == 429
        assert aclient.get("/").status_code == 429


def test_disabled_comes_back_on_exceptions_and_nests() -> None:
    with pytest.raises(RuntimeError), disabled():
        raise RuntimeError("boom")
    assert not is_disabled()
    with disabled():
        with disabled():
            assert is_disabled()
        assert is_disabled()  # the outer block is still open
    assert not is_disabled()
    disable()
    assert is_disabled()
    with disabled():
        pass
    assert is_disabled()  # disable() holds until enable()
    enable()
    assert not is_disabled()


def test_overlapping_blocks_in_threads() -> None:
    """Thread A opens, B opens, A closes: still off until B closes too."""
    a_in, b_in, a_out, b_may_leave = (threading.Event() for _ in range(4))
    seen: dict[str, bool] = {}

    def a() -> None:
        with disabled():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b() -> None:
        a_in.wait(10)
        with disabled():
            b_in.set()
            a_out.wait(10)
            seen["after A left"] = is_disabled()
            b_may_leave.wait(10)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    a_out.wait(10)
    b_may_leave.set()
    for thread in threads:
        thread.join(10)
    assert seen == {"after A left": True}
    assert not is_disabled()


# -- the pytest plugin -------------------------------------------------------------------------
PLUGIN_USER = """
import asyncio
from tokenlimit import Limit
from tokenlimit.testing import is_disabled

LIMIT = Limit(1, 2)

def test_clock_and_limiter(tokenlimit_clock, tokenlimit_limiter):
    assert tokenlimit_limiter.backend.clock is tokenlimit_clock
    assert tokenlimit_limiter.try_acquire("k", LIMIT, cost=2)
    assert not tokenlimit_limiter.try_acquire("k", LIMIT)
    tokenlimit_clock.advance(1)
    assert tokenlimit_limiter.try_acquire("k", LIMIT)

def test_fresh_per_test(tokenlimit_clock, tokenlimit_limiter):
    assert tokenlimit_clock() == 0
    assert tokenlimit_limiter.try_acquire("k", LIMIT, cost=2)

def test_async(tokenlimit_clock, tokenlimit_async_limiter):
    async def run():
        assert await tokenlimit_async_limiter.try_acquire("k", LIMIT, cost=2)
        assert not await tokenlimit_async_limiter.try_acquire("k", LIMIT)
        tokenlimit_clock.advance(1)
        assert await tokenlimit_async_limiter.try_acquire("k", LIMIT)
    asyncio.run(run())

def test_disabled(tokenlimit_disabled, tokenlimit_limiter):
    assert is_disabled()
    assert all(tokenlimit_limiter.try_acquire("k", LIMIT) for _ in range(5))

def test_back_on():
    assert not is_disabled()
"""


def test_fixtures_load_through_the_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=PLUGIN_USER)
    # A fresh interpreter: only the installed entry point can have loaded the fixtures.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    # And without the plugin, they are not there.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:tokenlimit")
    result.assert_outcomes(errors=4, passed=1)
    result.stdout.fnmatch_lines(["*fixture 'tokenlimit_*' not found*"])


def test_fixtures_in_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=PLUGIN_USER)
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=5)


def test_importing_tokenlimit_never_imports_pytest() -> None:
    code = (
        "import sys, tokenlimit, tokenlimit.testing\n"
        "from tokenlimit.testing import FakeClock, memory_limiter, disabled\n"
        "assert 'pytest' not in sys.modules and '_pytest' not in sys.modules, 'pytest imported'\n"
        "assert not hasattr(tokenlimit.testing, 'tokenlimit_clock')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
