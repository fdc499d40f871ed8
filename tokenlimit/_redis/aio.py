"""The async twin of ``_redis``: same discipline (one send, own deadline, dirty connections
closed), with ``asyncio`` bounding every step, connecting and pool waits included.

On a standalone server, decisions made concurrently in one event loop are batched: they share
one pipelined write and one read, each still its own atomic script call, run at most once, each
bounded by its own deadline (see ``_batch``). On a cluster each decision makes its own exchange
with its node; what follows an error reply is ``_reply_policy``'s to decide, ``_call`` only does
its steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sys
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tokenlimit._backend import scan_pattern
from tokenlimit._errors import BackendError
from tokenlimit._request import Request, with_args
from tokenlimit._scripts import (
    Script,
    acquire_script,
    hold_script,
    holdback_script,
    lease_script,
    override_script,
    peek_script,
    refund_script,
    release_script,
)

from . import replies as policy
from .batch import Batcher, drop_if_stale, forget_replica, give_back, header, retire
from .driver import available
from .replies import classify
from .server_check import start_check
from .sync import address
from .topology import AsyncSlotRefresher, stale_map

if TYPE_CHECKING:
    from redis.asyncio.cluster import ClusterNode, NodesManager
    from redis.asyncio.connection import AbstractConnection, Connection
    from redis.typing import KeyT

    from .driver import AsyncPool
    from .resp import Command

__all__ = ["AsyncRedisBackend"]

T = TypeVar("T")
_STREAMS = "asyncio Connection._reader/_writer, StreamReader._buffer"
_RECANCEL = 0.01  # seconds between cancellations of an exchange that outlived its deadline
_POOL_POLL = 0.001  # seconds between tries for a cluster connection held by someone else


if sys.version_info >= (3, 12):  # pragma: no cover - the suite's interpreter is 3.11

    async def _bounded(exchange: Awaitable[T], timeout: float) -> T:
        """Run ``exchange`` within the deadline (see the other branch for why not always so)."""
        try:
            async with asyncio.timeout(timeout):
                return await exchange
        except TimeoutError:
            # classify() makes the redis error the cause; the asyncio one stays as context.
            raise classify(rx.TimeoutError("no reply before the limiter's deadline"))  # noqa: B904

else:

    async def _bounded(exchange: Awaitable[T], timeout: float) -> T:
        """Run ``exchange`` and return by the deadline, whatever it does with its cancellation:
        below 3.12 redis-py's ``wait_for`` can swallow one, so the exchange runs in a task of
        its own (docs/internals.md, "Deadlines")."""
        task = asyncio.ensure_future(exchange)
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout)
        except asyncio.CancelledError:  # the caller was cancelled: so is the exchange
            await _stopped(task)
            raise
        if task in done:
            return task.result()
        await _stopped(task)
        # classify() makes the redis error the cause, like every other storage failure.
        raise classify(rx.TimeoutError("no reply before the limiter's deadline"))


async def _stopped(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and give it a moment to end: it usually does at once, closing what it
    left dirty, so the caller returns with its connection back in the pool (and may close the
    client next), as with ``asyncio.timeout``. If it holds on, ``_stop`` keeps at it."""
    # Its outcome is nobody's now: consume it whenever it comes, even if the loop closes
    # before ``_stop`` looks again (else asyncio logs "exception was never retrieved" when
    # the task is collected, a traceback in the application's log for a call long answered).
    task.add_done_callback(_consume)
    _stop(task)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait((task,), timeout=_RECANCEL)


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel ``task``, again and again (a cancellation may be swallowed too), until it has
    ended, so it never keeps a connection (its outcome is ``_consume``'s)."""
    if task.done():
        return
    task.cancel()
    task.get_loop().call_later(_RECANCEL, _stop, task)


class AsyncRedisBackend:
    """Decisions on a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` client."""

    remote = True

    def __init__(self, client: Redis | RedisCluster, *, owned: bool = False) -> None:
        self.client = client
        cluster = client if isinstance(client, RedisCluster) else None
        self.is_cluster = cluster is not None
        # Batches need redis-py's stream internals (_redispy); without them, and on a cluster,
        # each decision makes its own exchange through redis-py's public connection API.
        self._unbatched = self.is_cluster or not available(_STREAMS)
        self._owned = owned
        self._acquire = acquire_script()
        self._peek = peek_script()
        # The batcher of the loop this backend decides in. One slot, not a map by loop: an
        # asyncio client cannot cross loops anyway, and a map's values would keep its keys, the
        # loops, alive. A decision from another loop (sequential asyncio.run() calls) simply
        # starts a batcher there; the old one finishes its own work.
        self._batcher: Batcher | None = None
        self._slots = None if cluster is None else AsyncSlotRefresher(cluster)
        self._check: asyncio.Task[None] | None = None  # the eviction-policy check, run once
        # Cluster: per node, how many of its connections this backend's calls may hold at once.
        self._gates: dict[str, asyncio.Semaphore] = {}

    def decide(
        self, request: Request, *, consume: bool, timeout: float
    ) -> Awaitable[Sequence[int]]:
        # A plain method handing over _script's coroutine: one coroutine less per decision.
        return self._script(self._acquire if consume else self._peek, request, timeout)

    async def _script(self, script: Script, request: Request, timeout: float) -> Sequence[int]:
        """``script`` on ``request``'s keys and packed arguments (a reply of integers), run at
        most once by the deadline: in this loop's batch on a standalone server, else in an
        exchange of its own."""
        if self._unbatched:
            deadline = time.monotonic() + timeout
            try:
                reply = await _bounded(
                    self._call(*_script_call(script, request), deadline), timeout
                )
            except BackendError as error:  # a node gone silent: look for the new master
                if self._slots is not None and stale_map(error):
                    self._slots.failed(self._name(request.keys[0]))
                raise
            self._first(request, timeout)
            return [int(x) for x in reply]
        loop = asyncio.get_running_loop()
        batcher = self._batcher
        if batcher is None or batcher.loop is not loop:
            pool = self.client.connection_pool  # type: ignore[union-attr]
            batcher = self._batcher = Batcher(loop, pool)
        future: asyncio.Future[list[int]] = loop.create_future()
        command = header(request.size + 2) + script.evalsha + request.tail
        batcher.submit(future, loop.time() + timeout, command, script, request)
        # The future is all the caller waits on: its deadline is set by the lane's timer, and
        # a cancellation of the caller cancels only this future (see _batch).
        answer = await future
        self._first(request, timeout)
        return answer

    def _first(self, request: Request, timeout: float) -> None:
        """After the first decision the server answered: ask about its eviction policy, in a
        task of its own that no decision waits for (see ``_server_check``)."""
        if self._check is None:
            self._check = start_check(functools.partial(self._ask_info, request.keys[0], timeout))

    def batch_counts(self) -> tuple[int, int]:
        """``(batches written, commands in them)`` by this loop's batcher: for tests, tuning."""
        batcher = self._batcher
        if batcher is None or batcher.loop is not asyncio.get_running_loop():
            return (0, 0)
        return (batcher.flushes, batcher.commands)

    async def run_script(
        self, script: Script, keys: tuple[str, ...], args: tuple[str, ...], *, timeout: float
    ) -> Any:  # the script's reply, as ``_call``'s
        """One call of another shipped script (concurrency slots), run at most once by the
        deadline, outside the batches: NOSCRIPT reloaded, cluster redirects followed."""
        call = _script_call(script, Request(keys, args, (), 0))
        try:
            return await _bounded(self._call(*call, time.monotonic() + timeout), timeout)
        except BackendError as error:
            if self._slots is not None and stale_map(error):
                self._slots.failed(self._name(keys[0]))
            raise

    async def hold_back(self, request: Request, hold_us: int, *, timeout: float) -> Sequence[int]:
        """The holdback script on ``request``'s keys: ``ARGV[1]`` is the hold in µs where a
        decision has its cost, then the same limits; run at most once, by the deadline."""
        args = (str(hold_us), *request.args[1:])
        return await self._script(holdback_script(), with_args(request, args), timeout)

    async def refund(self, request: Request, *, timeout: float) -> Sequence[int]:
        """The refund script on ``request``'s keys and arguments (those of its decision); run
        at most once, by the deadline."""
        return await self._script(refund_script(), request, timeout)

    async def lease(
        self, request: Request, want: int, back: int, *, timeout: float
    ) -> Sequence[int]:
        """The lease script on ``request``'s keys: ``back`` tokens given back, then up to
        ``want`` taken (at least ``request.cost``); run at most once, by the deadline."""
        args = (request.args[0], str(want), str(back), *request.args[1:])
        return await self._script(lease_script(), with_args(request, args), timeout)

    async def overrides(self, key: str, args: Sequence[str], *, timeout: float) -> Sequence[object]:
        """The override script at ``key`` (live overrides); run at most once, by the deadline."""
        reply = await self.run_script(override_script(), (key,), tuple(args), timeout=timeout)
        return list(reply)

    async def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float
    ) -> Sequence[int]:
        args = (holder, str(max_in_flight), str(lease_us))
        reply = await self.run_script(hold_script(), (key,), args, timeout=timeout)
        return [int(x) for x in reply]

    async def release_slot(self, key: str, holder: str, *, timeout: float) -> int:
        return int(await self.run_script(release_script(), (key,), (holder,), timeout=timeout))

    async def clear_prefix(self, prefix: str) -> int:
        """The async twin of ``RedisBackend.clear_prefix``."""
        client = self.client
        count = 0
        batch: list[KeyT] = []
        async for key in client.scan_iter(match=scan_pattern(prefix), count=1000):
            batch.append(key)
            if len(batch) >= 500:
                count += int(await client.delete(*batch))
                batch.clear()
        if batch:
            count += int(await client.delete(*batch))
        return count

    async def reset(self, request: Request, *, timeout: float) -> None:
        command = ("DEL", *request.keys)
        await _bounded(
            self._call(request.keys[0], command, None, time.monotonic() + timeout), timeout
        )

    async def _ask_info(self, key: str, timeout: float) -> tuple[str | None, object]:
        """``INFO memory`` from the server (the cluster node) of ``key``, and its address."""
        info = self._call(key, ("INFO", "memory"), None, time.monotonic() + timeout)
        reply = await _bounded(info, timeout)
        return self._name(key), reply

    def _name(self, key: str) -> str | None:
        if not self.is_cluster:
            return address(self.client.connection_pool)  # type: ignore[union-attr]
        try:
            return str(self.client.get_node_from_key(key).name)  # type: ignore[union-attr]
        except (rx.RedisError, AttributeError):  # not initialized, or the slot uncovered
            return None

    async def aclose(self) -> None:
        """Fail the decisions still pending in this loop, end its lanes, then close the
        client if it is ours."""
        check = self._check
        if check is not None and not check.done():
            check.cancel()
        batcher = self._batcher
        if batcher is not None and batcher.loop is asyncio.get_running_loop():
            self._batcher = None
            await batcher.aclose()
        if check is not None and check.get_loop() is asyncio.get_running_loop():
            # Awaited, so that a connection it was making is closed before the client is.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await check
        if self._owned:
            await self.client.aclose()

    # -- the shell of the reply policy ------------------------------------------------------
    async def _call(self, key: str, command: Command, body: Command | None, deadline: float) -> Any:
        """Send ``command`` (``body``, the script's, once NOSCRIPT asks for it), then do each
        step ``_reply_policy`` gives until it is done, and return the reply: its shape is the
        command's (a script's array of integers, DEL's count...), which the caller knows and
        redis-py's ``read_response`` does not type."""
        state = policy.CallState(
            deadline=deadline, by_sha=body is not None, cluster=self.is_cluster
        )
        asking: tuple[str, int] | None = None  # after an ASK: the node to send to, after ASKING
        while True:
            sent = command if state.by_sha or body is None else body
            reply, conn = await self._attempt(sent, key, asking)
            if not isinstance(reply, BackendError):
                return reply
            step, state = policy.next_step(policy.outcome_of(reply), state, time.monotonic())
            match step:
                case policy.Resend():  # to the same node: ``state`` now says the body goes
                    pass
                case policy.Redirect(node=node, slot=slot, asking=ask, refresh_slot=refresh):
                    if refresh:
                        await self._refresh_slot(slot, node)
                    asking = node if ask else None
                case policy.Pause(seconds=seconds):
                    asking = None
                    await asyncio.sleep(seconds)
                case policy.DropAndFail(error=error):
                    if self.is_cluster:  # the node's pool is the client's: this one connection
                        retire(() if conn is None else (conn,))
                    else:
                        await forget_replica(self.client.connection_pool)  # type: ignore[union-attr]
                    raise error
                case policy.Fail(error=error):
                    raise error
                case policy.Done(reply=done):
                    return done

    async def _attempt(
        self, command: Command, key: str, asking: tuple[str, int] | None
    ) -> tuple[object, AbstractConnection | None]:
        """One send of ``command`` and its reply, or the BackendError that ended it; with the
        connection it went on (None if none was had)."""
        if not self.is_cluster:
            client: Redis = self.client  # type: ignore[assignment]
            pool: AsyncPool = client.connection_pool
            try:
                conn: AbstractConnection = await pool.get_connection()
            except (rx.RedisError, OSError) as exc:
                return classify(exc), None
            try:
                return (await _roundtrip(conn, [command]))[-1], conn
            except BackendError as error:
                return error, conn
            finally:
                # _roundtrip closed it if cut short; a connection retired meanwhile is closed
                # here, so the pool never hands it to the client's other users.
                await give_back(pool, conn, clean=True)

        cluster: RedisCluster = self.client  # type: ignore[assignment]
        try:
            await cluster.initialize()
            if asking is None:
                node = cluster.get_node_from_key(key)
            else:
                node = cluster.get_node(host=asking[0], port=asking[1])
            if node is None:
                raise rx.ClusterError("no node serves this key")
            conn = await self._connection(node)
        except (rx.RedisError, OSError) as exc:
            return classify(exc), None
        commands = [command] if asking is None else [("ASKING",), command]
        try:
            return (await _roundtrip(conn, commands))[-1], conn
        except BackendError as error:
            return error, conn
        finally:
            node.release(conn)
            self._gates[node.name].release()

    async def _refresh_slot(self, slot: int, node: tuple[str, int]) -> None:
        """After MOVED: the client's slot map learns that ``node`` serves ``slot`` now."""
        manager: NodesManager = self.client.nodes_manager  # type: ignore[union-attr]
        try:
            if available("NodesManager.move_slot"):
                moved = manager.move_slot(rx.MovedError(f"{slot} {node[0]}:{node[1]}"))
                if inspect.isawaitable(moved):  # a coroutine from redis-py 8, None before
                    await moved
            else:
                await manager.initialize()
        except (rx.RedisError, OSError) as exc:
            raise classify(exc) from exc

    async def _connection(self, node: ClusterNode) -> Connection:
        """A connection to a cluster node, waiting (within the caller's deadline) while all of
        the node's ``max_connections`` are in use, where redis-py's async cluster would raise;
        the caller releases it and then the node's gate (docs/internals.md, "Deadlines")."""
        gate = self._gates.get(node.name)
        if gate is None:
            gate = self._gates[node.name] = asyncio.Semaphore(node.max_connections)
        await gate.acquire()
        try:
            while True:
                try:
                    return node.acquire_connection()
                except rx.MaxConnectionsError:  # held by the client's other users
                    await asyncio.sleep(_POOL_POLL)
        except BaseException:
            gate.release()
            raise


def _script_call(script: Script, request: Request) -> tuple[str, Command, Command]:
    """``key, command, body`` of a script's call, for ``_call``."""
    head: Command = (len(request.keys), *request.keys, *request.args)
    return request.keys[0], ("EVALSHA", script.sha, *head), ("EVAL", script.body, *head)


async def _roundtrip(conn: AbstractConnection, commands: Sequence[Command]) -> list[object]:
    """Send ``commands`` in one write and read every reply; close the connection if cut short."""
    clean = False
    try:
        await drop_if_stale(conn)
        if len(commands) == 1:
            await conn.send_command(*commands[0], check_health=False)
        else:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies = []
        error: BaseException | None = None
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except rx.ResponseError as exc:  # an error reply: the connection stays in sync
                error = error or exc
        clean = True
        if error is not None:
            raise error
        return replies
    except (rx.RedisError, OSError) as exc:
        raise classify(exc) from exc
    finally:
        if not clean:
            # Cancelled or failed mid-exchange: the reply may still come, so this socket must
            # never serve another call (redis-py CVE-2023-28858 was exactly this).
            await conn.disconnect(nowait=True)
