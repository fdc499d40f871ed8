"""The metrics hook a limiter calls; ``tokenlimit.metrics`` implements it for Prometheus."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ._decision import Decision
from ._limit import Limit

__all__ = ["MetricsSink"]


@runtime_checkable
class MetricsSink(Protocol):
    """Receives one call per decision and per storage failure. Never per-key data.

    A sink may also have ``record_request(route, result)``: the web integrations then call it
    once per request with the route template and its final result, ``"allowed"``,
    ``"refused"`` or ``"unavailable"``. It is optional, so sinks written before it keep
    working. So is ``record_slot(max_in_flight, result)``: concurrency limits call it once per
    entry with ``"held"``, ``"refused"`` or ``"shadowed"`` (their storage failures go to
    ``record_error``).

    With ``failure_mode="local"``, two more optional methods: ``record_switch(to)``, called with
    ``"local"`` when the limiter starts deciding in-process because storage failed and with
    ``"shared"`` when the server answers again; and ``record_local_decision(limits, decision)``,
    called for each decision made locally, which also reaches ``record_decision`` (as what the
    caller got). The storage failure behind a switch, and each failed try of the server while
    local, reaches ``record_error`` with ``failed_open`` False: the call was decided, locally.

    Live overrides call the optional ``record_override(limit, active)`` when an override of
    the limit labelled ``limit`` starts or changes (``active`` True) and when it ends (False).

    ``record_circuit(state)``, optional too: the limiter's circuit breaker changed state, to
    ``"closed"``, ``"open"`` (calls skip the server and get the failure mode at once) or
    ``"half_open"`` (one call probes the server). While open, each call kept from the server
    reaches ``record_error`` with reason ``"circuit_open"`` (with ``failure_mode="open"``,
    ``failed_open`` True), except with ``failure_mode="local"``, where it is a local decision.

    In shadow mode a would-be refusal reaches ``record_decision`` as what the caller got, an
    admitted ``Decision`` (``allowed`` True) with ``shadowed=True``; a storage failure reaches
    ``record_error`` with ``failed_open`` True.
    """

    def record_decision(self, limits: Sequence[Limit], decision: Decision, seconds: float) -> None:
        """A decision was made (``seconds``: time spent in the backend)."""

    def record_error(self, limits: Sequence[Limit], reason: str, failed_open: bool) -> None:
        """Storage failed with ``reason``; ``failed_open`` if the call was admitted anyway."""
