"""The exception tree, drawn once.

    TokenLimitError
    ├── RateLimitExceeded        refused: carries the Decision and its retry_after
    ├── BackendError             storage failed (timeout, connection, server); wraps the driver
    └── ConfigError (ValueError) a bad argument; the message names the parameter

A wrong *type* (a bool or str where a number belongs) raises an exception that is both a
``ConfigError`` and a ``TypeError``, so either ``except`` clause catches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._decision import Decision

__all__ = ["BackendError", "ConfigError", "RateLimitExceeded", "TokenLimitError"]


class TokenLimitError(Exception):
    """Root of every error tokenlimit raises on purpose."""


class RateLimitExceeded(TokenLimitError):
    """The request was refused; ``retry_after`` says when the same cost could be admitted."""

    def __init__(self, decision: Decision, message: str | None = None) -> None:
        self.decision = decision
        super().__init__(message or f"rate limit exceeded; retry after {decision.retry_after:.3f}s")

    def __reduce__(self) -> tuple[type[RateLimitExceeded], tuple[Decision, str]]:
        # Pickled whole (a refusal crossing processes: Celery's pool, multiprocessing), not
        # rebuilt from ``args``, which hold only the message.
        return (type(self), (self.decision, str(self)))

    @property
    def retry_after(self) -> float:
        """Seconds until this cost could be admitted."""
        return self.decision.retry_after


class BackendError(TokenLimitError):
    """The storage could not make a decision (timeout, connection, server error).

    ``reason`` is a short machine-readable cause: ``"timeout"``, ``"connection"``,
    ``"server"``, ``"cluster"`` or ``"protocol"``. The driver's exception is ``__cause__``.
    """

    def __init__(self, message: str, *, reason: str = "server") -> None:
        self.reason = reason
        super().__init__(message)


class ConfigError(TokenLimitError, ValueError):
    """A bad argument: the message names the parameter."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(f"{param}: {message}")


class ConfigTypeError(ConfigError, TypeError):
    """A bad argument of the wrong type: a ``ConfigError`` that is also a ``TypeError``."""
