"""The FastAPI app whose requests per second the benchmark compares: ``/plain`` has no limiter,
``/limited`` takes a token per request through tokenlimit's ``RateLimit`` dependency (a hot
limit that never refuses, keyed by the default identity: here the client IP), ``/mw/limited``
the same through ``RateLimitMiddleware`` on a mounted sub-app (so ``/plain`` stays bare), and
``/tight`` (1/second, burst 1) only proves, once, that the dependency really refuses.

    TOKENLIMIT_BENCH_URL=redis://127.0.0.1:6379/0 uvicorn _app:app --app-dir benchmarks
"""

from __future__ import annotations

import os

from fastapi import Depends, FastAPI

from tokenlimit import AsyncRateLimiter, Limit
from tokenlimit.integrations.fastapi import RateLimit, RateLimitMiddleware

limiter = AsyncRateLimiter.from_url(os.environ["TOKENLIMIT_BENCH_URL"])
HOT = Limit(1_000_000, burst=1_000_000)
hot = RateLimit(HOT, limiter=limiter)
tight = RateLimit(Limit(1, burst=1), limiter=limiter)

app = FastAPI()


@app.get("/plain")
async def plain() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/limited", dependencies=[Depends(hot)])
async def limited() -> dict[str, str]:
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
