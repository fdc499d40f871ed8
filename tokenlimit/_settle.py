"""Giving leased tokens back when their hold ends, for a process that stops deciding.

A hot key gives its expired tokens back with its next refill (one atomic call, see
``_lease.py``); these settlers cover the keys that go quiet. ``ThreadSettler`` (sync limiters)
is one daemon thread per limiter, started at the first held lease, asleep on a condition while
nothing is held; ``LoopSettler`` (async limiters) is one ``call_later`` on the running loop.
Both give every held token back on close. A held token is therefore back in the store at most
``HOLD`` plus one store call after its lease was granted, unless the process dies first (it
then loses at most one lease per key: the tokens simply refill).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import weakref
from collections.abc import Awaitable, Callable

from ._lease import LeaseTable
from ._request import Request

__all__ = ["LoopSettler", "ThreadSettler"]


class ThreadSettler:
    """Gives ``table``'s expired tokens back through ``give_back`` in a daemon thread, which
    runs only while tokens are held (a limiter never closed leaves no thread behind)."""

    def __init__(self, table: LeaseTable, give_back: Callable[[Request, int], None]) -> None:
        self._table = table
        self._give_back = give_back
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None  # set and cleared under _cond
        self._wake_at = math.inf
        self._closed = False
        _SETTLERS.add(self)

    def due(self, when: float) -> None:
        """A lease holding tokens ends its hold at ``when`` (the table's clock)."""
        with self._cond:
            if self._closed:
                return
            thread = self._thread
            if thread is None or not thread.is_alive():  # none, or a forked child's copy
                self._wake_at = math.inf
                self._thread = threading.Thread(
                    target=self._run, name="tokenlimit-leases", daemon=True
                )
                self._thread.start()
            elif when < self._wake_at:
                self._cond.notify()

    def _run(self) -> None:
        table = self._table
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    next_due = table.next_due()
                    if next_due is None:  # nothing held: ``due`` starts a thread again
                        self._thread = None
                        return
                    delay = next_due - table.clock()
                    if delay <= 0:
                        break
                    self._wake_at = next_due
                    self._cond.wait(delay)
            self.settle()

    def settle(self) -> None:
        """Give back now every token whose hold has ended."""
        for request, tokens in self._table.expired(self._table.clock()):
            self._give_back(request, tokens)

    def close(self) -> None:
        """Stop the thread, then give every held token back. A limiter used after ``close``
        (its client reconnects) starts a thread again at its next held lease."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        for request, tokens in self._table.drain():
            self._give_back(request, tokens)
        with self._cond:
            self._closed = False
            self._thread = None

    def _forked(self) -> None:
        """In a forked child: no thread, and a lock no thread of the parent's holds."""
        self._cond = threading.Condition(threading.Lock())
        self._thread = None
        self._wake_at = math.inf


class LoopSettler:
    """Gives ``table``'s expired tokens back through ``give_back`` from the running loop."""

    def __init__(
        self, table: LeaseTable, give_back: Callable[[Request, int], Awaitable[None]]
    ) -> None:
        self._table = table
        self._give_back = give_back
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_at = math.inf
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def due(self, when: float) -> None:
        """A lease holding tokens ends its hold at ``when``; called on the running loop."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._handle is not None and self._loop is loop and self._wake_at <= when:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._loop = loop
        self._wake_at = when
        self._handle = loop.call_later(max(0.0, when - self._table.clock()), self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._wake_at = math.inf
        if self._closed:
            return
        assert self._loop is not None
        task = self._loop.create_task(self.settle())
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Give back now every token whose hold has ended; wake again for the next."""
        table = self._table
        for request, tokens in table.expired(table.clock()):
            await self._give_back(request, tokens)
        next_due = table.next_due()
        if next_due is not None:
            self.due(next_due)

    async def aclose(self) -> None:
        """Stop waking, finish the give-backs under way, then give every held token back. As
        ``aclose`` closes only the running loop's client, the limiter may decide again after
        it (in another loop): the settler then wakes again at its next held lease."""
        self._closed = True  # no wake-up scheduled meanwhile: the drain below takes all
        try:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for request, tokens in self._table.drain():
                await self._give_back(request, tokens)
        finally:
            self._closed = False


_SETTLERS: weakref.WeakSet[ThreadSettler] = weakref.WeakSet()


def _forked() -> None:
    for settler in list(_SETTLERS):
        settler._forked()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forked)
