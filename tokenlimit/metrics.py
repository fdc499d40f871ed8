"""Prometheus metrics for limiters and integrations, on a registry you pass.

    from prometheus_client import CollectorRegistry
    from tokenlimit.metrics import PrometheusMetrics

    registry = CollectorRegistry()  # or prometheus_client.REGISTRY, if you want the default one
    limiter = RateLimiter.from_url(url, metrics=PrometheusMetrics(registry))

Series (``tokenlimit`` is the ``namespace``):

- ``tokenlimit_decisions_total{limit, result}``: one per decision the store made (``try_acquire``,
  each attempt inside ``acquire``, ``peek``), ``result`` ``allowed`` or ``refused``, under the
  limit the ``Decision`` reports (``Limit.label``); with several limits that is the one that
  refused, or on admission the one with the fewest tokens left.
- ``tokenlimit_shadow_refusals_total{limit}``: decisions a limiter in shadow mode admitted
  although enforcement would have refused them (``Decision.shadowed``), under the limit that
  would have refused. They count as ``allowed`` in ``decisions_total`` (and in
  ``http_requests_total``): those series keep saying what callers got.
- ``tokenlimit_decision_seconds``: a histogram of the time each of those decisions took.
- ``tokenlimit_storage_errors_total{reason}``: storage failures (``timeout``, ``connection``,
  ``server``, ``cluster``, ``protocol``; anything else is ``other``), and calls the circuit
  breaker kept from the server while open (``circuit_open``; not with ``failure_mode="local"``,
  where those are local decisions).
- ``tokenlimit_fail_open_total{limit}``: calls admitted without a decision because storage failed
  or the circuit breaker was open, and ``failure_mode="open"``.
- ``tokenlimit_circuit_state``: the circuit breaker, ``0`` closed, ``1`` open (calls skip the
  server), ``2`` half-open (one call probes it). Set at each change of state; limiters sharing
  one registry share the gauge, which then shows the latest change among them.
- ``tokenlimit_failure_mode_switches_total{to}``: with ``failure_mode="local"``, switches to
  deciding in-process because storage failed (``to="local"``) and back to the shared buckets
  once the server answers again (``to="shared"``).
- ``tokenlimit_local_decisions_total{limit, result}``: decisions made in-process while storage
  was down (``failure_mode="local"``), each at the process's share of the limit. They count
  in ``decisions_total`` too, under the same ``limit`` label.
- ``tokenlimit_http_requests_total{route, result}``: one per request (or WebSocket handshake) an
  integration checks, however many checks it passes, by route template (``/items/{item_id}``,
  never ``/items/42``) and final result, ``allowed``/``refused``/``unavailable``.

No label ever holds a key. Importing this module does not import ``prometheus_client`` and
registers nothing; each ``PrometheusMetrics`` registers on the registry it is given.

Several worker processes (``uvicorn --workers``, gunicorn) each count their own series: with
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before the workers
start), ``exposition(registry)`` renders every worker's series merged, whichever worker
answers the scrape.
"""

from __future__ import annotations

import math
import os
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ._breaker import STATES
from ._decision import Decision, fail_open_decision
from ._errors import ConfigError, ConfigTypeError
from ._limit import Limit

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "DEFAULT_BUCKETS",
    "GAUGE_MULTIPROCESS_MODE",
    "MULTIPROCESS_ENV",
    "PrometheusMetrics",
    "exposition",
    "scrape_registry",
]

