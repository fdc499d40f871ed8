"""What narrows a FastAPI/Starlette limit (issue 16): ``methods``, ``exempt_when``,
``deduct_when`` (the failed-logins limit: taken before the route, given back after it unless the
response counts), exempt routers and routes, and router-level limits and ``scope``; on memory
and on every real server."""

import asyncio
from collections.abc import Iterator
from typing import Annotated, Any

import fastapi
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel

from tokenlimit import AsyncRateLimiter, ConfigError, Decision, Limit, MemoryBackend, RateLimiter
from tokenlimit.integrations.fastapi import (
    RateLimit,
    RateLimitMiddleware,
    ResponseInfo,
    install_handlers,
)

SLOW = 0.01  # tokens per second: nothing refills during a test
THREE = Limit(SLOW, 3)
LOGINS = "5/15 minutes"  # five failed logins per 15 minutes per username
LIMIT_FIELDS = ("x-ratelimit-limit", "x-ratelimit-remaining", "ratelimit-policy", "ratelimit")
# FastAPI 0.118 raises a validation error inside its dependencies' exit stack; before, after it
# closed, so a dependency with yield saw the request end as if the route had answered (200).
VALIDATION_SEEN = 422 if tuple(map(int, fastapi.__version__.split(".")[:2])) >= (0, 118) else 200


@pytest.fixture(params=["async", "sync"])
def any_limiter(
    request: pytest.FixtureRequest, url: str
) -> Iterator[RateLimiter | AsyncRateLimiter]:
    """An AsyncRateLimiter, and a sync RateLimiter (decided off the loop), on every backend."""
    if request.param == "async":
        yield AsyncRateLimiter.from_url(url, timeout=5)  # its clients close with the loop
    else:
        with RateLimiter.from_url(url, timeout=5) as limiter:
            yield limiter


def used(limiter: RateLimiter, key: str, limit: Limit = THREE) -> int:
    """Tokens taken from ``key``'s bucket."""
    return limit.burst - limiter.peek(key, limit).remaining


def no_limit_fields(response: httpx.Response) -> bool:
    return not any(name in response.headers for name in LIMIT_FIELDS)


