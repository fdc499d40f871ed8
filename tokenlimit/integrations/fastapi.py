"""FastAPI and Starlette: the ``RateLimit`` dependency, a pure ASGI ``RateLimitMiddleware``, and
``install_handlers`` for the 429/503 answers.

    limited = RateLimit("10/second", burst=20)

    @app.get("/items", dependencies=[Depends(limited)])
    async def items() -> list[str]: ...

    app.add_middleware(RateLimitMiddleware, limit="100/minute", exempt=["/health"])

``limit`` may also be a callable taking the request (sync or async) and returning the limit(s)
for it, such as the caller's plan (tiers): each chosen limit has its own bucket.

Decisions never block the event loop: an ``AsyncRateLimiter`` is awaited, and a sync
``RateLimiter`` on Redis decides in a worker thread. Only Starlette is imported, so the middleware
also serves plain Starlette apps.
"""

# No ``from __future__ import annotations`` here: FastAPI reads ``RateLimit.__call__``'s
# annotations at runtime, and an instance has no ``__globals__`` to resolve strings against.

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenlimit._config import default_async_limiter
from tokenlimit._decision import Decision
from tokenlimit._errors import BackendError, ConfigTypeError, RateLimitExceeded
from tokenlimit._limiter import AsyncRateLimiter, RateLimiter
from tokenlimit._log import ThrottledLog
from tokenlimit._plan import LimitSpec
from tokenlimit.integrations._common import (
    Policy,
    call_key,
    decide_async,
    rate_limit_headers,
    record_request,
    refused_body,
    response_headers,
    unavailable_body,
)

__all__ = ["RateLimit", "RateLimitMiddleware", "RateLimited", "install_handlers"]

LimitArg = float | LimitSpec  # a chooser here takes the request
KeyFunc = Callable[[Request], str | Awaitable[str | None] | None]
ApiKeyCheck = Callable[[str], Any]  # raw key -> truthy when known (or an awaitable of that)
Limiter = RateLimiter | AsyncRateLimiter
DEFAULT_EXEMPT = ("/health", "/metrics")


class RateLimited(HTTPException):
    """The 429 ``RateLimit`` raises on refusal, with the ``decision`` and its ``retry_after``.

    An ``HTTPException``, so a bare FastAPI app already answers 429 with the headers;
    ``install_handlers`` adds ``retry_after`` to the JSON body.
    """

    def __init__(self, decision: Decision, *, headers: bool = True) -> None:
        fields = dict(response_headers(decision, enabled=headers))
        super().__init__(429, "rate limit exceeded", headers=fields)
        self.decision = decision

    @property
    def retry_after(self) -> float:
        """Seconds until the same cost could be admitted."""
        return self.decision.retry_after


def _check_limiter(limiter: Any) -> Limiter | None:
    """``limiter`` if it is one (None: the default, resolved per request)."""
    if limiter is not None and not isinstance(limiter, (RateLimiter, AsyncRateLimiter)):
        raise ConfigTypeError(
            "limiter", f"must be a RateLimiter or AsyncRateLimiter, not {type(limiter).__name__}"
        )
    return limiter


def _user_id(user: Any) -> Any:
    """The id of an authenticated ``scope["user"]`` (Starlette's AuthenticationMiddleware)."""
    if user is None:
        return None
    try:
        if getattr(user, "is_authenticated", False) is not True:
            return None
    except NotImplementedError:  # Starlette's BaseUser leaves its properties abstract
        return None
    for name in ("identity", "id", "display_name"):
        try:
            value = getattr(user, name, None)
        except NotImplementedError:
            continue
        if value is not None and value != "":
            return value
    return None


async def _identity(policy: Policy, scope: Scope, request: Request | None) -> str:
    """The custom key if it gives one, else API key -> user -> client IP."""
    if policy.key is not None:
        # The middleware passes no ``receive``: a key function must not read the body, which
        # belongs to the app.
        custom = await call_key(policy.key, request if request is not None else Request(scope))
        if custom is not None:
            return custom
    headers = Headers(scope=scope)
    client = scope.get("client")
    # Several X-Forwarded-For lines are one comma-separated list (RFC 9110 5.3); reading only
    # the first would let a client's own line stand in for the one its proxy added.
    forwarded = ", ".join(headers.getlist("x-forwarded-for")) or None
    raw_key = headers.get(policy.api_key_header) if policy.api_key_header else None
    return policy.identity(
        api_key=await policy.avouched_key(raw_key),
        user_id=_user_id(scope.get("user")),
        peer=client[0] if client else None,
        forwarded_for=forwarded,
    )


