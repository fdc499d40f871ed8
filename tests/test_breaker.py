"""The circuit breaker (``tokenlimit/_breaker.py``): after consecutive storage failures, calls
stop waiting on the server and get the failure mode at once; one call probes after a growing
cool-down.

The pure circuit on a fake clock; limiters over a store that fails on demand (same clock), in
every failure mode; then real servers: hung behind ``faultproxy.FaultProxy`` (sync and async,
each failure mode) and a cluster whose nodes are paused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from faultproxy import FaultProxy

import tokenlimit
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    Breaker,
    ConfigError,
    Decision,
    Limit,
    MemoryBackend,
    RateLimiter,
)
from tokenlimit._breaker import CLOSED, HALF_OPEN, OPEN, Circuit
from tokenlimit._fallback import LocalFallback
from tokenlimit._request import Request
from tokenlimit.testing import FakeClock, memory_limiter

SLOW = 0.001  # tokens per second: nothing refills during a test
MODES = ["closed", "open", "local"]


def options_for(mode: str, **more: Any) -> dict[str, Any]:
    local = {"expected_processes": 2} if mode == "local" else {}
    return {"failure_mode": mode, **local, **more}


# -- the pure circuit ---------------------------------------------------------------------------
def changes(circuit_list: list[tuple[int, int]]) -> Callable[[Circuit, int, int], None]:
    return lambda circuit, before, after: circuit_list.append((before, after))


def test_opens_after_n_consecutive_failures_and_one_call_probes_after_the_cool_down() -> None:
    clock, seen = FakeClock(100.0), []
    circuit = Circuit(3, 1.0, 8.0, clock=clock, listener=changes(seen))
    assert not circuit.tripped
    assert circuit.failed() is True  # the first since the last answer
    assert circuit.failed() is False
    assert (circuit.state, circuit.tripped) == (CLOSED, True)
    assert circuit.route()  # closed with failures: calls still go
    circuit.failed()
    assert circuit.state == OPEN
    assert circuit.next_probe_in() == pytest.approx(1.0)
    assert [circuit.route() for _ in range(5)] == [False] * 5
    clock.advance(0.999)
    assert not circuit.route()
    clock.advance(0.001)
    assert [circuit.route() for _ in range(5)] == [True, False, False, False, False]
    assert circuit.state == HALF_OPEN
    assert circuit.answered() is True
    assert (circuit.state, circuit.tripped, circuit.failures) == (CLOSED, False, 0)
    assert circuit.answered() is False  # nothing left to clear
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_failed_probe_doubles_the_cool_down_up_to_the_cap_and_an_answer_resets_it() -> None:
    clock = FakeClock()
    circuit = Circuit(1, 1.0, 5.0, clock=clock)
    circuit.failed()
    waits = []
    for _ in range(5):
        waits.append(circuit.next_probe_in())
        clock.advance(circuit.next_probe_in())
        assert circuit.route()
        circuit.failed()
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    clock.advance(5.0)
    assert circuit.route()
    circuit.answered()
    circuit.failed()  # a new run of failures starts from the first cool-down
    assert circuit.next_probe_in() == 1.0


def test_an_answer_between_failures_starts_the_count_again() -> None:
    circuit = Circuit(3, clock=FakeClock())
    for _ in range(5):
        circuit.failed()
        circuit.failed()
        circuit.answered()
    assert circuit.state == CLOSED


def test_a_probe_that_never_reports_lets_another_call_probe_one_cool_down_later() -> None:
    clock = FakeClock()
    circuit = Circuit(1, 2.0, 2.0, clock=clock)
    circuit.failed()
    clock.advance(2.0)
    assert circuit.route()  # this probe's caller is cancelled: it never reports
    clock.advance(1.9)
    assert not circuit.route()
    clock.advance(0.1)
    assert circuit.route()
    assert circuit.state == HALF_OPEN


def test_a_late_failure_while_open_changes_nothing_and_a_late_answer_closes() -> None:
    clock = FakeClock()
    circuit = Circuit(1, 1.0, 10.0, clock=clock)
    circuit.failed()
    circuit.failed()  # a call sent before the circuit opened
    assert (circuit.state, circuit.next_probe_in()) == (OPEN, 1.0)
    circuit.answered()  # another one, answered: the server is there
    assert circuit.state == CLOSED


def test_one_probe_among_many_threads() -> None:
    clock = FakeClock()
    circuit = Circuit(1, 1.0, clock=clock)
    circuit.failed()
    clock.advance(1.0)
    start = threading.Barrier(16)
    went: list[bool] = []

    def call() -> None:
        start.wait()
        went.append(circuit.route())

    threads = [threading.Thread(target=call) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(went) == [False] * 15 + [True]


def test_a_circuit_that_never_opens_still_tells_a_clean_run() -> None:
    """``breaker=False`` with ``failure_mode="local"``: every call tries the server, and the
    switches to local and back are still counted."""
    circuit = Circuit.of(None, "local", clock=FakeClock())
    for _ in range(1000):
        circuit.failed()
        assert circuit.route()
    assert (circuit.state, circuit.tripped) == (CLOSED, True)
    assert circuit.answered()


# -- the option --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"failures": 0}, "failures"),
        ({"failures": True}, "failures"),
        ({"failures": 2.0}, "failures"),
        ({"failures": "3"}, "failures"),
        ({"cool_down": 0}, "cool_down"),
        ({"cool_down": -1}, "cool_down"),
        ({"cool_down": float("nan")}, "cool_down"),
        ({"cool_down": "1s"}, "cool_down"),
        ({"max_cool_down": float("inf")}, "max_cool_down"),
        ({"max_cool_down": 86_401}, "max_cool_down"),
        ({"cool_down": 5, "max_cool_down": 2}, "max_cool_down"),
    ],
)
def test_breaker_settings_are_validated(arguments: dict[str, Any], param: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Breaker(**arguments)
    assert caught.value.param == param


@pytest.mark.parametrize("bad", ["yes", 1, None, {"failures": 3}])
def test_the_breaker_option_takes_a_bool_or_a_breaker(bad: object) -> None:
    with pytest.raises(ConfigError) as caught:
        RateLimiter.from_url("memory://", breaker=bad)  # type: ignore[arg-type]
    assert caught.value.param == "breaker"
    assert isinstance(caught.value, TypeError)


def test_the_option_reaches_every_constructor_and_shows() -> None:
    custom = Breaker(failures=5, cool_down=0.5, max_cool_down=2.0)
    assert memory_limiter().breaker == Breaker()
    assert "breaker" not in repr(memory_limiter())  # the default
    limiter = memory_limiter(breaker=custom)
    assert limiter.breaker is custom
    assert "breaker=Breaker(failures=5, cool_down=0.5, max_cool_down=2.0)" in repr(limiter)
    off = AsyncRateLimiter.from_url("memory://", breaker=False)
    assert off.breaker is None
    assert "breaker=False" in repr(off)
    tokenlimit.configure("memory://", breaker=custom)
    sync, async_ = tokenlimit.default_limiter(False), tokenlimit.default_limiter(True)
    assert sync.breaker is async_.breaker is custom
    assert sync._circuit is async_._circuit  # one server, one circuit
    assert (Breaker().threshold("closed"), Breaker().threshold("open")) == (3, 3)
    assert Breaker().threshold("local") == 1
    assert custom.threshold("local") == 5


# -- limiters over a store that fails on demand (a fake clock) -------------------------------------
class Flaky:
    """A backend over a memory store that fails every call while ``down``."""

    remote = True

    def __init__(self, clock: FakeClock) -> None:
        self.store = MemoryBackend(clock=clock)
        self.down = False
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.down:
            raise BackendError("storage is down", reason="connection")

    def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        self._maybe_fail()
        return self.store.decide(request, consume=consume)

    def hold_back(self, request: Request, hold_us: int, *, timeout: float) -> Sequence[int]:
        self._maybe_fail()
        return self.store.hold_back(request, hold_us)

    def refund(self, request: Request, *, timeout: float) -> Sequence[int]:
        self._maybe_fail()
        return self.store.refund(request)

    def reset(self, request: Request, *, timeout: float) -> None:
        self._maybe_fail()
        self.store.reset(request)

    def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float
    ) -> Sequence[int]:
        self._maybe_fail()
        return self.store.hold_slot(key, holder, max_in_flight, lease_us)

    def release_slot(self, key: str, holder: str, *, timeout: float) -> int:
        self._maybe_fail()
        return self.store.release_slot(key, holder)

    def close(self) -> None:
        pass


class Recorder:
    """A metrics sink with the optional circuit method: keeps what it is told."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.errors: list[tuple[str, bool]] = []
        self.states: list[str] = []

    def record_decision(self, limits: Sequence[Limit], decision: Decision, seconds: float) -> None:
        self.decisions.append(decision)

    def record_error(self, limits: Sequence[Limit], reason: str, failed_open: bool) -> None:
        self.errors.append((reason, failed_open))

    def record_circuit(self, state: str) -> None:
        self.states.append(state)


