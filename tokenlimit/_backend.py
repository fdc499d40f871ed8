"""The seam between a limiter and its storage: what every backend offers, sync and async.

Memory, Redis/Valkey standalone, cluster and Sentinel backends implement it, and so may a third
party's (``tests/test_backend_seam.py`` plugs one in). Callers ask the backend what it can do
(``remote``, ``hold_slot``, ``hold_back``, ``refund``, ``lease``) and never look at its class.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol, runtime_checkable

from ._request import Request

__all__ = [
    "AsyncBackend",
    "AsyncLeaser",
    "SyncBackend",
    "SyncLeaser",
    "can_hold_back",
    "can_lease",
    "can_refund",
    "holds_slots",
    "is_remote",
    "scan_pattern",
]


@runtime_checkable
class SyncBackend(Protocol):
    """Makes one atomic decision per call, within ``timeout`` seconds, or raises BackendError.

    ``remote``: decisions go to a server, so a call blocks on IO, can be cut short at its
    deadline, and a refusal may be cached locally until its ``retry_after``; False for a store
    in this process (instant, never cut short, run inline even from async code).
    """

    remote: bool

    def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]: ...

    def reset(self, request: Request, *, timeout: float) -> None: ...

    def hold_back(self, request: Request, hold_us: int, *, timeout: float) -> Sequence[int]:
        """Refuse every caller of ``request``'s buckets for ``hold_us`` µs (1 to a day), all in
        one atomic step and never adding tokens (``_model.hold``); the reply is ``decide``'s
        for a peek of one token right after. Optional, as ``hold_slot`` (``can_hold_back``)."""
        ...

    def refund(self, request: Request, *, timeout: float) -> Sequence[int]:
        """Give ``request.cost`` tokens back to each of ``request``'s buckets, never above full
        and leaving an absent one absent, all in one atomic step (``_model.refund``); the reply
        is ``decide``'s for a peek of one token right after. Optional (``can_refund``)."""
        ...

    def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float
    ) -> Sequence[int]:
        """One concurrency slot of ``key`` for ``holder``: ``[admitted, count, wait_us]``."""
        ...

    def release_slot(self, key: str, holder: str, *, timeout: float) -> int:
        """Free ``holder``'s slot of ``key``; 1 if it held one."""
        ...

    def clear_prefix(self, prefix: str) -> int:
        """Forget every bucket and slot whose key starts with ``prefix``; how many went (tests)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncBackend(Protocol):
    """The async twin of ``SyncBackend``."""

    remote: bool

    def decide(
        self, request: Request, *, consume: bool, timeout: float
    ) -> Awaitable[Sequence[int]]:
        """Awaited by the limiter: an ``async def``, or a plain method handing over another
        backend's coroutine (``LoopLocalBackend``: one coroutine less per decision)."""
        ...

    async def reset(self, request: Request, *, timeout: float) -> None: ...

    async def hold_back(
        self, request: Request, hold_us: int, *, timeout: float
    ) -> Sequence[int]: ...

    async def refund(self, request: Request, *, timeout: float) -> Sequence[int]: ...

    async def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float
    ) -> Sequence[int]: ...

    async def release_slot(self, key: str, holder: str, *, timeout: float) -> int: ...

    async def clear_prefix(self, prefix: str) -> int: ...

    async def aclose(self) -> None: ...


class SyncLeaser(Protocol):
    """A backend that can lease tokens (optional, ``can_lease``; outside ``SyncBackend`` so
    that a third party's backend without it still is one): leased limits then decide as
    unleased ones."""

    def lease(self, request: Request, want: int, back: int, *, timeout: float) -> Sequence[int]:
        """Give ``back`` tokens back to ``request``'s buckets, then take as many as all of them
        hold, at least ``request.cost`` and at most ``want``, the same from each, all in one
        atomic step (``_model.lease``); the reply is ``decide``'s for the cost, then the tokens
        granted (0: refused)."""
        ...


class AsyncLeaser(Protocol):
    """The async twin of ``SyncLeaser``."""

    async def lease(
        self, request: Request, want: int, back: int, *, timeout: float
    ) -> Sequence[int]: ...


def is_remote(backend: object) -> bool:
    """``backend.remote``; True for a backend that does not say (the safe reading: its calls
    may block, so they run off an event loop and within the deadline)."""
    return bool(getattr(backend, "remote", True))


def holds_slots(backend: object) -> bool:
    """Whether ``backend`` can hold concurrency slots (a minimal third-party one may not)."""
    return callable(getattr(backend, "hold_slot", None)) and callable(
        getattr(backend, "release_slot", None)
    )


def can_hold_back(backend: object) -> bool:
    """Whether ``backend`` can hold buckets back (``hold_back``; a minimal one may not)."""
    return callable(getattr(backend, "hold_back", None))


def can_refund(backend: object) -> bool:
    """Whether ``backend`` can give tokens back (``refund``; a minimal one may not)."""
    return callable(getattr(backend, "refund", None))


def can_lease(backend: object) -> bool:
    """Whether ``backend`` can lease tokens (``lease``; a minimal one may not)."""
    return callable(getattr(backend, "lease", None))


def scan_pattern(prefix: str) -> str:
    """The SCAN pattern for a limiter's keys, ``<prefix>{<tag>}...`` (glob escaped): never
    ``*`` alone, even with an empty prefix."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
    return escaped + "{*"
