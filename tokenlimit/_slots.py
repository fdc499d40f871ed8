"""Concurrency slots, the reference model: the memory backend runs it, ``slot_hold.lua`` and
``slot_release.lua`` mirror it. Pure: a key's holders and the time (µs) in, the reply out."""

from __future__ import annotations

__all__ = ["hold", "release"]


def hold(
    holders: dict[str, int], holder: str, max_in_flight: int, lease_us: int, now: int
) -> list[int]:
    """Take a slot for ``holder`` until ``now + lease_us`` if fewer than ``max_in_flight``
    leases are running at ``now`` (µs). Returns ``[admitted, holders, µs until the earliest
    lease ends (refused only)]``, as ``slot_hold.lua`` does."""
    for ended in [name for name, end in holders.items() if end <= now]:
        del holders[ended]
    count = len(holders)
    if count >= max_in_flight:
        return [0, count, min(holders.values()) - now]
    holders[holder] = now + lease_us
    return [1, count + 1, 0]


def release(holders: dict[str, int], holder: str, now: int) -> int:
    """Give ``holder``'s slot back: 1 if its lease was still running, as ``slot_release.lua``."""
    end = holders.pop(holder, None)
    return int(end is not None and end > now)
