"""``Limit``: one token-bucket policy (rate, burst, name), validated on construction."""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ._errors import ConfigError, ConfigTypeError
from ._validate import check_int, check_number, shown

__all__ = ["Limit", "LimitSpec", "coerce_limits", "split_limits"]

_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
    # As the ``limits`` package counts them, so a migrated "1000/month" keeps its rate.
    "mo": 2592000, "month": 2592000, "months": 2592000,
    "y": 31104000, "yr": 31104000, "year": 31104000, "years": 31104000,
}  # fmt: skip
_SEPARATOR = re.compile(r"\s*[;,|]\s*")  # "10/hour;100/day": several limits, the ``limits`` way
_EXPECTED = (
    "expected '<count>/<unit>' such as '100/minute', '10 per hour' or '2/5 seconds' "
    "(units: second, minute, hour, day, week, month, year)"
)
_PATTERN = re.compile(
    r"^\s*(?P<n>\d+)\s*(?:/|per)\s*(?P<k>\d+)?\s*(?P<unit>[a-z]+)\s*$", re.IGNORECASE
)
# Bounds that keep the bucket arithmetic exact in doubles (Lua has no integers): with a burst
# up to 1e9 the rounding of a bucket's debt stays far below the 1e-6-token slack, and a fill time
# up to 1e12 s (~31,700 years) keeps every TTL in range. Both are checked again in the script.
MAX_BURST = 1_000_000_000
MAX_RATE = 1e9  # one token per nanosecond
_MAX_FILL_SECONDS = 1e12
_EXACT = 2**53  # every whole number up to it is a double
MIN_RATE = 1e9 / (_MAX_FILL_SECONDS * 1e9)  # one token per 1e12 s


def _held_by_a_double(n: int) -> int:
    """The least whole number >= ``n`` that a double holds exactly."""
    if n <= _EXACT:
        return n
    nearest = float(n)
    return int(nearest) if int(nearest) >= n else int(math.nextafter(nearest, math.inf))