def on_clock(limiter: RateLimiter | AsyncRateLimiter, clock: FakeClock) -> None:
    """``limiter``'s circuit (and local buckets) on ``clock``."""
    if limiter.expected_processes is not None:
        limiter._fallback = LocalFallback(limiter.expected_processes, clock=clock)
    limiter._circuit = Circuit.of(
        limiter.breaker, limiter.failure_mode, clock=clock, listener=limiter._circuit_changed
    )


@contextmanager
def flaky(mode: str, **options: Any) -> Iterator[tuple[RateLimiter, Flaky, FakeClock, Recorder]]:
    clock, recorder = FakeClock(1000.0), Recorder()
    backend = Flaky(clock)
    limiter = RateLimiter(
        backend, metrics=recorder, local_cache=False, **options_for(mode, **options)
    )
    on_clock(limiter, clock)
    yield limiter, backend, clock, recorder


def outcome(call: Callable[[], Decision]) -> str:
    """What one call got: ``admitted``/``refused`` with the limit it was decided at (a share's
    burst is a local decision), or the BackendError's reason."""
    try:
        decision = call()
    except BackendError as error:
        return error.reason
    return f"{'admitted' if decision.allowed else 'refused'}:{decision.limit}"


# What a call gets from a store that failed (the reason) and from an open circuit, per mode;
# the limit is 10 tokens, a share (expected_processes=2) 5.
FAILED = {"closed": "connection", "open": "admitted:10", "local": "admitted:5"}
SKIPPED = {"closed": "circuit_open", "open": "admitted:10", "local": "admitted:5"}


