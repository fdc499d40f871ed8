"""Timed loops: how many decisions per second one decider makes, sync or with N asyncio tasks.

Each run also counts the decisions that were allowed, so the report can prove that an adapter
really limits (a mostly-refused workload must refuse) and really admits (an all-allowed one must
not refuse).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SyncOp = Callable[[str], object]
AsyncOp = Callable[[str], Awaitable[object]]


@dataclass
class Sample:
    """One timed run."""

    calls: int
    allowed: int
    elapsed: float
    errors: int = 0  # decisions that raised (counted in calls): e.g. a deadline missed
    error: str = ""  # the last one

    @property
    def rate(self) -> float:
        """Decisions made per second (calls that raised do not count)."""
        return (self.calls - self.errors) / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class Case:
    """One row of the decisions table: a library (or floor) x workload x mode."""

    library: str
    workload: str
    mode: str  # "sync", "async64", "pipeline100"
    samples: list[Sample] = field(default_factory=list)
    status: str = "ok"  # "ok", "n/a", "not installed (...)", "error: ..."
    check: str = ""  # the allowed/refused verdict, filled in after the rounds
    connections: int | None = None  # connections the async variant opened (its concurrency)
    run: Callable[[float], Sample] | None = field(default=None, repr=False)

    @property
    def rates(self) -> list[float]:
        return [s.rate for s in self.samples]

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.samples else None

    def to_json(self) -> dict[str, Any]:
        return {
            "library": self.library,
            "workload": self.workload,
            "mode": self.mode,
            "status": self.status,
            "check": self.check,
            "connections": self.connections,
            "median": self.median,
            "samples": [{**asdict(s), "rate": s.rate} for s in self.samples],
        }


class KeyCursor:
    """Cycles through a pre-generated key list; one position shared by every task."""

    __slots__ = ("keys", "pos")

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = keys
        self.pos = 0


def run_sync(op: SyncOp, cursor: KeyCursor, seconds: float, batch: int = 1) -> Sample:
    """Call ``op(key)`` back to back for ``seconds``; ``batch`` decisions per call (pipelines).

    ``op`` returns a truthy value when allowed (for floors and pipelines: the number allowed).
    """
    keys, n = cursor.keys, len(cursor.keys)
    pos = cursor.pos
    calls = allowed = errors = 0
    error: Exception | None = None
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(8):
            try:
                allowed += int(op(keys[pos]))  # type: ignore[call-overload]
            except Exception as exc:
                errors += 1
                error = exc
            pos += 1
            if pos == n:
                pos = 0
        calls += 8
        if clock() >= deadline:
            break
    elapsed = clock() - start
    cursor.pos = pos
    return Sample(calls * batch, allowed, elapsed, errors * batch, _describe(error))


async def run_async(op: AsyncOp, cursor: KeyCursor, seconds: float, tasks: int) -> Sample:
    """``tasks`` coroutines each awaiting ``op(key)`` back to back for ``seconds``."""
    keys, n = cursor.keys, len(cursor.keys)
    counts = [0, 0, 0]  # calls, allowed, errors
    errors: list[Exception] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds

    async def worker() -> None:
        while clock() < deadline:
            pos = cursor.pos
            cursor.pos = pos + 1 if pos + 1 < n else 0
            try:
                if await op(keys[pos]):
                    counts[1] += 1
            except Exception as exc:
                counts[2] += 1
                errors[:] = [exc]
            counts[0] += 1

    await asyncio.gather(*(worker() for _ in range(tasks)))
    last = errors[0] if errors else None
    return Sample(counts[0], counts[1], clock() - start, counts[2], _describe(last))


def _describe(error: Exception | None) -> str:
    return "" if error is None else f"{type(error).__name__}: {error}"[:160]
