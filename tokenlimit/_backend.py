"""What a limiter needs from a storage backend: one decision, one reset, close."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ._request import Request

__all__ = ["AsyncBackend", "SyncBackend"]


@runtime_checkable
class SyncBackend(Protocol):
    """Makes one atomic decision per call, within ``timeout`` seconds, or raises BackendError."""

    def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]: ...

    def reset(self, request: Request, *, timeout: float) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncBackend(Protocol):
    """The async twin of ``SyncBackend``."""

    async def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]: ...

    async def reset(self, request: Request, *, timeout: float) -> None: ...

    async def aclose(self) -> None: ...