@pytest.mark.parametrize("mode", MODES)
def test_after_n_failures_no_call_reaches_the_store_until_the_cool_down(mode: str) -> None:
    limit = Limit(SLOW, 10)
    with flaky(mode) as (limiter, backend, clock, recorder):
        n = 1 if mode == "local" else 3
        assert outcome(lambda: limiter.try_acquire("k", limit)) == "admitted:10"
        backend.down = True
        got = [outcome(lambda: limiter.try_acquire("k", limit)) for _ in range(n)]
        assert got == [FAILED[mode]] * n
        assert backend.calls == 1 + n
        got = [outcome(lambda: limiter.peek("k", limit)) for _ in range(4)]
        assert got == [SKIPPED[mode]] * 4
        assert backend.calls == 1 + n  # none reached the store
        assert recorder.states == ["open"]
        skipped = {"closed": [("circuit_open", False)] * 4, "open": [("circuit_open", True)] * 4}
        failed_open = mode == "open"
        assert recorder.errors == [("connection", failed_open)] * n + skipped.get(mode, [])
        clock.advance(1.0)  # one probe, failing: open again for twice as long
        assert outcome(lambda: limiter.try_acquire("k", limit)) == FAILED[mode]
        assert backend.calls == 2 + n
        clock.advance(1.0)
        assert outcome(lambda: limiter.try_acquire("k", limit)) == SKIPPED[mode]
        assert backend.calls == 2 + n
        backend.down = False
        clock.advance(1.0)
        assert outcome(lambda: limiter.try_acquire("k", limit)) == "admitted:10"  # the server's
        assert limiter.try_acquire("k", limit).remaining == 7
        assert backend.calls == 4 + n
        assert recorder.states == ["open", "half_open", "open", "half_open", "closed"]


