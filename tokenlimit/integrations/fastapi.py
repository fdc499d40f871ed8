"""FastAPI and Starlette: the ``RateLimit`` dependency, a pure ASGI ``RateLimitMiddleware``, and
``install_handlers`` for the 429/503 answers.

    limited = RateLimit("10/second", burst=20)

    @app.get("/items", dependencies=[Depends(limited)])
    async def items() -> list[str]: ...

    app.add_middleware(RateLimitMiddleware, limit="100/minute", exempt=["/health"])

``limit`` may also be a callable taking the request (sync or async) and returning the limit(s)
for it, such as the caller's plan (tiers). Both also limit WebSocket connections, a token per
handshake: refused before ``accept`` with the 429 response where the server offers the ASGI
``websocket.http.response`` extension, else closed with code 1008. This module reads the ASGI
scope and renders the shared check's verdict, which never blocks the event loop. Only Starlette
is imported, so the middleware also serves plain Starlette apps.

``deduct_when`` sees a ``ResponseInfo`` (``status_code`` and ``headers``): the middleware reads
it off the response as it starts; a dependency cannot see the response, so ``RateLimit`` with
``deduct_when`` is a dependency with ``yield``, which sees what the route raised (an
``HTTPException``'s status, or 500) or else the status it set on the injected ``Response`` or
declared (``status_code=``, else 200).
"""

# No ``from __future__ import annotations`` here: FastAPI reads ``RateLimit.__call__``'s
# annotations at runtime, and an instance has no ``__globals__`` to resolve strings against.

import functools
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, cast

from tokenlimit._config import default_async_limiter
from tokenlimit._decision import Decision
from tokenlimit._errors import BackendError, RateLimitExceeded
from tokenlimit._extras import needs_extra
from tokenlimit._log import ThrottledLog
from tokenlimit.integrations._check import (
    Charge,
    Ledger,
    Limiter,
    RequestFacts,
    Verdict,
    acheck,
    asettle,
    check_limiter,
    check_scope,
    finish,
    merged,
)
from tokenlimit.integrations._common import (
    ApiKeyValidator,
    KeyFunction,
    Policy,
    RequestLimit,
    rate_limit_headers,
    raw_fields,
    raw_rate_limit_headers,
    refused_body,
    response_headers,
    retry_after_seconds,
    unavailable_body,
)

with needs_extra("fastapi", "fastapi", feature=__name__):
    import starlette
    from starlette.applications import Starlette
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException, WebSocketException
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import Response
    from starlette.routing import Match, Router
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
    from starlette.websockets import WebSocket

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "RateLimit",
    "RateLimitMiddleware",
    "RateLimited",
    "ResponseInfo",
    "install_handlers",
]

DEFAULT_EXEMPT = ("/health", "/metrics")
_LEDGER = "tokenlimit.charged"  # scope key: the buckets this request charged
PUBLIC = "tokenlimit"  # scope["state"] key: the request's Decision, ``request.state.tokenlimit``
_DENIAL = "websocket.http.response"  # the ASGI extension for an HTTP answer to a handshake
# Close codes for a handshake refused where no HTTP answer can be sent (RFC 6455 7.4.1).
POLICY_VIOLATION = 1008  # refused: 429's counterpart
INTERNAL_ERROR = 1011  # storage failed (closed mode): 503's counterpart
# Starlette sends the handler's response for an HTTPException raised before a WebSocket's
# accept from 0.41 on; before, it sends nothing, so a dependency closes with a code instead.
_RELEASE = re.match(r"(\d+)\.(\d+)", starlette.__version__)
_HTTP_BEFORE_ACCEPT = _RELEASE is not None and (int(_RELEASE[1]), int(_RELEASE[2])) >= (0, 41)


class ResponseInfo(NamedTuple):
    """What ``deduct_when`` is given in FastAPI and Starlette: the response's status code and
    headers, as far as the middleware or the dependency can see them (never the body)."""

    status_code: int
    headers: Mapping[str, str]


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


def _user_id(user: object) -> object:
    """The id of an authenticated ``scope["user"]`` (Starlette's AuthenticationMiddleware)."""
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


