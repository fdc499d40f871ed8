"""What the sync and async limiters share: options, validation, decoding, failure policy.

Neither limiter subclasses the other; both inherit this IO-free base and only move bytes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Generic, TypedDict, TypeVar

from ._backend import can_hold_back, can_override, can_refund
from ._breaker import (
    CLOSED,
    HALF_OPEN,
    NO_ANSWER,
    OPEN,
    STATES,
    Breaker,
    Circuit,
    check_breaker,
)
from ._cache import RefusalCache, check_local_cache
from ._decision import Decision, decode_reply, fail_open_decision
from ._errors import BackendError, ConfigTypeError, RateLimitExceeded
from ._fallback import LocalFallback
from ._hash_secret import hasher_for
from ._leasing import lease_table
from ._log import ThrottledLog, logger
from ._metrics import MetricsSink
from ._overrides import (
    REFRESH,
    LiveOverrides,
    Override,
    check_override,
    decode_listing,
    overrides_key,
)
from ._request import Request, build_request
from ._validate import (
    check_deadline,
    check_expected_processes,
    check_failure_mode,
    check_prefix,
)

if TYPE_CHECKING:
    from typing import Self

    from ._limit import Limit
    from ._plan import LimitSpec
    from ._settle import LoopSettler, ThreadSettler

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "LimiterBase", "LimiterOptions"]

# The store a limiter decides through: a SyncBackend (RateLimiter) or an AsyncBackend
# (AsyncRateLimiter), see _backend.py.
_B = TypeVar("_B")

DEFAULT_PREFIX = "tl:"
DEFAULT_TIMEOUT = 0.5  # seconds: the deadline for one decision
MAX_PAUSE = 86_400.0  # seconds slept at once while ``acquire`` waits
_UNREAD_BACKOFF = 5.0  # seconds to the next overrides read after one failed


class LimiterOptions(TypedDict, total=False):
    """The keyword options of ``RateLimiter``/``AsyncRateLimiter`` that ``from_url``,
    ``configure`` and ``testing.memory_limiter`` pass on."""

    prefix: str
    timeout: float
    failure_mode: str
    expected_processes: int | None
    metrics: MetricsSink | None
    local_cache: bool | int
    shadow: bool
    breaker: bool | Breaker
    hash_secret: str | bytes | None
    overrides: bool


def _failures(count: int) -> str:
    return f"{count} consecutive storage failure{'' if count == 1 else 's'}"


class LimiterBase(Generic[_B]):
    is_async: ClassVar[bool] = False  # AsyncRateLimiter: True (its methods are awaited)

    __slots__ = (
        "_breaker",
        "_circuit",
        "_failure_mode",
        "_fallback",
        "_hasher",
        "_leases",
        "_log",
        "_metrics",
        "_overrides",
        "_overrides_log",
        "_prefix",
        "_refusals",
        "_settler",
        "_shadow",
        "_shadow_log",
        "_timeout",
        "_twin",
        "backend",
    )

    def __init__(
        self,
        backend: _B,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        failure_mode: str = "closed",
        expected_processes: int | None = None,
        metrics: MetricsSink | None = None,
        local_cache: bool | int = True,
        remote: bool = False,
        shadow: bool = False,
        breaker: bool | Breaker = True,
        hash_secret: str | bytes | None = None,
        overrides: bool = True,
    ) -> None:
        """``remote``: the backend is a server (Redis, Valkey). Only then is ``local_cache``
        used: the in-process memory backend gains nothing from it, and may run on an injected
        clock that the cache's real one would contradict. ``hash_secret``: see _hash_secret.py
        (kept only as the keyed hash state it makes, never in clear).

        ``overrides``: follow the store's live overrides (``set_override``; read at most once
        a second). False: never read them, and ``set_override`` raises."""
        size = check_local_cache(local_cache)
        self._refusals = RefusalCache(size) if size and remote else None
        self._prefix = check_prefix(prefix)
        self._timeout = check_deadline(timeout)
        self._failure_mode = check_failure_mode(failure_mode)
        processes = check_expected_processes(self._failure_mode, expected_processes)
        # None unless failure_mode="local": the local buckets, used when the server is not.
        self._fallback = None if processes is None else LocalFallback(processes)
        # Which calls go to the server (_breaker.py); ``tripped`` is read once per decision.
        self._breaker = check_breaker(breaker)
        self._circuit = Circuit.of(
            self._breaker, self._failure_mode, listener=self._circuit_changed
        )
        if metrics is not None and not isinstance(metrics, MetricsSink):
            raise ConfigTypeError(
                "metrics", "must have record_decision() and record_error() (see MetricsSink)"
            )
        if not isinstance(shadow, bool):
            raise ConfigTypeError("shadow", f"must be True or False, not {shadow!r}")
        self._metrics = metrics
        self._log = ThrottledLog()
        self._shadow = shadow
        self._shadow_log = ThrottledLog()
        self._twin: LimiterBase[_B] | None = self if shadow else None
        self._hasher = hasher_for(hash_secret)
        self.backend = backend
        # Leased tokens (Limit(..., lease=N)): see _leasing.py. The twins set the settler.
        self._leases = lease_table(backend)
        self._settler: ThreadSettler | LoopSettler | None = None
        if not isinstance(overrides, bool):
            raise ConfigTypeError("overrides", f"must be True or False, not {overrides!r}")
        # None when off or the backend holds none: the one check a decision pays for them.
        self._overrides = (
            LiveOverrides(self._override_changed) if overrides and can_override(backend) else None
        )
        self._overrides_log = ThrottledLog()

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def timeout(self) -> float:
        """The deadline, in seconds, for one decision."""
        return self._timeout

    @property
    def failure_mode(self) -> str:
        return self._failure_mode

    @property
    def expected_processes(self) -> int | None:
        """With ``failure_mode="local"``: the processes sharing the limits (each decides at
        1/N of them while storage is down); else None."""
        return None if self._fallback is None else self._fallback.processes

    @property
    def breaker(self) -> Breaker | None:
        """The circuit breaker's settings (None: off, every call tries the server)."""
        return self._breaker

    @property
    def metrics(self) -> MetricsSink | None:
        """The sink given as ``metrics=`` (None: nothing is recorded)."""
        return self._metrics

    @property
    def shadow(self) -> bool:
        """Shadow mode: decide and count as usual, but admit every call (see ``as_shadow``)."""
        return self._shadow

    def as_shadow(self) -> Self:
        """This limiter in shadow mode: same store, buckets, metrics and local cache, but every
        ``try_acquire``/``acquire`` admits. A would-be refusal still takes nothing (as it would
        under enforcement), comes back with ``allowed=True`` and ``shadowed=True``, is counted
        by the metrics sink with that marker, and is logged at most once per 10 s (the limit
        only, never the key). ``acquire`` never sleeps. ``peek`` still answers what enforcement
        would. Storage failures admit whatever ``failure_mode`` says: a limit being tried out
        must never take the service down. The integrations' ``shadow=True`` uses this."""
        twin = self._twin
        if not isinstance(twin, type(self)):
            twin = object.__new__(type(self))
            for cls in type(self).__mro__:  # every slot, the subclasses' too
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(self, name):
                        object.__setattr__(twin, name, getattr(self, name))
            twin._shadow = True
            twin._twin = twin
            self._twin = twin
        return twin

    @property
    def local_cache(self) -> int:
        """How many refusals are answered in-process at most (0: the cache is off)."""
        return 0 if self._refusals is None else self._refusals.max_entries

    @property
    def hashes_with_secret(self) -> bool:
        """Whether identities are hashed with a secret (``hash_secret=``) into bucket keys."""
        return self._hasher is not None

    def _request(self, key: str | bytes, limit: LimitSpec, cost: int = 1) -> Request:
        return build_request(self._prefix, key, limit, cost, self._hasher)

    # -- live overrides (see _overrides.py) ----------------------------------------------------
    def _live_overrides(self) -> LiveOverrides:
        """The limiter's overrides, for the calls that change or list them."""
        live = self._overrides
        if live is None:
            why = (
                "was made with overrides=False"
                if can_override(self.backend)
                else f"uses {type(self.backend).__name__}, which holds no overrides"
            )
            raise TypeError(
                f"this limiter {why}; live overrides need a memory, Redis or Valkey one"
            )
        return live

    def _override_args(
        self,
        name: object,
        limit: object,
        seconds: object,
        burst: int | None,
        block: object,
        reason: object,
    ) -> tuple[str, ...]:
        label, payload, ttl_ms = check_override(name, limit, seconds, block, reason, burst)
        return ("set", label, payload, str(ttl_ms))

    def _in_force(self, request: Request) -> Request:
        """``request`` as the live overrides have it (its limits and buckets; unchanged when
        none applies, or when one blocks it: nothing is taken from a blocked limit)."""
        live = self._overrides
        if live is None or not live.table:
            return request
        made = live.apply(request, time.perf_counter())
        return request if isinstance(made, Decision) else made

    def _to_reset(self, request: Request) -> Request:
        """``reset``'s request: the limits' own buckets and, under an override, its buckets."""
        in_force = self._in_force(request)
        if in_force is request:
            return request
        return request._replace(keys=tuple(dict.fromkeys(request.keys + in_force.keys)))

    @property
    def _overrides_at(self) -> str:
        return overrides_key(self._prefix)

    def _read_overrides(
        self, live: LiveOverrides, reply: Sequence[object]
    ) -> tuple[bool, tuple[Override, ...]]:
        """Put a listing the server just sent in force (the next read is due ``REFRESH``
        later): ``(changed, overrides)``."""
        changed, found = decode_listing(reply)
        now = time.perf_counter()
        live.update(found, now)
        live.due = now + REFRESH
        return changed, found

    def _written(self, live: LiveOverrides, name: str, reply: Sequence[object]) -> Override:
        """After ``set_override``: the listing in force, and the override just written."""
        for item in self._read_overrides(live, reply)[1]:
            if item.name == name:
                return item
        raise BackendError(f"the store did not keep the override of {name!r}", reason="server")

    def _override_unread(self, live: LiveOverrides, error: BackendError, now: float) -> None:
        """The server's overrides could not be read: the last ones stay, expiring on time. A
        user whose ACL refuses the override script is asked again a minute later, not every
        second."""
        text = str(error).lower()  # Valkey and Redis 7.2+, then Redis 7.0's words
        if "no permissions" in text or "can't run this command" in text:
            live.due = now + 60.0
            self._overrides_log.warning(
                "tokenlimit: live overrides are off for a minute, as the ACL user may not run "
                "the override script (grant +hgetall +hset +hdel +pexpire)",
                error,
            )
        else:
            # The decisions meet the same failure and report it (log, metrics, failure mode);
            # the next read waits longer, so an outage costs few extra deadlines.
            live.due = now + _UNREAD_BACKOFF
            logger.debug(
                "tokenlimit: cannot read live overrides, keeping the last known: %s", error
            )
        live.expire(now)

    def _override_changed(self, name: str, override: Override | None) -> None:
        """An override started, changed or ended: refusals cached under the old numbers no
        longer hold; the sink's gauge follows (``record_override``, optional)."""
        if self._refusals is not None:
            self._refusals.clear(time.perf_counter())
        record = getattr(self._metrics, "record_override", None)
        if record is not None:
            record(name, override is not None)

    def _check_can_hold(self) -> None:
        """``hold_back`` needs a backend that can hold buckets back (a minimal one may not)."""
        if not can_hold_back(self.backend):
            raise TypeError(
                f"{type(self.backend).__name__} cannot hold buckets back (hold_back); "
                "use a memory, Redis or Valkey limiter"
            )

    def _check_can_refund(self) -> None:
        """``refund`` needs a backend that can give tokens back (a minimal one may not)."""
        if not can_refund(self.backend):
            raise TypeError(
                f"{type(self.backend).__name__} cannot give tokens back (refund); "
                "use a memory, Redis or Valkey limiter"
            )

    def _decoded(
        self, request: Request, reply: Sequence[int], started: float, *, consume: bool
    ) -> Decision:
        decision = decode_reply(reply, request.limits)
        if not decision.allowed and self._refusals is not None:
            # ``started`` was read before the request was sent: see _cache.py for why.
            self._refusals.put(request.keys, request.cost, started, decision, request.limits)
        if self._shadow and consume and not decision.allowed:
            decision = self._shadowed(request, decision)
        # A peek decides nothing: counting it would let a dashboard that polls inflate refusals.
        if consume and self._metrics is not None:
            self._metrics.record_decision(request.limits, decision, time.perf_counter() - started)
        return decision

    def _answered(
        self, request: Request, decision: Decision, started: float, *, consume: bool
    ) -> Decision:
        """A refusal from the local cache: still a decision, recorded like one."""
        if self._shadow and consume:
            decision = self._shadowed(request, decision)
        if consume and self._metrics is not None:
            self._metrics.record_decision(request.limits, decision, time.perf_counter() - started)
        return decision

    def _shadowed(self, request: Request, decision: Decision) -> Decision:
        """Shadow mode: the refusal becomes an admission marked ``shadowed``, logged (throttled,
        with the limit's label and never the key)."""
        policy = decision.policy or (request.limits[0] if request.limits else None)
        label = policy.label if policy is not None else "?"
        would = RateLimitExceeded(
            decision, f"limit {label}, retry after {decision.retry_after:.3f}s"
        )
        self._shadow_log.warning("tokenlimit: shadow mode admitted a call it would refuse", would)
        return dataclasses.replace(decision, allowed=True, shadowed=True)

    def _forget_all(self) -> None:
        """After every bucket was cleared (``testing.reset_all``): no cached refusal holds, the
        local buckets (``failure_mode="local"``) are full again, and no leased token is held."""
        if self._refusals is not None:
            self._refusals.clear(time.perf_counter())
        if self._fallback is not None:
            self._fallback.clear()
        if self._leases is not None:
            self._leases.clear()

    def _forget_refusals(self, keys: tuple[str, ...]) -> None:
        """Tokens may be back in ``keys``' buckets: the refusals cached for them, and those
        sent before now and still on their way, no longer hold."""
        if self._refusals is not None:
            self._refusals.forget(keys, time.perf_counter())

    def _forget(self, request: Request, *, leases: bool = False) -> None:
        """After ``reset`` (``leases``: its held tokens are dropped, the bucket being full) or
        ``refund``: the cached refusals for these buckets no longer hold, and their local
        buckets are full again."""
        self._forget_refusals(request.keys)
        if self._fallback is not None:
            self._fallback.forget(request)
        if leases and self._leases is not None:
            self._leases.clear(request.keys)

    @staticmethod
    def _pause(decision: Decision, deadline: float) -> float:
        """After a refusal inside ``acquire``: the seconds to sleep before trying again, or
        ``RateLimitExceeded`` at once (nothing consumed) when the wait would pass ``deadline``.
        At most ``MAX_PAUSE``: a limit may take up to 1e12 s to refill, more than
        ``time.sleep`` takes; the next try finds the wait that is left."""
        if decision.retry_after > deadline - time.monotonic():
            raise RateLimitExceeded(decision)
        return min(decision.retry_after, MAX_PAUSE)

    # -- storage unavailable: the circuit breaker, then the failure mode ------------------------
    def _storage_failed(
        self, limits: Sequence[Limit], error: BackendError | None, what: str = "admitting"
    ) -> LocalFallback | None:
        """The server did not decide a call: it failed with ``error`` (counted on the circuit),
        or the circuit kept the call from it (``error`` None). Then the failure mode: the local
        buckets to decide with (``"local"``), None to admit (``"open"``, or a shadow limiter:
        trying a limit out must not make its storage a new way to fail), or raise (``"closed"``).
        """
        metrics = self._metrics
        fallback = self._fallback
        if error is not None:
            first = self._circuit.failed(answered=error.reason not in NO_ANSWER)
            if fallback is not None:
                # Counted, not as failing open: the call is decided, locally.
                if metrics is not None:
                    metrics.record_error(limits, error.reason, False)
                if first:
                    self._log.warning(
                        f"tokenlimit: storage failed, deciding in this process at 1/"
                        f"{fallback.processes} of each limit (failure_mode='local')",
                        error,
                    )
                    self._record_switch("local")
        if fallback is not None:
            return fallback
        if error is None:
            error = self._circuit_open()
        is_open = self._failure_mode == "open" or self._shadow
        if metrics is not None:
            metrics.record_error(limits, error.reason, is_open)
        if not is_open:
            raise error
        mode = "shadow=True" if self._shadow else "failure_mode='open'"
        self._log.warning(f"tokenlimit: storage failed, {what} ({mode})", error)
        return None

    def _circuit_open(self) -> BackendError:
        """What a call the circuit kept from the server fails with (reason ``"circuit_open"``)."""
        circuit = self._circuit
        when = (
            "one call is probing it"
            if circuit.state == HALF_OPEN
            else f"the next probe in {circuit.next_probe_in():.3f}s"
        )
        return BackendError(
            f"storage unavailable: the circuit breaker is open after "
            f"{_failures(circuit.failures)}, so the server was not asked ({when})",
            reason="circuit_open",
        )

    def _undecided(
        self, request: Request, error: BackendError | None, started: float, *, consume: bool
    ) -> Decision:
        """A decision the server did not make (see ``_storage_failed``)."""
        fallback = self._storage_failed(request.limits, error)
        if fallback is None:
            return fail_open_decision(request.limits)
        return self._local(fallback, request, started, consume=consume)

    def _recovered(self) -> None:
        """The server answered while the circuit was tripped: closed, and with
        ``failure_mode="local"`` back to the shared buckets (counted once per switch)."""
        if self._circuit.answered() and self._fallback is not None:
            logger.info("tokenlimit: storage answers again, back to the shared buckets")
            self._record_switch("shared")

    def _circuit_changed(self, circuit: Circuit, before: int, after: int) -> None:
        """One log line and one gauge update per change of the circuit's state."""
        record = getattr(self._metrics, "record_circuit", None)
        if record is not None:
            record(STATES[after])
        if after == OPEN:
            then = {
                "closed": "every call fails at once with BackendError",
                "open": "every call is admitted at once",
                "local": "every call is decided in this process",
            }[self._failure_mode]
            why = "the probe failed" if before == HALF_OPEN else _failures(circuit.failures)
            logger.warning(
                "tokenlimit: circuit breaker open (%s): %s for %gs, then one call probes "
                "the server",
                why,
                then,
                circuit.cool_down,
            )
        elif after == HALF_OPEN:
            logger.info("tokenlimit: circuit breaker half-open: one call probes the server")
        elif after == CLOSED:
            logger.info("tokenlimit: circuit breaker closed: the server answers again")

    def _record_switch(self, to: str) -> None:
        record = getattr(self._metrics, "record_switch", None)
        if record is not None:
            record(to)

    def _local(
        self, fallback: LocalFallback, request: Request, started: float, *, consume: bool
    ) -> Decision:
        """Decide ``request`` on this process's share of its limits, recorded as a decision
        (and, for sinks that count them, as a local one)."""
        local = fallback.localized(request)
        decision = decode_reply(fallback.store.decide(local, consume=consume), local.limits)
        if self._shadow and consume and not decision.allowed:
            decision = self._shadowed(request, decision)
        metrics = self._metrics
        if consume and metrics is not None:
            metrics.record_decision(request.limits, decision, time.perf_counter() - started)
            record = getattr(metrics, "record_local_decision", None)
            if record is not None:
                record(request.limits, decision)
        return decision

    def _held_elsewhere(
        self, request: Request, error: BackendError | None, hold_us: int
    ) -> Decision:
        """``hold_back`` the server did not do (see ``_storage_failed``): on this process's
        share of the limits (the local buckets), or nothing held (open)."""
        fallback = self._storage_failed(request.limits, error)
        if fallback is None:
            return fail_open_decision(request.limits)
        local = fallback.localized(request)
        return decode_reply(fallback.store.hold_back(local, hold_us), local.limits)

    def _refunded_elsewhere(self, request: Request, error: BackendError | None) -> Decision:
        """``refund`` the server did not do: given back to the local share (where a token was
        taken while the server was not asked), or nothing given back (open)."""
        fallback = self._storage_failed(request.limits, error)
        if fallback is None:
            return fail_open_decision(request.limits)
        local = fallback.localized(request)
        return decode_reply(fallback.store.refund(local), local.limits)

    def __repr__(self) -> str:
        shadow = ", shadow=True" if self._shadow else ""
        if self._hasher is not None:  # that there is one, never what it is
            shadow += ", hash_secret=<set>"
        processes = (
            "" if self._fallback is None else f", expected_processes={self.expected_processes}"
        )
        breaker = "" if self._breaker == Breaker() else f", breaker={self._breaker or False!r}"
        return (
            f"{type(self).__name__}({type(self.backend).__name__}, prefix={self._prefix!r}, "
            f"timeout={self._timeout!r}, failure_mode={self._failure_mode!r}{processes}"
            f"{breaker}{shadow})"
        )
