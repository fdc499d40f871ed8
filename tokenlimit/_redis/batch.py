"""Async batching: the decisions made concurrently in one event loop share one pipelined write.

Invariants: each decision is its own script call, run at most once (a pipeline, never MULTI);
a lane reads every reply it wrote, in order, or closes its connection; a caller's deadline is a
timer per batch, never a cancellation of the shared lane. The design, and why, is in
docs/internals.md ("Async batching").
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import TYPE_CHECKING, TypeGuard

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool

from tokenlimit._request import Request
from tokenlimit._scripts import Script

from . import replies as policy
from .driver import available
from .replies import classify
from .resp import ReplyError, ReplyReader
from .sync import unread_in_kernel

if TYPE_CHECKING:
    from collections.abc import Iterable

    from redis.asyncio.connection import AbstractConnection

    from .driver import AsyncPool, OpenConnection

__all__ = [
    "MAX_BATCH",
    "Batcher",
    "drop_if_stale",
    "forget_replica",
    "give_back",
    "header",
    "retire",
]

MAX_BATCH = 256  # commands per batch: one write never grows without bound
_RECANCEL = 0.01  # seconds between cancellations of a lane that outlived its deadline
_CLOSE_WAIT = 1.0  # seconds aclose() waits for the lanes to end
# A timer may fire up to the clock's resolution before its time; a deadline this close counts
# as passed, so the timer is not set again for the same instant.
_SLACK = 1e-6
_READ = 65536
_LINGER = 0.005  # seconds a lane waits for the next batch before giving its connection back
_NEVER = 1 << 62  # an early threshold never reached

# Member: (future, deadline in loop.time(), packed command, script for a NOSCRIPT fallback or
# None once the command is the EVAL, request). A tuple: the cheapest record per decision.
Member = tuple["asyncio.Future[list[int]]", float, bytes, "Script | None", Request]

# Connections in use when their server answered READONLY (see the module doc): closed before
# their next use. Weak: a connection the pool drops is forgotten with it.
_RETIRED: weakref.WeakSet[AbstractConnection] = weakref.WeakSet()

_HEADERS = tuple(b"*%d\r\n" % n for n in range(64))


def header(count: int) -> bytes:
    """The RESP array header of a command of ``count`` strings."""
    return _HEADERS[count] if count < 64 else b"*%d\r\n" % count


def _deadline_error() -> rx.TimeoutError:
    return rx.TimeoutError("no reply before the limiter's deadline")


class Batcher:
    """The pending decisions and the lanes (connections at work) of one backend in one loop."""

    __slots__ = (
        "_busy",
        "_counted",
        "_early",
        "_handle",
        "_idle",
        "_lanes",
        "_pending",
        "_spare",
        "commands",
        "flushes",
        "loop",
        "pool",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: AsyncPool) -> None:
        self.loop = loop
        self.pool = pool
        self._pending: list[Member] = []
        self._handle: asyncio.Handle | None = None
        self._lanes: set[_Lane] = set()
        self._idle: list[_Lane] = []  # lanes lingering after a batch, ready for the next
        self._busy = 0  # lanes with a batch on the wire
        self._spare = _spare_rule(pool)
        # Without the pool's count of connections in use (_redispy), a bounded pool gets no linger.
        self._counted = available("asyncio ConnectionPool._in_use_connections")
        # Pending commands that go out at once, from the caller's own step, on an idle lane
        # (see ``_Lane.done_reading``); _NEVER while another batch is on the wire.
        self._early = _NEVER
        # What went to the server: batches written and commands in them (tests, diagnostics).
        self.flushes = 0
        self.commands = 0

    def submit(
        self,
        future: asyncio.Future[list[int]],
        deadline: float,
        command: bytes,
        script: Script | None,
        request: Request,
    ) -> None:
        """Queue one decision for the next flush; ``future`` gets its reply or BackendError."""
        pending = self._pending
        pending.append((future, deadline, command, script, request))
        if len(pending) >= self._early and self._idle and self._to_idle(pending):
            self._pending = []
        elif self._handle is None:
            self._handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._handle = None
        pending, self._pending = self._pending, []
        # A caller cancelled before the write is never sent: its decision is simply not made.
        live = [member for member in pending if not member[0].done()]
        for start in range(0, len(live), MAX_BATCH):
            batch = live[start : start + MAX_BATCH]
            if not (self._idle and self._to_idle(batch)):
                _Lane(self, batch)

    def room_to_linger(self) -> bool:
        """Whether the pool has connections to spare for a lane to keep one a while longer:
        one at least if it makes callers wait for a connection, more than half if it fails
        them (see the module doc)."""
        if self._spare is None:
            return True
        limit, share = self._spare
        in_use = getattr(self.pool, "_in_use_connections", None) if self._counted else None
        return in_use is not None and share * len(in_use) < limit

    def _to_idle(self, members: list[Member]) -> bool:
        """Hand ``members`` to a lingering lane, the latest first; False if none would take
        them (a lane that refuses has found its connection unfit and stopped lingering)."""
        idle = self._idle
        while idle:
            if idle[-1].send_now(members):
                return True
        return False

    async def aclose(self) -> None:
        """Fail what is pending, stop every lane and wait (briefly) until they end."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        pending, self._pending = self._pending, []
        _fail(pending, rx.ConnectionError("the limiter was closed"))
        lanes = list(self._lanes)
        for lane in lanes:
            lane.stop(closing=True)
        if lanes:
            await asyncio.wait([lane.task for lane in lanes], timeout=_CLOSE_WAIT)


