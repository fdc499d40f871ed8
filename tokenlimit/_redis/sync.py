"""Redis/Valkey backends, standalone and cluster, sync: one script call per decision, run once.

Why this talks to a pooled connection instead of ``client.evalsha``: redis-py retries a command
that timed out, and a retried consuming script takes tokens twice (DESIGN: "the decision call must
run at most once"). Here the script is sent once, the reply is awaited until the limiter's own
deadline, and a connection whose reply is unknown is closed, never reused. What follows an error
reply (NOSCRIPT, MOVED, ASK, TRYAGAIN, READONLY) is ``_reply_policy``'s to decide; ``_call``
only does its steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar

from redis import BlockingConnectionPool, Redis
from redis import exceptions as rx
from redis.cluster import RedisCluster
from redis.connection import Connection

from tokenlimit._backend import scan_pattern
from tokenlimit._errors import BackendError
from tokenlimit._request import Request
from tokenlimit._scripts import (
    Script,
    acquire_script,
    hold_script,
    holdback_script,
    lease_script,
    peek_script,
    refund_script,
    release_script,
)

from . import replies as policy
from .driver import BLOCKING_TAKES_INUSE, Conn, NodePool, available, close_idle_blocking
from .pools import DEADLINE, deadline_class
from .replies import classify
from .resp import ReplyError, parse_one
from .sentinel import private_pool as private_sentinel_pool
from .server_check import report
from .topology import SlotRefresher, stale_map

if TYPE_CHECKING:
    import asyncio

    from redis import ConnectionPool
    from redis.sentinel import SentinelConnectionPool
    from redis.typing import KeyT

    from .driver import SyncCluster, SyncPool
    from .resp import Command

__all__ = ["RedisBackend", "address", "unread_in_kernel"]

logger = logging.getLogger("tokenlimit")


class RedisBackend:
    """Decisions on a ``redis.Redis`` or ``redis.cluster.RedisCluster`` client."""

    remote = True

    def __init__(
        self, client: Redis | RedisCluster, *, owned: bool = False, timeout: float | None = None
    ) -> None:
        self.client = client
        self._owned = owned
        # A cluster client, or the pool of a standalone one: one of the two is None.
        self._cluster: SyncCluster | None = None
        self._pool: ConnectionPool | None = None
        pool = None
        if isinstance(client, RedisCluster):
            self._cluster = client
        else:
            pool = client.connection_pool
            self._pool = pool if owned or timeout is None else _private_pool(pool, timeout)
            if owned:  # ours from the start (from_url): no connection exists yet
                pool.connection_class = deadline_class(pool.connection_class)
        self.is_cluster = self._cluster is not None
        self._private = self._pool is not None and not owned and self._pool is not pool
        # The lean path (see _Lanes): one per pool, so one per node on a cluster; off where
        # redis-py lacks what it needs (_redispy) and once a socket turns out to be TLS.
        self._lean = available("Connection._sock")
        lean_pool = self._pool if self._lean else None
        self._lanes: _Lanes[Connection] | None = None if lean_pool is None else _lanes_on(lean_pool)
        self._node_lanes: dict[ConnectionPool, _Lanes[Connection]] = {}  # a cluster's, by node
        self._acquire = acquire_script()
        self._peek = peek_script()
        self._slots = None if self._cluster is None else SlotRefresher(self._cluster)
        self._checked = False  # the server's eviction policy, asked once (see _check_server)

    # -- the backend protocol -----------------------------------------------------------------
    def decide(self, request: Request, *, consume: bool, timeout: float) -> Sequence[int]:
        script = self._acquire if consume else self._peek
        deadline = time.monotonic() + timeout
        try:
            lanes = self._lanes if self._cluster is None else self._lanes_for(request.keys[0])
            reply: object = None
            if lanes is not None:  # the lean path: one write, one read (see _Lanes)
                header = b"*%d\r\n" % (request.size + 2)
                reply = lanes.call(header + script.evalsha + request.tail, deadline)
            if type(reply) is not list:  # an error reply, or nothing sent yet
                call = _script_call(script, request, lean=lanes is not None)
                reply = [int(x) for x in self._call(call, deadline, lanes=lanes, first=reply)]
        except BackendError as error:
            self._failed(error, request.keys[0])
            raise
        if not self._checked:
            self._check_server(request.keys[0], deadline)
        return reply

    def _lanes_for(self, key: str) -> _Lanes[Connection] | None:
        """The lean path to the cluster node that serves ``key`` (None: use redis-py's)."""
        cluster = self._cluster
        if not self._lean or cluster is None:
            return None
        node_lanes = self._node_lanes
        try:
            pool = cluster.get_redis_connection(cluster.get_node_from_key(key)).connection_pool
        except (rx.RedisError, OSError, AttributeError):
            return None  # redis-py's path reports it properly
        lanes = node_lanes.get(pool)
        if lanes is None:
            # A pool not seen before: its node is new to us, maybe in place of one the client
            # replaced or forgot (failover, resharding, a new topology). Lanes on pools that no
            # node of the client's uses any more are dropped here, never per decision.
            known = {
                node.redis_connection.connection_pool
                for node in cluster.get_nodes()
                if node.redis_connection is not None
            }
            for gone in [seen for seen in list(node_lanes) if seen not in known]:
                dropped = node_lanes.pop(gone, None)
                if dropped is not None:
                    dropped.drop()
            lanes = node_lanes.setdefault(pool, _Lanes(pool, node=True))
        return lanes

    def run_script(
        self, script: Script, keys: tuple[str, ...], args: tuple[str, ...], *, timeout: float
    ) -> Any:  # the script's reply, as ``_call``'s
        """One call of another shipped script (concurrency slots), run at most once by the
        deadline: redis-py's path with the pool of ``decide``, no retries, NOSCRIPT reloaded."""
        call = _script_call(script, Request(keys, args, (), 0), lean=False)
        try:
            return self._call(call, time.monotonic() + timeout)
        except BackendError as error:
            self._failed(error, keys[0])
            raise

    def hold_back(self, request: Request, hold_us: int, *, timeout: float) -> Sequence[int]:
        """The holdback script on ``request``'s keys: ``ARGV[1]`` is the hold in µs where a
        decision has its cost, then the same limits; run at most once, by the deadline."""
        args = (str(hold_us), *request.args[1:])
        reply = self.run_script(holdback_script(), request.keys, args, timeout=timeout)
        return [int(x) for x in reply]

    def refund(self, request: Request, *, timeout: float) -> Sequence[int]:
        """The refund script on ``request``'s keys and arguments (those of its decision); run
        at most once, by the deadline."""
        reply = self.run_script(refund_script(), request.keys, request.args, timeout=timeout)
        return [int(x) for x in reply]

    def lease(self, request: Request, want: int, back: int, *, timeout: float) -> Sequence[int]:
        """The lease script on ``request``'s keys: ``back`` tokens given back, then up to
        ``want`` taken (at least ``request.cost``); run at most once, by the deadline."""
        args = (request.args[0], str(want), str(back), *request.args[1:])
        reply = self.run_script(lease_script(), request.keys, args, timeout=timeout)
        return [int(x) for x in reply]

    def hold_slot(
        self, key: str, holder: str, max_in_flight: int, lease_us: int, *, timeout: float
    ) -> Sequence[int]:
        args = (holder, str(max_in_flight), str(lease_us))
        return [int(x) for x in self.run_script(hold_script(), (key,), args, timeout=timeout)]

    def release_slot(self, key: str, holder: str, *, timeout: float) -> int:
        return int(self.run_script(release_script(), (key,), (holder,), timeout=timeout))

    def clear_prefix(self, prefix: str) -> int:
        """SCAN and DEL through the client (every node of a cluster): for tests, no deadline."""
        client = self.client
        count = 0
        batch: list[KeyT] = []
        for key in client.scan_iter(match=scan_pattern(prefix), count=1000):
            batch.append(key)
            if len(batch) >= 500:
                count += int(client.delete(*batch))
                batch.clear()
        if batch:
            count += int(client.delete(*batch))
        return count

    def reset(self, request: Request, *, timeout: float) -> None:
        try:
            self._call(_Call(request.keys[0], ("DEL", *request.keys)), time.monotonic() + timeout)
        except BackendError as error:
            self._failed(error, request.keys[0])
            raise

    def _check_server(self, key: str, deadline: float) -> None:
        """Once per backend, after its first decision, on its connection and within what is
        left of its deadline: warn if the server can evict buckets (see ``_server_check``).
        Every failure, a NOPERM included, is only logged at debug level."""
        if deadline - time.monotonic() < _CHECK_AT_LEAST:
            return  # no time left: ask at a later decision rather than fail this one
        self._checked = True
        try:
            cluster = self._cluster
            if cluster is not None:
                node = cluster.get_node_from_key(key)
                pool = _node_pool(cluster.get_redis_connection(node).connection_pool)
                server = str(node.name)
                lanes = self._node_lanes.get(pool)
            else:
                assert self._pool is not None  # a standalone client's
                pool, server, lanes = self._pool, address(self._pool), self._lanes
            # The connection the decision just used is held by its lanes: lent to the INFO.
            reply = _pooled(lanes, pool, [("INFO", "memory")], deadline)[-1]
        except (BackendError, rx.RedisError, OSError, AttributeError) as exc:
            logger.debug("tokenlimit: could not read the server's eviction policy: %r", exc)
            return
        report(reply, server)

    def _failed(self, error: BackendError, key: str) -> None:
        """A cluster node failed us: maybe the cluster changed without a redirect to say so
        (a master crashed or hangs and its replica took over). Look again, in the background."""
        cluster, slots = self._cluster, self._slots
        if cluster is not None and slots is not None and stale_map(error):
            try:
                node: str | None = cluster.get_node_from_key(key).name
            except (rx.RedisError, OSError, AttributeError):
                node = None
            slots.failed(node)

    def close(self) -> None:
        # The lanes first: no exchange of theirs may be left on a socket the client closes.
        if self._lanes is not None:
            self._lanes.close()
        for lanes in list(self._node_lanes.values()):
            lanes.close()
        if self._owned:
            self.client.close()
        elif self._private and self._pool is not None:
            # close(): a private Sentinel pool closes its sentinels' connections too.
            getattr(self._pool, "close", self._pool.disconnect)()

    # -- plumbing: the shell of the reply policy ---------------------------------------------
    def _call(
        self,
        call: _Call,
        deadline: float,
        *,
        lanes: _Lanes[Connection] | None = None,
        first: object = None,
    ) -> Any:
        """Send ``call``, then do each step ``_reply_policy`` gives until it is done, and return
        the reply: its shape is the command's (a script's array of integers, DEL's count...),
        which the caller knows and redis-py's ``read_response`` does not type.

        ``lanes``: the lean path to the key's server, for the attempts before any redirect;
        ``first``: what it already answered to the call (None or ``_TLS``: nothing was sent).
        """
        state = policy.CallState(
            deadline=deadline, by_sha=call.body is not None, cluster=self._cluster is not None
        )
        asking: tuple[str, int] | None = None  # after an ASK: the node to send to, after ASKING
        if first is _TLS:
            self._no_lean()
            lanes = first = None
        reply = _UNSENT if first is None else first
        while True:
            if reply is _UNSENT:
                reply = self._attempt(call, state.by_sha, asking, lanes, deadline)
            if not isinstance(reply, (ReplyError, BackendError)):
                return reply
            step, state = policy.next_step(policy.outcome_of(reply), state, time.monotonic())
            reply = _UNSENT
            match step:
                case policy.Resend():  # to the same node: ``state`` now says the body goes
                    pass
                case policy.Redirect(node=node, slot=slot, asking=ask, refresh_slot=refresh):
                    lanes = None  # redis-py's path from here on: it can send ASKING first
                    if refresh and self._cluster is not None:  # the policy redirects no other
                        _refresh_slot(self._cluster, slot, node)
                    asking = node if ask else None
                case policy.Pause(seconds=seconds):
                    lanes = asking = None
                    time.sleep(seconds)
                case policy.DropAndFail(error=error):
                    self._forget_replica(lanes, call.key, asking)
                    raise error
                case policy.Fail(error=error):
                    raise error
                case policy.Done(reply=done):
                    return done

    def _attempt(
        self,
        call: _Call,
        by_sha: bool,
        asking: tuple[str, int] | None,
        lanes: _Lanes[Connection] | None,
        deadline: float,
    ) -> object:
        """One send of ``call`` and its reply, or what ended it: a ``ReplyError`` (an error reply
        on the lean path) or a ``BackendError``. On ``lanes`` if given and open, else pooled."""
        try:
            if lanes is not None:
                reply = lanes.call(call.packed if by_sha else call.packed_body, deadline)
                if reply is _TLS:
                    self._no_lean()
                elif reply is not None:
                    return reply
            command = call.command if by_sha or call.body is None else call.body
            pool, held = self._target(call.key, asking)
            commands = [command] if asking is None else [("ASKING",), command]
            return _pooled(held, pool, commands, deadline)[-1]
        except BackendError as error:
            return error

    def _target(
        self, key: str, asking: tuple[str, int] | None
    ) -> tuple[ConnectionPool, _Lanes[Connection] | None]:
        """The pool that serves ``key`` (or the ASK's node), and the lanes that hold some of its
        connections."""
        pool = self._pool
        if pool is not None:  # a standalone server
            return pool, self._lanes
        cluster = self._cluster
        assert cluster is not None  # a backend has a pool or a cluster
        try:
            if asking is None:
                node = cluster.get_node_from_key(key)
            else:
                found = cluster.get_node(host=asking[0], port=asking[1])
                if found is None:
                    raise rx.ClusterError(f"unknown node {asking[0]}:{asking[1]}")
                node = found
            pool = _node_pool(cluster.get_redis_connection(node).connection_pool)
        except (rx.RedisError, OSError) as exc:  # slot not covered, node lookup
            raise classify(exc) from exc
        return pool, self._node_lanes.get(pool)

    def _forget_replica(
        self, lanes: _Lanes[Connection] | None, key: str, asking: tuple[str, int] | None
    ) -> None:
        """DropAndFail: close the idle connections to the server that answered READONLY."""
        if lanes is None:
            try:
                pool, lanes = self._target(key, asking)
            except BackendError:
                return
            if lanes is None:
                _disconnect_idle(pool)
                return
        lanes.drop_idle()

    def _no_lean(self) -> None:
        """The connection turned out to be TLS: the lean path is off for good (see _Lanes)."""
        self._lanes = None
        self._node_lanes = {}
        self._lean = False


class _Call(NamedTuple):
    """One call as redis-py's path sends it (``command``; ``body``, after NOSCRIPT, for a
    script) and as the lean path does (``packed``, ``packed_body``: empty when not lean)."""

    key: str
    command: Command
    body: Command | None = None
    packed: bytes = b""
    packed_body: bytes = b""


def _script_call(script: Script, request: Request, *, lean: bool) -> _Call:
    head: Command = (len(request.keys), *request.keys, *request.args)
    packed = packed_body = b""
    if lean:
        header = b"*%d\r\n" % (request.size + 2)
        packed = header + script.evalsha + request.tail
        packed_body = header + script.eval + request.tail
    sha, body = ("EVALSHA", script.sha, *head), ("EVAL", script.body, *head)
    return _Call(request.keys[0], sha, body, packed, packed_body)


_UNSENT = object()  # _call: the next attempt is still to be made

_CHECK_AT_LEAST = 0.005  # seconds of deadline left for the server check to be worth trying


def address(pool: object) -> str:
    """``host:port`` (or the socket path) of a standalone pool's server, for messages."""
    service = getattr(pool, "service_name", None)
    if service is not None:  # Sentinel: the primary last found, if any
        found = getattr(pool, "master_address", None)
        return f"{found[0]}:{found[1]}" if found else f"the primary of {service}"
    kwargs = getattr(pool, "connection_kwargs", {})
    if kwargs.get("path"):
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


_TLS = object()  # what _Lanes.call answers when the connection turns out to be TLS
_CLOSE_WAIT = 1.0  # seconds _Lanes.close() waits for the exchanges it cut short to end


class _Lanes(Generic[Conn]):
    """Connections held out of a pool for the lean path: one write and one read per decision.

    A decision sends its pre-packed command straight to the socket and reads the reply with
    ``_resp``: no pool lock and queue, no command packer, no response callbacks. A connection
    is taken from the free list (or the pool) for one exchange and put back only if its reply
    was read in full, so a connection never carries a stray reply to the next caller; one
    whose exchange failed or timed out is closed and given back to the pool. Before a send,
    a zero-timeout poll finds connections the server has closed (restart, CLIENT KILL, idle
    timeout): nothing was sent on them, so reconnecting cannot double-count.

    Held connections still count against the pool's size. A caller that finds the free list
    empty waits in the pool (a BlockingConnectionPool), where only ``release`` wakes it; so
    while anyone waits there (``_waiting``), finished connections go back to the pool instead.

    An exchange reads and writes the socket's descriptor number, so that socket must not be
    closed under it: the number could then be reused by anything the process opens. ``close``
    therefore cuts the exchanges in flight short with a ``shutdown`` (which keeps the number)
    and waits until each has closed and given back its own connection, before the pool's
    owner may close the rest. Once closed, or dropped, calls take redis-py's path.

    TLS sockets keep decrypted bytes that ``poll`` cannot see, so they go redis-py's way.
    """

    def __init__(self, pool: SyncPool[Conn], *, node: bool = False) -> None:
        self._pool = pool
        self._node = node  # a cluster node's pool, shared with the client (see _node_pool)
        self._free: list[tuple[Conn, socket.socket, select.poll]] = []
        self._waiting = 0
        # Bumped by drop_idle(), close() and drop(): an exchange that began before it ends by
        # closing its connection, which reached a server now known to be a replica, or
        # belongs to lanes that lend no more.
        self._epoch = 0
        # Taken from the pool and not given back yet (idle here, or in an exchange): changed
        # under the lock, only when a connection comes from or goes back to the pool.
        self._held: set[Conn] = set()
        self._closed = False  # by close() or drop(): no exchange starts any more
        self._cut = False  # by close(): the exchanges in flight were cut short
        self._lock = threading.Lock()
        self._given_back = threading.Condition(self._lock)
        _ALL_LANES.add(self)

    def call(self, payload: bytes, deadline: float) -> object:
        """Send ``payload`` (one command) and return its reply (a ReplyError for an error), or
        None if the lanes are closed: then nothing was sent, and redis-py's path takes it."""
        epoch = self._epoch  # before taking: drop_idle() may run while we take one
        if self._closed:  # read after the epoch: close() sets it before bumping that
            return None
        lane = self._take(deadline)
        if lane is None:
            return None if self._closed else _TLS
        conn, sock, poller = lane
        clean = False
        try:
            # os.write/os.read on the descriptor: the socket object, which has a timeout, would
            # poll before each call, two more system calls per decision than the exchange needs
            # (our own poll already bounds the wait for the reply by the deadline).
            fd = sock.fileno()
            try:
                sent = os.write(fd, payload)
            except BlockingIOError:  # the send buffer is full: the socket's own way, with waits
                sent = 0
            if sent < len(payload):
                sock.sendall(memoryview(payload)[sent:])
            buf = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000.0):
                    raise rx.TimeoutError("no reply before the limiter's deadline")
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:  # woken, but nothing to read after all: wait again
                    continue
                if not chunk:
                    raise rx.ConnectionError("the server closed the connection")
                buf += chunk
                reply = parse_one(buf)
                if reply is not None:
                    break
            clean = True
            return reply
        except (rx.RedisError, OSError) as exc:
            if self._cut:
                raise classify(rx.ConnectionError("the limiter was closed")) from exc
            raise classify(exc) from exc
        finally:
            if clean and epoch == self._epoch:
                self._free.append(lane)
                if self._waiting:
                    self._hand_back()
            else:
                self._give_back(conn, close=True)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a call that takes a connection from the pool directly: while it waits there,
        connections that finish an exchange go back to the pool, and an idle one goes now."""
        with self._lock:
            self._waiting += 1
        try:
            self._hand_back()
            yield
        finally:
            with self._lock:
                self._waiting -= 1

    def _hand_back(self) -> None:
        """Give one idle connection back to the pool, for a caller waiting there."""
        try:
            conn = self._free.pop()[0]
        except IndexError:
            return
        self._give_back(conn, close=False)

    def _give_back(self, conn: Conn, *, close: bool) -> None:
        """Back to the pool, closed first if ``close``. No longer held from the moment this
        thread is done with its socket, so that ``close()`` never shuts down one of the pool's."""
        if close:
            conn.disconnect()
        with self._lock:
            self._held.discard(conn)
            if self._closed:
                self._given_back.notify_all()
        self._pool.release(conn)

    def _take(self, deadline: float) -> tuple[Conn, socket.socket, select.poll] | None:
        free = self._free
        while free:
            try:
                lane = free.pop()
            except IndexError:  # another thread took the last one
                break
            # Still the socket we polled (a pool.disconnect() closes held connections too),
            # and nothing readable before we send: not closed by the server, not out of step.
            if lane[0]._sock is lane[1] and not lane[2].poll(0):
                return lane
            self._give_back(lane[0], close=True)
        with self._lock:
            if self._closed:
                return None
            self._waiting += 1
        # Checked again now that a returning caller sees us waiting (it then hands back).
        if free:
            with self._lock:
                self._waiting -= 1
            return self._take(deadline)
        conn = None
        DEADLINE.at = deadline  # connecting, inside get_connection(), ends by it
        try:
            if self._node:
                _node_pool(self._pool)
            conn = self._pool.get_connection()
        except (rx.RedisError, OSError) as exc:
            raise classify(exc) from exc
        finally:
            DEADLINE.at = None
            with self._lock:
                self._waiting -= 1
                if conn is not None and not self._closed:
                    self._held.add(conn)
        if conn not in self._held:  # closed meanwhile: not held, so close() waits not for it
            self._pool.release(conn)
            return None
        sock = getattr(conn, "_sock", None)
        if not isinstance(sock, socket.socket) or _is_tls(sock):
            self._give_back(conn, close=False)
            return None
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return conn, sock, poller

    def close(self) -> None:
        """Give every held connection back to the pool: idle ones now, those in an exchange
        once it has ended, cut short (see the class doc), waiting up to ``_CLOSE_WAIT``."""
        self._stop(close=False)
        with self._lock:
            self._cut = True
            for conn in self._held:  # in an exchange, or given back by its thread right now
                with contextlib.suppress(OSError, AttributeError):  # closed meanwhile
                    sock = conn._sock
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
            self._given_back.wait_for(lambda: not self._held, _CLOSE_WAIT)

    def drop(self) -> None:
        """No cluster node uses the pool any more: close every held connection, idle ones now
        and those in an exchange when it ends (nobody closes that pool under them)."""
        self._stop(close=True)

    def _stop(self, *, close: bool) -> None:
        """Start no exchange any more; give the idle connections back (closed if ``close``)."""
        with self._lock:
            self._closed = True
            self._epoch += 1  # an exchange in flight gives its connection back when it ends,
            self._waiting += 1  # and so does one that saw the old epoch just before
        self._give_back_idle(close=close)

    def _give_back_idle(self, *, close: bool) -> None:
        """Every idle held connection back to the pool (closed if ``close``); popped one at a
        time, so no other thread can take the same one."""
        while True:
            try:
                conn = self._free.pop()[0]
            except IndexError:
                return
            self._give_back(conn, close=close)

    def forget(self) -> None:
        """In a forked child: the sockets are the parent's, never to be used or closed here;
        the lock may be held for good by a parent thread, and the waiters were the parent's."""
        self._free = []
        self._held = set()
        self._waiting = 0
        self._lock = threading.Lock()
        self._given_back = threading.Condition(self._lock)

    def drop_idle(self) -> None:
        """Close every idle connection, held here or in the pool: their server answered
        READONLY, so it is a replica now, and the next connection must look again (on a
        Sentinel pool, connecting asks the sentinels for the primary). Those in an exchange
        on another thread right now are closed when it ends (``_epoch``)."""
        with self._lock:
            self._epoch += 1
        self._give_back_idle(close=True)
        _disconnect_idle(self._pool)


