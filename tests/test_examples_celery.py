"""examples/celery_demo.py: the one-command Celery demo runs a real worker on the suite's server
and reports every vendor within its budget, each task run once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("celery")

import conftest
from conftest import FLAVOURS

DEMO = Path(__file__).resolve().parent.parent / "examples" / "celery_demo.py"
pytestmark = pytest.mark.slow
VALKEY = "valkey" if "valkey" in FLAVOURS else FLAVOURS[0]  # the suite's embedded server


def test_celery_demo_keeps_each_vendor_within_its_budget(testbed: conftest.TestBed) -> None:
    target = testbed.get("standalone", VALKEY)
    target.flush()
    out = subprocess.run(
        [sys.executable, str(DEMO), "--tasks", "10", "--concurrency", "3"],
        env={**os.environ, "TOKENLIMIT_URL": target.url},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every task ran once" in out.stdout
    for vendor in ("acme", "globex"):
        line = re.search(rf"{vendor}: 10 calls \(10 distinct tasks\) in ([\d.]+)s", out.stdout)
        assert line, out.stdout
        assert float(line[1]) >= 0.8  # 5 at once, then 5 more at 5/s: one second at least