def _template(scope: Scope) -> str | None:
    """The matched route's template (``/items/{item_id}``), never the raw path; None before
    routing or when nothing matched."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else None


class _Guarded:
    """What the dependency and the middleware share: a policy, a limiter, a failure log, and
    reading the request facts off an ASGI scope."""

    __slots__ = ("_api_key_name", "_limiter", "_log", "policy")

    def __init__(self, policy: Policy[Request], limiter: Limiter | None) -> None:
        self.policy = policy
        self._limiter = check_limiter(limiter)
        self._log = ThrottledLog()
        header = policy.api_key_header
        self._api_key_name = header.lower().encode("latin-1") if header else None

    def _resolve(self) -> Limiter:
        # Resolved per request, so ``configure()`` may run after the app is built.
        return self._limiter if self._limiter is not None else default_async_limiter()

    def _facts(self, scope: Scope, request: HTTPConnection | None, *, routed: bool) -> RequestFacts:
        """``routed``: the router has matched the route (a dependency), which names the bucket:
        the method and the path template, ``GET /items/{item_id}`` (``WEBSOCKET /ws`` for a
        WebSocket route). A middleware runs before.
        """
        template = _template(scope) if routed else None
        route = f"{scope.get('method', 'WEBSOCKET')} {template or '*'}" if routed else None
        client = scope.get("client")
        peer = client[0] if client else None
        # One pass over the raw headers, where the policy reads any of them: X-Forwarded-For
        # only matters behind a trusted proxy or a unix socket. Several X-Forwarded-For lines
        # are one comma-separated list (RFC 9110 5.3): reading only the first would let a
        # client's own line stand in for the one its proxy added.
        forwarded: str | None = None
        api_key: str | None = None
        wanted = self._api_key_name
        if wanted is not None or not self.policy.proxies.ignores_header(peer):
            for name, value in scope["headers"]:
                if name == b"x-forwarded-for":
                    line = value.decode("latin-1")
                    forwarded = line if forwarded is None else f"{forwarded}, {line}"
                elif name == wanted and api_key is None:
                    api_key = value.decode("latin-1")
        user = scope.get("user")
        ledger = scope.get(_LEDGER)
        if ledger is None:  # made once per request (an empty one is falsy, so test for None)
            ledger = scope[_LEDGER] = Ledger()
        return RequestFacts(
            request,
            scope["path"],
            peer,
            forwarded or None,
            api_key,
            None if user is None else functools.partial(_user_id, user),
            route,
            template,
            routed,
            ledger,
            scope.get("method"),  # a WebSocket handshake has none
        )


class _RouteLimit(_Guarded):
    """Where ``RateLimit`` instances are made: one given ``deduct_when`` is a
    ``_SettlingRateLimit``. Apart from ``RateLimit``, so that ``inspect.signature(RateLimit)``
    (help, IDEs) reads its ``__init__``."""

    __slots__ = ()

    def __new__(cls, *args: object, deduct_when: object = None, **options: object) -> "Self":
        # With deduct_when the dependency must outlive the route: FastAPI runs a dependency
        # whose __call__ is an async generator to the end of the request.
        if deduct_when is not None and cls is RateLimit:
            return cast("Self", object.__new__(_SettlingRateLimit))
        return object.__new__(cls)


class RateLimit(_RouteLimit):
    """A FastAPI dependency taking tokens per request: ``Depends(RateLimit("10/second"))``.

    Allowed: the rate-limit headers go on the response and the ``Decision`` is the dependency's
    value; ``request.state.tokenlimit`` is the request's decision (with the middleware's and
    other dependencies' limits, the most restrictive). Refused: ``RateLimited`` (429). Storage down
    in closed mode: ``HTTPException(503)``.
    A route that returns its own ``Response`` drops the headers (FastAPI only merges them into
    responses it builds); use ``RateLimitMiddleware`` there.

    Each route has its own bucket (the method and path template), also where one
    ``RateLimit`` guards several routes or a whole router; ``scope="name"`` makes every limit
    of that scope share one bucket instead. The middleware's bucket is never a route's.

    ``methods=["POST"]``: only those methods are checked and charged; ``exempt_when(request)``
    (sync or async) true: neither. The value is then None, and no headers are added.
    ``deduct_when(response)`` (sync or async, given a ``ResponseInfo``): the token is taken
    before the route runs, and given back after it unless this returns true. As a dependency
    cannot see the response, this one then has ``yield``: it sees an ``HTTPException`` the
    route raised (its status; a validation error is 422 from FastAPI 0.118, which raises it
    within the dependencies' exit; any other exception is 500), else the status the route set on
    the injected ``Response`` (``response.status_code = 401``) or its ``status_code=``, else
    200. A route that *returns* a ``Response`` with its own status shows it only to the
    middleware: raise ``HTTPException`` there, or give ``RateLimitMiddleware`` the predicate.

    ``shadow=True`` (here and on ``RateLimitMiddleware``): decide, count and send the headers as
    usual, but never answer 429; a would-be refusal is a ``Decision`` with ``shadowed=True``.

    On a ``@app.websocket`` route it takes a token per handshake (the bucket ``WEBSOCKET
    <template>``): refused, the handshake is answered 429 where the server offers the ASGI
    ``websocket.http.response`` extension (and Starlette is 0.41 or later), else closed with
    code 1008 before ``accept``; ``key`` and a chooser are then given the ``WebSocket``.

    Identity (both): ``key(request)`` if given and not None/""; else an API key, only where the
    app vouches for it: ``api_key_header="X-API-Key"`` where authentication runs first, or
    ``api_key_validator(key)`` (sync or async; truthy for a known key, which is hashed); else
    the signed-in user; else the client IP through ``trusted_proxies``.
    """

    __slots__ = ("scope",)

    def __init__(
        self,
        limit: RequestLimit[Request],
        *,
        burst: int | None = None,
        key: KeyFunction[Request] | None = None,
        cost: int = 1,
        limiter: Limiter | None = None,
        trusted_proxies: int | Iterable[str] | None = None,
        headers: bool = True,
        api_key_header: str | None = None,
        ipv6_prefix: int = 64,
        shadow: bool = False,
        api_key_validator: ApiKeyValidator | None = None,
        scope: str | None = None,
        methods: Iterable[str] | None = None,
        exempt_when: Callable[[Request], object] | None = None,
        deduct_when: Callable[[ResponseInfo], object] | None = None,
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
            methods=methods,
            exempt_when=exempt_when,
            deduct_when=deduct_when,
        )
        self.scope = check_scope(scope)
        super().__init__(policy, limiter)

    # ``HTTPConnection``: FastAPI hands a route's ``Request`` and a WebSocket route's
    # ``WebSocket`` alike.
    async def __call__(self, request: HTTPConnection, response: Response) -> Decision | None:
        facts = self._facts(request.scope, request, routed=True)
        verdict = await acheck(self.policy, facts, self._resolve(), scope=self.scope)
        return self._rendered(request, verdict, response)

    def _rendered(
        self, request: HTTPConnection, verdict: Verdict, response: Response
    ) -> Decision | None:
        """The dependency's value for ``verdict``, its headers set on ``response``; raises
        the 429 or 503 (for a WebSocket handshake that cannot be answered over HTTP, the close
        code instead)."""
        scope = request.scope
        if (
            verdict.status != 200
            and scope["type"] == "websocket"
            and not (_HTTP_BEFORE_ACCEPT and _can_deny(scope))
        ):
            verdict.report(self._log)
            raise WebSocketException(*_close_code(verdict)) from verdict.error
        if verdict.status == 503:
            verdict.report(self._log)
            raise HTTPException(503, "rate limiter unavailable") from verdict.error
        decision = verdict.decision
        if decision is None:  # not checked: another method, or exempt_when said so
            return None
        if verdict.status == 429:
            raise RateLimited(decision, headers=self.policy.headers)
        if not verdict.repeated:
            state = request.scope.setdefault("state", {})
            state[PUBLIC] = merged(state.get(PUBLIC), decision)
        if not self.policy.headers:
            return decision
        if not response.raw_headers:  # FastAPI's fresh sub-response: add the fields in one step
            response.raw_headers.extend(raw_rate_limit_headers(decision))
        else:  # set each: another RateLimit's fields on this route are replaced, not repeated
            fields = response.headers
            for name, value in rate_limit_headers(decision):
                fields[name] = value
        return decision

    def __repr__(self) -> str:
        labels = ", ".join(limit.label for limit in self.policy.limits)
        if self.policy.choose is not None:
            labels = f"chosen by {getattr(self.policy.choose, '__qualname__', self.policy.choose)}"
        return f"RateLimit({labels}, cost={self.policy.cost})"


class _SettlingRateLimit(RateLimit):
    """``RateLimit`` with ``deduct_when``: a dependency with ``yield``, settling its charge
    with what the route's outcome shows (see ``RateLimit``)."""

    __slots__ = ()

    # An async generator where RateLimit's is a coroutine: FastAPI tells them apart.
    async def __call__(  # type: ignore[override]
        self, request: Request, response: Response
    ) -> AsyncIterator[Decision | None]:
        facts = self._facts(request.scope, request, routed=True)
        verdict = await acheck(self.policy, facts, self._resolve(), scope=self.scope)
        decision = self._rendered(request, verdict, response)
        charge = verdict.charge
        if charge is None:  # refused, exempt, or nothing was taken
            yield decision
            return
        try:
            yield decision
        except HTTPException as error:  # the route's, or a later dependency's (a 429 too)
            await self._settle(charge, error.status_code, Headers(error.headers))
            raise
        except Exception as error:
            await self._settle(charge, _status_of(error), Headers())
            raise
        route_status = getattr(request.scope.get("route"), "status_code", None)
        await self._settle(charge, response.status_code or route_status or 200, response.headers)

    async def _settle(self, charge: Charge, status: int, headers: Mapping[str, str]) -> None:
        await asettle(charge, ResponseInfo(status, headers), log=self._log)


def _status_of(error: Exception) -> int:
    """The status FastAPI answers ``error`` (not an ``HTTPException``) with by default."""
    from fastapi.exceptions import RequestValidationError

    return 422 if isinstance(error, RequestValidationError) else 500


async def _answer(
    send: Send, status: int, body: bytes, fields: Sequence[tuple[str, str]], kind: str = "http"
) -> None:
    """Send a whole JSON response (the app is never called); ``kind`` ``"websocket"``: as the
    answer to a WebSocket handshake (the ``websocket.http.response`` extension)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += raw_fields(fields)
    prefix = "" if kind == "http" else "websocket."
    await send({"type": f"{prefix}http.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": body})


def _can_deny(scope: Scope) -> bool:
    """Whether the server takes an HTTP response to a WebSocket handshake (else it is closed
    with a code)."""
    return _DENIAL in (scope.get("extensions") or ())


def _close_code(verdict: Verdict) -> tuple[int, str]:
    """The close code and reason that refuse a WebSocket handshake without an HTTP answer."""
    if verdict.status == 503:
        return INTERNAL_ERROR, "rate limiter unavailable"
    assert verdict.decision is not None
    retry = retry_after_seconds(verdict.decision)
    return POLICY_VIOLATION, f"rate limit exceeded; retry after {retry} s"


def _find_router(app: object) -> Router | None:
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
    """Pure ASGI middleware: one default limit for every HTTP request and WebSocket handshake
    outside ``exempt``.

    ``exempt`` paths match exactly or as a prefix ending at ``/`` (``/metrics`` covers
    ``/metrics/x``, not ``/metricsx``): a router's prefix frees the router, a route's path the
    route (their own ``RateLimit`` still applies). An admitted request's ``Decision`` is
    ``request.state.tokenlimit`` (None on an exempt path). Lifespan traffic passes untouched.
    In a Starlette or FastAPI app, a request that matches no route (a 404) is not charged, as in
    Flask; in front of an app without a router every request is. ``methods``, ``exempt_when``
    and ``deduct_when`` as on ``RateLimit``; here ``deduct_when`` sees every response's real
    status and headers as it starts (an exception that escapes the app is a 500). A WebSocket
    connection takes one token when it connects (its messages take none): refused, the
    handshake is answered 429 where the server offers the ASGI ``websocket.http.response``
    extension, else closed with code 1008 before ``accept``; admitted, the
    ``websocket.accept`` carries the rate-limit headers.
    """

    __slots__ = ("_router", "_wants_request", "app")

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: RequestLimit[Request],
        burst: int | None = None,
        key: KeyFunction[Request] | None = None,
        cost: int = 1,
        limiter: Limiter | None = None,
        exempt: Iterable[str] | None = DEFAULT_EXEMPT,
        trusted_proxies: int | Iterable[str] | None = None,
        headers: bool = True,
        api_key_header: str | None = None,
        ipv6_prefix: int = 64,
        shadow: bool = False,
        api_key_validator: ApiKeyValidator | None = None,
        methods: Iterable[str] | None = None,
        exempt_when: Callable[[Request], object] | None = None,
        deduct_when: Callable[[ResponseInfo], object] | None = None,
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
            methods=methods,
            exempt_when=exempt_when,
            deduct_when=deduct_when,
        )
        super().__init__(policy, limiter)
        self._wants_request = (
            policy.key is not None or policy.choose is not None or policy.exempt_when is not None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "websocket" and self._routed(scope):
                await self._connect(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if not self._routed(scope):
            await self.app(scope, receive, send)
            return
        limiter = self._resolve()
        # A key function, limit chooser or exempt_when takes a Request (without ``receive``:
        # the body is the app's); made only for them.
        request = Request(scope) if self._wants_request else None
        verdict = await acheck(self.policy, self._facts(scope, request, routed=False), limiter)
        if verdict.status != 200:
            verdict.report(self._log)
            await _answer(send, verdict.status, verdict.body, verdict.headers)
            return
        decision = verdict.decision
        scope.setdefault("state", {})[PUBLIC] = decision
        extra = (
            raw_rate_limit_headers(decision) if decision is not None and self.policy.headers else []
        )
        try:
            if verdict.charge is not None:
                await self._settling(verdict.charge, extra, scope, receive, send)
            elif extra:

                async def send_with_headers(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        headers = message.get("headers", ())
                        # A route's own RateLimit is the more specific answer: keep its fields
                        # alone rather than send two conflicting sets.
                        if not any(name.lower() == b"x-ratelimit-limit" for name, _ in headers):
                            message = {**message, "headers": [*headers, *extra]}
                    await send(message)

                await self.app(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send)
        finally:
            if verdict.decision is not None:  # admitted: counted once the route is known
                finish(limiter, scope[_LEDGER], _template(scope))

    async def _settling(
        self,
        charge: Charge,
        extra: list[tuple[bytes, bytes]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """The app, for a request whose charge ``deduct_when`` settles as its response starts
        (given back when the response does not count; the headers then show the bucket as the
        give-back left it)."""
        started = False

        async def send_settled(message: Message) -> None:
            nonlocal extra, started
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                started = True
                info = ResponseInfo(message["status"], Headers(raw=list(headers)))
                after = await asettle(charge, info, log=self._log)
                if after is not None and extra:  # the bucket as the give-back left it
                    extra = raw_rate_limit_headers(after)
                if extra and not any(name.lower() == b"x-ratelimit-limit" for name, _ in headers):
                    message = {**message, "headers": [*headers, *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_settled)
        except Exception:
            if not started:  # Starlette's outermost layer answers 500
                await asettle(charge, ResponseInfo(500, Headers()), log=self._log)
            raise

    async def _connect(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket connection: one token for its handshake, counted once the app has
        answered the handshake (accepted, or closed it)."""
        limiter = self._resolve()
        socket = WebSocket(scope, receive, send) if self._wants_request else None
        verdict = await acheck(self.policy, self._facts(scope, socket, routed=False), limiter)
        if verdict.status != 200:
            verdict.report(self._log)
            if _can_deny(scope):
                await _answer(send, verdict.status, verdict.body, verdict.headers, "websocket")
            else:
                code, reason = _close_code(verdict)
                await send({"type": "websocket.close", "code": code, "reason": reason})
            return
        if verdict.decision is None:  # exempt
            await self.app(scope, receive, send)
            return
        extra = raw_rate_limit_headers(verdict.decision) if self.policy.headers else []
        ledger = scope[_LEDGER]

        async def send_answered(message: Message) -> None:
            if message["type"] == "websocket.accept" and extra:
                headers = message.get("headers") or ()
                if not any(name.lower() == b"x-ratelimit-limit" for name, _ in headers):
                    message = {**message, "headers": [*headers, *extra]}
            if not ledger.counted:
                finish(limiter, ledger, _template(scope))
            await send(message)

        try:
            await self.app(scope, receive, send_answered)
        finally:
            finish(limiter, ledger, _template(scope))  # never answered: counted now

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
