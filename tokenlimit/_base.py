"""What the sync and async limiters share: options, validation, decoding, failure policy.

Neither limiter subclasses the other; both inherit this IO-free base and only move bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ._core import (
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    Request,
    ThrottledLog,
    build_request,
    check_deadline,
    check_failure_mode,
    check_prefix,
    decode_reply,
    fail_open_decision,
)
from ._decision import Decision
from ._errors import BackendError, ConfigTypeError, RateLimitExceeded
from ._metrics import MetricsSink

__all__ = ["LimiterBase"]


class LimiterBase:
    __slots__ = ("_failure_mode", "_log", "_metrics", "_prefix", "_timeout", "backend")

    def __init__(
        self,
        backend: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        failure_mode: str = "closed",
        metrics: MetricsSink | None = None,
    ) -> None:
        self._prefix = check_prefix(prefix)
        self._timeout = check_deadline(timeout)
        self._failure_mode = check_failure_mode(failure_mode)
        if metrics is not None and not isinstance(metrics, MetricsSink):
            raise ConfigTypeError(
                "metrics", "must have record_decision() and record_error() (see MetricsSink)"
            )
        self._metrics = metrics
        self._log = ThrottledLog()
        self.backend = backend

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
    def metrics(self) -> MetricsSink | None:
        """The sink given as ``metrics=`` (None: nothing is recorded)."""
        return self._metrics

    def _request(self, key: Any, limit: Any, cost: Any = 1) -> Request:
        return build_request(self._prefix, key, limit, cost)

    def _decoded(
        self, request: Request, reply: Sequence[int], started: float, *, consume: bool
    ) -> Decision:
        decision = decode_reply(reply, request.limits)
        # A peek decides nothing: counting it would let a dashboard that polls inflate refusals.
        if consume and self._metrics is not None:
            self._metrics.record_decision(request.limits, decision, time.perf_counter() - started)
        return decision

    @staticmethod
    def _pause(decision: Decision, deadline: float) -> float:
        """After a refusal inside ``acquire``: the seconds to sleep before trying again, or
        ``RateLimitExceeded`` at once (nothing consumed) when the wait would pass ``deadline``."""
        if decision.retry_after > deadline - time.monotonic():
            raise RateLimitExceeded(decision)
        return decision.retry_after

    def _failed(self, request: Request, error: BackendError) -> Decision:
        """Apply the failure mode: admit and log (open), or re-raise (closed)."""
        is_open = self._failure_mode == "open"
        if self._metrics is not None:
            self._metrics.record_error(request.limits, error.reason, is_open)
        if not is_open:
            raise error
        self._log.warning("tokenlimit: storage failed, admitting (failure_mode='open')", error)
        return fail_open_decision(request.limits)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.backend).__name__}, prefix={self._prefix!r}, "
            f"timeout={self._timeout!r}, failure_mode={self._failure_mode!r})"
        )