def _disconnect_idle(pool: SyncPool[Conn]) -> None:
    """Close the pool's idle connections, never those in use on other threads."""
    if isinstance(pool, BlockingConnectionPool) and not BLOCKING_TAKES_INUSE:
        close_idle_blocking(pool)
    else:
        pool.disconnect(inuse_connections=False)


class _SentinelLanes(_Lanes[Connection]):
    """Lanes on a Sentinel pool: a held connection to a server the sentinels no longer name
    as the primary is closed before use (redis-py's pool does so for its idle connections
    when a new connection finds a new primary; ours are held outside it)."""

    _pool: SentinelConnectionPool

    def _take(self, deadline: float) -> tuple[Connection, socket.socket, select.poll] | None:
        while True:
            lane = super()._take(deadline)
            primary = self._pool.master_address
            if lane is None or primary is None or (lane[0].host, lane[0].port) == primary:
                return lane
            self._give_back(lane[0], close=True)


def _lanes_on(pool: ConnectionPool) -> _Lanes[Connection]:
    from redis.sentinel import SentinelConnectionPool

    return _SentinelLanes(pool) if isinstance(pool, SentinelConnectionPool) else _Lanes(pool)


def unread_in_kernel(transport: asyncio.BaseTransport) -> bool:
    """Whether an idle asyncio connection has bytes or an EOF in the kernel that its event loop
    has not read yet: the same zero-timeout poll ``_Lanes`` makes before a send.

    The loop reads a socket only when it runs; if its thread was busy (blocked while the server
    restarted, or just a long step), the EOF of a connection the server closed is still in the
    kernel, ``can_read()`` sees nothing, and the decision sent on it failed with "the server
    closed the connection". Nothing has been sent yet, so reconnecting cannot double-count.
    TLS transports are left out: their socket holds records (session tickets) that are not
    replies, and the loop's own checks cover them.
    """
    if transport.get_extra_info("sslcontext") is not None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed under us: stale too
        return True


