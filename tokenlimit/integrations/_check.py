"""The request check every web integration runs, free of any framework.

A framework module reads ``RequestFacts`` off its request, calls ``check`` (sync code) or
``acheck`` (async code), and renders the ``Verdict``: go on with ``headers``, or answer 429/503
with ``headers`` and ``body``. Decided here, once for every framework: exempt paths, methods
and ``exempt_when``; the identity (a custom key, else an API key the app vouches for, then the
user, then the client IP); the limits (what a chooser picks per request); the bucket; shadow
mode; storage failures (503 and a log line, never a password); the request metrics; and, with
``deduct_when``, the ``Charge`` the framework settles once the response is known (``settle``,
``asettle``): the tokens are taken before the view runs, so concurrent requests can never all
pass, and given back when the response does not count.

The request metrics count each request once, with its outcome: a refusal or a storage failure
when a check meets it; an admission at the end, by the outermost layer that sees the end (a
middleware; Django's view decorator; a check that is the only one), never by a check inside it.

The bucket rule: a limit given ``scope="name"`` charges ``scope:name|<identity>``, one bucket
for every limit of that scope; any other per-route limit charges ``route:<route>|<identity>``,
a bucket per route; an app-wide limit (a middleware, Flask's default) charges the identity
alone. So a middleware and a route never share a bucket, and one request charges one bucket
(the same key and limits) at most once: a second check of it reuses the first decision.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from tokenlimit._decision import Decision
from tokenlimit._errors import BackendError, ConfigError, ConfigTypeError
from tokenlimit._limit import Limit
from tokenlimit._limiter import AsyncRateLimiter, RateLimiter
from tokenlimit._log import ThrottledLog
from tokenlimit._plan import LimitSpec
from tokenlimit.integrations._common import (
    Policy,
    RequestT,
    ResponsePredicate,
    custom_identity,
    decide_async,
    decide_sync,
    held_tokens,
    record_request,
    refund_async,
    refund_sync,
    refused_body,
    response_headers,
    unavailable_body,
)

__all__ = [
    "Charge",
    "Ledger",
    "Limiter",
    "RequestFacts",
    "Verdict",
    "ViewLimit",
    "acheck",
    "answer",
    "asettle",
    "awaited",
    "bucket_key",
    "check",
    "check_limiter",
    "check_scope",
    "combined",
    "finish",
    "merged",
    "settle",
    "tally",
    "unavailable",
]

Limiter = RateLimiter | AsyncRateLimiter
Resolve = Callable[[Awaitable[object]], object]  # runs an awaitable to its result from sync code
T = TypeVar("T")
# A bare 503 is logged by no framework: say why (throttled, so an outage does not flood the log).
STORAGE_FAILED = "tokenlimit: storage failed, answering 503 (failure_mode='closed')"
REFUND_FAILED = "tokenlimit: storage failed giving tokens back (deduct_when): the charge stands"


class Ledger(dict[tuple[str, tuple[Limit, ...]], Decision]):
    """What one request did so far, kept on it: the buckets it charged, (key, limits) -> the
    decision taken, and its count in the request metrics. Made per request, so without an
    ``__init__``: the flags are class defaults until set."""

    counted: str | None = None  # the result counted for the request (None: not counted yet)
    deferred: bool = False  # an outer layer admitted it and counts it at the end (finish)


def tally(limiter: object, ledger: Ledger | None, route: str | None, result: str) -> None:
    """Count the request under ``result``, once: only a refusal or failure after a counted
    admission counts again (several checks that see no end, and no outer layer)."""
    if ledger is not None:
        counted = ledger.counted
        if counted is not None and (counted != "allowed" or result == "allowed"):
            return
        ledger.counted = result
    record_request(limiter, route, result)


def finish(limiter: object, ledger: Ledger | None, route: str | None) -> None:
    """The end of a request an outer layer admitted: count it as admitted, unless a check
    inside counted it already (a refusal, or an admission)."""
    tally(limiter, ledger, route, "allowed")


class RequestFacts(NamedTuple):
    """What the check needs to know about one request, as its framework module read it.

    A named tuple: immutable, and the cheapest record to build once per request.
    """

    # The framework's request, handed to the policy's key function and limit chooser, which
    # take the policy's RequestT. Left untyped: a NamedTuple cannot be generic before Python
    # 3.11 (the project supports 3.10), so the framework module building both ties the two.
    request: Any
    path: str  # matched against the policy's exempt paths
    peer: str | None  # the socket peer (None, "" or a path: a unix socket)
    forwarded_for: str | None  # every X-Forwarded-For line, joined with ", "
    api_key: str | None = None  # the raw value of the policy's api_key_header (None: not read)
    # Reads the signed-in user's id (None: anonymous), or an awaitable of it; called only when
    # no API key names the client (it may query a database). None: nobody signs in here.
    user: Callable[[], object] | None = None
    route: str | None = None  # what a per-route limit's bucket is named after; None: app-wide
    template: str | None = None  # the matched route's template, a metrics label, never a path
    # False: the caller sees the request's end (a middleware, a view decorator) and counts an
    # admission then (finish); True: an admission is counted now, unless an outer layer will.
    routed: bool = True
    ledger: Ledger | None = None  # what this request charged and counted so far, kept on it
    method: str | None = None  # upper case, as every framework gives it; for ``methods=``


class Charge(NamedTuple):
    """What an admitted request took where the policy has ``deduct_when``: given back by
    ``settle``/``asettle`` when ``deduct_when(response)`` is false."""

    limiter: Limiter
    key: str
    limits: tuple[Limit, ...]
    cost: int
    deduct_when: ResponsePredicate


class Verdict(NamedTuple):
    """What to answer: ``status`` 200 goes on (the framework module adds the rate-limit fields
    of ``decision``), 429 refuses and 503 reports a storage failure, each with ``headers`` and
    ``body``."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    decision: Decision | None = None  # None: exempt, or storage failed
    log: str | None = None  # a line for the integration's throttled log
    error: BackendError | None = None  # the storage failure behind a 503
    repeated: bool = False  # this request had charged the bucket already: nothing was taken
    charge: Charge | None = None  # to settle after the response (only with deduct_when)

    def report(self, log: ThrottledLog) -> None:
        """Write the log line, if any, through the integration's throttled log."""
        if self.log is not None and self.error is not None:
            log.warning(self.log, self.error)


