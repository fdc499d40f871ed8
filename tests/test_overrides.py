"""Live overrides (brownout): set, clear, list, expiry, the last known table while the server is
unreachable, metrics and logs, and 4 processes following an override under load."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faultproxy import FaultProxy

import workers
from tokenlimit import AsyncRateLimiter, Limit, RateLimiter
from tokenlimit._cli import main
from tokenlimit._errors import BackendError, ConfigError, ConfigTypeError
from tokenlimit._memory import MemoryBackend
from tokenlimit._overrides import READER, REFRESH, Override, decode_listing

API = Limit(100, 10, name="api")


def _prom() -> Any:
    from prometheus_client import CollectorRegistry

    from tokenlimit.metrics import PrometheusMetrics

    return PrometheusMetrics(CollectorRegistry())


def _gauge(metrics: Any, limit: str) -> float | None:
    value = metrics.registry.get_sample_value("tokenlimit_override_active", {"limit": limit})
    return None if value is None else float(value)


def _spend(limiter: RateLimiter, key: str, limit: Limit, n: int) -> int:
    return sum(limiter.try_acquire(key, limit).allowed for _ in range(n))


# -- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"name": "", "limit": "5/s", "seconds": 10}, "name"),
        ({"name": 3, "limit": "5/s", "seconds": 10}, "name"),
        ({"name": "a\nb", "limit": "5/s", "seconds": 10}, "name"),
        ({"name": "api", "limit": "5/s", "seconds": 0}, "seconds"),
        ({"name": "api", "limit": "5/s", "seconds": 8 * 86400}, "seconds"),
        ({"name": "api", "limit": "5/s", "seconds": float("nan")}, "seconds"),
        ({"name": "api", "limit": None, "seconds": 10}, "limit"),
        ({"name": "api", "limit": "5/s", "seconds": 10, "block": True}, "limit"),
        ({"name": "api", "limit": "five", "seconds": 10}, "limit"),
        ({"name": "api", "limit": 5, "seconds": 10}, "limit"),
        ({"name": "api", "limit": "5/s", "seconds": 10, "block": 1}, "block"),
        ({"name": "api", "limit": "5/s", "seconds": 10, "reason": "x\n"}, "reason"),
        ({"name": "api", "limit": Limit(5), "seconds": 10, "burst": 3}, "burst"),
        ({"name": "api", "limit": "5/s", "seconds": 10, "burst": 0}, "burst"),
        ({"name": "api", "seconds": 10, "block": True, "burst": 3}, "burst"),
    ],
)
def test_bad_overrides_name_the_parameter_and_write_nothing(
    kwargs: dict[str, Any], param: str
) -> None:
    limiter = RateLimiter(MemoryBackend())
    with pytest.raises(ConfigError) as raised:
        limiter.set_override(**kwargs)
    assert raised.value.param == param
    assert limiter.list_overrides() == ()


def test_a_limiter_without_overrides_says_so() -> None:
    limiter = RateLimiter(MemoryBackend(), overrides=False)
    with pytest.raises(TypeError, match="overrides=False"):
        limiter.set_override("api", "5/s", seconds=10)
    with pytest.raises(ConfigTypeError, match="overrides"):
        RateLimiter(MemoryBackend(), overrides="yes")  # type: ignore[arg-type]


def test_entries_a_version_cannot_read_are_skipped() -> None:
    good = json.dumps({"rate": 5.0, "burst": 5})
    changed, found = decode_listing(
        [0, b"api", good.encode(), 1500, b"new", b'{"shape":"future"}', 900, b"bad", b"[", 10]
    )
    assert not changed
    assert found == (Override("api", Limit(5.0, 5, name="api"), False, 1.5),)


# -- one store, every backend -----------------------------------------------------------------
def _until(check: Callable[[], bool], seconds: float = REFRESH + 8.0) -> None:
    """Poll ``check`` (each poll a decision, which starts a due read off its caller's time)
    until it holds, or fail after ``seconds`` (a loaded machine's failed read is retried 5 s
    later: the bound allows one)."""
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, f"not applied in time ({READER._queue!r})"
        time.sleep(0.02)


SLOW_API = Limit(0.01, 10, name="api")  # one token per 100 s: nothing refills in a test


def test_an_override_decides_on_a_bucket_of_its_own_under_the_limit_label(url: str) -> None:
    shared = url != "memory://"  # each memory:// limiter has a store of its own
    with RateLimiter.from_url(url, timeout=5.0) as a, RateLimiter.from_url(url, timeout=5.0) as b:
        assert b.peek("k", SLOW_API).limit == 10  # b has read the (empty) table
        assert _spend(a, "k", SLOW_API, 4) == 4
        made = a.set_override("api", "2/minute", seconds=30, reason="INC-1")
        assert made == Override(
            "api", Limit(2 / 60, 2, name="api"), False, made.expires_in, "INC-1"
        )
        assert 29 < made.expires_in <= 30
        # The writer applies it at once, on the override's own bucket: full, its burst 2.
        first = a.try_acquire("k", SLOW_API)
        assert first.allowed
        assert first.limit == 2
        assert first.policy is not None
        assert first.policy.label == "api"
        assert a.try_acquire("k", SLOW_API).allowed
        assert not a.try_acquire("k", SLOW_API).allowed
        if shared:  # another limiter follows within REFRESH of a decision
            _until(lambda: b.peek("k", SLOW_API).limit == 2)
            assert not b.try_acquire("k", SLOW_API).allowed  # the same override bucket
            assert [o.name for o in b.list_overrides()] == ["api"]
        assert a.clear_override("api") is True
        assert a.clear_override("api") is False
        # The limit's own bucket, as it was: 4 of 10 spent before the override.
        back = a.try_acquire("k", SLOW_API)
        assert back.limit == 10
        assert back.remaining == 5
        if shared:
            _until(lambda: b.peek("k", SLOW_API).limit == 10)
        # Other limits were never touched.
        assert a.try_acquire("k", Limit(100, 10, name="web")).limit == 10


def test_a_strict_override_leaves_no_debt_once_it_ends(url: str) -> None:
    """A call taken at 1/minute owes a minute; the 100/s limit must not inherit it."""
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        limiter.set_override("api", "1/minute", seconds=30)
        assert limiter.try_acquire("k", API).allowed
        assert not limiter.try_acquire("k", API).allowed
        limiter.clear_override("api")
        assert limiter.try_acquire("k", API).allowed


def test_refund_hold_back_and_reset_act_on_the_buckets_in_force(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        limiter.set_override("api", "3/minute", seconds=30)
        assert _spend(limiter, "k", SLOW_API, 4) == 3
        given = limiter.refund("k", SLOW_API)  # to the override's bucket, at its rate
        assert given.limit == 3
        assert given.remaining == 1
        assert limiter.try_acquire("k", SLOW_API).allowed
        assert not limiter.try_acquire("k", SLOW_API).allowed
        limiter.reset("k", SLOW_API)  # both buckets full again
        assert limiter.peek("k", SLOW_API).remaining == 3
        held = limiter.hold_back("k", SLOW_API, 30)
        assert held.limit == 3
        assert not limiter.try_acquire("k", SLOW_API).allowed
        limiter.clear_override("api")
        assert limiter.try_acquire("k", SLOW_API).remaining == 9  # the limit's own: untouched


def test_block_refuses_without_the_server_until_it_ends(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        limiter.set_override("api", block=True, seconds=0.6)
        limits = [API, Limit(1000, 100, name="other")]
        refused = limiter.try_acquire("k", limits)
        assert not refused.allowed
        # Every call, not only the first: a repeated call reuses what the table made of it.
        assert not any(limiter.try_acquire("k", limits) for _ in range(5))
        assert not any(limiter.try_acquire("k", API) for _ in range(5))
        assert 0.4 < refused.retry_after <= 0.6
        assert refused.policy is not None
        assert refused.policy.label == "api"
        assert not limiter.peek("k", API).allowed
        time.sleep(0.7)  # expires on its own, in the store and in the limiter
        assert limiter.try_acquire("k", API).allowed
        assert limiter.list_overrides() == ()


def test_a_call_costing_more_than_the_override_burst_is_refused_until_it_ends(url: str) -> None:
    with RateLimiter.from_url(url, timeout=5.0) as limiter:
        limiter.set_override("api", "2/second", seconds=30)
        decision = limiter.try_acquire("k", API, cost=5)
        assert not decision.allowed
        assert 29 < decision.retry_after <= 30


def test_async_limiters_follow_overrides(url: str) -> None:
    async def run() -> None:
        a = AsyncRateLimiter.from_url(url, timeout=5.0)
        b = AsyncRateLimiter.from_url(url, timeout=5.0)
        try:
            assert (await b.try_acquire("k", API)).limit == 10
            await a.set_override("api", "3/second", seconds=30)
            assert (await a.try_acquire("k", API)).limit == 3
            if url != "memory://":  # each memory:// limiter has a store of its own
                end = time.monotonic() + REFRESH + 3.0
                while (await b.peek("k", API)).limit != 3:  # each peek may start a read
                    assert time.monotonic() < end, "not applied in time"
                    await asyncio.sleep(0.02)
                assert [o.limit for o in await b.list_overrides()] == [Limit(3.0, 3, name="api")]
            assert await a.clear_override("api")
            assert (await a.try_acquire("k", API)).limit == 10
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(run())


def test_overrides_live_under_the_prefix(url: str) -> None:
    with (
        RateLimiter.from_url(url, prefix="one:") as one,
        RateLimiter.from_url(url, prefix="two:") as two,
    ):
        one.set_override("api", block=True, seconds=30)
        assert not one.try_acquire("k", API).allowed
        assert two.try_acquire("k", API).allowed
        assert two.list_overrides() == ()


def test_each_change_is_logged_once_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    metrics = _prom()
    limiter = RateLimiter(MemoryBackend(), metrics=metrics)
    caplog.set_level(logging.WARNING, logger="tokenlimit")
    limiter.set_override("api", "5/second", seconds=30, reason="INC-7")
    assert _gauge(metrics, "api") == 1
    for _ in range(20):
        limiter.try_acquire("k", API)
    limiter.list_overrides()  # the same table: no new line
    limiter.set_override("api", block=True, seconds=30)
    limiter.clear_override("api")
    assert _gauge(metrics, "api") == 0
    lines = [r.getMessage() for r in caplog.records if "override" in r.getMessage()]
    assert lines == [
        "tokenlimit: override of limit 'api': 5/second (burst 5) for 30 s (INC-7)",
        "tokenlimit: override of limit 'api': blocked for 30 s",
        "tokenlimit: override of limit 'api' ended",
    ]
    refused = metrics.registry.get_sample_value(
        "tokenlimit_decisions_total", {"limit": "api", "result": "refused"}
    )
    assert refused == 15  # 20 calls under 5/s burst 5: the refusals keep the limit's label


# -- the server unreachable: the last known table ---------------------------------------------
@pytest.fixture
def proxied(standalone: Any) -> Iterator[FaultProxy]:
    host, port = standalone.host_ports()[0]
    with FaultProxy(port, host) as proxy:
        yield proxy


def test_the_last_known_table_holds_while_the_server_is_unreachable(
    proxied: FaultProxy, standalone: Any
) -> None:
    with (
        RateLimiter.from_url(standalone.url) as admin,
        RateLimiter.from_url(
            proxied.url, timeout=0.3, failure_mode="local", expected_processes=1
        ) as limiter,
    ):
        assert limiter.try_acquire("k", API).limit == 10
        admin.set_override("web", block=True, seconds=30)
        admin.set_override("api", "2/second", seconds=4.0)
        ends = time.monotonic() + 4.0
        _until(lambda: limiter.peek("k", API).limit == 2)  # read the table
        proxied.refuse()
        time.sleep(REFRESH + 0.1)
        # Local decisions, at the override's numbers; the blocked limit stays blocked.
        local = limiter.try_acquire("k2", API)
        assert local.limit == 2
        assert not limiter.try_acquire("k2", Limit(5, name="web")).allowed
        # Past the "api" override's end: it ends here too, on this clock.
        time.sleep(max(0.0, ends - time.monotonic()) + 0.2)
        assert limiter.try_acquire("k3", API).limit == 10
        assert not limiter.try_acquire("k3", Limit(5, name="web")).allowed


def test_a_failed_write_changes_nothing(proxied: FaultProxy) -> None:
    with RateLimiter.from_url(proxied.url, timeout=0.3) as limiter:
        proxied.refuse()
        with pytest.raises(BackendError):
            limiter.set_override("api", block=True, seconds=30)
        proxied.heal()
        assert limiter.list_overrides() == ()
        assert limiter.try_acquire("k", API).limit == 10


# -- the CLI ----------------------------------------------------------------------------------
def test_the_command_line_sets_lists_and_clears(
    standalone: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = standalone.url
    with RateLimiter.from_url(url) as app:
        assert app.try_acquire("k", API).limit == 10
        code = main(["override", "set", "api", "5/second", "--for", "15m", "--url", url,
                     "--reason", "INC-9"])  # fmt: skip
        assert code == 0
        assert "api: 5/second (burst 5) for 900 s" in capsys.readouterr().out
        _until(lambda: app.peek("k", API).limit == 5)
        assert main(["override", "set", "web", "--block", "--for", "1h30m", "--url", url]) == 0
        capsys.readouterr()
        assert main(["override", "list", "--json", "--url", url]) == 0
        listed = json.loads(capsys.readouterr().out)["overrides"]
        assert [(o["name"], o["block"], o["rate"], o["reason"]) for o in listed] == [
            ("api", False, 5.0, "INC-9"),
            ("web", True, None, ""),
        ]
        assert 5390 < listed[1]["expires_in"] <= 5400
        assert main(["override", "clear", "api", "--url", url]) == 0
        assert "cleared" in capsys.readouterr().out
        _until(lambda: app.peek("k", API).limit == 10)
    assert main(["override", "set", "api", "--for", "1m", "--url", url]) == 2
    assert main(["override", "set", "api", "5/s", "--for", "soon", "--url", url]) == 2
    assert main(["override", "set", "api", "5/s", "--for", "8d", "--url", url]) == 2
    assert main(["override", "list", "--url", "redis://127.0.0.1:1/0"]) == 3


# -- 4 processes under load -------------------------------------------------------------------
def _context() -> Any:
    try:
        ctx = multiprocessing.get_context("forkserver")
    except ValueError:  # pragma: no cover - no forkserver on this platform
        return multiprocessing.get_context("spawn")
    ctx.set_forkserver_preload(["workers", "tokenlimit", "redis"])
    return ctx


def _rate(times: list[float], start: float, end: float) -> float:
    return sum(start <= t < end for t in times) / (end - start)


def test_four_processes_follow_an_override_and_its_clear(standalone: Any) -> None:
    """200/s shared by 4 processes; an override to 40/s set at +1.5 s, cleared at +4 s. The
    fleet's admitted rate follows each within REFRESH (plus a margin for a loaded machine)."""
    ctx = _context()
    barrier, results = ctx.Barrier(5), ctx.Queue()
    start = time.time() + 3.0  # the children's start-up, then the barrier
    until = start + 6.5
    procs = [
        ctx.Process(
            target=workers.admit_timeline,
            args=(standalone.url, "fleet", 200.0, 20, "api", until, barrier, results),
        )
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=60)
        t0 = time.time()
        with RateLimiter.from_url(standalone.url, timeout=5.0) as admin:
            time.sleep(max(0.0, t0 + 1.5 - time.time()))
            admin.set_override("api", "40/second", burst=4, seconds=60)
            time.sleep(max(0.0, t0 + 4.0 - time.time()))
            assert admin.clear_override("api")
        reports = [results.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
    assert all(kind == "ok" for kind, _ in reports), reports
    times = sorted(t for _, got in reports for t in got)
    lag = REFRESH + 0.3
    before = _rate(times, t0 + 0.3, t0 + 1.5)
    during = _rate(times, t0 + 1.5 + lag, t0 + 4.0)
    after = _rate(times, t0 + 4.0 + lag, until - 0.1)
    assert 150 < before <= 200 * 1.05 + 20 / 1.2, (before, during, after)
    assert 20 < during <= 40 * 1.05 + 4 / 1.2, (before, during, after)
    assert 150 < after <= 200 * 1.05 + 20 / 1.2, (before, during, after)


def test_no_decision_waits_on_an_overrides_read(proxied: FaultProxy) -> None:
    """The read runs off the caller's time: with the server hung, the decision that finds a
    read due costs its own deadline, not two."""
    with RateLimiter.from_url(
        proxied.url, timeout=0.3, failure_mode="open", breaker=False
    ) as limiter:
        assert limiter.try_acquire("k", API).allowed  # the first read, healthy
        time.sleep(REFRESH + 0.1)  # the next read is due
        proxied.blackhole()
        started = time.monotonic()
        assert limiter.try_acquire("k", API).allowed  # fails open after its deadline
        assert time.monotonic() - started < 0.3 + 0.2


def test_entries_that_break_a_reader_are_skipped_too() -> None:
    bad = [b'{"rate":1,"burst":1e999}', b"[" * 100_000, b'{"rate":"x","burst":1}']
    reply: list[object] = [0]
    for i, payload in enumerate(bad):
        reply += [f"bad{i}".encode(), payload, 1000]
    assert decode_listing(reply) == (False, ())
