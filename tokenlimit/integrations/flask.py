"""Flask: the ``TokenLimit`` extension (``init_app``, a default limit, per-view limits).

    ext = TokenLimit(limit="100/minute", exempt=["/health"])
    ext.init_app(app)

    @app.get("/search")
    @ext.limit("10/minute")
    def search(): ...

The check runs as a ``before_request`` hook; allowed responses get the rate-limit headers in
``after_request``. Refusals are ``tokenlimit.RateLimitExceeded`` (also when raised by
``@rate_limit`` inside a view) and storage failures ``tokenlimit.BackendError``; the extension's
error handlers answer 429 and 503 with a small JSON body. Register your own handler for either
class after ``init_app`` to render them differently: the headers are still added.

``app.config`` supplies what the constructor leaves out (the constructor wins):
``TOKENLIMIT_URL``, ``TOKENLIMIT_FAILURE_MODE``, ``TOKENLIMIT_EXPECTED_PROCESSES`` and
``TOKENLIMIT_HASH_SECRET`` (else the environment's) (the limiter, when ``limiter=`` is not
given; else the one ``tokenlimit.configure()`` set),
``TOKENLIMIT_LIMIT``, ``TOKENLIMIT_EXEMPT``, ``TOKENLIMIT_TRUSTED_PROXIES``,
``TOKENLIMIT_API_KEY_HEADER``, ``TOKENLIMIT_SHADOW`` and ``TOKENLIMIT_HEADERS``: checked at
``init_app`` and read again at the app's first request, so config loaded after ``init_app``
counts. ``TOKENLIMIT_ENABLED = False`` (read at each request) turns the extension off for the
app. Any other ``TOKENLIMIT_*`` key, or flask-limiter's
``RATELIMIT_*``, is a ``ConfigError`` naming the key to write instead.

The view sees the request's ``Decision`` as ``flask.g.tokenlimit`` (None where the extension
decided nothing).
"""

from __future__ import annotations

import hashlib
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar, cast

from tokenlimit._config import default_sync_limiter
from tokenlimit._decision import Decision
from tokenlimit._errors import BackendError, ConfigError, ConfigTypeError, RateLimitExceeded
from tokenlimit._extras import needs_extra
from tokenlimit._hash_secret import ENV_HASH_SECRET, env_hash_secret, hasher_for
from tokenlimit._limiter import RateLimiter
from tokenlimit._log import ThrottledLog
from tokenlimit._validate import check_expected_processes, check_failure_mode
from tokenlimit.integrations._check import (
    Charge,
    RequestFacts,
    ViewLimit,
    awaited,
    check,
    check_limiter,
    settle,
)
from tokenlimit.integrations._common import (
    ApiKeyValidator,
    KeyFunction,
    Policy,
    RequestLimit,
    rate_limit_headers,
    refused_body,
    retry_after_seconds,
    unavailable_body,
)
from tokenlimit.integrations._incumbents import flask_limiter_message, unknown_message

with needs_extra("flask", "flask", feature=__name__):
    from flask import Blueprint, Flask, Response, current_app, g, request

if TYPE_CHECKING:
    from flask import Request
    from flask.config import Config

__all__ = ["TokenLimit"]

# What ``.limit(...)`` and ``.exempt`` mark: a view function or a Blueprint.
M = TypeVar("M", bound="Callable[..., object] | Blueprint")
T = TypeVar("T")

