"""The async twin of ``_redis``: same discipline (one send, own deadline, dirty connections
closed), with ``asyncio`` bounding every step, connecting and pool waits included.

On a standalone server, decisions made concurrently in one event loop are batched: they share
one pipelined write and one read, each still its own atomic script call, run at most once, each
bounded by its own deadline (see ``_batch``). On a cluster each decision makes its own exchange
with its node, following MOVED/ASK/TRYAGAIN redirects (the script did not run on a redirect).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from ._batch import Batcher, drop_if_stale, give_back, header
from ._errors import BackendError
from ._redis import MAX_REDIRECTS, TRYAGAIN_PAUSE, address, classify
from ._redispy import available
from ._request import Request
from ._scripts import Script, acquire_script, peek_script
from ._server_check import start_check
from ._topology import AsyncSlotRefresher, stale_map

__all__ = ["AsyncRedisBackend"]

T = TypeVar("T")
_STREAMS = "asyncio Connection._reader/_writer, StreamReader._buffer"
_RECANCEL = 0.01  # seconds between cancellations of an exchange that outlived its deadline
_POOL_POLL = 0.001  # seconds between tries for a cluster connection held by someone else


if sys.version_info >= (3, 12):  # pragma: no cover - the suite's interpreter is 3.11

    async def _bounded(exchange: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``exchange`` within the deadline (see the other branch for why not always so)."""
        try:
            async with asyncio.timeout(timeout):
                return await exchange
        except TimeoutError:
            # classify() makes the redis error the cause; the asyncio one stays as context.
            raise classify(rx.TimeoutError("no reply before the limiter's deadline"))  # noqa: B904

else:

    async def _bounded(exchange: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``exchange`` and return by the deadline, whatever it does with its cancellation.

        Why not ``asyncio.timeout`` around the exchange, as on 3.12+: the deadline is a
        cancellation, and below 3.12 code under us swallows one. redis-py sends through
        ``asyncio.wait_for`` whenever a socket timeout is set (5 s by default since redis-py
        8), and that ``wait_for`` drops a cancellation that lands as its inner send completes:
        the exchange then ran on with no deadline at all (a fault-proxy test saw decisions of
        5 s, and up to a minute with redis-py's connect retries, for a 50 ms timeout). So here
        the exchange runs in its own task, and the caller stops waiting at the deadline in any
        case. It costs a task per decision (~30 us), which 3.12's ``wait_for`` makes needless.
        """
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

    def __init__(self, client: Redis | RedisCluster, *, owned: bool = False) -> None:
        self.client = client
        self.is_cluster = isinstance(client, RedisCluster)
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
        self._slots = AsyncSlotRefresher(client) if self.is_cluster else None
        self._check: asyncio.Task[None] | None = None  # the eviction-policy check, run once
        # Cluster: per node, how many of its connections this backend's calls may hold at once.
        self._gates: dict[str, asyncio.Semaphore] = {}

    async def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        script = self._acquire if consume else self._peek
        if self._unbatched:
            try:
                reply = await _bounded(self._call(script, request), timeout)
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
    ) -> Any:
        """One call of another shipped script (concurrency slots), run at most once by the
        deadline, outside the batches: NOSCRIPT reloaded, cluster redirects followed."""
        try:
            return await _bounded(self._call(script, Request(keys, args, (), 0)), timeout)
        except BackendError as error:
            if self._slots is not None and stale_map(error):
                self._slots.failed(self._name(keys[0]))
            raise

    async def reset(self, request: Request, *, timeout: float) -> None:
        await _bounded(self._execute(("DEL", *request.keys), request.keys[0]), timeout)

    async def _ask_info(self, key: str, timeout: float) -> tuple[str | None, Any]:
        """``INFO memory`` from the server (the cluster node) of ``key``, and its address."""
        reply = await _bounded(self._execute(("INFO", "memory"), key), timeout)
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

    async def _call(self, script: Script, request: Request) -> Any:
        head = (len(request.keys), *request.keys, *request.args)
        try:
            return await self._execute(("EVALSHA", script.sha, *head), request.keys[0])
        except BackendError as error:
            # The script did not run (NOSCRIPT), so sending its body cannot take tokens twice.
            if not isinstance(error.__cause__, rx.NoScriptError):
                raise
        return await self._execute(("EVAL", script.body, *head), request.keys[0])

    async def _execute(self, command: tuple[Any, ...], key: str) -> Any:
        if not self.is_cluster:
            client: Redis = self.client  # type: ignore[assignment]
            pool = client.connection_pool
            try:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            except (rx.RedisError, OSError) as exc:
                raise classify(exc) from exc
            try:
                return (await _roundtrip(conn, [command]))[-1]
            finally:
                # _roundtrip closed it if cut short; a connection retired meanwhile is closed
                # here, so the pool never hands it to the client's other users.
                await give_back(pool, conn, clean=True)

        cluster: RedisCluster = self.client  # type: ignore[assignment]
        asking: tuple[str, int] | None = None
        redirects = 0
        while redirects <= MAX_REDIRECTS:
            try:
                await cluster.initialize()
                if asking is None:
                    node = cluster.get_node_from_key(key)
                    commands = [command]
                else:
                    node = cluster.get_node(host=asking[0], port=asking[1])
                    commands = [("ASKING",), command]
                if node is None:
                    raise rx.ClusterError("no node serves this key")
                conn = await self._connection(node)
            except (rx.RedisError, OSError) as exc:
                raise classify(exc) from exc
            try:
                return (await _roundtrip(conn, commands))[-1]
            except BackendError as error:
                cause = error.__cause__
                if isinstance(cause, rx.MovedError):
                    try:
                        if available("NodesManager.move_slot"):
                            await cluster.nodes_manager.move_slot(cause)
                        else:
                            await cluster.nodes_manager.initialize()
                    except (rx.RedisError, OSError) as exc:
                        raise classify(exc) from exc
                    asking = None
                elif isinstance(cause, rx.AskError):
                    asking = (cause.host, cause.port)
                elif isinstance(cause, rx.TryAgainError):  # keys split mid-migration (_redis)
                    asking = None
                    redirects = 0  # progress, not a loop: only the deadline (_bounded) ends it
                    await asyncio.sleep(TRYAGAIN_PAUSE)
                    continue
                else:
                    raise
                redirects += 1
            finally:
                node.release(conn)
                self._gates[node.name].release()
        raise BackendError("storage failed (cluster): too many redirects", reason="cluster")

    async def _connection(self, node: Any) -> Any:
        """A connection to a cluster node, waiting (within the caller's deadline) while all of
        the node's ``max_connections`` are in use; the caller releases it and then the node's
        gate. redis-py's async cluster raises MaxConnectionsError at once instead, so past 100
        concurrent decisions on one node every further one failed as a storage error while the
        server was healthy (1,500 of 1,600 concurrent tasks in tests/test_contention.py). The
        sync limiter's pools block the same way (see ``_url._pool_options``)."""
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


async def _roundtrip(conn: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
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