def _route(scope: Scope) -> str | None:
    """The matched route's template (``/items/{item_id}``), never the raw path; None before
    routing or when nothing matched."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else None


class _Guarded:
    """What the dependency and the middleware share: a policy, a limiter, a failure log."""

    __slots__ = ("_limiter", "_log", "policy")

    def __init__(self, policy: Policy, limiter: Any) -> None:
        self.policy = policy
        self._limiter = _check_limiter(limiter)
        self._log = ThrottledLog()

    def _resolve(self) -> Limiter:
        # Resolved per request, so ``configure()`` may run after the app is built.
        return self._limiter if self._limiter is not None else default_async_limiter()

    async def _decide(self, limiter: Limiter, scope: Scope, request: Request | None) -> Decision:
        """Take the policy's cost for this request; ``BackendError`` in closed mode."""
        key = await _identity(self.policy, scope, request)
        limits = self.policy.limits
        if self.policy.choose is not None:  # tiers: the limits this caller's plan gets
            chooser_request = request if request is not None else Request(scope)
            limits = await self.policy.alimits_for(chooser_request)
        try:
            policy = self.policy
            return await decide_async(limiter, key, limits, policy.cost, shadow=policy.shadow)
        except BackendError as error:
            # The app answers a bare 503, which no framework logs: say why, at most once per
            # interval, so an outage is seen without flooding the log.
            self._log.warning(
                "tokenlimit: storage failed, answering 503 (failure_mode='closed')", error
            )
            raise


class RateLimit(_Guarded):
    """A FastAPI dependency taking tokens per request: ``Depends(RateLimit("10/second"))``.

    Allowed: the rate-limit headers go on the response and the ``Decision`` is the dependency's
    value. Refused: ``RateLimited`` (429). Storage down in closed mode: ``HTTPException(503)``.
    A route that returns its own ``Response`` drops the headers (FastAPI only merges them into
    responses it builds); use ``RateLimitMiddleware`` there.

    ``shadow=True`` (here and on ``RateLimitMiddleware``): decide, count and send the headers as
    usual, but never answer 429; a would-be refusal is a ``Decision`` with ``shadowed=True``.

    Identity (both): ``key(request)`` if given and not None/""; else an API key, only where the
    app vouches for it: ``api_key_header="X-API-Key"`` where authentication runs first, or
    ``api_key_validator(key)`` (sync or async; truthy for a known key, which is hashed); else
    the signed-in user; else the client IP through ``trusted_proxies``.
    """

    __slots__ = ()

    def __init__(
        self,
        limit: LimitArg,
        *,
        burst: int | None = None,
        key: KeyFunc | None = None,
        cost: int = 1,
        limiter: Limiter | None = None,
        trusted_proxies: int | Iterable[str] | None = None,
        headers: bool = True,
        api_key_header: str | None = None,
        ipv6_prefix: int = 64,
        shadow: bool = False,
        api_key_validator: ApiKeyCheck | None = None,
    ) -> None:
        policy = Policy.build(
            limit,
            burst=burst,
            key=key,
            cost=cost,
            trusted_proxies=trusted_proxies,
            headers=headers,
            api_key_header=api_key_header,
            ipv6_prefix=ipv6_prefix,
            shadow=shadow,
            api_key_validator=api_key_validator,
        )
        super().__init__(policy, limiter)

    async def __call__(self, request: Request, response: Response) -> Decision:
        limiter = self._resolve()
        route = _route(request.scope)  # the router has matched it before dependencies run
        try:
            decision = await self._decide(limiter, request.scope, request)
        except BackendError as error:
            record_request(limiter, route, "unavailable")
            raise HTTPException(503, "rate limiter unavailable") from error
        record_request(limiter, route, "allowed" if decision.allowed else "refused")
        if not decision.allowed:
            raise RateLimited(decision, headers=self.policy.headers)
        if self.policy.headers:
            for name, value in rate_limit_headers(decision):
                response.headers[name] = value
        return decision

    def __repr__(self) -> str:
        labels = ", ".join(limit.label for limit in self.policy.limits)
        if self.policy.choose is not None:
            labels = f"chosen by {getattr(self.policy.choose, '__qualname__', self.policy.choose)}"
        return f"RateLimit({labels}, cost={self.policy.cost})"