@dataclass(frozen=True, slots=True)
class Limit:
    """A bucket of ``burst`` tokens refilled at ``rate`` tokens per second.

    ``burst`` defaults to one second's worth of ``rate`` (at least 1). Two limits that differ in
    rate, burst or name never share a bucket. ``label`` names the limit in headers and metrics
    and is not part of its identity: a string's limits are labelled as written (``"10/second"``),
    so two spellings of one rate and burst share their bucket, each reported by its own label.
    """

    rate: float
    burst: int = None  # type: ignore[assignment]  # filled in __post_init__
    name: str | None = field(default=None, kw_only=True)
    # Leased tokens (issue 18): how many tokens one process may take from the bucket at once
    # and hand out locally (None: every decision goes to the store). How a process consumes,
    # not what the bucket is: never in _id, _hash or ==, so a leased and an unleased caller of
    # the same limit share one bucket.
    lease: int | None = field(default=None, kw_only=True, compare=False, hash=False)
    _id: str = field(init=False, repr=False, compare=False, hash=False)
    interval_ns: int = field(init=False, repr=False, compare=False, hash=False)
    # Made once per limit: the hash (a new key's cache lookup would hash the fields again).
    _hash: int = field(init=False, repr=False, compare=False, hash=False)
    # What headers and metrics call it (None: made from the numbers when first asked). Never in
    # _id, _hash or ==: a label never sets a bucket apart.
    _label: str | None = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        rate = check_number("rate", self.rate, maximum=MAX_RATE)
        given: object = self.burst  # None until filled in here
        if given is None:
            burst = max(1, math.floor(rate))  # <= MAX_BURST, as rate <= MAX_RATE
        else:
            burst = check_int("burst", given, minimum=1, maximum=MAX_BURST)
        name: object = self.name
        if name is not None and not isinstance(name, str):
            raise ConfigTypeError("name", f"must be a str or None, not {type(name).__name__}")
        lease: object = self.lease
        if lease is not None:
            lease = check_int("lease", lease, minimum=1)
            if lease > burst:  # more than the bucket can ever hold at once
                raise ConfigError("lease", f"must be at most the burst ({burst}), got {lease}")
        # Whole nanoseconds per token, rounded up (never a faster rate than asked), and past 2^53
        # up again to a whole number a double holds: the script reads it exactly (_model.py).
        # MIN_RATE first: below it 1e9 / rate may be inf, which ceil() refuses.
        if rate < MIN_RATE:
            raise ConfigError("rate", f"too small: at least one token per 1e12 s, got {rate!r}/s")
        interval_ns = _held_by_a_double(math.ceil(1e9 / rate))
        if burst * interval_ns > _MAX_FILL_SECONDS * 1e9:  # as the script checks it
            raise ConfigError("rate", f"too small: filling {burst} tokens would take over 1e12 s")
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "interval_ns", interval_ns)
        object.__setattr__(self, "burst", burst)
        object.__setattr__(self, "lease", lease)
        # The limit is part of every bucket's key (48 bits; only limits checked against the
        # same identity could ever meet, so a collision is not a practical concern).
        digest = hashlib.blake2b(repr((rate, burst, self.name)).encode(), digest_size=6).digest()
        object.__setattr__(self, "_id", base64.urlsafe_b64encode(digest).decode())
        object.__setattr__(self, "_hash", hash((rate, burst, self.name)))
        object.__setattr__(self, "_label", self.name)

    def __hash__(self) -> int:  # what dataclass would make (its fields' tuple), computed once
        return self._hash

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def parse(
        cls,
        text: str,
        *,
        burst: int | None = None,
        name: str | None = None,
        lease: int | None = None,
    ) -> Limit:
        """Parse ``"100/minute"``, ``"10 per second"``, ``"5/10s"``; burst defaults to the count.

        One limit: ``"10/hour;100/day"`` is two, which ``limit=`` arguments accept as they are.
        """
        return cls._parse(text, burst, name, "limit", lease)

    @classmethod
    def _parse(
        cls, text: str, burst: int | None, name: str | None, param: str, lease: int | None = None
    ) -> Limit:
        if not isinstance(text, str):
            raise ConfigTypeError(
                "limit", f"must be a str like '100/minute', not {type(text).__name__}"
            )
        match = _PATTERN.match(text)
        unit = match and _UNITS.get(match["unit"].lower())
        if not match or not unit:
            if _SEPARATOR.search(text.strip(" ;,|")):
                raise ConfigError(
                    param,
                    f"{shown(text)} is several limits: give it where a limit is expected "
                    "(limit=, rate_limit(...)), or a list of Limit objects",
                )
            raise ConfigError(param, f"cannot parse {shown(text)}; {_EXPECTED}")
        try:
            count = int(match["n"])
            periods = int(match["k"] or 1)
        except ValueError:  # more than 4300 digits, which int() refuses
            raise ConfigError(param, f"{shown(text)} is out of range") from None
        if count < 1 or periods < 1:
            raise ConfigError(param, f"count and period must be >= 1 in {shown(text)}")
        try:
            rate = count / (periods * unit)
        except OverflowError:  # a quotient beyond a double
            raise ConfigError(param, f"{shown(text)} is out of range") from None
        return cls._checked(rate, burst, count, name, param, text, lease)

    @classmethod
    def _checked(
        cls,
        rate: float,
        burst: int | None,
        default: int,
        name: str | None,
        param: str,
        given: object,
        lease: int | None = None,
    ) -> Limit:
        """The limit for a constructor whose argument ``param`` (``given``) made the rate and,
        unless ``burst`` is given, the burst (``default``): an error in those names ``param``.
        Unnamed, a limit given as a string is labelled with it as written."""
        try:
            limit = cls(rate, default if burst is None else burst, name=name, lease=lease)
        except ConfigError as exc:
            if exc.param == "rate" or (exc.param == "burst" and burst is None):
                raise ConfigError(param, f"{shown(given)} is out of range ({exc})") from None
            raise
        if name is None and isinstance(given, str):
            object.__setattr__(limit, "_label", given.strip())
        return limit

    @classmethod
    def per_second(
        cls,
        n: float,
        burst: int | None = None,
        *,
        name: str | None = None,
        lease: int | None = None,
    ) -> Limit:
        """``n`` per second; burst defaults to ``n``."""
        return cls._per(n, 1, burst, name, lease)

    @classmethod
    def per_minute(
        cls,
        n: float,
        burst: int | None = None,
        *,
        name: str | None = None,
        lease: int | None = None,
    ) -> Limit:
        """``n`` per minute; burst defaults to ``n``."""
        return cls._per(n, 60, burst, name, lease)

    @classmethod
    def per_hour(
        cls,
        n: float,
        burst: int | None = None,
        *,
        name: str | None = None,
        lease: int | None = None,
    ) -> Limit:
        """``n`` per hour; burst defaults to ``n``."""
        return cls._per(n, 3600, burst, name, lease)

    @classmethod
    def per_day(
        cls,
        n: float,
        burst: int | None = None,
        *,
        name: str | None = None,
        lease: int | None = None,
    ) -> Limit:
        """``n`` per day; burst defaults to ``n``."""
        return cls._per(n, 86400, burst, name, lease)

    @classmethod
    def _per(
        cls, n: float, seconds: int, burst: int | None, name: str | None, lease: int | None
    ) -> Limit:
        count = check_number("n", n)
        return cls._checked(count / seconds, burst, max(1, math.floor(count)), name, "n", n, lease)

    # -- derived values -----------------------------------------------------------------------
    @property
    def interval(self) -> float:
        """Microseconds between two tokens (the GCRA emission interval), as the bucket uses it."""
        return self.interval_ns / 1000

    @property
    def fill_time(self) -> float:
        """Seconds an empty bucket takes to become full."""
        return self.burst / self.rate

    @property
    def label(self) -> str:
        """A short name for headers and metrics: ``name`` if set, else the string the limit was
        written as (``"100/minute"``), else one made from it (``"100-per-60s"``)."""
        label = self._label
        if label is None:
            label = _derived(self)
            object.__setattr__(self, "_label", label)
        return label