PASS = Verdict(200)  # exempt: nothing decided, nothing to add


async def awaited(awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result: what a framework's sync-from-async bridge runs."""
    return await awaitable


def check_limiter(limiter: object, *, sync: bool = False) -> Limiter | None:
    """``limiter`` if it is one an integration can use (None: the default, looked up per
    request); ``sync``: only a ``RateLimiter`` (an async one is a common mistake there)."""
    kinds = RateLimiter if sync else (RateLimiter, AsyncRateLimiter)
    if limiter is not None and not isinstance(limiter, kinds):
        wanted = "a sync RateLimiter" if sync else "a RateLimiter or AsyncRateLimiter"
        raise ConfigTypeError("limiter", f"must be {wanted}, not {type(limiter).__name__}")
    return limiter


def check_scope(scope: object) -> str | None:
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


def answer(
    policy: Policy[RequestT],
    decision: Decision,
    *,
    repeated: bool = False,
    charge: Charge | None = None,
) -> Verdict:
    """The verdict for ``decision``: go on, or refuse with 429 and its headers. An admission
    carries no header fields: each framework module renders them from ``decision`` when
    ``policy.headers`` says so, in the form it sends (Flask and Django at the response, ASGI
    as bytes), so no request pays for a form its framework does not send."""
    if decision.allowed:
        return Verdict(200, (), b"", decision, None, None, repeated, charge)
    headers = response_headers(decision, enabled=policy.headers)
    return Verdict(429, headers, refused_body(decision), decision, None, None, repeated)


def combined(decisions: Sequence[Decision]) -> Decision:
    """Several checks' decisions on one request as one for its headers: the most restrictive
    (on refusal the longest wait), with every limit listed."""
    if len(decisions) == 1:
        return decisions[0]
    parts = tuple(part for d in decisions for part in (d.details or (d,)))
    refused = [d for d in decisions if not d.allowed]
    if refused:
        worst = max(refused, key=lambda d: d.retry_after)
    else:
        worst = min(decisions, key=lambda d: (d.remaining, -d.reset_after))
    return dataclasses.replace(worst, details=parts)


def merged(earlier: Decision | None, decision: Decision) -> Decision:
    """The request's decision so far (``earlier``, None for none) with ``decision`` added:
    what a framework shows the view (Flask's ``g.tokenlimit``, Django's ``request.tokenlimit``,
    Starlette's ``request.state.tokenlimit``). ``combined`` of all of them, one at a time."""
    return decision if earlier is None else combined((earlier, decision))


def unavailable(error: BackendError) -> Verdict:
    """503: the storage failed (closed mode); no Retry-After, since nobody knows when."""
    return Verdict(503, (), unavailable_body(), None, STORAGE_FAILED, error)


# The check yields each awaitable it meets and is sent back its result: an identity, a
# validator's answer, a user id, limits or a Decision, one type per yield, which the one send
# type of a Generator cannot tell apart.
Steps = Generator[Awaitable[object], Any, Verdict]


def _is_async(function: Callable[..., object]) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    call = type(function).__call__
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


def _steps(
    policy: Policy[RequestT],
    facts: RequestFacts,
    limiter: Limiter,
    scope: str | None,
    asynchronous: bool,
) -> Steps:
    """The check, once for sync and async code: it yields each awaitable it meets (an async key
    function, validator, user or chooser, an async decision) and the shell sends back its
    result, by awaiting it or through the framework's way of running it from sync code."""
    request, path, peer, forwarded_for, api_key, user, route, template, routed, ledger, method = (
        facts
    )
    if policy.exempt and policy.is_exempt(path):
        return PASS
    if policy.methods is not None and method not in policy.methods:
        return PASS
    if policy.exempt_when is not None:
        exempt = policy.exempt_when(request)
        if inspect.isawaitable(exempt):
            exempt = yield exempt
        if exempt:
            return PASS
    identity = None
    if policy.key is not None:
        named = policy.key(request)
        if type(named) is not str and inspect.isawaitable(named):
            named = yield named
        identity = custom_identity(named)
    if identity is None:
        if api_key and policy.api_key_validator is not None:  # only a key the app knows counts
            known = policy.api_key_validator(api_key)
            if inspect.isawaitable(known):
                known = yield known
            api_key = api_key if known else None
        user_id = None
        if not api_key and user is not None:
            user_id = user()
            if inspect.isawaitable(user_id):
                user_id = yield user_id
        identity = policy.identity(
            api_key=api_key, user_id=user_id, peer=peer, forwarded_for=forwarded_for
        )
    limits = policy.limits
    if policy.choose is not None:  # tiers: the limits this caller's plan gets
        if asynchronous or _is_async(policy.choose):  # sync code: resolved by the shell
            limits = yield policy.alimits_for(request)
        else:
            limits = policy.limits_for(request)
    key = bucket_key(identity, route=route, scope=scope)
    if ledger:  # (empty on a request's first check, as most are: no lookup)
        earlier = ledger.get((key, limits))
        if earlier is not None:
            return answer(policy, earlier, repeated=True)
    decision: Decision  # also what the yield below is sent back
    try:
        if asynchronous:
            held = held_tokens(limiter, key, limits, policy.cost) if limits[0].lease else None
            if held is None:
                held = yield decide_async(limiter, key, limits, policy.cost, shadow=policy.shadow)
            decision = held
        else:
            decision = decide_sync(limiter, key, limits, policy.cost, shadow=policy.shadow)
    except BackendError as error:
        tally(limiter, ledger, template, "unavailable")
        return unavailable(error)
    if ledger is not None:
        ledger[(key, limits)] = decision
    if not decision.allowed:
        tally(limiter, ledger, template, "refused")
    elif not routed:
        if ledger is not None:
            ledger.deferred = True
    elif ledger is None or not ledger.deferred:
        tally(limiter, ledger, template, "allowed")
    deduct_when = policy.deduct_when
    # An admission that took tokens owes at least one interval (reset_after > 0); a fail-open
    # one, or a shadowed would-be refusal, took nothing and must give nothing back.
    if deduct_when is None or not decision.allowed or decision.shadowed:
        return answer(policy, decision)
    if decision.reset_after <= 0:
        return answer(policy, decision)
    return answer(policy, decision, charge=Charge(limiter, key, limits, policy.cost, deduct_when))


def check(
    policy: Policy[RequestT],
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
    policy: Policy[RequestT], facts: RequestFacts, limiter: Limiter, *, scope: str | None = None
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


def settle(
    charge: Charge, response: object, *, resolve: Resolve, log: ThrottledLog
) -> Decision | None:
    """After the response, from sync code: the tokens stay taken if ``deduct_when(response)`` is
    true, else they go back. The bucket's state after a give-back, for the response's headers;
    None to keep the admission's (the charge stands; or storage failed: logged, never raised;
    or the bucket is still empty, as a ``hold_back`` may leave it)."""
    counts = charge.deduct_when(response)
    if inspect.isawaitable(counts):
        counts = resolve(counts)
    if counts:
        return None
    try:
        after = refund_sync(charge.limiter, charge.key, charge.limits, charge.cost)
    except BackendError as error:
        log.warning(REFUND_FAILED, error)
        return None
    return after if after.allowed else None


async def asettle(charge: Charge, response: object, *, log: ThrottledLog) -> Decision | None:
    """``settle`` from async code: ``deduct_when`` may be a coroutine function."""
    counts = charge.deduct_when(response)
    if inspect.isawaitable(counts):
        counts = await counts
    if counts:
        return None
    try:
        after = await refund_async(charge.limiter, charge.key, charge.limits, charge.cost)
    except BackendError as error:
        log.warning(REFUND_FAILED, error)
        return None
    return after if after.allowed else None


class ViewLimit(Generic[RequestT]):
    """A limit written on one view (Flask's ``@ext.limit``, Django's ``@ratelimit``): checked
    where it is written; ``policy(app)`` adds the app's identity options, once per app policy.
    ``None`` for ``shadow`` or ``headers`` means the app's; the view's ``key``, where it names
    no identity, falls back to the app's, then to the default identity. ``methods``,
    ``exempt_when`` and ``deduct_when`` are the view's own (the app's do not apply to it)."""

    __slots__ = ("_cache", "_own", "_spec", "headers", "scope", "shadow")

    def __init__(
        self,
        limit: float | LimitSpec,
        *,
        burst: int | None,
        key: Callable[[RequestT], object] | None,
        cost: int,
        scope: str | None,
        shadow: bool | None,
        headers: bool | None,
        methods: Iterable[str] | None = None,
        exempt_when: Callable[[RequestT], object] | None = None,
        deduct_when: ResponsePredicate | None = None,
    ) -> None:
        if headers is not None and not isinstance(headers, bool):
            raise ConfigTypeError("headers", f"must be True, False or None, not {headers!r}")
        if shadow is not None and not isinstance(shadow, bool):
            raise ConfigTypeError("shadow", f"must be True, False or None, not {shadow!r}")
        # Fail where the view is written; what this checks of the view's own options is kept.
        self._own: Policy[RequestT] = Policy.build(
            limit,
            burst=burst,
            key=key,
            cost=cost,
            methods=methods,
            exempt_when=exempt_when,
            deduct_when=deduct_when,
        )
        self.scope = check_scope(scope)
        self.shadow = shadow
        self.headers = headers
        self._spec = (limit, burst, key, cost)
        self._cache: tuple[Policy[RequestT], Policy[RequestT]] | None = None

    def policy(self, app: Policy[RequestT]) -> Policy[RequestT]:
        """This view's policy under ``app``'s identity options."""
        cached = self._cache
        if cached is not None and cached[0] is app:
            return cached[1]
        limit, burst, key, cost = self._spec
        if key is not None and app.key is not None:
            key = _FirstKey(key, app.key)
        policy = Policy.build(
            limit,
            burst=burst,
            key=app.key if key is None else key,
            cost=cost,
            trusted_proxies=app.proxies,
            headers=app.headers if self.headers is None else self.headers,
            api_key_header=app.api_key_header,
            ipv6_prefix=app.ipv6_prefix,
            shadow=app.shadow if self.shadow is None else self.shadow,
            api_key_validator=app.api_key_validator,
            methods=self._own.methods,
            exempt_when=self._own.exempt_when,
            deduct_when=self._own.deduct_when,
        )
        self._cache = (app, policy)
        return policy


class _FirstKey(Generic[RequestT]):
    """The first identity that one of several key functions names; an awaitable of it once one
    of them is async (then the rest are awaited too)."""

    __slots__ = ("functions",)

    def __init__(self, *functions: Callable[[RequestT], object]) -> None:
        self.functions = functions

    def __call__(self, request: RequestT) -> object:
        for index, function in enumerate(self.functions):
            named = function(request)
            if inspect.isawaitable(named):
                return self._rest(named, request, index + 1)
            if custom_identity(named) is not None:
                return named
        return None

    async def _rest(self, pending: Awaitable[object], request: RequestT, start: int) -> object:
        named = await pending
        for function in self.functions[start:]:
            if custom_identity(named) is not None:
                break
            named = function(request)
            if inspect.isawaitable(named):
                named = await named
        return named
