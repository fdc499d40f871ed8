"""``RefusalCache``: refusals answered in-process while the server has said a bucket is empty.

When the server refuses ``cost`` tokens with ``retry_after`` R, the same call is refused again
until R has passed: tokens cannot appear early, because other processes can only *take* tokens.
The exceptions are ``reset`` and ``refund`` (leased tokens given back included) by another
process, which this process sees only once the cached window ends (at most R later); the same
limiter forgets the entries at once (``_base.LimiterBase._forget_refusals``).
Whatever else makes the server forget a bucket (FLUSHALL, DEL, eviction, a failover that lost
writes, a forward step of the server's clock) is likewise seen at most R later.

The window is timed from a local clock reading taken *before* the request was sent, so it
starts no later than the server's decision and ends at or before the server's own moment of
admission: a local answer never refuses what the server would admit. It also ends early by the
server's admission slack (``_model.SLACK`` of one token interval, and its rounding to whole µs)
and by ``_DRIFT`` of its length, which covers clock-rate differences between this host and the
server (NTP slews at most 500 ppm).

The refusal answered locally carries what the server would say at that moment if nobody else
had taken tokens since: the cached per-limit numbers aged by the local time elapsed. Others can
only take tokens, so the refusal holds and the true wait is at least the one reported.

Pure and IO-free: the caller passes the clock readings, ``time.perf_counter()`` seconds (a
monotonic clock, which the limiter reads before each request anyway).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from itertools import islice

from ._decision import Decision, decision
from ._errors import ConfigError, ConfigTypeError
from ._limit import Limit
from ._model import SLACK

__all__ = ["DEFAULT_SIZE", "RefusalCache", "check_local_cache"]

DEFAULT_SIZE = 10_000
_DRIFT = 1e-3  # the window is shortened by this fraction of its length (clock-rate margin)
_ROUNDING = 1e-6  # the server rounds each retry up to a whole µs

Keys = tuple[str, ...]
# Per limit: the Limit, the server's retry_after and reset_after (seconds), and the elapsed time
# from which the server would admit this limit (-inf: it already did).
_Part = tuple[Limit, float, float, float]


def check_local_cache(value: object) -> int:
    """The ``local_cache`` option as a maximum number of entries (0: off)."""
    if value is True:
        return DEFAULT_SIZE
    if value is False:
        return 0
    if not isinstance(value, int):
        raise ConfigTypeError(
            "local_cache", f"must be a bool or an int >= 0, not {type(value).__name__}"
        )
    if value < 0:
        raise ConfigError("local_cache", f"must be >= 0 (0: off), got {value!r}")
    return int(value)


class _Entry:
    """One cached refusal: the cost it was for, when it was sent and until when it holds."""

    __slots__ = ("cost", "limits", "parts", "sent", "until")

    def __init__(
        self,
        cost: int,
        sent: float,
        until: float,
        parts: tuple[_Part, ...],
        limits: Sequence[Limit],
    ) -> None:
        self.cost = cost
        self.sent = sent
        self.until = until
        self.parts = parts
        self.limits = limits  # the refused caller's: another caller's may be labelled apart


def _relabelled(parts: tuple[_Part, ...], limits: Sequence[Limit]) -> tuple[_Part, ...]:
    """``parts`` reported under ``limits``: equal to theirs, one each, perhaps labelled apart."""
    return tuple((lim, *part[1:]) for lim, part in zip(limits, parts, strict=True))


def _aged(parts: tuple[_Part, ...], elapsed: float) -> Decision:
    """The refusal the server would give ``elapsed`` seconds after the cached one."""
    details = []
    for lim, retry, reset, ok_at in parts:
        ok = elapsed >= ok_at
        debt = reset - elapsed  # seconds until full; it shrinks as time passes
        if debt < 0.0:
            debt = 0.0
        burst = lim.burst
        # As the script computes it: whole tokens = burst - debt / interval (+ its slack).
        remaining = min(max(math.floor(burst - debt * lim.rate + SLACK), 0), burst)
        details.append(decision(ok, burst, remaining, 0.0 if ok else retry - elapsed, debt, lim))
    if len(details) == 1:
        return details[0]
    # The most restrictive limit, chosen as decode_reply chooses it for a refusal.
    worst = max(details, key=lambda d: (d.retry_after, -d.remaining))
    return Decision(
        False,
        worst.limit,
        worst.remaining,
        worst.retry_after,
        worst.reset_after,
        policy=worst.policy,
        details=tuple(details),
    )


class RefusalCache:
    """At most ``max_entries`` refusals by bucket keys, each answered until its window ends.

    Thread-safe: lookups are single dict reads (atomic under the GIL) of immutable entries;
    every change is made under one lock, taken only on refusals, expiries and resets.
    """

    __slots__ = ("_entries", "_forgotten", "_lock", "_low", "_max", "_multi")

    def __init__(self, max_entries: int = DEFAULT_SIZE) -> None:
        if max_entries < 1:
            raise ConfigError("local_cache", f"must be >= 1 entry, got {max_entries!r}")
        self._max = max_entries
        # When full, drop down to this many: the sweep that makes room then runs at most once
        # per max/8 insertions, which keeps insertion O(1) amortized.
        self._low = max_entries - max(1, max_entries // 8)
        self._entries: dict[Keys, _Entry] = {}
        self._multi = 0  # entries for several keys (a reset must then look for overlaps)
        self._forgotten = -math.inf  # the last reset: refusals sent before it are stale
        self._lock = threading.Lock()

    @property
    def max_entries(self) -> int:
        return self._max

    def get(
        self, keys: Keys, cost: int, now: float, limits: Sequence[Limit] | None = None
    ) -> Decision | None:
        """The refusal for ``cost`` on ``keys`` at local time ``now``, or None: ask the server.
        ``limits``: the caller's (the ones ``keys`` were made of), which the refusal reports
        (None: the refused caller's)."""
        entry = self._entries.get(keys)
        if entry is None:
            return None
        if now >= entry.until:
            self._discard(keys, entry)
            return None
        if entry.cost != cost:  # another cost has other numbers; only this one is known exactly
            return None
        parts = entry.parts
        if limits is not None and limits is not entry.limits:
            parts = _relabelled(parts, limits)
        # now < sent when a call that started later put this entry first: no time has passed.
        return _aged(parts, max(now - entry.sent, 0.0))

    def put(
        self,
        keys: Keys,
        cost: int,
        sent: float,
        decision: Decision,
        limits: Sequence[Limit] | None = None,
    ) -> None:
        """Remember the server's refusal ``decision`` of ``cost`` sent at local time ``sent``
        for a caller with ``limits`` (the ones ``keys`` were made of; None: the decision's)."""
        if decision.allowed:
            return
        parts: list[_Part] = []
        window = 0.0
        for d in decision.details or (decision,):
            lim = d.policy
            if lim is None:
                return
            ok_at = -math.inf
            if not d.allowed:
                # The server admits once the missing time is within its slack of one interval
                # (interval_ns = ceil(1e9 / rate), hence the 1e-9).
                ok_at = d.retry_after - SLACK * (1.0 / lim.rate + 1e-9)
                window = max(window, ok_at)
            parts.append((lim, d.retry_after, d.reset_after, ok_at))
        # retry_after was rounded up to whole µs, so the true moment may be up to 1 µs earlier.
        window = (window - _ROUNDING) * (1.0 - _DRIFT)
        if window <= 0.0:  # the server admits (within its slack) already
            return
        made = tuple(parts)
        entry = _Entry(
            cost, sent, sent + window, made, tuple(p[0] for p in made) if limits is None else limits
        )
        with self._lock:
            if sent <= self._forgotten:  # sent before a reset here: the server may be full
                return
            entries = self._entries
            old = entries.get(keys)
            if old is not None:
                if old.sent > sent:  # a fresher reply is already here
                    return
                self._remove(keys)  # re-inserted at the end: insertion order stays age order
            elif len(entries) >= self._max:
                self._make_room(sent)
            entries[keys] = entry
            if len(keys) > 1:
                self._multi += 1

    def forget(self, keys: Keys, now: float) -> None:
        """``keys`` were reset at local time ``now``: drop every entry that involves them."""
        with self._lock:
            self._forgotten = max(self._forgotten, now)
            entries = self._entries
            if self._multi:
                wanted = set(keys)
                doomed = [k for k in entries if not wanted.isdisjoint(k)]
            else:  # every entry is for one key
                doomed = [(k,) for k in keys if (k,) in entries]
            for k in doomed:
                self._remove(k)

    def clear(self, now: float) -> None:
        """Forget every entry, and every refusal sent before ``now`` that arrives later."""
        with self._lock:
            self._forgotten = max(self._forgotten, now)
            self._entries.clear()
            self._multi = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- under the lock -----------------------------------------------------------------------
    def _remove(self, keys: Keys) -> None:
        del self._entries[keys]
        if len(keys) > 1:
            self._multi -= 1

    def _discard(self, keys: Keys, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(keys) is entry:  # not replaced since it was read
                self._remove(keys)

    def _make_room(self, now: float) -> None:
        """Drop the expired entries, then the oldest, down to the low-water mark."""
        entries = self._entries
        doomed = [k for k, e in entries.items() if e.until <= now]
        excess = len(entries) - len(doomed) - self._low
        if excess > 0:
            live = (k for k, e in entries.items() if e.until > now)
            doomed.extend(islice(live, excess))
        for k in doomed:
            self._remove(k)
