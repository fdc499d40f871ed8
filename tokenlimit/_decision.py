"""``Decision``: what the limiter answered for one call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._limit import Limit

__all__ = ["Decision"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one ``try_acquire``/``acquire``/``peek``.

    With several limits, the fields describe the most restrictive one (fewest ``remaining``; on
    refusal the longest ``retry_after``), and ``details`` holds one ``Decision`` per limit, in
    the order given. With one limit ``details`` is empty: the decision is that limit's own
    (``decision.details or (decision,)`` reads both alike).
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_after: float
    policy: Limit | None = field(default=None, kw_only=True, compare=False)
    details: tuple[Decision, ...] = field(default=(), kw_only=True, compare=False, repr=False)

    def __bool__(self) -> bool:
        return self.allowed
