"""The request check every web integration runs, free of any framework.

A framework module reads ``RequestFacts`` off its request, calls ``check`` (sync code) or
``acheck`` (async code), and renders the ``Verdict``: go on with ``headers``, or answer 429/503
with ``headers`` and ``body``. Decided here, once for every framework: exempt paths; the
identity (a custom key, else an API key the app vouches for, then the user, then the client IP);
the limits (what a chooser picks per request); the bucket; shadow mode; storage failures (503
and a log line, never a password); and the request metrics.

The bucket rule: a limit given ``scope="name"`` charges ``scope:name|<identity>``, one bucket
for every limit of that scope; any other per-route limit charges ``route:<route>|<identity>``,
a bucket per route; an app-wide limit (a middleware, Flask's default) charges the identity
alone. So a middleware and a route never share a bucket, and one request charges one bucket
(the same key and limits) at most once: a second check of it reuses the first decision.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, NamedTuple

from tokenlimit._decision import Decision
from tokenlimit._errors import BackendError, ConfigError, ConfigTypeError
from tokenlimit._limit import Limit
from tokenlimit._limiter import AsyncRateLimiter, RateLimiter
from tokenlimit.integrations._common import (
    Policy,
    custom_identity,
    decide_async,
    decide_sync,
    rate_limit_headers,
    record_request,
    refused_body,
    response_headers,
    unavailable_body,
)

__all__ = [
    "RequestFacts",
    "Verdict",
    "acheck",
    "answer",
    "bucket_key",
    "check",
    "check_scope",
    "unavailable",
]

Limiter = RateLimiter | AsyncRateLimiter
Ledger = dict[tuple[str, tuple[Limit, ...]], Decision]  # (key, limits) -> the decision taken
Resolve = Callable[[Awaitable[Any]], Any]  # runs an awaitable to its result from sync code
STORAGE_FAILED = "tokenlimit: storage failed, answering 503 (failure_mode='closed')"


def _anonymous() -> None:
    return None


class RequestFacts(NamedTuple):
    """What the check needs to know about one request, as its framework module read it.

    A named tuple: immutable, and the cheapest record to build once per request.
    """

    request: Any  # handed to key functions and limit choosers
    path: str  # matched against the policy's exempt paths
    peer: str | None  # the socket peer (None, "" or a path: a unix socket)
    forwarded_for: str | None  # every X-Forwarded-For line, joined with ", "
    api_key: str | None = None  # the raw value of the policy's api_key_header (None: not read)
    # The signed-in user's id (None: anonymous), or an awaitable of it; read only when no API
    # key names the client (it may query a database).
    user: Callable[[], Any] = _anonymous
    route: str | None = None  # what a per-route limit's bucket is named after; None: app-wide
    template: str | None = None  # the matched route's template, a metrics label, never a path
    routed: bool = True  # False before routing (a middleware): the caller counts an admission
    ledger: Ledger | None = None  # the buckets this request charged so far, kept on it


class Verdict(NamedTuple):
    """What to answer: ``status`` 200 goes on (``headers`` join the response), 429 refuses and
    503 reports a storage failure, each with ``headers`` and ``body``."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    decision: Decision | None = None  # None: exempt, or storage failed
    log: str | None = None  # a line for the integration's throttled log
    error: BackendError | None = None  # the storage failure behind a 503
    repeated: bool = False  # this request had charged the bucket already: nothing was taken


PASS = Verdict(200)  # exempt: nothing decided, nothing to add


def check_scope(scope: Any) -> str | None:
    """A ``scope=`` name: None (a bucket per route) or a non-empty string without ``|``."""
    if scope is None:
        return None
    if not isinstance(scope, str):
        raise ConfigTypeError("scope", f"must be a string naming a shared bucket, not {scope!r}")
    if not scope or "|" in scope:
        raise ConfigError("scope", f"must be a non-empty name without '|', not {scope!r}")
    return scope


def bucket_key(identity: str, *, route: str | None, scope: str | None) -> str:
    """The one bucket rule (see the module docstring)."""
    if scope is not None:
        return f"scope:{scope}|{identity}"
    if route is None:
        return identity
    if "|" in route or "%" in route:  # escaped, so that the first "|" ends the route
        route = route.replace("%", "%25").replace("|", "%7C")
    return f"route:{route}|{identity}"