def _is_tls(sock: socket.socket) -> bool:
    import ssl

    return isinstance(sock, ssl.SSLSocket)


class _Forgets(Protocol):
    """Lanes of any connection type, as the fork hook sees them."""

    def forget(self) -> None: ...


# After a fork the child must not share the parent's sockets (redis-py's pools check the pid;
# held lanes bypass that check, so they are dropped here instead).
_ALL_LANES: weakref.WeakSet[_Forgets] = weakref.WeakSet()


def _forget_all_lanes() -> None:
    for lanes in list(_ALL_LANES):
        lanes.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_lanes)


def _private_pool(pool: ConnectionPool, timeout: float) -> ConnectionPool:
    """A pool like the client's, but whose connections never retry and time out at the deadline.

    Connecting through a client's own pool would follow its retry policy (redis-py 6+ retries
    three times with backoff by default), holding a decision for seconds while the server is
    down. Sharing its sockets would also put our short timeouts on the caller's own commands.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import SentinelConnectionPool

    if isinstance(pool, SentinelConnectionPool):
        return private_sentinel_pool(pool, timeout)
    kwargs = dict(pool.connection_kwargs)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    for name in ("socket_timeout", "socket_connect_timeout"):
        if kwargs.get(name) is None or kwargs[name] > timeout:
            kwargs[name] = timeout
    try:
        clone = type(pool)(
            connection_class=deadline_class(pool.connection_class),
            max_connections=pool.max_connections,
            **kwargs,
        )
    except TypeError:  # a pool that needs more than its connection kwargs (Sentinel): use it
        return pool
    if hasattr(clone, "timeout"):  # BlockingConnectionPool: never wait past the deadline
        clone.timeout = timeout
    return clone


_P = TypeVar("_P", bound=NodePool)


def _node_pool(pool: _P) -> _P:
    """A cluster node's pool, whose connections connect by the deadline of our decisions.

    A cluster client's node pools are its own (there is no single pool to clone, and nodes
    come and go), so the deadline class goes onto them in place: onto the pool for the
    connections it makes next, and onto the idle ones it already made (the client's own
    CLUSTER SLOTS at start-up made one), which it reconnects as they are. It changes nothing
    for the client's own commands: it acts only while a decision of this thread connects.
    Without it, a master that hangs (its port still accepts, nothing answers) held every
    decision that had to reconnect for the client's socket timeout (5 s by default), not
    the limiter's. The instance's class can change because the subclass only adds methods.
    """
    cls = pool.connection_class
    if not getattr(cls, "_tokenlimit_deadline", False):
        pool.connection_class = deadline_class(cls)
    if not available("ConnectionPool._available_connections"):
        return pool
    for conn in list(pool._available_connections):
        made = type(conn)
        if not getattr(made, "_tokenlimit_deadline", False):
            conn.__class__ = deadline_class(made)
    return pool


def _refresh_slot(cluster: SyncCluster, slot: int, node: tuple[str, int]) -> None:
    """After MOVED: the client's slot map learns that ``node`` serves ``slot`` now."""
    manager = cluster.nodes_manager
    try:
        if available("NodesManager.move_slot"):
            manager.move_slot(rx.MovedError(f"{slot} {node[0]}:{node[1]}"))
        else:
            manager.initialize()
    except (rx.RedisError, OSError) as exc:
        raise classify(exc) from exc