# -- methods ------------------------------------------------------------------------------------
def test_methods_narrow_a_router_limit_and_the_middleware(url: str) -> None:
    limiter = RateLimiter.from_url(url, timeout=5)
    seen: list[Decision | None] = []

    post_only = RateLimit(THREE, limiter=limiter, methods=["post"])

    async def record(decision: Annotated[Decision | None, Depends(post_only)]) -> None:
        seen.append(decision)

    router = APIRouter(dependencies=[Depends(record)])

    @router.api_route("/items", methods=["GET", "POST"])
    async def items() -> dict[str, str]:
        return {"ok": "yes"}

    api = FastAPI()
    install_handlers(api)
    api.include_router(router)
    with TestClient(api) as client:
        gets = [client.get("/items") for _ in range(4)]
        assert [r.status_code for r in gets] == [200] * 4
        assert all(no_limit_fields(r) for r in gets)
        assert seen == [None] * 4  # not checked: the dependency's value is None
        assert [client.post("/items").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert used(limiter, "route:POST /items|ip:unknown") == 3
    assert used(limiter, "route:GET /items|ip:unknown") == 0

    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limit=THREE, limiter=limiter, methods=("POST", "Put"))

    @app.api_route("/x", methods=["GET", "POST", "PUT"])
    async def x() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(app) as client:
        assert [client.get("/x").status_code for _ in range(5)] == [200] * 5
        assert no_limit_fields(client.get("/x"))
        codes = [client.post("/x").status_code, client.put("/x").status_code]
        codes += [client.post("/x").status_code, client.put("/x").status_code]
        assert codes == [200, 200, 200, 429]
    limiter.close()


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("POST", "a list like"),  # a bare string: a list was meant
        (["POST", "FETCH"], "'FETCH' is not an HTTP method"),
        ([], "at least one"),
        (5, "a list like"),
        ([b"POST"], "is not an HTTP method"),
    ],
)
def test_bad_methods_name_the_parameter(methods: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^methods: .*{message}"):
        RateLimit("1/second", methods=methods)
    with pytest.raises(ConfigError, match=rf"^methods: .*{message}"):
        RateLimitMiddleware(FastAPI(), limit="1/second", methods=methods)


# -- exempt_when -------------------------------------------------------------------------------
def internal(request: Request) -> bool:
    return request.headers.get("x-internal") == "yes"


async def ainternal(request: Request) -> bool:
    await asyncio.sleep(0)
    return request.headers.get("x-internal") == "yes"


@pytest.mark.parametrize("predicate", [internal, ainternal], ids=["sync", "async"])
def test_exempt_when_skips_the_check_the_charge_and_the_headers(
    any_limiter: RateLimiter | AsyncRateLimiter, predicate: Any
) -> None:
    api = FastAPI()
    install_handlers(api)
    api.add_middleware(RateLimitMiddleware, limit=THREE, limiter=any_limiter, exempt_when=predicate)
    guard = RateLimit(THREE, limiter=any_limiter, exempt_when=predicate)

    @api.get("/a")
    async def a(decision: Annotated[Decision | None, Depends(guard)]) -> dict[str, bool]:
        return {"checked": decision is not None}

    inside = {"x-internal": "yes"}
    with TestClient(api) as client:
        for _ in range(5):
            response = client.get("/a", headers=inside)
            assert response.status_code == 200
            assert response.json() == {"checked": False}
            assert no_limit_fields(response)
        outside = [client.get("/a") for _ in range(4)]
    assert [r.status_code for r in outside] == [200, 200, 200, 429]
    assert outside[0].json() == {"checked": True}


def test_a_predicate_written_for_flask_limiter_fails_where_it_is_written() -> None:
    # flask-limiter's exempt_when takes no argument: ours takes the request.
    with pytest.raises(ConfigError, match=r"^exempt_when: must take one argument, the request"):
        RateLimit("1/second", exempt_when=lambda: True)
    with pytest.raises(ConfigError, match=r"^deduct_when: must take one argument, the response"):
        RateLimitMiddleware(FastAPI(), limit="1/second", deduct_when=lambda a, b: True)
    with pytest.raises(ConfigError, match=r"^exempt_when: must be a callable"):
        RateLimit("1/second", exempt_when=True)  # type: ignore[arg-type]


# -- deduct_when: five failed logins per 15 minutes per username --------------------------------
class Credentials(BaseModel):
    username: str
    password: str


async def username(request: Request) -> str:
    return f"login:{(await request.json())['username']}"


def failed(response: ResponseInfo) -> bool:
    return response.status_code == 401


def login_app(limiter: RateLimiter | AsyncRateLimiter, *, pause: float = 0.0) -> FastAPI:
    """``POST /login``: 401 for a wrong password (raised, as FastAPI's security tutorial does)."""
    api = FastAPI()
    install_handlers(api)
    guard = RateLimit(LOGINS, key=username, deduct_when=failed, limiter=limiter)

    @api.post("/login", dependencies=[Depends(guard)])
    async def login(body: Credentials) -> dict[str, str]:
        await asyncio.sleep(pause)
        if body.password != "right":
            raise HTTPException(401, "wrong username or password")
        return {"user": body.username}

    return api


def login_bucket(user: str) -> str:
    return f"route:POST /login|login:{user}"


def test_five_failed_logins_then_429_while_successes_never_count(
    any_limiter: RateLimiter | AsyncRateLimiter,
) -> None:
    with TestClient(login_app(any_limiter)) as client:

        def attempt(password: str, user: str = "alice") -> int:
            body = {"username": user, "password": password}
            return client.post("/login", json=body).status_code

        for _ in range(5):
            assert attempt("right") == 200  # given back: never counts
            assert attempt("wrong") == 401
        assert attempt("wrong") == 429
        assert attempt("right") == 429  # the username is locked, whatever the password
        assert attempt("wrong", "bob") == 401  # a bucket per username
    assert isinstance(RateLimit(LOGINS, deduct_when=failed), RateLimit)


def test_concurrent_failed_logins_never_pass_the_limit(url: str) -> None:
    """20 wrong passwords at once, each taking 0.2 s: exactly 5 run (and count), 15 are
    refused. Counting only after the route would have let all 20 try."""

    async def main() -> list[int]:
        limiter = AsyncRateLimiter.from_url(url, timeout=5)
        try:
            api = login_app(limiter, pause=0.2)
            transport = httpx.ASGITransport(app=api)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                body = {"username": "carol", "password": "guess"}
                tries = [client.post("/login", json=body) for _ in range(20)]
                responses = await asyncio.gather(*tries)
            left = await limiter.peek(login_bucket("carol"), Limit.parse(LOGINS))
            assert left.remaining == 0
            return sorted(r.status_code for r in responses)
        finally:
            await limiter.aclose()

    assert asyncio.run(main()) == [401] * 5 + [429] * 15


def test_the_dependency_sees_the_status_the_route_sets_or_declares() -> None:
    limiter = RateLimiter(MemoryBackend())
    api = FastAPI()
    install_handlers(api)
    seen: list[int] = []

    def counts(response: ResponseInfo) -> bool:
        seen.append(response.status_code)
        return response.status_code in (401, 422, 500)

    guard = Depends(RateLimit(THREE, deduct_when=counts, limiter=limiter))

    @api.get("/set", dependencies=[guard])
    async def set_status(response: Response) -> dict[str, str]:
        response.status_code = 401
        return {}

    @api.get("/declared", status_code=201, dependencies=[guard])
    async def declared() -> dict[str, str]:
        return {}

    @api.get("/plain", dependencies=[guard])
    async def plain() -> dict[str, str]:
        return {}

    @api.get("/typed/{n}", dependencies=[guard])
    async def typed(n: int) -> dict[str, int]:
        return {"n": n}

    @api.get("/boom", dependencies=[guard])
    async def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(api, raise_server_exceptions=False) as client:
        assert client.get("/set").status_code == 401
        assert client.get("/declared").status_code == 201
        assert client.get("/plain").status_code == 200
        assert client.get("/typed/x").status_code == 422
        assert client.get("/boom").status_code == 500
    assert seen == [401, 201, 200, VALIDATION_SEEN, 500]
    kept = {"/set": 1, "/declared": 0, "/plain": 0, "/typed/{n}": int(VALIDATION_SEEN == 422)}
    kept["/boom"] = 1
    for route, tokens in kept.items():
        assert used(limiter, f"route:GET {route}|ip:unknown") == tokens, route


def test_the_middleware_sees_every_response_as_it_starts(url: str) -> None:
    """A route returning its own Response (which a dependency cannot see) and an exception that
    escapes the app (a 500); a given-back token shows in the response's headers."""
    limiter = AsyncRateLimiter.from_url(url, timeout=5)
    api = FastAPI()
    api.add_middleware(
        RateLimitMiddleware,
        limit=THREE,
        limiter=limiter,
        key=lambda request: request.headers.get("x-user"),
        deduct_when=lambda response: (
            response.status_code == 401 or response.headers.get("x-counts") == "yes"
        ),
    )

    @api.post("/login")
    async def login(request: Request) -> JSONResponse:
        if request.headers.get("x-password") != "right":
            return JSONResponse({"detail": "wrong"}, status_code=401)
        return JSONResponse({"ok": True}, headers={"x-counts": request.headers.get("x-mark", "")})

    @api.post("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    user = {"x-user": "dave"}
    with TestClient(api, raise_server_exceptions=False) as client:
        ok = client.post("/login", headers={**user, "x-password": "right"})
        assert (ok.status_code, ok.headers["x-ratelimit-remaining"]) == (200, "3")
        assert client.post("/boom", headers=user).status_code == 500  # given back too
        marked = client.post("/login", headers={**user, "x-password": "right", "x-mark": "yes"})
        assert (marked.status_code, marked.headers["x-ratelimit-remaining"]) == (200, "2")
        wrong = [client.post("/login", headers=user) for _ in range(3)]
    assert [r.status_code for r in wrong] == [401, 401, 429]
    assert [r.headers["x-ratelimit-remaining"] for r in wrong] == ["1", "0", "0"]


# -- exemptions from the middleware, router-level limits, scope ---------------------------------
def test_exempt_paths_free_a_router_and_a_route_from_the_middleware(url: str) -> None:
    """A router's prefix frees the router, a route's path the route; their own limits stay."""
    limiter = RateLimiter.from_url(url, timeout=5)
    api = FastAPI()
    install_handlers(api)
    api.add_middleware(
        RateLimitMiddleware, limit=THREE, limiter=limiter, exempt=["/internal", "/ping"]
    )
    internal_api = APIRouter(prefix="/internal")

    @internal_api.get("/status")
    async def status() -> dict[str, str]:
        return {"ok": "yes"}

    own = Depends(RateLimit(Limit(SLOW, 1), limiter=limiter))

    @internal_api.get("/export", dependencies=[own])
    async def export() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/ping")
    async def ping() -> dict[str, str]:
        return {"ok": "yes"}

    @api.get("/items")
    async def items() -> dict[str, str]:
        return {"ok": "yes"}

    api.include_router(internal_api)
    with TestClient(api) as client:
        for path in ("/internal/status", "/ping"):
            responses = [client.get(path) for _ in range(5)]
            assert [r.status_code for r in responses] == [200] * 5
            assert no_limit_fields(responses[0])
        assert [client.get("/internal/export").status_code for _ in range(2)] == [200, 429]
        assert [client.get("/items").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert used(limiter, "ip:unknown") == 3  # the middleware's: /items alone
    limiter.close()


def test_a_router_limit_has_a_bucket_per_route_unless_scoped(url: str) -> None:
    limiter = RateLimiter.from_url(url, timeout=5)
    per_route = APIRouter(prefix="/a", dependencies=[Depends(RateLimit(THREE, limiter=limiter))])
    scoped = APIRouter(
        prefix="/b", dependencies=[Depends(RateLimit(THREE, limiter=limiter, scope="b-api"))]
    )
    for router in (per_route, scoped):

        @router.get("/one")
        async def one() -> dict[str, str]:
            return {"ok": "yes"}

        @router.get("/two")
        async def two() -> dict[str, str]:
            return {"ok": "yes"}

    api = FastAPI()
    install_handlers(api)
    api.include_router(per_route)
    api.include_router(scoped)
    with TestClient(api) as client:
        paths = ["/a/one", "/a/two"] * 3
        assert [client.get(p).status_code for p in paths] == [200] * 6
        paths = ["/b/one", "/b/two", "/b/one", "/b/two"]
        assert [client.get(p).status_code for p in paths] == [200, 200, 200, 429]
    assert used(limiter, "route:GET /a/one|ip:unknown") == 3
    assert used(limiter, "scope:b-api|ip:unknown") == 3
    limiter.close()
