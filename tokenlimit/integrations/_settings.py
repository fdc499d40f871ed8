"""The ``TOKENLIMIT`` settings dict (Django's ``settings.TOKENLIMIT``), free of the framework:
one ``Problem`` per bad entry, each with its check id, for the framework to report its own way
(Django's system checks), and the ``Settings`` a valid dict makes: the limiters and policies.

The store: ``URL``, else the ``TOKENLIMIT_URL`` environment variable (as ``rate_limit``'s
default limiter reads it), else ``memory://`` (per process: W002 says so). The hash secret
likewise: ``HASH_SECRET``, else ``TOKENLIMIT_HASH_SECRET``, else none (unkeyed hashing).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pkgutil
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

from tokenlimit._base import DEFAULT_PREFIX, DEFAULT_TIMEOUT
from tokenlimit._breaker import Breaker, check_breaker
from tokenlimit._config import limiter_pair
from tokenlimit._errors import ConfigError, ConfigTypeError
from tokenlimit._hash_secret import ENV_HASH_SECRET, env_hash_secret, hasher_for
from tokenlimit._limit import Limit, coerce_limits
from tokenlimit._log import ThrottledLog
from tokenlimit._metrics import MetricsSink
from tokenlimit._plan import Chooser
from tokenlimit._url import parse_url
from tokenlimit._validate import (
    check_deadline,
    check_expected_processes,
    check_failure_mode,
    check_prefix,
)
from tokenlimit.integrations._common import (
    Policy,
    TrustedProxies,
    check_methods,
    check_predicate,
)
from tokenlimit.integrations._incumbents import DJANGO_RATELIMIT

__all__ = ["Options", "Problem", "Settings", "SettingsError", "problems", "read"]


class Problem(NamedTuple):
    """One thing wrong with the settings, as a system check reports it."""

    id: str  # "tokenlimit.E003"
    message: str
    hint: str | None = None
    serious: bool = True  # an error; False: a warning


@dataclasses.dataclass(frozen=True)
class Options:
    """``settings.TOKENLIMIT``, validated."""

    url: str = "memory://"
    limits: tuple[Limit, ...] | Chooser | None = None  # or a chooser taking the request (tiers)
    key: Callable[..., object] | None = None  # takes the request
    exempt: tuple[str, ...] = ()
    proxies: TrustedProxies = dataclasses.field(default_factory=TrustedProxies)
    failure_mode: str = "closed"
    expected_processes: int | None = None  # with failure_mode "local" (required there)
    headers: bool = True
    prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT
    api_key_header: str | None = None  # None: API keys are no identity (unless validated)
    ipv6_prefix: int = 64
    metrics: MetricsSink | None = None
    shadow: bool = False
    api_key_validator: Callable[[str], object] | None = None
    enabled: bool = True  # False: the middleware, decorator and throttles check nothing
    methods: frozenset[str] | None = None  # the middleware's only
    exempt_when: Callable[..., object] | None = None  # takes the request; the middleware's only
    deduct_when: Callable[..., object] | None = None  # takes the response; the middleware's only
    breaker: Breaker | None = dataclasses.field(default_factory=Breaker)  # None: off
    # keys the identity hash; out of the repr, which a debug page or a log may show
    hash_secret: str | bytes | None = dataclasses.field(default=None, repr=False)


class SettingsError(ValueError):
    """The settings cannot work; the message lists each problem with its check id."""


class Settings:
    """What valid settings make: the limiter twins on one URL (sync code decides through
    ``sync``, async code through ``async_``: one store for ``memory://``), the identity options
    a view's own limit adds its own to (``base``), the middleware's policy (None without
    ``LIMIT``), and the throttled log of storage failures answered 503."""

    def __init__(self, raw: object) -> None:
        options, found = read(raw)
        errors = [problem for problem in found if problem.serious]
        if errors:
            raise SettingsError("; ".join(f"{p.message} ({p.id})" for p in errors))
        limiter_options = {
            "prefix": options.prefix,
            "timeout": options.timeout,
            "failure_mode": options.failure_mode,
            "expected_processes": options.expected_processes,
            "metrics": options.metrics,
            "breaker": options.breaker or False,
            "hash_secret": options.hash_secret,
        }
        try:
            self.sync, self.async_ = limiter_pair(options.url, limiter_options)
        except ValueError as error:  # a URL the scheme check let through (a bad port, ...)
            raise SettingsError(f"settings.TOKENLIMIT['URL']: {error} (tokenlimit.E002)") from error
        identity = functools.partial(
            Policy.build,
            key=options.key,
            exempt=options.exempt,
            trusted_proxies=options.proxies,
            headers=options.headers,
            api_key_header=options.api_key_header,
            ipv6_prefix=options.ipv6_prefix,
            shadow=options.shadow,
            api_key_validator=options.api_key_validator,
        )
        self.base = identity(None)
        self.enabled = options.enabled
        self.policy = (
            None
            if options.limits is None
            else identity(
                options.limits,
                methods=options.methods,
                exempt_when=options.exempt_when,
                deduct_when=options.deduct_when,
            )
        )
        self.log = ThrottledLog()

    def close(self) -> None:
        # The async twin's clients close with their event loops (LoopLocalBackend).
        self.sync.close()


def _key_function(value: object, param: str = "key") -> Callable[..., object]:
    """``KEY``: a dotted path to a callable (or the callable itself)."""
    function: object = pkgutil.resolve_name(value) if isinstance(value, str) else value
    if not callable(function):
        raise ConfigTypeError(param, f"{value!r} is not callable")
    return function


def _api_key_validator(value: object) -> Callable[..., object] | None:
    """``API_KEY_VALIDATOR``: a dotted path to ``key -> truthy when known`` (or the callable)."""
    return None if value is None else _key_function(value, "api_key_validator")


def _predicate(param: str, takes: str) -> Callable[[object], Callable[..., object] | None]:
    """A validator for ``EXEMPT_WHEN``/``DEDUCT_WHEN``: a dotted path to a callable of one
    argument, ``takes`` (or the callable itself), or None."""

    def validate(value: object) -> Callable[..., object] | None:
        if value is None:
            return None
        return check_predicate(param, _key_function(value, param), takes)

    return validate


def _limit_setting(value: object) -> tuple[Limit, ...] | Chooser:
    """``LIMIT``: the limit(s), or a callable taking the request and choosing them (tiers),
    given itself or as a dotted path."""
    if not callable(value):
        try:
            return coerce_limits(value)
        except ConfigError:
            if not (isinstance(value, str) and _DOTTED.match(value)):
                raise
        value = _key_function(value, "limit")
    # Taken as the chooser it is named as: what it picks is checked at each request.
    return cast("Chooser", value)


def _hash_secret(value: object) -> object:
    """``HASH_SECRET``: a str or bytes of at least 16 bytes, or None (unkeyed hashing)."""
    hasher_for(value)
    return value


def _enabled(value: object) -> bool:
    """``ENABLED``: True or False only (a string such as "false" is truthy)."""
    if not isinstance(value, bool):
        raise ConfigTypeError("enabled", f"must be True or False, not {value!r}")
    return value


def _breaker_setting(value: object) -> Breaker | None:
    """``BREAKER``: True, False, a ``tokenlimit.Breaker``, or a dict of its fields
    (``{"FAILURES": 5, "COOL_DOWN": 0.5, "MAX_COOL_DOWN": 30}``)."""
    if not isinstance(value, dict):
        return check_breaker(value)
    fields = {"FAILURES": "failures", "COOL_DOWN": "cool_down", "MAX_COOL_DOWN": "max_cool_down"}
    unknown = sorted(str(name) for name in value if name not in fields)
    if unknown:
        raise ConfigError("breaker", f"unknown entries {unknown}; known: {', '.join(fields)}")
    try:
        return Breaker(**{fields[name]: field for name, field in value.items()})
    except ConfigError as error:  # names the field: "cool_down: must be > 0, got 0"
        raise ConfigError("breaker", str(error)) from None


_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")  # "myapp.plans.limits_for"


def _metrics_sink(value: object) -> MetricsSink | None:
    """``METRICS``: a dotted path to a ``MetricsSink`` instance (or the instance itself)."""
    sink: object = pkgutil.resolve_name(value) if isinstance(value, str) else value
    if sink is not None and (isinstance(sink, type) or not isinstance(sink, MetricsSink)):
        raise ConfigTypeError(
            "metrics", f"{value!r} is not a MetricsSink (record_decision() and record_error())"
        )
    return sink


# setting -> (option, check id, validator). A validator takes whatever the settings hold and
# checks it at run time (some say which spellings they accept: a wrong one is an error there).
_FIELDS: dict[str, tuple[str, str, Callable[[Any], object]]] = {
    "URL": ("url", "tokenlimit.E002", lambda v: parse_url(v)[1]),
    "LIMIT": ("limits", "tokenlimit.E003", _limit_setting),
    "KEY": ("key", "tokenlimit.E004", _key_function),
    "FAILURE_MODE": ("failure_mode", "tokenlimit.E005", check_failure_mode),
    "TRUSTED_PROXIES": ("proxies", "tokenlimit.E006", TrustedProxies),
    "EXEMPT": ("exempt", "tokenlimit.E007", lambda v: Policy.build(None, exempt=v).exempt),
    "HEADERS": ("headers", "tokenlimit.E008", lambda v: Policy.build(None, headers=v).headers),
    "PREFIX": ("prefix", "tokenlimit.E009", check_prefix),
    "TIMEOUT": ("timeout", "tokenlimit.E010", check_deadline),
    "API_KEY_HEADER": (
        "api_key_header",
        "tokenlimit.E011",
        lambda v: Policy.build(None, api_key_header=v).api_key_header,
    ),
    "IPV6_PREFIX": (
        "ipv6_prefix",
        "tokenlimit.E012",
        lambda v: Policy.build(None, ipv6_prefix=v).ipv6_prefix,
    ),
    "METRICS": ("metrics", "tokenlimit.E013", _metrics_sink),
    "SHADOW": ("shadow", "tokenlimit.E014", lambda v: Policy.build(None, shadow=v).shadow),
    "API_KEY_VALIDATOR": ("api_key_validator", "tokenlimit.E015", _api_key_validator),
    "ENABLED": ("enabled", "tokenlimit.E016", _enabled),
    "EXPECTED_PROCESSES": (
        "expected_processes",
        "tokenlimit.E017",
        lambda v: check_expected_processes("local", v),
    ),
    "METHODS": ("methods", "tokenlimit.E018", check_methods),
    "EXEMPT_WHEN": ("exempt_when", "tokenlimit.E019", _predicate("exempt_when", "the request")),
    "DEDUCT_WHEN": ("deduct_when", "tokenlimit.E020", _predicate("deduct_when", "the response")),
    "BREAKER": ("breaker", "tokenlimit.E023", _breaker_setting),
    "HASH_SECRET": ("hash_secret", "tokenlimit.E022", _hash_secret),
}
ENV_URL = "TOKENLIMIT_URL"  # the environment's store, where settings name none

# Entries other libraries spell differently: an error naming ours, where an unknown entry would
# only be warned about and the setting it meant silently not applied.
_OURS = {"METHOD": ("tokenlimit.E021", "'METHODS': ['POST'] (a list of methods)")}


def read(raw: object) -> tuple[Options, list[Problem]]:
    """Validate ``settings.TOKENLIMIT``: the options, and one problem per bad entry."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        hint = 'TOKENLIMIT = {"URL": "redis://localhost:6379/0", "LIMIT": "100/minute"}'
        message = f"settings.TOKENLIMIT must be a dict, not {type(raw).__name__}."
        return Options(), [Problem("tokenlimit.E001", message, hint)]
    values: dict[str, Any] = {}  # option -> its validator's answer, of the option's own type
    found: list[Problem] = []
    for name, value in raw.items():
        field = _FIELDS.get(name)
        if field is None and name in _OURS:
            check_id, ours = _OURS[name]
            message = f"settings.TOKENLIMIT[{name!r}] is not a tokenlimit setting: use {ours}."
            found.append(Problem(check_id, message))
            continue
        if field is None:
            message = f"settings.TOKENLIMIT has an unknown entry {name!r}; it is ignored."
            hint = f"Known entries: {', '.join(_FIELDS)}."
            found.append(Problem("tokenlimit.W001", message, hint, serious=False))
            continue
        option, check_id, validate = field
        try:
            values[option] = validate(value)
        except Exception as error:  # an import error from KEY, a ConfigError, ...
            reason = str(error)
            if isinstance(error, ConfigError):
                reason = reason.removeprefix(f"{error.param}: ")
            found.append(Problem(check_id, f"settings.TOKENLIMIT[{name!r}]: {reason}"))
    url = os.environ.get(ENV_URL)
    if "URL" not in raw and url:
        try:
            values["url"] = parse_url(url)[1]
        except ConfigError as error:
            reason = str(error).removeprefix(f"{error.param}: ")
            found.append(Problem("tokenlimit.E002", f"the environment's {ENV_URL}: {reason}"))
    secret = env_hash_secret()
    if "HASH_SECRET" not in raw and secret is not None:
        try:
            values["hash_secret"] = _hash_secret(secret)
        except ConfigError as error:
            reason = str(error).removeprefix(f"{error.param}: ")
            found.append(
                Problem("tokenlimit.E022", f"the environment's {ENV_HASH_SECRET}: {reason}")
            )
    found.extend(_local_mode_problems(raw, values))
    return Options(**values), found


def _local_mode_problems(raw: dict[Any, Any], values: dict[str, Any]) -> list[Problem]:
    """FAILURE_MODE "local" needs EXPECTED_PROCESSES, which no other mode reads."""
    if "FAILURE_MODE" in raw and "failure_mode" not in values:
        return []  # a bad FAILURE_MODE is its own problem (E005)
    if "EXPECTED_PROCESSES" in raw and "expected_processes" not in values:
        return []  # and so is a bad EXPECTED_PROCESSES (E017)
    mode = values.get("failure_mode", "closed")
    given = "expected_processes" in values
    if mode == "local" and not given:
        message = "settings.TOKENLIMIT['EXPECTED_PROCESSES'] is required with FAILURE_MODE 'local'."
        hint = (
            "How many processes share the limits, on every host (e.g. 4 hosts x 8 workers: "
            "32): each enforces 1/N of every limit while storage is down."
        )
        return [Problem("tokenlimit.E017", message, hint)]
    if mode != "local" and given:
        message = (
            "settings.TOKENLIMIT['EXPECTED_PROCESSES'] is only used with FAILURE_MODE 'local' "
            f"(FAILURE_MODE is {mode!r})."
        )
        return [Problem("tokenlimit.E017", message, "Remove it, or set FAILURE_MODE to 'local'.")]
    return []


def problems(
    raw: object,
    middleware: Sequence[str],
    *,
    limiter: str,
    auth: str,
    incumbent: Sequence[str] = (),
) -> list[Problem]:
    """Everything wrong with ``raw`` (``settings.TOKENLIMIT``) where ``middleware`` is the
    installed list, ``limiter`` the rate-limit middleware's path and ``auth`` the one that
    signs users in: bad entries, no ``LIMIT`` for the middleware, no ``URL``, the limiter
    placed where it cannot see the user, and ``incumbent``, django-ratelimit's settings left
    in place (which tokenlimit does not read)."""
    installed = limiter in middleware
    found = read(raw)[1]
    if isinstance(raw, dict) or (raw is None and installed):
        raw = raw or {}
        if installed and "LIMIT" not in raw:
            message = "settings.TOKENLIMIT['LIMIT'] is required by RateLimitMiddleware."
            found.append(Problem("tokenlimit.E003", message, 'For example "LIMIT": "100/minute".'))
        if "URL" not in raw and not os.environ.get(ENV_URL):
            message = (
                f"settings.TOKENLIMIT['URL'] is not set, nor is {ENV_URL} in the environment: "
                "memory:// limits each process separately."
            )
            hint = 'Share one limit across processes: "URL": "redis://host:6379/0".'
            found.append(Problem("tokenlimit.W002", message, hint, serious=False))
    if installed and auth in middleware and middleware.index(limiter) < middleware.index(auth):
        message = (
            "RateLimitMiddleware comes before AuthenticationMiddleware, so it cannot see the "
            "user: signed-in users are limited by IP address."
        )
        hint = "Move it after AuthenticationMiddleware in settings.MIDDLEWARE."
        found.append(Problem("tokenlimit.W003", message, hint, serious=False))
    for name in incumbent:
        message = f"settings.{name} is django-ratelimit's setting, which tokenlimit does not read."
        hint = f"Use {DJANGO_RATELIMIT.get(name, 'the TOKENLIMIT entries')} (docs/migrating.md)."
        found.append(Problem("tokenlimit.W004", message, hint, serious=False))
    return found