def test_closed_mode_says_the_breaker_is_open_and_when_it_probes() -> None:
    with flaky("closed", breaker=Breaker(failures=2, cool_down=3.0)) as (limiter, backend, _, _):
        backend.down = True
        for _ in range(2):
            with pytest.raises(BackendError):
                limiter.try_acquire("k", Limit(1, 5))
        with pytest.raises(BackendError, match="circuit breaker is open") as caught:
            limiter.try_acquire("k", Limit(1, 5))
        assert caught.value.reason == "circuit_open"
        assert "after 2 consecutive storage failures" in str(caught.value)
        assert "the next probe in 3.000s" in str(caught.value)


def test_shadow_limiters_admit_while_open() -> None:
    with flaky("closed") as (limiter, backend, _, recorder):
        shadow = limiter.as_shadow()
        backend.down = True
        got = [outcome(lambda: shadow.try_acquire("k", Limit(SLOW, 3))) for _ in range(6)]
        assert got == ["admitted:3"] * 6
        assert backend.calls == 3
        assert recorder.errors[3:] == [("circuit_open", True)] * 3


@pytest.mark.parametrize("mode", MODES)
def test_hold_back_refund_and_concurrency_slots_follow_the_circuit(mode: str) -> None:
    limit = Limit(SLOW, 10)
    with flaky(mode) as (limiter, backend, clock, _):
        backend.down = True
        for _ in range(3):  # opens it (local: at the first)
            outcome(lambda: limiter.try_acquire("k", limit))
        calls = backend.calls
        guard = limiter.concurrency("jobs", 4)
        if mode == "closed":
            for call in (
                lambda: limiter.hold_back("k", limit, 5),
                lambda: limiter.refund("k", limit),
            ):
                with pytest.raises(BackendError, match="circuit breaker"):
                    call()
            with pytest.raises(BackendError, match="circuit breaker"), guard:
                pass
        else:
            held = limiter.hold_back("k", limit, 5)
            refunded = limiter.refund("k", limit)
            with guard as slot:
                pass
            local = mode == "local"
            assert (held.allowed, held.limit) == (not local, 5 if local else 10)
            assert refunded.limit == (5 if local else 10)
            assert slot.limit == (2 if local else 4)
        assert backend.calls == calls  # none of them waited on the store
        with pytest.raises(BackendError, match="storage is down"):
            limiter.reset("k", limit)  # a reset always asks the server (and follows no mode)
        assert backend.calls == calls + 1
        backend.down = False
        clock.advance(1.0)
        with guard as slot:  # the probe: a slot on the server closes the circuit
            assert slot.limit == 4
        assert limiter.try_acquire("k", limit).limit == 10


def test_breaker_off_every_call_tries_the_store() -> None:
    with flaky("closed", breaker=False) as (limiter, backend, _, recorder):
        backend.down = True
        got = [outcome(lambda: limiter.try_acquire("k", Limit(1, 5))) for _ in range(20)]
        assert got == ["connection"] * 20
        assert backend.calls == 20
        assert recorder.states == []


