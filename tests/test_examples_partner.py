"""examples/partner_worker.py: one command starts an embedded Valkey and a fake partner, runs a
fleet of workers through httpx's RateLimitTransport, and the partner counts no 429 from its
limit; when it sheds load once, every worker waits."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "partner_worker.py"


def test_the_example_runs_with_no_429_and_a_shared_wait() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--workers", "3", "--seconds", "2.5"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    assert "429 count: 0" in done.stdout
    silence = re.search(r"no worker sent for ([0-9.]+)s", done.stdout)
    assert silence is not None
    assert 0.95 <= float(silence.group(1)) < 2.0  # Retry-After: 1, for every worker
    workers = re.findall(r"worker-\d: \{200: \d+(, 429: 1)?\}", done.stdout)
    assert len(workers) == 3
    assert workers.count(", 429: 1") == 1  # the one that was told; the others waited too
