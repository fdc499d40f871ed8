"""tokenlimit.integrations.requests: ``RateLimitAdapter`` mounted on a session, against a real
local HTTP server (examples/fake_partner.py, in a process of its own) that enforces its own
limit. tests/test_outbound_fleet.py runs the adapter from several processes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tokenlimit import ConfigError, Limit, MemoryBackend, RateLimiter, RateLimitExceeded
from tokenlimit.integrations.requests import RateLimitAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from fake_partner import THROTTLE_BODY, Partner, running_partner


@pytest.fixture(scope="module")
def partner_process() -> Iterator[Partner]:
    with running_partner(rate=20, burst=5) as partner:
        yield partner


@pytest.fixture
def partner(partner_process: Partner) -> Partner:
    partner_process.reset()
    return partner_process


def session_with(adapter: RateLimitAdapter, partner: Partner) -> requests.Session:
    session = requests.Session()
    session.mount(partner.url + "/api", adapter)
    return session


def test_takes_a_token_per_request_and_refuses_without_sending(partner: Partner) -> None:
    store = MemoryBackend()
    adapter = RateLimitAdapter(Limit(1, 5), key="partner", limiter=RateLimiter(store), timeout=0)
    with session_with(adapter, partner) as session:
        for _ in range(5):
            assert session.get(f"{partner.url}/api/items", timeout=5).status_code == 200
        with pytest.raises(RateLimitExceeded):
            session.get(f"{partner.url}/api/items", timeout=5)
        # unmounted paths are not limited
        assert session.get(f"{partner.url}/admin/stats", timeout=5).status_code == 200
    assert [status for _, status, _ in partner.requests()] == [200] * 5  # the 6th never left


def test_waits_at_the_partners_pace(partner: Partner) -> None:
    """The partner allows 20/s with bursts of 5; the adapter keeps one token of that burst for
    the network's jitter (see docs/integrations/http.md)."""
    limit = Limit(20, 4)
    adapter = RateLimitAdapter(limit, key="partner", limiter=RateLimiter(MemoryBackend()))
    with session_with(adapter, partner) as session:
        statuses = [session.get(f"{partner.url}/api/x", timeout=5).status_code for _ in range(24)]
    assert statuses == [200] * 24
    times = [t for t, _, _ in partner.requests()]
    assert times[-1] - times[0] >= 0.95  # 4 at once, then 20 at 20/s: 1 s, less jitter


def test_a_429_comes_back_unchanged_and_holds_back_every_client(partner: Partner) -> None:
    store = MemoryBackend()
    mine = RateLimitAdapter(Limit(20, 5), key="partner", limiter=RateLimiter(store))
    others = RateLimitAdapter(Limit(20, 5), key="partner", limiter=RateLimiter(store), timeout=0)
    partner.throttle(2)
    with session_with(mine, partner) as session, session_with(others, partner) as other:
        response = session.get(f"{partner.url}/api/items", timeout=5, stream=True)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "2"
        assert response.raw.tell() == 0  # not read: streamable as the partner sent it
        assert response.content == THROTTLE_BODY
        with pytest.raises(RateLimitExceeded) as caught:
            other.get(f"{partner.url}/api/items", timeout=5)
    assert 1.5 < caught.value.retry_after <= 2.0
    assert len(partner.requests()) == 1


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ConfigError, match=r"^limit: "):
        RateLimitAdapter("sometimes", key="k")
    with pytest.raises(ConfigError, match=r"^key: "):
        RateLimitAdapter(Limit(1), key=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^timeout: "):
        RateLimitAdapter(Limit(1), key="k", timeout=-1)
    with pytest.raises(ConfigError, match=r"^limiter: "):
        RateLimitAdapter(Limit(1), key="k", limiter=object())  # type: ignore[arg-type]


def test_adapter_options_pass_through() -> None:
    adapter = RateLimitAdapter(Limit(1), key="k", max_retries=2, pool_maxsize=3)
    assert adapter.max_retries.total == 2
    assert adapter._pool_maxsize == 3  # type: ignore[attr-defined]
