"""A fleet of worker processes calling one partner API through the outbound integrations, on a
shared Valkey, against a real local HTTP server that enforces its own limit
(examples/fake_partner.py; the workers are tests/partner_clients.py).

The partner allows 20 requests per second with bursts of 10 and answers 429 with Retry-After
beyond that. Through the transport the whole fleet gets no 429 from it; without, the same
workers get many. When the partner answers one 429 with ``Retry-After: 2``, every worker stops
sending until then (the partner's own timestamps say so), and the one caller that got it sees
the partner's response as it was sent. Bounds are generous: a loaded 2-core machine runs the
partner, Valkey and the workers at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import FLAVOURS

if TYPE_CHECKING:
    from conftest import TestBed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from fake_partner import THROTTLE_BODY, Partner, running_partner

CLIENTS = str(Path(__file__).resolve().parent / "partner_clients.py")
RATE, BURST = 20, 10  # the partner's limit
# The fleet's limit: the partner's rate, and half its burst. The tokens kept back absorb the
# jitter between taking a token and the request's arrival, 50 ms each at 20/s: requests admitted
# 50 ms apart may arrive together when the machine deschedules one process and not another (one
# token was not enough on a machine busy with other test suites).
FLEET_BURST = BURST // 2
# (kind, processes, extra arguments): each kind of client, several processes of it.
FLEETS = [
    ("httpx", 4, []),
    ("async", 2, ["--tasks", "3"]),
    ("requests", 3, []),
]


@pytest.fixture(scope="module")
def partner_process() -> Iterator[Partner]:
    with running_partner(rate=RATE, burst=BURST) as partner:
        yield partner


@pytest.fixture
def partner(partner_process: Partner) -> Partner:
    partner_process.reset()
    return partner_process


@pytest.fixture
def valkey(testbed: TestBed) -> str:
    """One flushed standalone server: the store is not what these tests are about."""
    target = testbed.get("standalone", "valkey" if "valkey" in FLAVOURS else FLAVOURS[0])
    target.flush()
    return target.url


class Fleet:
    """Worker processes, started and ready, released together by ``go``."""

    def __init__(
        self, kind: str, count: int, partner: Partner, valkey: str, seconds: float, *extra: str
    ) -> None:
        self.names = {f"w{i}" for i in range(count)}
        options = ["--seconds", str(seconds), "--rate", str(RATE), "--burst", str(FLEET_BURST)]
        self.processes = [
            subprocess.Popen(
                [sys.executable, CLIENTS, kind, partner.url, valkey, name, *options, *extra],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for name in sorted(self.names)
        ]
        for process in self.processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"

    def go(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()

    def results(self) -> list[dict[str, dict[str, int] | list[dict[str, str]]]]:
        reports = []
        for process in self.processes:
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


def test_without_a_limiter_the_partner_refuses_many(partner: Partner, valkey: str) -> None:
    """The control: the same workers on plain httpx clients, no tokenlimit."""
    fleet = Fleet("none", 4, partner, valkey, 1.0)
    try:
        fleet.go()
        fleet.results()
    finally:
        fleet.stop()
    statuses = [status for _, status, _ in partner.requests()]
    assert statuses.count(429) > statuses.count(200)
    print(f"[control] no limiter: {statuses.count(200)} x 200, {statuses.count(429)} x 429")


@pytest.mark.parametrize(("kind", "count", "extra"), FLEETS, ids=[f[0] for f in FLEETS])
def test_a_fleet_at_the_partners_limit_gets_no_429(
    partner: Partner, valkey: str, kind: str, count: int, extra: list[str]
) -> None:
    fleet = Fleet(kind, count, partner, valkey, 2.0, *extra)
    try:
        fleet.go()
        reports = fleet.results()
    finally:
        fleet.stop()
    served = partner.requests()
    statuses = [status for _, status, _ in served]
    assert statuses.count(429) == 0, statuses
    assert sum(sum(r["statuses"].values()) for r in reports) == len(served)  # type: ignore[union-attr]
    # within the policy: at most the burst plus the rate over the span the partner saw, and
    # every worker took part
    span = served[-1][0] - served[0][0]
    # (at the partner's end: arrivals may bunch by the jitter the margin absorbs, 0.25 s)
    assert len(served) <= FLEET_BURST + RATE * (span + 0.25) + 1
    assert len(served) >= RATE * 1.0  # about 2 s of sending: at least half the budget used
    assert {worker for _, _, worker in served} == fleet.names
    print(f"[{kind}] {count} processes: {len(served)} x 200 in {span:.2f}s, 0 x 429")


@pytest.mark.parametrize(("kind", "count", "extra"), FLEETS, ids=[f[0] for f in FLEETS])
def test_one_429_with_retry_after_holds_back_the_whole_fleet(
    partner: Partner, valkey: str, kind: str, count: int, extra: list[str]
) -> None:
    fleet = Fleet(kind, count, partner, valkey, 5.0, *extra)
    try:
        fleet.go()
        # Once every worker is sending (a busy machine may start one late), the partner's next
        # request gets 429 with Retry-After: 2.
        deadline = time.monotonic() + 2.0
        while {w for _, _, w in partner.requests()} != fleet.names:
            assert time.monotonic() < deadline, partner.requests()
            time.sleep(0.05)
        partner.throttle(2)
        reports = fleet.results()
    finally:
        fleet.stop()
    served = partner.requests()
    throttled = [t for t, status, _ in served if status == 429]
    assert len(throttled) == 1, served  # that one, and no other 429 at all
    t429 = throttled[0]
    arrivals = [(round(t - t429, 3), worker) for t, _, worker in served]  # for the messages
    assert {w for t, _, w in served if t < t429} == fleet.names, arrivals  # all were sending
    # Requests already admitted when the 429 came may still arrive just after it (a worker may
    # be descheduled between the two); then nothing from any worker until the 2 s are over.
    during = [(dt, w) for dt, w in arrivals if 0.5 < dt < 1.95]
    assert during == [], arrivals
    resumed = [dt for dt, _ in arrivals if dt >= 1.95]
    assert resumed, arrivals  # and the fleet went on after the hold
    # the one caller that got the 429 saw the partner's response as it was sent
    seen = [t for r in reports for t in r["throttled"]]  # type: ignore[union-attr]
    assert seen == [{"retry_after": "2", "body": THROTTLE_BODY.decode()}]
    gap = min(resumed) - max([dt for dt, _ in arrivals if dt < 1.95])
    print(f"[{kind}] hold: silent {gap:.2f}s after the 429 (Retry-After: 2)")