def _pooled(
    lanes: _Lanes[Conn] | None, pool: SyncPool[Conn], commands: Sequence[Command], deadline: float
) -> list[object]:
    """``_roundtrip`` on a pool whose connections ``lanes`` may hold: counted as waiting, so
    an idle held connection goes back to the pool for it now and a busy one when its exchange
    ends. Without this a pool whose every connection is held (a pool of one after a decision,
    any pool after a burst) starves resets, concurrency slots and redis-py's path."""
    if lanes is None:
        return _roundtrip(pool, commands, deadline)
    with lanes.waiting():
        return _roundtrip(pool, commands, deadline)


def _roundtrip(pool: SyncPool[Conn], commands: Sequence[Command], deadline: float) -> list[object]:
    """Send ``commands`` in one write on one pooled connection and read every reply by deadline.

    A connection whose replies were not all read is closed: its next reply would belong to us,
    not to the next caller.
    """
    DEADLINE.at = deadline  # connecting, inside get_connection(), ends by it too
    try:
        return _exchange(pool, commands, deadline)
    finally:
        DEADLINE.at = None


def _exchange(pool: SyncPool[Conn], commands: Sequence[Command], deadline: float) -> list[object]:
    try:
        conn = pool.get_connection()
    except (rx.RedisError, OSError) as exc:
        raise classify(exc) from exc
    clean = False
    try:
        if len(commands) == 1:
            conn.send_command(*commands[0], check_health=False)
        else:
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies = []
        error: BaseException | None = None
        for _ in commands:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not conn.can_read(timeout=remaining):
                raise rx.TimeoutError("no reply before the limiter's deadline")
            try:
                replies.append(conn.read_response())
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
            conn.disconnect()
        pool.release(conn)