# Seconds: a decision is one round trip (sub-millisecond on a LAN), bounded by the limiter's
# deadline (0.5 s by default).
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# BackendError.reason values; anything else counts as "other", so the label stays bounded.
STORAGE_ERROR_REASONS = ("timeout", "connection", "server", "cluster", "protocol", "circuit_open")
REQUEST_RESULTS = ("allowed", "refused", "unavailable")
SLOT_RESULTS = ("held", "refused", "shadowed")
SWITCHES = ("local", "shared")  # failure_mode="local": where decisions are made from now on
_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# prometheus_client's switch: set before it is imported, it makes every value a file in that
# directory, which MultiProcessCollector merges (counters and histograms summed across workers).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How a gauge of ours merges across workers in multiprocess mode: the largest value among the
# live processes (a worker that exits takes its value along when the server reports it dead:
# gunicorn's child_exit hook, prometheus_client.multiprocess.mark_process_dead; else it stays
# until the directory is cleaned, which the demo and the image do at start). "max" because our
# gauges are states where the worst worker is the news: tokenlimit_circuit_state (0 closed,
# 1 open, 2 half-open: >= 1 in any worker is a breaker not closed) and
# tokenlimit_override_active{limit} (1 once any worker applies the override; they all do within
# the poll bound). The default, "all", would add a `pid` label: a series per worker process.
GAUGE_MULTIPROCESS_MODE: Final = "livemax"


@dataclass(frozen=True, slots=True)
class _Families:
    """The collectors registered for one (registry, namespace)."""

    buckets: tuple[float, ...]
    decisions: Counter
    seconds: Histogram
    errors: Counter
    fail_open: Counter
    requests: Counter
    shadow: Counter
    slots: Counter
    switches: Counter
    local: Counter
    overrides: Gauge
    circuit: Gauge


# One set of collectors per registry and namespace, shared by every PrometheusMetrics made on
# them: a second sink (a sync and an async limiter, an app factory called twice) counts into the
# same series instead of failing on prometheus_client's "Duplicated timeseries".
_lock = threading.Lock()
_registered: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Families]] = (
    weakref.WeakKeyDictionary()
)


def _check_buckets(buckets: object) -> tuple[float, ...]:
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence):
        raise ConfigTypeError("buckets", f"must be a sequence of seconds, not {buckets!r}")
    checked: list[float] = []
    for bound in buckets:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise ConfigTypeError("buckets", f"must hold numbers, not {bound!r}")
        if math.isnan(bound) or bound <= 0 or (checked and bound <= checked[-1]):
            raise ConfigError("buckets", f"must be positive and increasing, got {list(buckets)!r}")
        checked.append(float(bound))
    if not checked or math.isinf(checked[0]):
        raise ConfigError("buckets", "must name at least one finite bound")
    return tuple(checked)