EXTENSION = "tokenlimit"
DECISION = "tokenlimit_decision"  # flask.g attribute: the Decision behind this response's headers
PUBLIC = "tokenlimit"  # flask.g attribute: the request's Decision, as the docs name it
CHARGE = "_tokenlimit_charge"  # flask.g attribute: what deduct_when settles after the view
ENABLED = "TOKENLIMIT_ENABLED"
# Every app.config key read here: any other TOKENLIMIT_* key is a ConfigError, since a typo in
# one (TOKENLIMIT_LIMITS) would leave the app unlimited without a word.
CONFIG_KEYS = (
    "TOKENLIMIT_URL",
    "TOKENLIMIT_FAILURE_MODE",
    "TOKENLIMIT_EXPECTED_PROCESSES",
    "TOKENLIMIT_HASH_SECRET",
    "TOKENLIMIT_LIMIT",
    "TOKENLIMIT_EXEMPT",
    "TOKENLIMIT_TRUSTED_PROXIES",
    "TOKENLIMIT_API_KEY_HEADER",
    "TOKENLIMIT_SHADOW",
    "TOKENLIMIT_HEADERS",
    ENABLED,
)
# Django's TOKENLIMIT entries that Flask takes as arguments instead.
_ELSEWHERE = {
    "TOKENLIMIT_KEY": "pass key= to TokenLimit(...)",
    "TOKENLIMIT_COST": "pass cost= to TokenLimit(...)",
    "TOKENLIMIT_IPV6_PREFIX": "pass ipv6_prefix= to TokenLimit(...)",
    "TOKENLIMIT_API_KEY_VALIDATOR": "pass api_key_validator= to TokenLimit(...)",
    "TOKENLIMIT_PREFIX": "pass limiter=RateLimiter.from_url(url, prefix=...)",
    "TOKENLIMIT_TIMEOUT": "pass limiter=RateLimiter.from_url(url, timeout=...)",
    "TOKENLIMIT_METRICS": "pass limiter=RateLimiter.from_url(url, metrics=...)",
    "TOKENLIMIT_BREAKER": "pass limiter=RateLimiter.from_url(url, breaker=...)",
}
_settling = threading.Lock()  # one thread reads an app's config again at its first request


_EXEMPT = object()  # marks views decorated with @ext.exempt
# The limiter's options read from app.config, by the parameter a ConfigError names.
_LIMITER_SETTINGS = {
    "url": "TOKENLIMIT_URL",
    "failure_mode": "TOKENLIMIT_FAILURE_MODE",
    "expected_processes": "TOKENLIMIT_EXPECTED_PROCESSES",
    "hash_secret": "TOKENLIMIT_HASH_SECRET",
}


@dataclass(frozen=True, slots=True)
class _State:
    """What one app's config made of the extension: ``app.extensions["tokenlimit"]``, made at
    ``init_app`` and again, replacing it, at the app's first request (``settled``)."""

    extension: TokenLimit
    policy: Policy[Request]  # identity, exempt paths, headers; limits apply when has_default
    has_default: bool
    limiter: RateLimiter | None  # None: the default limiter, looked up per request
    # the limiter's TOKENLIMIT_URL, _FAILURE_MODE, _EXPECTED_PROCESSES and the keyed hash its
    # TOKENLIMIT_HASH_SECRET made (the state, never the secret: this is in the repr)
    source: tuple[object, object, object, object] | None
    settled: bool


class _Options(NamedTuple):
    """What the constructor was given for the policy; ``app.config`` fills the ones left None
    among ``limit``, ``exempt``, ``trusted_proxies``, ``headers``, ``shadow`` and
    ``api_key_header``."""

    limit: RequestLimit[Request] | None
    burst: int | None
    key: KeyFunction[Request] | None
    cost: int
    exempt: str | Iterable[str] | None
    trusted_proxies: int | str | Iterable[str] | None
    headers: bool | None
    api_key_header: str | None
    ipv6_prefix: int
    shadow: bool | None
    api_key_validator: ApiKeyValidator | None
    methods: Iterable[str] | None
    exempt_when: Callable[[Request], object] | None
    deduct_when: Callable[[Response], object] | None