def test_one_log_line_per_change_of_state(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="tokenlimit"),
        flaky("open") as (limiter, backend, clock, _),
    ):
        backend.down = True
        for _ in range(10):
            limiter.try_acquire("k", Limit(1, 5))
        clock.advance(1.0)
        limiter.try_acquire("k", Limit(1, 5))  # the probe fails
        backend.down = False
        clock.advance(2.0)
        limiter.try_acquire("k", Limit(1, 5))  # the probe is answered
    lines = [r.getMessage() for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert len(lines) == 5, lines
    assert lines[0].startswith(
        "tokenlimit: circuit breaker open (3 consecutive storage failures): every call is "
        "admitted at once for 1s"
    )
    assert "half-open" in lines[1]
    assert lines[2].startswith("tokenlimit: circuit breaker open (the probe failed)")
    assert "for 2s" in lines[2]
    assert "half-open" in lines[3]
    assert "closed" in lines[4]


def test_the_prometheus_gauge_and_counters() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from tokenlimit.metrics import PrometheusMetrics

    registry = prometheus_client.CollectorRegistry()
    clock = FakeClock()
    backend = Flaky(clock)
    limiter = RateLimiter(backend, failure_mode="open", metrics=PrometheusMetrics(registry))
    on_clock(limiter, clock)

    def gauge() -> float | None:
        return registry.get_sample_value("tokenlimit_circuit_state")

    limit = Limit(SLOW, 3)
    assert gauge() == 0
    backend.down = True
    for _ in range(5):
        limiter.try_acquire("k", limit)
    assert gauge() == 1
    label = {"limit": limit.label}
    assert registry.get_sample_value("tokenlimit_fail_open_total", label) == 5
    errors = "tokenlimit_storage_errors_total"
    assert registry.get_sample_value(errors, {"reason": "connection"}) == 3
    assert registry.get_sample_value(errors, {"reason": "circuit_open"}) == 2
    backend.down = False
    clock.advance(1.0)
    limiter.try_acquire("k", limit)
    assert gauge() == 0
    with pytest.raises(ConfigError):
        PrometheusMetrics(registry).record_circuit("ajar")


def test_async_tasks_meanwhile_get_the_failure_mode_while_one_probes() -> None:
    """While the probe waits on the server, every other task decides at once (open: admitted),
    and the one answer closes the circuit for all."""
    clock, recorder = FakeClock(), Recorder()
    backend = Flaky(clock)

    class Gated:
        remote = True

        def __init__(self) -> None:
            self.gate = asyncio.Event()

        async def decide(self, request: Request, *, consume: bool, timeout: float) -> Any:
            if not backend.down:
                await self.gate.wait()  # the probe hangs until the test lets it answer
            return backend.decide(request, consume=consume, timeout=timeout)

        async def reset(self, request: Request, *, timeout: float) -> None:
            backend.reset(request, timeout=timeout)

        async def aclose(self) -> None:
            pass

    async def main() -> None:
        gated = Gated()
        limiter = AsyncRateLimiter(gated, failure_mode="open", metrics=recorder, local_cache=False)
        on_clock(limiter, clock)
        limit = Limit(SLOW, 10)
        backend.down = True
        for _ in range(3):
            await limiter.try_acquire("k", limit)
        backend.down = False
        clock.advance(1.0)
        probe = asyncio.ensure_future(limiter.try_acquire("k", limit))
        await asyncio.sleep(0)  # the probe is now waiting on the server
        others = await asyncio.gather(*(limiter.try_acquire("k", limit) for _ in range(20)))
        assert [d.remaining for d in others] == [10] * 20  # admitted undecided (fail-open)
        assert recorder.errors[3:] == [("circuit_open", True)] * 20
        assert backend.calls == 3
        gated.gate.set()
        assert (await probe).remaining == 9
        assert (await limiter.try_acquire("k", limit)).remaining == 8
        assert recorder.states == ["open", "half_open", "closed"]

    asyncio.run(main())


def test_the_memory_backend_never_trips_it() -> None:
    limiter = memory_limiter(FakeClock())
    for _ in range(50):
        limiter.try_acquire("k", Limit(1, 2))
    assert not limiter._circuit.tripped


# -- real servers: hung behind the fault proxy ----------------------------------------------------
TIMEOUT = 0.1  # the limiter's deadline through the proxy
COOL = Breaker(cool_down=0.5, max_cool_down=0.5)  # short, and not growing: the test's clock
FAST = TIMEOUT / 10  # a call that did not wait on the server
MARGIN = 0.25  # scheduling on a loaded 2-core machine
WARM = Limit(SLOW, 1_000_000)


@pytest.fixture
def proxy(standalone: Any) -> Iterator[FaultProxy]:
    host, port = standalone.host_ports()[0]
    with FaultProxy(port, host) as made:
        yield made


def from_server(decision: Decision | None) -> bool:
    return decision is not None and decision.limit == WARM.burst


def warm_sync(limiter: RateLimiter) -> None:
    """Until a decision comes from the server (connecting through the proxy on a loaded
    machine may miss the deadline, which the breaker counts)."""
    deadline = time.monotonic() + 15
    while not from_server(try_sync(lambda: limiter.peek("warm-up", WARM))):
        assert time.monotonic() < deadline, "the limiter never reached the server"
        time.sleep(0.05)


def try_sync(call: Callable[[], Decision]) -> Decision | None:
    try:
        return call()
    except BackendError:
        return None


def timed(call: Callable[[], Decision]) -> tuple[float, str]:
    started = time.monotonic()
    got = outcome(call)
    return time.monotonic() - started, got


# What a call on WARM gets from a hung server, and while the circuit is open, per mode.
HUNG = {"closed": "timeout", "open": "admitted:1000000", "local": "admitted:500000"}
HUNG_SKIPPED = {**HUNG, "closed": "circuit_open"}


@pytest.mark.parametrize("mode", MODES)
def test_a_hung_server_costs_the_deadline_n_times_then_nothing_sync(
    proxy: FaultProxy, mode: str
) -> None:
    with RateLimiter.from_url(proxy.url, **options_for(mode, timeout=TIMEOUT, breaker=COOL)) as lim:
        warm_sync(lim)
        n = 1 if mode == "local" else 3
        proxy.blackhole()
        tried = [timed(lambda: lim.try_acquire("k", WARM)) for _ in range(n)]
        skipped = [timed(lambda: lim.try_acquire("k", WARM)) for _ in range(50)]
        for elapsed, got in tried:
            assert got == HUNG[mode]
            assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + MARGIN
        assert {got for _, got in skipped} == {HUNG_SKIPPED[mode]}
        assert max(elapsed for elapsed, _ in skipped) < FAST
        proxy.heal()
        healed = time.monotonic()
        while not from_server(try_sync(lambda: lim.try_acquire("k", WARM))):
            assert time.monotonic() - healed < COOL.cool_down + TIMEOUT + MARGIN
            time.sleep(0.01)
        print(f"[{mode} sync] resumed {time.monotonic() - healed:.3f}s after healing")


@pytest.mark.parametrize("mode", MODES)
def test_a_hung_server_costs_the_deadline_n_times_then_nothing_async(
    proxy: FaultProxy, mode: str
) -> None:
    async def attempt(call: Any) -> tuple[float, str]:
        started = time.monotonic()
        try:
            decision = await call
        except BackendError as error:
            return time.monotonic() - started, error.reason
        word = "admitted" if decision.allowed else "refused"
        return time.monotonic() - started, f"{word}:{decision.limit}"

    async def main() -> None:
        async with AsyncRateLimiter.from_url(
            proxy.url, **options_for(mode, timeout=TIMEOUT, breaker=COOL)
        ) as lim:
            deadline = time.monotonic() + 15
            while (await attempt(lim.peek("warm-up", WARM)))[1] != "admitted:1000000":
                assert time.monotonic() < deadline, "the limiter never reached the server"
                await asyncio.sleep(0.05)
            n = 1 if mode == "local" else 3
            proxy.blackhole()
            tried = [await attempt(lim.try_acquire("k", WARM)) for _ in range(n)]
            # Eight tasks at a time, as many times: none waits on the server.
            skipped = []
            for _ in range(8):
                skipped += await asyncio.gather(
                    *(attempt(lim.try_acquire("k", WARM)) for _ in range(8))
                )
            for elapsed, got in tried:
                assert got == HUNG[mode]
                assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + MARGIN
            assert {got for _, got in skipped} == {HUNG_SKIPPED[mode]}
            assert max(elapsed for elapsed, _ in skipped) < FAST
            proxy.heal()
            healed = time.monotonic()
            while (await attempt(lim.try_acquire("k", WARM)))[1] != "admitted:1000000" or (
                mode == "open" and lim._circuit.state != CLOSED
            ):
                assert time.monotonic() - healed < COOL.cool_down + TIMEOUT + MARGIN
                await asyncio.sleep(0.01)

    asyncio.run(main())


# -- a cluster whose nodes all hang for a second ---------------------------------------------------
@contextmanager
def paused(pids: list[int], seconds: float) -> Iterator[None]:
    """SIGSTOP every process for ``seconds`` (less than the cluster's node timeout, 2 s, so
    no node is marked failed): they keep their sockets and answer nothing."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, lambda: [os.kill(pid, signal.SIGCONT) for pid in pids])
    timer.start()
    try:
        yield
    finally:
        timer.join()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.cluster
def test_a_hung_cluster_costs_the_deadline_n_times_then_nothing(cluster: Any) -> None:
    pids = [node.process.pid for node in cluster.cluster.nodes]
    limit = Limit(SLOW, 1_000_000)
    with RateLimiter.from_url(cluster.url, timeout=TIMEOUT, breaker=COOL) as limiter:
        deadline = time.monotonic() + 15
        while try_sync(lambda: limiter.try_acquire("k", limit)) is None:
            assert time.monotonic() < deadline, "the limiter never reached the cluster"
            time.sleep(0.05)
        with paused(pids, 1.0):
            stopped = time.monotonic()
            calls = []
            while time.monotonic() - stopped < 0.8:
                calls.append(timed(lambda: limiter.try_acquire("k", limit)))
                time.sleep(0.005)
        resumed = time.monotonic()
        while try_sync(lambda: limiter.try_acquire("k", limit)) is None:
            assert time.monotonic() - resumed < COOL.cool_down + TIMEOUT + MARGIN
            time.sleep(0.01)
    reasons = [got for _, got in calls]
    assert reasons[:3] == ["timeout"] * 3
    assert set(reasons[3:]) <= {"circuit_open", "timeout"}
    waited = [elapsed for elapsed, _ in calls[3:] if elapsed >= FAST]
    # Besides the first three, only probes waited: one per cool-down at most (and one slowed
    # by the machine).
    assert len(waited) <= 0.8 / COOL.cool_down + 2, waited
    assert len(calls) > 3 + 5 * len(waited)


# -- the integrations' settings ----------------------------------------------------------------
def test_django_settings_take_a_breaker() -> None:
    from tokenlimit.integrations._settings import Settings, read

    made = Settings({"URL": "memory://", "BREAKER": {"FAILURES": 5, "COOL_DOWN": 0.25}})
    assert made.sync.breaker == Breaker(failures=5, cool_down=0.25)
    assert made.sync._circuit is made.async_._circuit
    assert Settings({"URL": "memory://", "BREAKER": False}).sync.breaker is None
    assert Settings({"URL": "memory://"}).sync.breaker == Breaker()
    for bad, says in [
        ({"FAILURES": 0}, "failures: must be >= 1"),
        ({"COOLDOWN": 1}, "unknown entries ['COOLDOWN']"),
        ("on", "must be True, False or a tokenlimit.Breaker"),
    ]:
        (problem,) = read({"URL": "memory://", "BREAKER": bad})[1]
        assert problem.id == "tokenlimit.E023"
        assert says in problem.message


def test_flask_names_where_the_breaker_goes() -> None:
    pytest.importorskip("flask")
    from flask import Flask

    from tokenlimit.integrations.flask import TokenLimit

    app = Flask(__name__)
    app.config.update(TOKENLIMIT_URL="memory://", TOKENLIMIT_BREAKER=False)
    with pytest.raises(ConfigError, match=r"breaker=\.\.\.") as caught:
        TokenLimit(app, limit="10/minute")
    assert caught.value.param == "TOKENLIMIT_BREAKER"