def _fail(members: list[Member], exc: BaseException) -> None:
    for member in members:
        future = member[0]
        if not future.done():
            # One BackendError each: an exception object raised in several tasks would pile
            # their tracebacks onto one another.
            future.set_exception(classify(exc))


class _Lane:
    """One task and one pooled connection, serving batches: write all, read all, resolve each.

    After a batch the lane lingers up to ``_LINGER`` (``_linger``) before giving its
    connection back: the callers it just answered often decide again at once, and their batch
    then goes out on it without a new task and a pool checkout and release (redis-py's cost as
    much as a dozen decisions).
    """

    __slots__ = (
        "batcher",
        "busy",
        "closing",
        "conn",
        "demoted",
        "ending",
        "last",
        "members",
        "next",
        "read",
        "task",
        "timer",
    )

    def __init__(self, batcher: Batcher, members: list[Member]) -> None:
        self.batcher = batcher
        self.closing = False  # stopped by aclose(), not by a deadline
        self.ending = False  # cleaning up: a cancellation now would only cut the cleanup short
        self.next: asyncio.Future[bool] | None = None  # while lingering: set when work comes
        self.timer: asyncio.TimerHandle | None = None
        self.conn: OpenConnection | None = None  # the pooled connection, once taken
        self.busy = False  # a batch on the wire (counted in the batcher's _busy)
        self.demoted = False  # the server answered READONLY: a replica now (see _odd)
        self._begin(members)
        self.task = batcher.loop.create_task(self._run())
        batcher._lanes.add(self)
        self.task.add_done_callback(self._done)

    def _begin(self, members: list[Member]) -> None:
        self.members = members
        self.read = 0  # members[:read] have had their reply (resolved, or resubmitted)
        deadlines = [member[1] for member in members]
        self.last = max(deadlines)
        self.timer = self.batcher.loop.call_at(min(deadlines), self._expire)

    def send_now(self, members: list[Member]) -> bool:
        """Write ``members`` on this lingering lane's connection at once, from the caller's
        step, and wake the lane to read the replies; False (nothing done) if the connection is
        not plainly healthy (the lane's own checks then run the usual, async way)."""
        conn = self.conn
        waiting = self.next
        if waiting is None or waiting.done() or not _healthy(conn) or conn in _RETIRED:
            self.give_up()  # of no use to the batches to come either: leaves the idle lanes
            return False
        self.batcher._idle.remove(self)
        self._begin(members)
        self._write(conn)
        waiting.set_result(True)
        return True

    # -- deadlines ----------------------------------------------------------------------------
    def _expire(self) -> None:
        """Fail the members whose deadline has passed; past the last one, stop the lane."""
        self.timer = None
        loop = self.batcher.loop
        now = loop.time() + _SLACK
        upcoming = None
        for member in self.members[self.read :]:
            future, deadline = member[0], member[1]
            if future.done():
                continue
            if deadline <= now:
                future.set_exception(classify(_deadline_error()))
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
        if upcoming is not None:
            self.timer = loop.call_at(upcoming, self._expire)
        elif now >= self.last:
            self.stop()
        else:  # members cancelled by their callers: still read their replies until the last
            self.timer = loop.call_at(self.last, self._expire)

    def stop(self, *, closing: bool = False) -> None:
        """Cancel the lane's task, again and again (a cancellation may be swallowed below
        3.12, see the module doc) until it has caught one and is cleaning up."""
        self.closing = self.closing or closing
        if self.task.done() or self.ending:
            return
        self.task.cancel()
        self.batcher.loop.call_later(_RECANCEL, self.stop)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.batcher._lanes.discard(self)
        if not task.cancelled():
            task.exception()  # retrieved: never "Task exception was never retrieved"
            return
        # Cancelled before its first step (aclose() right after the flush): _run's handlers
        # never ran, so its callers are answered here, not by the timer at their deadline.
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._fail(self._stopped())

    def _stopped(self) -> rx.RedisError:
        """Why the lane's callers without a reply fail once it is cancelled."""
        if self.closing:
            return rx.ConnectionError("the limiter was closed")
        return _deadline_error()

    # -- the exchanges ------------------------------------------------------------------------
    async def _run(self) -> None:
        pool = self.batcher.pool
        conn: OpenConnection | None = None
        clean = False
        written = False  # the batch went out already (send_now)
        try:
            conn = self.conn = await pool.get_connection()
            while True:
                clean = False
                if not written:
                    await drop_if_stale(conn)
                    if not conn.is_connected:
                        await conn.connect()
                    self._write(conn)
                await self._read(conn)
                if self.demoted:
                    await forget_replica(pool)
                    break  # not clean: closed, so that its next use asks for the primary
                clean = True
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                if not self.batcher.room_to_linger() or not await self._linger():
                    clean = _healthy(conn)  # a stray byte or EOF while lingering: closed
                    break
                written = True
        except asyncio.CancelledError:
            self.ending = True
            self._fail(self._stopped())
        except Exception as exc:  # whatever failed, it ends in the members' futures
            self.ending = True
            self._fail(exc)
        finally:
            self.ending = True
            if self.busy:
                # Cancelled with a batch on the wire: aclose(), or a deadline, right after
                # send_now() wrote it and before the lane woke. Its replies may still come.
                clean = False
            self._done_reading()
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self in self.batcher._idle:
                self.batcher._idle.remove(self)
            if conn is not None:
                await give_back(pool, conn, clean=clean)

    def _write(self, conn: OpenConnection) -> None:
        """The batch in one write (the replies are read by ``_read``)."""
        # Who gave up while the connection was coming is not sent (its decision not made).
        members = self.members = [m for m in self.members if not m[0].done()]
        if members:
            conn._writer.write(b"".join([member[2] for member in members]))
            batcher = self.batcher
            batcher.flushes += 1
            batcher.commands += len(members)
            self.busy = True
            batcher._busy += 1
            batcher._early = _NEVER

    def _done_reading(self) -> None:
        """The batch is off the wire (read, or failed). If no other batch is on the wire, the
        server sits idle while this loop turn runs the callers just answered: so half as many
        as that batch held (they are about to decide again) go out at once, from the caller's
        own step, and the server starts on them while the other half is still being run; those
        go at the end of the turn, on another lane. Two batches then alternate, each one's
        server time overlapping the other's client time, which lockstep batches never do."""
        if not self.busy:
            return
        self.busy = False
        batcher = self.batcher
        batcher._busy -= 1
        if batcher._busy == 0:
            batcher._early = max(1, len(self.members) // 2)

    async def _read(self, conn: OpenConnection) -> None:
        """Exactly one reply per command written, in order."""
        members = self.members
        count = len(members)
        if not count:
            return
        reader = conn._reader
        await conn._writer.drain()
        replies = ReplyReader()
        read = 0
        while read < count:
            chunk = await reader.read(_READ)
            if not chunk:
                raise rx.ConnectionError("the server closed the connection")
            for reply in replies.take(chunk, count - read):
                if type(reply) is list:
                    future = members[read][0]
                    if not future.done():
                        future.set_result(reply)
                else:
                    self._odd(members[read], reply)
                read += 1
            self.read = read
        if replies.leftover():  # more than our replies: the stream is out of step, drop it
            raise rx.InvalidResponse("tokenlimit: more bytes than the replies")
        self._done_reading()

    async def _linger(self) -> bool:
        """Wait up to ``_LINGER`` for the next batch: True when one was sent (``send_now``)."""
        loop = self.batcher.loop
        waiting: asyncio.Future[bool] = loop.create_future()
        self.next = waiting
        self.batcher._idle.append(self)
        # Bound to this wait's future: a give-up left from an earlier wait must not cut this
        # one short (cancelled below, but a handle already run cannot be).
        timer = loop.call_later(_LINGER, self._give_up, waiting)
        try:
            return await waiting
        finally:
            timer.cancel()
            self.next = None

    def _give_up(self, waiting: asyncio.Future[bool]) -> None:
        """The linger's timer: give the connection back, unless a batch is forming."""
        if waiting is not self.next or waiting.done():
            return
        if self.batcher._handle is not None:  # a batch is forming: take it, a turn from now
            self.batcher.loop.call_soon(self._give_up, waiting)
            return
        self.give_up()

    def give_up(self) -> None:
        """Stop lingering now: the lane gives its connection back."""
        waiting = self.next
        if self in self.batcher._idle:
            self.batcher._idle.remove(self)
        if waiting is not None and not waiting.done():
            waiting.set_result(False)

    def _odd(self, member: Member, reply: object) -> None:
        """A reply that is not a script's array: an error reply, most likely. Its step is the
        reply policy's; a batch follows no redirect (a standalone server sends none)."""
        future, deadline, _, script, request = member
        if not isinstance(reply, ReplyError):
            reply = rx.InvalidResponse(f"tokenlimit: unexpected reply {reply!r:.40}")
        outcome = policy.outcome_of(reply)
        state = policy.CallState(deadline=deadline, by_sha=script is not None, cluster=False)
        step, _ = policy.next_step(outcome, state, self.batcher.loop.time())
        if isinstance(step, policy.DropAndFail):
            self.demoted = True  # whoever waits for this reply: the lane stops (_run)
        if future.done():
            return
        match step:
            case policy.Resend() if script is not None:
                command = header(request.size + 2) + script.eval + request.tail
                self.batcher.submit(future, deadline, command, None, request)
            case policy.Fail(error=error) | policy.DropAndFail(error=error):
                future.set_exception(error)
            case _:  # a pause: not followed here
                future.set_exception(outcome.error)

    def _fail(self, exc: BaseException) -> None:
        """Every member without its reply yet: failed, outcome unknown."""
        _fail(self.members[self.read :], exc)


def _spare_rule(pool: object) -> tuple[int, int] | None:
    """``(max_connections, share)`` for ``Batcher.room_to_linger``: a lane may linger while
    ``share * in_use < max_connections``; None when the pool has no such bound to check."""
    limit = getattr(pool, "max_connections", None)
    if not isinstance(limit, int):
        return None
    return (limit, 1 if isinstance(pool, BlockingConnectionPool) else 2)


def _healthy(conn: OpenConnection | None) -> TypeGuard[OpenConnection]:
    """Whether an idle connection can take a write right now, checked without awaiting: open,
    and nothing to read on it (a stray byte or EOF means it is out of step or closing)."""
    if conn is None or not conn.is_connected:
        return False
    reader, writer = conn._reader, conn._writer
    transport = writer.transport
    return not (
        transport.is_closing() or reader.at_eof() or reader._buffer or unread_in_kernel(transport)
    )


def retire(conns: Iterable[AbstractConnection]) -> None:
    """Close each of ``conns`` before its next use or when it is given back (``drop_if_stale``,
    ``give_back``): their server answered READONLY, so none may serve another call on it."""
    _RETIRED.update(conns)


async def forget_replica(pool: AsyncPool) -> None:
    """Retire the pool's connections in use and close its idle ones: their server answered
    READONLY, so the next connection must look for the primary again (on a Sentinel pool,
    connecting asks the sentinels)."""
    retire(getattr(pool, "_in_use_connections", ()))
    with contextlib.suppress(rx.RedisError, OSError):
        await pool.disconnect(inuse_connections=False)


async def give_back(pool: AsyncPool, conn: AbstractConnection, *, clean: bool) -> None:
    """Back to the pool; closed first unless every reply was read (it may still get one), or
    if it was retired (its server turned replica while it was in use)."""
    try:
        if not clean or conn in _RETIRED:
            _RETIRED.discard(conn)
            await conn.disconnect(nowait=True)
    except (rx.RedisError, OSError):
        pass
    finally:
        with contextlib.suppress(rx.RedisError, OSError, KeyError, ValueError):
            await pool.release(conn)


async def drop_if_stale(conn: AbstractConnection) -> None:
    """Disconnect a pooled connection the server has closed (restart, CLIENT KILL, idle timeout).

    redis-py's async pool skips this check when maintenance notifications are on ("auto" by
    default in 8.x) and cluster nodes never make it; without it the first decision on every
    such connection fails. Nothing has been sent yet, so reconnecting cannot double-count.
    A retired connection (see the module doc) is closed here too, and connects anew.
    """
    if conn in _RETIRED:
        _RETIRED.discard(conn)
        await conn.disconnect(nowait=True)
    if not conn.is_connected:
        return
    # A connection reset (RST: a proxy, a load balancer, a network fault) leaves no EOF for
    # can_read() to see, only a closed transport; without this check the next decision on it
    # failed with "Connection reset by peer" although the server was up.
    transport = getattr(getattr(conn, "_writer", None), "transport", None)
    if transport is not None and (transport.is_closing() or unread_in_kernel(transport)):
        await conn.disconnect(nowait=True)
        return
    # redis-py 8 has can_read(); before it only can_read_destructive(), which may consume
    # bytes: harmless here, since any byte waiting before we send means we disconnect.
    can_read = getattr(conn, "can_read", None) or conn.can_read_destructive
    try:
        stale = await can_read()
    except (rx.ConnectionError, OSError):
        stale = True
    if stale:
        await conn.disconnect()