class TokenLimit:
    """Rate limiting for a Flask app: a default limit for every view, per-view limits, exemptions.

    ``limit``: the default limit(s) (a number per second or a string like ``"100/minute"``, each
    with an optional ``burst``, a ``Limit``, or a list), or None to limit only views decorated
    with ``.limit(...)``; here and in ``.limit`` it may be a callable taking the request and
    returning the limit(s) for it, such as the caller's plan (tiers).
    ``key(request)`` chooses the identity (None or "" fall back to the default: an API key, then
    the user id from ``user(request)``, else ``flask.g.user_id``, else Flask-Login's
    ``current_user``, then the client IP through ``trusted_proxies``, a hop count or a list of
    CIDRs). The API key counts only where the app vouches for it: ``api_key_header="X-API-Key"``
    where authentication runs first, or ``api_key_validator(key)`` returning truthy for a known
    key (the header is then ``X-API-Key`` unless named); it is hashed. By default it is off.
    ``exempt``: paths free of the default.
    ``headers=False`` (or ``TOKENLIMIT_HEADERS``) leaves the rate-limit headers out (a 429
    still carries ``Retry-After``).

    The default limit's bucket is the identity's alone; a view's own limit has a bucket per
    endpoint (or one per ``scope`` name, shared), and applies even under an exempt path.

    ``shadow=True`` (or ``TOKENLIMIT_SHADOW``): decide, count and add the headers as usual, but
    never answer 429 (a would-be refusal is a ``Decision`` with ``shadowed=True`` in ``g``);
    ``.limit(shadow=...)`` overrides it for one view.

    ``methods=["POST"]``: the default limit checks and charges only those methods;
    ``exempt_when(request)`` true: the request is neither checked nor charged, and gets no
    headers; ``deduct_when(response)`` (the view's Flask response): the token is taken before
    the view and given back after it unless this returns true. These three are the default
    limit's; ``.limit(...)`` takes its own.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        limit: RequestLimit[Request] | None = None,
        burst: int | None = None,
        limiter: RateLimiter | None = None,
        key: KeyFunction[Request] | None = None,
        cost: int = 1,
        exempt: str | Iterable[str] | None = None,
        trusted_proxies: int | str | Iterable[str] | None = None,
        headers: bool | None = None,
        api_key_header: str | None = None,
        user: Callable[[Request], object] | None = None,  # the user id, or an awaitable of it
        ipv6_prefix: int = 64,
        shadow: bool | None = None,
        api_key_validator: ApiKeyValidator | None = None,
        methods: Iterable[str] | None = None,
        exempt_when: Callable[[Request], object] | None = None,
        deduct_when: Callable[[Response], object] | None = None,
    ) -> None:
        check_limiter(limiter, sync=True)  # an async limiter is a common mistake
        if user is not None and not callable(user):
            raise ConfigTypeError("user", f"must be a callable taking the request, not {user!r}")
        self._limiter = limiter
        self._user = user
        self._options = _Options(
            limit, burst, key, cost, exempt, trusted_proxies, headers, api_key_header,
            ipv6_prefix, shadow, api_key_validator, methods, exempt_when, deduct_when,
        )  # fmt: skip
        # Weak: app factories that define their views per app must not keep old apps' views.
        self._views: weakref.WeakKeyDictionary[
            Callable[..., object], ViewLimit[Request] | object
        ] = weakref.WeakKeyDictionary()
        self._blueprints: dict[str, ViewLimit[Request] | object] = {}  # by blueprint name
        self._log = ThrottledLog()
        self._build(self._options, None)  # fail here, where the options were written
        if app is not None:
            self.init_app(app)

    # -- setup --------------------------------------------------------------------------------
    def init_app(self, app: Flask) -> None:
        """Register the hooks and error handlers on ``app``, checking its ``TOKENLIMIT_*``
        config (read again at its first request)."""
        if EXTENSION in app.extensions:
            raise RuntimeError("a TokenLimit extension is already registered on this app")
        app.extensions[EXTENSION] = self._state(app.config, None)
        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.register_error_handler(RateLimitExceeded, self._refused)
        app.register_error_handler(BackendError, self._unavailable)

    def _state(self, config: Config, earlier: _State | None) -> _State:
        """What ``config`` makes of the extension, each bad key a ConfigError naming it;
        ``earlier`` (init_app's) lends its limiter when the config names the same store."""
        _check_keys(config)
        _enabled(config.get(ENABLED, True))
        policy, has_default = self._build(self._options, config)
        limiter, source = self._limiter, None
        secret = _hash_secret(config, limiter)
        if limiter is None:
            source = (
                config.get("TOKENLIMIT_URL"),
                config.get("TOKENLIMIT_FAILURE_MODE"),
                config.get("TOKENLIMIT_EXPECTED_PROCESSES"),
                hasher_for(secret, "TOKENLIMIT_HASH_SECRET"),  # one object per secret
            )
            if earlier is not None and earlier.source == source:
                limiter = earlier.limiter
            else:
                limiter = _limiter_from(*source[:3], secret)
        return _State(self, policy, has_default, limiter, source, earlier is not None)

    def _settle(self, app: Flask) -> _State:
        """Read ``app``'s config again, once, at its first request: config loaded after
        ``init_app`` (a URL, a limit) counts, and a bad key fails every request until fixed."""
        with _settling:
            state: _State = app.extensions[EXTENSION]
            if state.settled:
                return state
            settled = self._state(app.config, state)
            app.extensions[EXTENSION] = settled
        if state.source is not None and state.limiter not in (None, settled.limiter):
            state.limiter.close()  # made at init_app from a URL the config no longer names
        return settled

    @staticmethod
    def _build(options: _Options, config: Config | None) -> tuple[Policy[Request], bool]:
        from_config: dict[str, str] = {}

        def configured(name: str, given: T) -> T:
            """``given``, or where it is None the app's ``TOKENLIMIT_<NAME>``."""
            setting = f"TOKENLIMIT_{name.upper()}"
            if given is None and config is not None and config.get(setting) is not None:
                from_config[name] = setting
                value: T = config[setting]  # Flask's config holds any value: checked below
                return value
            return given

        limit = configured("limit", options.limit)
        shadow = configured("shadow", options.shadow)
        headers = configured("headers", options.headers)
        try:
            policy: Policy[Request] = Policy.build(
                limit,
                burst=options.burst,
                key=options.key,
                cost=options.cost,
                exempt=configured("exempt", options.exempt),
                trusted_proxies=configured("trusted_proxies", options.trusted_proxies),
                headers=True if headers is None else headers,
                api_key_header=configured("api_key_header", options.api_key_header),
                ipv6_prefix=options.ipv6_prefix,
                shadow=False if shadow is None else shadow,
                api_key_validator=options.api_key_validator,
                methods=options.methods,
                exempt_when=options.exempt_when,
                deduct_when=options.deduct_when,
            )
            return policy, limit is not None
        except ConfigError as error:
            if error.param not in from_config:
                raise
            # Name the setting the bad value came from.
            raise type(error)(from_config[error.param], str(error)) from None

    # -- per-view decorators ------------------------------------------------------------------
    def limit(
        self,
        limit: RequestLimit[Request],
        *,
        burst: int | None = None,
        key: KeyFunction[Request] | None = None,
        cost: int = 1,
        scope: str | None = None,
        shadow: bool | None = None,
        methods: Iterable[str] | None = None,
        exempt_when: Callable[[Request], object] | None = None,
        deduct_when: Callable[[Response], object] | None = None,
    ) -> Callable[[M], M]:
        """Give a view its own limit, replacing the default; its bucket is its own.

        ``key(request)`` chooses the identity for this view (None falls back to the extension's).
        Each endpoint has its own bucket (``route:<endpoint>|<identity>``); views given the
        same ``scope`` share one (``scope:<scope>|<identity>``). ``shadow`` (None: the
        extension's) decides and counts without ever refusing. ``methods``, ``exempt_when``
        and ``deduct_when`` as for the default limit, for this limit only.

        ``ext.limit(...)(blueprint)`` gives every view of a Blueprint (and of the blueprints
        nested in it) this limit, each in a bucket per endpoint unless ``scope`` is given; a
        view's own ``.limit`` or ``.exempt`` wins over its blueprint's.
        """
        rule = ViewLimit(
            limit,
            burst=burst,
            key=key,
            cost=cost,
            scope=scope,
            shadow=shadow,
            headers=None,
            methods=methods,
            exempt_when=exempt_when,
            deduct_when=deduct_when,
        )

        def decorate(view: M) -> M:
            self._mark(view, rule, "limit")
            return view

        return decorate

    def shared_limit(
        self,
        limit: RequestLimit[Request],
        scope: str,
        *,
        burst: int | None = None,
        key: KeyFunction[Request] | None = None,
        cost: int = 1,
        shadow: bool | None = None,
        methods: Iterable[str] | None = None,
        exempt_when: Callable[[Request], object] | None = None,
        deduct_when: Callable[[Response], object] | None = None,
    ) -> Callable[[M], M]:
        """``.limit(limit, scope=scope, ...)``, spelled as flask-limiter's ``shared_limit``:
        every view it decorates draws from one bucket, ``scope:<scope>|<identity>``."""
        return self.limit(
            limit, burst=burst, key=key, cost=cost, scope=scope, shadow=shadow,
            methods=methods, exempt_when=exempt_when, deduct_when=deduct_when,
        )  # fmt: skip

    def exempt(self, view: M) -> M:
        """Free a view, or every view of a Blueprint, from the default limit."""
        self._mark(view, _EXEMPT, "exempt")
        return view

    def _mark(self, view: object, rule: ViewLimit[Request] | object, param: str) -> None:
        if isinstance(view, Blueprint):  # found by name at each request (request.blueprints)
            if view.name in self._blueprints:
                raise ConfigError(param, f"blueprint {view.name!r} has a limit or exemption")
            self._blueprints[view.name] = rule
            return
        if not callable(view):
            raise ConfigTypeError(param, f"decorates a view function or Blueprint, not {view!r}")
        # The view itself is returned unchanged (sync or async alike); the hook finds the mark
        # by the function Flask dispatches to, or one it wraps, whatever the decorator order.
        try:
            if view in self._views:
                raise ConfigError(param, f"{view!r} already has a limit or exemption")
            self._views[view] = rule
        except TypeError:
            raise ConfigTypeError(param, f"cannot mark {view!r} (no weak reference)") from None

    def _rule_for(self, view: Callable[..., object] | None) -> ViewLimit[Request] | object | None:
        while view is not None:
            try:
                found = self._views.get(view)
            except TypeError:  # an unhashable callable
                return None
            if found is not None:
                return found
            view = getattr(view, "__wrapped__", None)
        return None

    # -- request hooks ------------------------------------------------------------------------
    def _before_request(self) -> None:
        endpoint = request.endpoint
        # Like Flask-Limiter: unrouted requests (404/405) and static files are not limited.
        if endpoint is None or endpoint.rpartition(".")[2] == "static":
            setattr(g, PUBLIC, None)
            return
        state: _State = current_app.extensions[EXTENSION]
        if not state.settled:
            state = self._settle(current_app)
        enabled = current_app.config.get(ENABLED, True)
        if enabled is not True and not _enabled(enabled):  # the app's kill switch
            setattr(g, PUBLIC, None)
            return
        rule = self._rule_for(current_app.view_functions.get(endpoint))
        if rule is None and self._blueprints:  # the innermost marked blueprint's
            for name in request.blueprints:
                rule = self._blueprints.get(name)
                if rule is not None:
                    break
        if isinstance(rule, ViewLimit):
            policy, route, scope = rule.policy(state.policy), endpoint, rule.scope
        elif rule is None and state.has_default:
            policy, route, scope = state.policy, None, None
        else:  # exempt, or no limit here
            setattr(g, PUBLIC, None)
            return
        limiter = state.limiter if state.limiter is not None else default_sync_limiter()
        facts = self._facts(state.policy, route)
        verdict = check(policy, facts, limiter, scope=scope, resolve=_resolve)
        if verdict.error is not None:
            raise verdict.error  # the 503 handler logs it
        _keep(verdict.decision)
        if verdict.charge is not None:
            setattr(g, CHARGE, verdict.charge)
        if verdict.status == 429 and verdict.decision is not None:
            raise RateLimitExceeded(verdict.decision)

    def _facts(self, policy: Policy[Request], route: str | None) -> RequestFacts:
        forwarded = request.headers.getlist("X-Forwarded-For")  # several lines: one list
        # Matched before this hook: the template ("/items/<int:item_id>"), never the raw path.
        template = request.url_rule.rule if request.url_rule is not None else None
        return RequestFacts(
            request,
            request.path,
            request.remote_addr,
            ", ".join(forwarded) if forwarded else None,
            _header(request, policy.api_key_header),
            self._user_id,
            route,
            template,
            method=request.method,
        )

    def _user_id(self) -> object:
        if self._user is not None:
            return current_app.ensure_sync(self._user)(request)
        user_id = g.get("user_id")
        if user_id is not None:
            return user_id
        # Flask-Login, when the app uses it (imported, with a LoginManager on this app).
        login = sys.modules.get("flask_login")
        if login is not None and hasattr(current_app, "login_manager"):
            user = login.current_user
            if user is not None and getattr(user, "is_authenticated", False):
                return user.get_id()
        return None

    def _after_request(self, response: Response) -> Response:
        charge: Charge | None = g.pop(CHARGE, None)
        if charge is not None:  # deduct_when: keep the tokens, or give them back
            after = settle(charge, response, resolve=_resolve, log=self._log)
            if after is not None:
                setattr(g, DECISION, after)
        decision: Decision | None = g.get(DECISION)
        state: _State | None = current_app.extensions.get(EXTENSION)
        if decision is None or state is None or not state.policy.headers:
            return response
        if decision.allowed and response.status_code == 429:
            return response  # refused by something else (a handler of yours): do not mix them
        for name, value in rate_limit_headers(decision):
            response.headers[name] = value
        return response

    # -- error handlers -----------------------------------------------------------------------
    def _refused(self, error: RateLimitExceeded) -> Response:
        _keep(error.decision)  # after_request adds the headers
        response = current_app.response_class(
            refused_body(error.decision), status=429, mimetype="application/json"
        )
        response.headers["Retry-After"] = str(retry_after_seconds(error.decision))
        return response

    def _unavailable(self, error: BackendError) -> Response:
        self._log.warning("tokenlimit: storage failed, answering 503", error)
        _keep(None)  # nothing known: no rate-limit headers, no Retry-After
        return current_app.response_class(
            unavailable_body(), status=503, mimetype="application/json"
        )


def _keep(decision: Decision | None) -> None:
    """The request's decision, on ``g``: for the response's headers, and for the view."""
    setattr(g, DECISION, decision)
    setattr(g, PUBLIC, decision)


def _enabled(value: object) -> bool:
    """``TOKENLIMIT_ENABLED``: True or False (None: not set), never a string such as "false",
    which would be truthy."""
    if value is None:
        return True
    if not isinstance(value, bool):
        raise ConfigTypeError(ENABLED, f"must be True or False, not {value!r}")
    return value


def _check_keys(config: Config) -> None:
    """Refuse flask-limiter's ``RATELIMIT_*`` keys (unless flask-limiter runs beside us, as
    during a move) and unknown ``TOKENLIMIT_*`` ones: either would leave the app unlimited."""
    keys = [key for key in config if isinstance(key, str)]
    if "flask_limiter" not in sys.modules:
        theirs = flask_limiter_message(keys)
        if theirs is not None:
            raise ConfigError(*theirs)
    for key in keys:
        if key.startswith("TOKENLIMIT_") and key not in CONFIG_KEYS:
            raise ConfigError(key, unknown_message(key, CONFIG_KEYS, _ELSEWHERE))


def _hash_secret(config: Config, limiter: RateLimiter | None) -> str | bytes | None:
    """The secret for the limiter made from ``config``: ``TOKENLIMIT_HASH_SECRET``, else the
    environment's variable of that name. In config, it must key the
    limiter the extension uses: one made from ``TOKENLIMIT_URL``, or ``limiter=`` keyed alike;
    a secret silently not applied would leave identities hashed without it."""
    if "TOKENLIMIT_HASH_SECRET" not in config:
        return env_hash_secret()  # checked where it is used: the same name as the config key
    secret = config["TOKENLIMIT_HASH_SECRET"]
    hasher = hasher_for(secret, "TOKENLIMIT_HASH_SECRET")
    if limiter is not None and not _same_key(hasher, limiter._hasher):
        raise ConfigError(
            "TOKENLIMIT_HASH_SECRET",
            "does not key limiter=, which has its own: pass hash_secret= to that limiter",
        )
    if limiter is None and config.get("TOKENLIMIT_URL") is None:
        raise ConfigError(
            "TOKENLIMIT_HASH_SECRET",
            "keys the limiter TOKENLIMIT_URL names, and none is set: set TOKENLIMIT_URL, or "
            "give the default limiter its secret (configure(url, hash_secret=...) or the "
            f"{ENV_HASH_SECRET} environment variable)",
        )
    return cast("str | bytes | None", secret)


def _same_key(one: hashlib.blake2b | None, other: hashlib.blake2b | None) -> bool:
    """Whether two keyed hash states hash alike (``digest`` leaves a state as it was)."""
    if one is None or other is None:
        return one is other
    return one is other or one.digest() == other.digest()


def _limiter_from(
    url: object, mode: object, processes: object, secret: str | bytes | None
) -> RateLimiter | None:
    """The limiter ``TOKENLIMIT_URL``, ``TOKENLIMIT_FAILURE_MODE``,
    ``TOKENLIMIT_EXPECTED_PROCESSES`` and the hash secret name (None: no URL)."""
    if url is None:
        return None
    if not isinstance(url, str):
        raise ConfigTypeError("TOKENLIMIT_URL", f"must be a URL string, not {url!r}")
    try:
        failure_mode = check_failure_mode("closed" if mode is None else mode)
        expected = check_expected_processes(failure_mode, processes)
        return RateLimiter.from_url(
            url, failure_mode=failure_mode, expected_processes=expected, hash_secret=secret
        )
    except ConfigError as error:
        setting = _LIMITER_SETTINGS.get(error.param)
        if setting is None:
            raise
        raise type(error)(setting, str(error)) from None


def _resolve(awaitable: Awaitable[object]) -> object:
    """What an async key function, validator or chooser returned, as Flask runs async code."""
    return current_app.ensure_sync(awaited)(awaitable)


def _header(request: Request, name: str | None) -> str | None:
    value = request.headers.get(name) if name else None
    return None if value is None else str(value)
