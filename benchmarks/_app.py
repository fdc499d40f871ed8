"""The FastAPI app whose requests per second the benchmark compares: ``/plain`` has no limiter,
``/limited`` takes a token per request through tokenlimit's ``RateLimit`` dependency (a hot
limit that never refuses, keyed by the default identity: here the client IP), ``/mw/limited``
the same through ``RateLimitMiddleware`` on a mounted sub-app (so ``/plain`` stays bare), and
``/tight`` (1/second, burst 1) only proves, once, that the dependency really refuses.

``/leased`` is ``/limited`` with one global key and leased tokens (issue 18: ``lease=1000``),
declared only where the imported tokenlimit has leases (a baseline revision may not).

``/headers`` is what FastAPI and the server charge any dependency that sends these headers:
a no-op dependency taking ``Request`` and ``Response``, as ``RateLimit`` does, that sets the
same five rate-limit fields (fixed values of the same lengths) and decides nothing. Its
requests/s and CPU next to ``/plain`` bound the ratio a limiter dependency that sends the
headers can reach here, whatever it does to decide.

``/floor`` is what any limiter that asks the server costs at least: a dependency that makes one
redis-py ``EVALSHA`` of ``return 1`` per request (the same floor as the decision tables), on its
own ``redis.asyncio`` client. Its requests/s next to ``/plain`` bound the ratio a FastAPI
dependency with one round trip per request can reach on this machine.

``/_bench/tokenlimit`` says which tokenlimit the server imported (``run.py --baseline`` starts a
second server on an older revision and checks it). It is declared last, after the mount, so no
measured route is matched against it first.

Only public API that the baseline revisions have too: ``AsyncRateLimiter.from_url``, ``Limit``,
``RateLimit(limit, limiter=...)`` and ``RateLimitMiddleware(app, limit=..., limiter=...)``.

    TOKENLIMIT_BENCH_URL=redis://127.0.0.1:6379/0 uvicorn _app:app --app-dir benchmarks
"""

from __future__ import annotations

import os

import redis.asyncio
from fastapi import Depends, FastAPI, Request, Response

import tokenlimit
from tokenlimit import AsyncRateLimiter, Limit
from tokenlimit.integrations.fastapi import RateLimit, RateLimitMiddleware

limiter = AsyncRateLimiter.from_url(os.environ["TOKENLIMIT_BENCH_URL"])
HOT = Limit(1_000_000, burst=1_000_000)
hot = RateLimit(HOT, limiter=limiter)
tight = RateLimit(Limit(1, burst=1), limiter=limiter)
try:
    LEASED = Limit(1_000_000, burst=1_000_000, lease=1000)
except TypeError:  # a tokenlimit before issue 18
    LEASED = None


def global_key(request: object) -> str:
    """One bucket for the whole API: a global limit."""
    return "global"


floor_client = redis.asyncio.Redis.from_url(os.environ["TOKENLIMIT_BENCH_URL"])
FLOOR_SCRIPT = "return 1"
floor_sha: list[str] = []


async def one_round_trip() -> None:
    """The floor: one trivial script call per request, and nothing else."""
    if not floor_sha:
        floor_sha.append(await floor_client.script_load(FLOOR_SCRIPT))
    await floor_client.evalsha(floor_sha[0], 1, "bench:floor")


# The fields a leased decision sends on /leased, with fixed values of the same lengths.
FIELDS = [
    (b"x-ratelimit-limit", b"1000000"),
    (b"x-ratelimit-remaining", b"999998"),
    (b"x-ratelimit-reset", b"1796606132"),
    (b"ratelimit-policy", b'"1000000-per-1s";q=1000000;w=1'),
    (b"ratelimit", b'"1000000-per-1s";r=999998;t=0'),
]


async def headers_only(request: Request, response: Response) -> None:
    """The framework's floor: a dependency that sends the headers and decides nothing."""
    response.raw_headers.extend(FIELDS)


app = FastAPI()


@app.get("/plain")
async def plain() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/limited", dependencies=[Depends(hot)])
async def limited() -> dict[str, str]:
    return {"hello": "world"}


if LEASED is not None:
    leased = RateLimit(LEASED, limiter=limiter, key=global_key)

    @app.get("/leased", dependencies=[Depends(leased)])
    async def leased_route() -> dict[str, str]:
        return {"hello": "world"}


@app.get("/headers", dependencies=[Depends(headers_only)])
async def headers_route() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/floor", dependencies=[Depends(one_round_trip)])
async def floor() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/tight", dependencies=[Depends(tight)])
async def tight_route() -> dict[str, str]:
    return {"hello": "world"}


middleware_app = FastAPI()
middleware_app.add_middleware(RateLimitMiddleware, limit=HOT, limiter=limiter)


@middleware_app.get("/limited")
async def middleware_limited() -> dict[str, str]:
    return {"hello": "world"}


app.mount("/mw", middleware_app)


@app.get("/_bench/tokenlimit")
async def which() -> dict[str, str]:
    return {"file": tokenlimit.__file__ or "", "version": tokenlimit.__version__}
