"""One worker process of a fleet calling the fake partner (examples/fake_partner.py), for
tests/test_outbound_fleet.py.

    python tests/partner_clients.py KIND PARTNER_URL VALKEY_URL NAME --seconds S [--tasks N]

KIND: ``httpx`` (``RateLimitTransport``), ``async`` (``AsyncRateLimitTransport``, ``--tasks``
concurrent callers), ``requests`` (``RateLimitAdapter``), or ``none`` (a plain httpx client:
the control). Prints ``ready`` once set up, starts on a line ``go`` from stdin, calls
``/api/items`` as fast as the limit lets it for ``S`` seconds, then prints one JSON line:
``{"statuses": {status: count}, "throttled": [{"retry_after", "body"}...]}`` with every 429 it
was answered, as the caller received it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time

import httpx
import requests

from tokenlimit import AsyncRateLimiter, Limit, RateLimiter
from tokenlimit.integrations.httpx import AsyncRateLimitTransport, RateLimitTransport
from tokenlimit.integrations.requests import RateLimitAdapter

KEY = "partner"


class Tally:
    def __init__(self) -> None:
        self.statuses: collections.Counter[int] = collections.Counter()
        self.throttled: list[dict[str, str]] = []

    def add(self, status: int, retry_after: str | None, body: bytes) -> None:
        self.statuses[status] += 1
        if status == 429:
            self.throttled.append({"retry_after": retry_after or "", "body": body.decode()})

    def report(self) -> str:
        return json.dumps({"statuses": dict(self.statuses), "throttled": self.throttled})


def run_httpx(args: argparse.Namespace, limit: Limit, tally: Tally, end: float) -> None:
    headers = {"X-Worker": args.name}
    with RateLimiter.from_url(args.valkey, timeout=5.0) as limiter:
        if args.kind == "none":
            client = httpx.Client(base_url=args.partner, headers=headers)
        else:
            transport = RateLimitTransport(limit, key=KEY, limiter=limiter)
            client = httpx.Client(base_url=args.partner, headers=headers, transport=transport)
        with client:
            while time.monotonic() < end:
                response = client.get("/api/items")
                tally.add(
                    response.status_code, response.headers.get("Retry-After"), response.content
                )


def run_requests(args: argparse.Namespace, limit: Limit, tally: Tally, end: float) -> None:
    with RateLimiter.from_url(args.valkey, timeout=5.0) as limiter, requests.Session() as session:
        session.mount(args.partner, RateLimitAdapter(limit, key=KEY, limiter=limiter))
        session.headers["X-Worker"] = args.name
        while time.monotonic() < end:
            response = session.get(f"{args.partner}/api/items", timeout=10)
            tally.add(response.status_code, response.headers.get("Retry-After"), response.content)


async def run_async(args: argparse.Namespace, limit: Limit, tally: Tally, end: float) -> None:
    limiter = AsyncRateLimiter.from_url(args.valkey, timeout=5.0)
    transport = AsyncRateLimitTransport(limit, key=KEY, limiter=limiter)
    headers = {"X-Worker": args.name}
    async with httpx.AsyncClient(base_url=args.partner, headers=headers, transport=transport) as c:

        async def caller() -> None:
            while time.monotonic() < end:
                response = await c.get("/api/items")
                tally.add(
                    response.status_code, response.headers.get("Retry-After"), response.content
                )

        await asyncio.gather(*(caller() for _ in range(args.tasks)))
    await limiter.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["httpx", "async", "requests", "none"])
    parser.add_argument("partner")
    parser.add_argument("valkey")
    parser.add_argument("name")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=3)
    args = parser.parse_args()
    limit = Limit(args.rate, args.burst)
    tally = Tally()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    end = time.monotonic() + args.seconds
    if args.kind == "async":
        asyncio.run(run_async(args, limit, tally, end))
    elif args.kind == "requests":
        run_requests(args, limit, tally, end)
    else:
        run_httpx(args, limit, tally, end)
    print(tally.report(), flush=True)


if __name__ == "__main__":
    main()
