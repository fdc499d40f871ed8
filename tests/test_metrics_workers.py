"""Metrics under several workers: the demo's launcher (``python -m fastapi_demo --workers 2``)
on the suite's server, with prometheus_client's multiprocess mode; whichever worker answers
``/metrics`` shows every worker's counts, equal to what the client saw. Plus
``tokenlimit.metrics.scrape_registry``'s own contract."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Target

from servers import free_port
from tokenlimit import ConfigError
from tokenlimit.metrics import (
    MULTIPROCESS_ENV,
    STORAGE_ERROR_REASONS,
    exposition,
    scrape_registry,
)

prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PID = "x-worker-pid"
STALE = 1000  # what a previous run left in the directory, counted as allowed decisions


def _leave_stale_counts(directory: Path) -> None:
    """A previous run's file in ``directory``, written by prometheus_client in multiprocess
    mode: the launcher must delete it, or the scrape counts STALE decisions too much."""
    code = (
        "from prometheus_client import Counter; "
        "Counter('tokenlimit_decisions', 'd', ['limit', 'result'])"
        f".labels(limit='10-per-2s', result='allowed').inc({STALE})"
    )
    env = {**os.environ, MULTIPROCESS_ENV: str(directory)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    assert list(directory.glob("counter_*.db"))


@pytest.fixture
def two_workers(standalone: Target, tmp_path: Path) -> Iterator[str]:
    """The demo on two uvicorn workers through its launcher, on the suite's server."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    _leave_stale_counts(directory)
    port = free_port()
    env = {**os.environ, "TOKENLIMIT_URL": standalone.url, MULTIPROCESS_ENV: str(directory)}
    env.pop("REDIS_URL", None)
    log = (tmp_path / "uvicorn.log").open("wb")
    command = [sys.executable, "-m", "fastapi_demo", "--port", str(port), "--workers", "2",
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
    # examples/ as the working directory: the app from there, tokenlimit as installed.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=EXAMPLES)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        pids: set[str] = set()
        while len(pids) < 2:  # both workers up: each answered /health once
            assert process.poll() is None, (tmp_path / "uvicorn.log").read_text()
            assert time.monotonic() < deadline, "two workers did not answer /health"
            try:
                pids.add(httpx.get(f"{base}/health", timeout=2).headers[PID])
            except httpx.HTTPError:
                time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def _totals(page: str) -> dict[tuple[str, str], float]:
    """(sample name, result) -> value, for the tokenlimit samples the check compares; and
    asserts no sample carries a ``pid`` label (a gauge without a multiprocess mode would)."""
    totals: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if not sample.name.startswith("tokenlimit_"):
                continue
            assert "pid" not in sample.labels, sample
            totals[(sample.name, sample.labels.get("result", ""))] += sample.value
    return dict(totals)


def test_every_worker_serves_the_totals_of_all(two_workers: str) -> None:
    statuses: Counter[int] = Counter()
    served: Counter[str] = Counter()
    # A new connection per request (httpx.get): the kernel spreads them over both workers.
    for sent in range(1, 401):
        response = httpx.get(f"{two_workers}/v1/hello", headers={"X-API-Key": "mp"}, timeout=5)
        statuses[response.status_code] += 1
        served[response.headers[PID]] += 1
        if sent >= 60 and len(served) == 2 and statuses[429]:
            break
    assert set(statuses) <= {200, 429}
    assert len(served) == 2, served  # both workers decided some of them
    assert 10 <= statuses[200] < 60  # the shared bucket: a burst of 10 and 5/s

    pages: dict[str, str] = {}
    for _ in range(200):
        response = httpx.get(f"{two_workers}/metrics", timeout=5)
        assert response.status_code == 200
        pages.setdefault(response.headers[PID], response.text)
        if len(pages) == 2:
            break
    assert set(pages) == set(served)
    for pid, page in pages.items():
        totals = _totals(page)
        allowed, refused = statuses[200], statuses[429]
        assert totals[("tokenlimit_decisions_total", "allowed")] == allowed, pid
        assert totals[("tokenlimit_decisions_total", "refused")] == refused, pid
        assert totals[("tokenlimit_http_requests_total", "allowed")] == allowed, pid
        assert totals[("tokenlimit_http_requests_total", "refused")] == refused, pid
        assert totals[("tokenlimit_decision_seconds_count", "")] == allowed + refused, pid
        # Pre-made at 0 in every worker: merged, still one series per reason (and "other").
        assert page.count("tokenlimit_storage_errors_total{") == len(STORAGE_ERROR_REASONS) + 1, pid


def test_launcher_refuses_memory_on_several_workers() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENLIMIT_URL", "REDIS_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "fastapi_demo", "--workers", "2", "--port", str(free_port())],
        env=env, cwd=EXAMPLES, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert "TOKENLIMIT_URL is not set" in line


def test_scrape_registry_is_the_registry_itself_without_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(MULTIPROCESS_ENV, raising=False)
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("mine", "m", registry=registry)
    counter.inc(3)
    assert scrape_registry(registry) is registry
    body, content_type = exposition(registry)
    assert b"mine_total 3.0" in body
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST


def test_scrape_registry_merges_the_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _leave_stale_counts(tmp_path)  # another process's counts, as a worker would leave them
    _leave_stale_counts(tmp_path)
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    registry = prometheus_client.CollectorRegistry()
    merged = scrape_registry(registry)
    assert merged is not registry
    body, _ = exposition(registry)
    assert _totals(body.decode()) == {("tokenlimit_decisions_total", "allowed"): 2 * STALE}


def test_scrape_registry_checks_its_inputs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=MULTIPROCESS_ENV):
        scrape_registry(prometheus_client.CollectorRegistry())
    with pytest.raises(TypeError, match="registry"):
        scrape_registry(object())  # type: ignore[arg-type]
