"""``Decision``: what the limiter answered for one call, read from the script's reply
(``decode_reply``) or made up when storage fails open (``fail_open_decision``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._limit import Limit

__all__ = ["Decision", "decision", "decode_reply", "fail_open_decision"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one ``try_acquire``/``acquire``/``peek``.

    With several limits, the fields describe the most restrictive one (fewest ``remaining``; on
    refusal the longest ``retry_after``), and ``details`` holds one ``Decision`` per limit, in
    the order given. With one limit ``details`` is empty: the decision is that limit's own
    (``decision.details or (decision,)`` reads both alike).

    ``shadowed`` is True only on a limiter in shadow mode (``shadow=True``), when enforcement
    would have refused: the call is then admitted, so ``allowed`` is True and ``if decision:``
    lets it through, as shadow mode promises, while ``remaining``/``retry_after``/``details``
    keep what the store answered (the refusal enforcement would have sent). Code written for
    enforcement therefore needs no change to run in shadow mode, and code that wants to see
    would-be refusals reads ``decision.shadowed``.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_after: float
    policy: Limit | None = field(default=None, kw_only=True, compare=False)
    details: tuple[Decision, ...] = field(default=(), kw_only=True, compare=False, repr=False)
    shadowed: bool = field(default=False, kw_only=True)

    def __bool__(self) -> bool:
        return self.allowed


_SET = {name: Decision.__dict__[name].__set__ for name in Decision.__slots__}
_set_allowed, _set_limit, _set_remaining = _SET["allowed"], _SET["limit"], _SET["remaining"]
_set_retry, _set_reset, _set_policy = _SET["retry_after"], _SET["reset_after"], _SET["policy"]
_set_details, _set_shadowed = _SET["details"], _SET["shadowed"]


def decision(
    allowed: bool, limit: int, remaining: int, retry_after: float, reset_after: float,
    policy: Limit,
) -> Decision:  # fmt: skip
    """``Decision(allowed, limit, remaining, retry_after, reset_after, policy=policy)``, for the
    hot paths: set through the slots' own setters, not the frozen dataclass's ``__init__`` and
    its ``object.__setattr__`` per field (a third of the time; docs/internals.md)."""
    made = object.__new__(Decision)
    _set_allowed(made, allowed)
    _set_limit(made, limit)
    _set_remaining(made, remaining)
    _set_retry(made, retry_after)
    _set_reset(made, reset_after)
    _set_policy(made, policy)
    _set_details(made, ())
    _set_shadowed(made, False)
    return made


def decode_reply(reply: Sequence[int], limits: Sequence[Limit]) -> Decision:
    """Turn the script's integer reply into a Decision reporting the most restrictive limit."""
    if len(reply) != 2 + 4 * len(limits):
        raise ValueError(f"unexpected reply length {len(reply)} for {len(limits)} limit(s)")
    if len(limits) == 1:  # the common case, in one object
        lim = limits[0]
        allowed = int(reply[1]) == 1
        return decision(
            allowed,
            lim.burst,
            int(reply[3]),
            0.0 if allowed else int(reply[4]) / 1e6,
            int(reply[5]) / 1e6,
            lim,
        )
    allowed = int(reply[1]) == 1
    details = []
    for i, lim in enumerate(limits):
        base = 2 + 4 * i
        details.append(
            Decision(
                allowed=int(reply[base]) == 1,
                limit=lim.burst,
                remaining=int(reply[base + 1]),
                retry_after=int(reply[base + 2]) / 1e6 if not allowed else 0.0,
                reset_after=int(reply[base + 3]) / 1e6,
                policy=lim,
            )
        )
    if allowed:
        worst = min(details, key=lambda d: (d.remaining, -d.reset_after))
    else:
        worst = max(details, key=lambda d: (d.retry_after, -d.remaining))
    return Decision(
        allowed=allowed,
        limit=worst.limit,
        remaining=worst.remaining,
        retry_after=worst.retry_after,
        reset_after=worst.reset_after,
        policy=worst.policy,
        details=tuple(details),
    )


def fail_open_decision(limits: Sequence[Limit]) -> Decision:
    """What ``failure_mode="open"`` answers when storage fails: admitted, nothing known."""
    lim = min(limits, key=lambda x: x.burst)
    return Decision(allowed=True, limit=lim.burst, remaining=lim.burst, retry_after=0.0,
                    reset_after=0.0, policy=lim)  # fmt: skip