def answer(policy: Policy, decision: Decision, *, repeated: bool = False) -> Verdict:
    """The verdict for ``decision``: go on with the rate-limit headers, or refuse with 429."""
    if decision.allowed:
        headers = rate_limit_headers(decision) if policy.headers else ()
        return Verdict(200, headers, b"", decision, None, None, repeated)
    headers = response_headers(decision, enabled=policy.headers)
    return Verdict(429, headers, refused_body(decision), decision, None, None, repeated)


def unavailable(error: BackendError) -> Verdict:
    """503: the storage failed (closed mode); no Retry-After, since nobody knows when."""
    return Verdict(503, (), unavailable_body(), None, STORAGE_FAILED, error)


Steps = Generator[Awaitable[Any], Any, Verdict]


def _steps(
    policy: Policy, facts: RequestFacts, limiter: Limiter, scope: str | None, asynchronous: bool
) -> Steps:
    """The check, once for sync and async code: it yields each awaitable it meets (an async key
    function, validator, user or chooser, an async decision) and the shell sends back its
    result, by awaiting it or through the framework's way of running it from sync code."""
    request, path, peer, forwarded_for, api_key, user, route, template, routed, ledger = facts
    if policy.exempt and policy.is_exempt(path):
        return PASS
    identity = None
    if policy.key is not None:
        named = policy.key(request)
        if inspect.isawaitable(named):
            named = yield named
        identity = custom_identity(named)
    if identity is None:
        if api_key and policy.api_key_validator is not None:  # only a key the app knows counts
            known = policy.api_key_validator(api_key)
            if inspect.isawaitable(known):
                known = yield known
            api_key = api_key if known else None
        user_id = None
        if not api_key:
            user_id = user()
            if inspect.isawaitable(user_id):
                user_id = yield user_id
        identity = policy.identity(
            api_key=api_key, user_id=user_id, peer=peer, forwarded_for=forwarded_for
        )
    limits = policy.limits
    if policy.choose is not None:  # tiers: the limits this caller's plan gets
        if asynchronous or inspect.iscoroutinefunction(policy.choose):
            limits = yield policy.alimits_for(request)
        else:
            limits = policy.limits_for(request)
    key = bucket_key(identity, route=route, scope=scope)
    if ledger is not None:
        earlier = ledger.get((key, limits))
        if earlier is not None:
            return answer(policy, earlier, repeated=True)
    try:
        if asynchronous:
            decision = yield decide_async(limiter, key, limits, policy.cost, shadow=policy.shadow)
        else:
            decision = decide_sync(limiter, key, limits, policy.cost, shadow=policy.shadow)
    except BackendError as error:
        record_request(limiter, template, "unavailable")
        return unavailable(error)
    if ledger is not None:
        ledger[(key, limits)] = decision
    if not decision.allowed:
        record_request(limiter, template, "refused")
    elif routed:
        record_request(limiter, template, "allowed")
    return answer(policy, decision)


def check(
    policy: Policy,
    facts: RequestFacts,
    limiter: Limiter,
    *,
    scope: str | None = None,
    resolve: Resolve,
) -> Verdict:
    """Check one request from sync code (a ``RateLimiter``); ``resolve`` runs what an async key
    function, validator, user reader or chooser returns, as the framework runs async code."""
    steps = _steps(policy, facts, limiter, scope, asynchronous=False)
    try:
        pending = next(steps)
        while True:
            pending = steps.send(resolve(pending))
    except StopIteration as done:
        verdict: Verdict = done.value
        return verdict


async def acheck(
    policy: Policy, facts: RequestFacts, limiter: Limiter, *, scope: str | None = None
) -> Verdict:
    """Check one request from async code; a sync ``RateLimiter`` on a network store decides in
    a worker thread, so the event loop never waits on a socket."""
    steps = _steps(policy, facts, limiter, scope, asynchronous=True)
    try:
        pending = next(steps)
        while True:
            try:
                result = await pending
            except BackendError as error:  # the decision's: the check answers 503
                pending = steps.throw(error)
            else:
                pending = steps.send(result)
    except StopIteration as done:
        verdict: Verdict = done.value
        return verdict