def _register(registry: CollectorRegistry, namespace: str, buckets: tuple[float, ...]) -> _Families:
    from prometheus_client import Counter, Gauge, Histogram

    made: list[Counter | Gauge | Histogram] = []

    def counter(name: str, documentation: str, labelnames: Sequence[str]) -> Counter:
        collector = Counter(name, documentation, labelnames, namespace=namespace, registry=registry)
        made.append(collector)
        return collector

    def gauge(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        # Under prometheus_client's multiprocess mode: the largest value among live workers.
        collector = Gauge(
            name,
            documentation,
            labelnames,
            namespace=namespace,
            registry=registry,
            multiprocess_mode=GAUGE_MULTIPROCESS_MODE,
        )
        made.append(collector)
        return collector

    def histogram(name: str, documentation: str) -> Histogram:
        collector = Histogram(
            name, documentation, namespace=namespace, registry=registry, buckets=buckets
        )
        made.append(collector)
        return collector

    try:
        families = _Families(
            buckets=buckets,
            decisions=counter(
                "decisions",
                "Rate-limit decisions made by the store, by limit and result.",
                ["limit", "result"],
            ),
            seconds=histogram(
                "decision_seconds", "Time taken by one rate-limit decision, in seconds."
            ),
            errors=counter(
                "storage_errors",
                "Rate-limit storage failures, by reason.",
                ["reason"],
            ),
            fail_open=counter(
                "fail_open",
                "Calls admitted without a decision because storage failed (failure_mode='open').",
                ["limit"],
            ),
            requests=counter(
                "http_requests",
                "Requests checked by web integrations, by route template and final result.",
                ["route", "result"],
            ),
            shadow=counter(
                "shadow_refusals",
                "Calls a limiter in shadow mode admitted that enforcement would refuse, by limit.",
                ["limit"],
            ),
            slots=counter(
                "concurrency",
                "Entries into concurrency limits (limiter.concurrency), by bound and outcome.",
                ["max_in_flight", "result"],
            ),
            switches=counter(
                "failure_mode_switches",
                "Switches to deciding in-process while storage is down (to='local') and back "
                "(to='shared'), with failure_mode='local'.",
                ["to"],
            ),
            overrides=gauge(
                "override_active",
                "1 while a live override (set_override, `tokenlimit override set`) changes or "
                "blocks the limit in this process, else 0.",
                ["limit"],
            ),
            local=counter(
                "local_decisions",
                "Rate-limit decisions made in-process while storage was down "
                "(failure_mode='local'), by limit and result.",
                ["limit", "result"],
            ),
            circuit=gauge(
                "circuit_state",
                "The storage circuit breaker: 0 closed, 1 open (calls skip the server), "
                "2 half-open (one call probes it).",
            ),
        )
    except ValueError as error:  # "Duplicated timeseries": names taken by another collector
        for collector in made:
            registry.unregister(collector)
        raise ConfigError(
            "registry",
            f"already holds metrics named like namespace {namespace!r} from another collector "
            f"({error}); pass another registry or namespace",
        ) from None
    for reason in (*STORAGE_ERROR_REASONS, "other"):  # present at 0, so rate() works at once
        families.errors.labels(reason=reason)
    for to in SWITCHES:
        families.switches.labels(to=to)
    return families


def scrape_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """The registry a ``/metrics`` endpoint renders for ``registry``: itself, or in
    multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) a new one holding a
    ``MultiProcessCollector``, which merges every worker's series from that directory.

    Made per scrape, as prometheus_client advises. In multiprocess mode only series kept in the
    directory are served: a custom collector registered on ``registry`` alone is not.
    """
    from prometheus_client import CollectorRegistry

    if not isinstance(registry, CollectorRegistry):
        raise ConfigTypeError(
            "registry",
            f"must be a prometheus_client.CollectorRegistry, not {type(registry).__name__}",
        )
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return registry
    if not os.path.isdir(directory):
        raise ConfigError(
            MULTIPROCESS_ENV, f"names {directory!r}, which is not a directory: create it first"
        )
    from prometheus_client.multiprocess import MultiProcessCollector

    merged = CollectorRegistry()
    # prometheus_client leaves this constructor unannotated (0.26, the lock's release).
    MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
    return merged


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The ``/metrics`` page for ``registry`` as (body, content type), in the Prometheus text
    format; every worker's series merged in multiprocess mode (see ``scrape_registry``)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(scrape_registry(registry)), CONTENT_TYPE_LATEST


class PrometheusMetrics:
    """A ``MetricsSink`` counting on a ``prometheus_client`` registry you pass.

    ``registry`` is required: a ``CollectorRegistry`` your app owns and serves, or
    ``prometheus_client.REGISTRY`` to use the default one. Sinks made on one registry with one
    ``namespace`` share their series (``buckets`` must then agree). ``buckets`` are the latency
    histogram's upper bounds, in seconds.
    """

    __slots__ = ("_families", "_namespace", "_registry")

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        namespace: str = "tokenlimit",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        try:
            from prometheus_client import CollectorRegistry
        except ImportError as error:
            raise ModuleNotFoundError(
                "tokenlimit.metrics needs prometheus_client: pip install 'tokenlimit[prometheus]'",
                name="prometheus_client",
            ) from error
        if registry is None:
            raise ConfigError(
                "registry",
                "is required: pass the CollectorRegistry your app serves, or "
                "prometheus_client.REGISTRY to use the default one",
            )
        if not isinstance(registry, CollectorRegistry):
            raise ConfigTypeError(
                "registry",
                f"must be a prometheus_client.CollectorRegistry, not {type(registry).__name__}",
            )
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(
                "namespace", f"must be a metric name prefix like 'tokenlimit', got {namespace!r}"
            )
        bounds = _check_buckets(buckets)
        with _lock:
            by_namespace = _registered.setdefault(registry, {})
            families = by_namespace.get(namespace)
            if families is None:
                families = by_namespace[namespace] = _register(registry, namespace, bounds)
            elif families.buckets != bounds:
                raise ConfigError(
                    "buckets",
                    f"this registry already has {namespace}_decision_seconds with buckets "
                    f"{list(families.buckets)!r}; pass the same ones, or another registry",
                )
        self._registry = registry
        self._namespace = namespace
        self._families = families

    @property
    def registry(self) -> CollectorRegistry:
        """The registry the series live on (serve it with ``generate_latest(registry)``)."""
        return self._registry

    @property
    def namespace(self) -> str:
        return self._namespace

    # -- MetricsSink --------------------------------------------------------------------------
    def record_decision(self, limits: Sequence[Limit], decision: Decision, seconds: float) -> None:
        """Count one decision under the limit it reports, and observe its latency."""
        label = _label(decision.policy, limits)
        self._families.decisions.labels(
            limit=label, result="allowed" if decision.allowed else "refused"
        ).inc()
        if decision.shadowed:  # admitted, but enforcement would have refused
            self._families.shadow.labels(limit=label).inc()
        self._families.seconds.observe(max(0.0, seconds))

    def record_error(self, limits: Sequence[Limit], reason: str, failed_open: bool) -> None:
        """Count one storage failure, and the admission when it failed open."""
        self._families.errors.labels(
            reason=reason if reason in STORAGE_ERROR_REASONS else "other"
        ).inc()
        if failed_open and limits:
            # Under the limit the fail-open Decision reports, as record_decision would.
            policy = fail_open_decision(limits).policy
            self._families.fail_open.labels(limit=_label(policy, limits)).inc()

    # -- failure_mode="local" -------------------------------------------------------------------
    def record_switch(self, to: str) -> None:
        """Count one switch: to ``"local"`` decisions (storage failed) or back to ``"shared"``."""
        if to not in SWITCHES:
            raise ConfigError("to", f"must be one of {SWITCHES}, got {to!r}")
        self._families.switches.labels(to=to).inc()

    def record_local_decision(self, limits: Sequence[Limit], decision: Decision) -> None:
        """Count one decision made in-process while storage was down (``record_decision``
        counted it already as a decision)."""
        self._families.local.labels(
            limit=_label(decision.policy, limits),
            result="allowed" if decision.allowed else "refused",
        ).inc()

    # -- live overrides -----------------------------------------------------------------------
    def record_override(self, limit: str, active: bool) -> None:
        """An override of the limit labelled ``limit`` started (``active``) or ended."""
        self._families.overrides.labels(limit=limit).set(1 if active else 0)

    # -- the circuit breaker --------------------------------------------------------------------
    def record_circuit(self, state: str) -> None:
        """The circuit breaker changed state: ``"closed"``, ``"open"`` or ``"half_open"``."""
        if state not in STATES:
            raise ConfigError("state", f"must be one of {STATES}, got {state!r}")
        self._families.circuit.set(STATES.index(state))

    # -- integrations -------------------------------------------------------------------------
    def record_request(self, route: str, result: str) -> None:
        """Count one request an integration checked: ``route`` is a template (bounded), never
        a raw path."""
        if not isinstance(route, str):
            raise ConfigTypeError("route", f"must be a route template str, not {route!r}")
        if result not in REQUEST_RESULTS:
            raise ConfigError("result", f"must be one of {REQUEST_RESULTS}, got {result!r}")
        self._families.requests.labels(route=route, result=result).inc()

    # -- concurrency limits -------------------------------------------------------------------
    def record_slot(self, max_in_flight: int, result: str) -> None:
        """Count one entry into a concurrency limit: ``"held"`` (a slot taken), ``"refused"``
        (all slots held until the entry's timeout) or ``"shadowed"`` (admitted without a slot
        by a shadow limiter, where enforcement would refuse)."""
        if result not in SLOT_RESULTS:
            raise ConfigError("result", f"must be one of {SLOT_RESULTS}, got {result!r}")
        self._families.slots.labels(max_in_flight=str(int(max_in_flight)), result=result).inc()

    def __repr__(self) -> str:
        return f"PrometheusMetrics(namespace={self._namespace!r})"


def _label(policy: Limit | None, limits: Sequence[Limit]) -> str:
    if policy is None:
        policy = limits[0] if limits else None
    return policy.label if policy is not None else "unknown"