def _raw(fields: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header fields as ASGI wants them: lower-case byte names, byte values."""
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in fields]


async def _answer(send: Send, status: int, body: bytes, fields: list[tuple[str, str]]) -> None:
    """Send a whole JSON response (the app is never called)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += _raw(fields)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _find_router(app: Any) -> Router | None:
    """The router under ``app``, through the middleware layers (each keeps the next as
    ``.app``, as Starlette's own do); None for an app without one."""
    for _ in range(64):  # a bound, in case layers point back at each other
        if isinstance(app, Router):
            return app
        router = getattr(app, "router", None)  # a Starlette or FastAPI app
        if isinstance(router, Router):
            return router
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class RateLimitMiddleware(_Guarded):
    """Pure ASGI middleware: one default limit for every HTTP request outside ``exempt``.

    ``exempt`` paths match exactly or as a prefix ending at ``/`` (``/metrics`` covers
    ``/metrics/x``, not ``/metricsx``). Lifespan and websocket traffic passes untouched. In a
    Starlette or FastAPI app, a request that matches no route (a 404) is not charged, as in
    Flask; in front of an app without a router every request is.
    """

    __slots__ = ("_router", "app")

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: LimitArg,
        burst: int | None = None,
        key: KeyFunc | None = None,
        cost: int = 1,
        limiter: Limiter | None = None,
        exempt: Iterable[str] | None = DEFAULT_EXEMPT,
        trusted_proxies: int | Iterable[str] | None = None,
        headers: bool = True,
        api_key_header: str | None = None,
        ipv6_prefix: int = 64,
        shadow: bool = False,
        api_key_validator: ApiKeyCheck | None = None,
    ) -> None:
        self.app = app
        self._router = _find_router(app)  # the stack below is built before this layer
        policy = Policy.build(
            limit,
            burst=burst,
            key=key,
            cost=cost,
            exempt=exempt,
            trusted_proxies=trusted_proxies,
            headers=headers,
            api_key_header=api_key_header,
            ipv6_prefix=ipv6_prefix,
            shadow=shadow,
            api_key_validator=api_key_validator,
        )
        super().__init__(policy, limiter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self.policy.is_exempt(scope["path"])
            or not self._routed(scope)
        ):
            await self.app(scope, receive, send)
            return
        limiter = self._resolve()
        try:
            decision = await self._decide(limiter, scope, None)
        except BackendError:
            # 503, not 429: nothing says when to come back, so no Retry-After either.
            record_request(limiter, None, "unavailable")  # before routing: no template known
            await _answer(send, 503, unavailable_body(), [])
            return
        fields = response_headers(decision, enabled=self.policy.headers)
        if not decision.allowed:
            record_request(limiter, None, "refused")
            await _answer(send, 429, refused_body(decision), fields)
            return
        extra = _raw(fields)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                # A route's own RateLimit is the more specific answer: keep its fields alone
                # rather than send two conflicting sets.
                if not any(name.lower() == b"x-ratelimit-limit" for name, _ in headers):
                    message = {**message, "headers": headers + extra}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers if fields else send)
        finally:
            # The router has put the matched route in the (shared) scope by now.
            record_request(limiter, _route(scope), "allowed")

    def _routed(self, scope: Scope) -> bool:
        """False when the app's router has no route for ``scope``: a 404 that costs nothing. A
        route matching all but the method (405) counts as routed."""
        if self._router is None:
            return True
        return any(route.matches(scope)[0] is not Match.NONE for route in self._router.routes)


def install_handlers(app: Starlette, *, headers: bool = True) -> None:
    """Answer ``RateLimited`` and ``RateLimitExceeded`` with 429 JSON, ``BackendError`` with 503.

    ``RateLimitExceeded`` comes from ``rate_limit``/``limiter.limit`` used inside a route; its
    headers follow ``headers``. Call before the app serves its first request.
    """

    async def on_rate_limited(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RateLimited)
        return Response(refused_body(exc.decision), 429, exc.headers, "application/json")

    async def on_exceeded(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RateLimitExceeded)
        fields = dict(response_headers(exc.decision, enabled=headers))
        return Response(refused_body(exc.decision), 429, fields, "application/json")

    async def on_backend_error(request: Request, exc: Exception) -> Response:
        return Response(unavailable_body(), 503, None, "application/json")

    app.add_exception_handler(RateLimited, on_rate_limited)
    app.add_exception_handler(RateLimitExceeded, on_exceeded)
    app.add_exception_handler(BackendError, on_backend_error)