def _derived(limit: Limit) -> str:
    """The label of a limit given by numbers: its burst and the seconds it takes to fill."""
    window = limit.burst / limit.rate
    seconds = f"{window:.0f}" if window == round(window) else f"{window:.6g}"
    return f"{limit.burst}-per-{seconds}s"


LimitSpec = Limit | str


def split_limits(text: str) -> list[str]:
    """The limits a string spells: ``"10/hour;100/day"`` (or ``,`` or ``|``) is two."""
    return [part for part in _SEPARATOR.split(text.strip()) if part]


def coerce_limits(value: object, param: str = "limit") -> tuple[Limit, ...]:
    """One ``Limit``, a string like ``"100/minute"``, or a non-empty sequence of them."""
    if isinstance(value, (Limit, str)):
        items: Iterable[object] = (value,)
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = value
    else:
        raise ConfigTypeError(
            param, f"must be a Limit, a string like '100/minute', or a list of them, not {value!r}"
        )
    limits: list[Limit] = []
    for item in items:
        if isinstance(item, Limit):
            limits.append(item)
        elif isinstance(item, str):
            parts = split_limits(item) or [item]  # "" fails to parse, naming itself
            limits.extend(Limit._parse(part, None, None, param) for part in parts)
        else:
            raise ConfigTypeError(param, f"expected a Limit or a string, got {item!r}")
    if not limits:
        raise ConfigError(param, "must name at least one limit")
    return tuple(dict.fromkeys(limits))  # the same limit twice would take its tokens twice
