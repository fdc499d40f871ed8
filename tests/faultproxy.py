"""A small fault-injecting TCP proxy for the tests: 127.0.0.1 -> a real server.

    with FaultProxy(server_port) as proxy:
        limiter = RateLimiter.from_url(proxy.url, timeout=0.05)
        proxy.latency(0.3)      # every server->client chunk arrives 300 ms late
        ...
        proxy.heal()

The proxy runs its own asyncio loop in one daemon thread. Every mode switch is applied inside
that loop and has taken effect when the call returns (connections it closes are closed, a port it
stops serving refuses the next connect), so tests can sequence faults without sleeping.

Modes, switchable while running:

- ``latency(seconds, direction="down")``: each chunk read from one side is written to the other
  ``seconds`` later. ``"down"`` is server->client, ``"up"`` client->server, ``"both"`` both. Chunks
  keep their order (a later chunk never overtakes an earlier one, as in TCP), and a connection the
  client has closed still forwards what it already read, so a request that reached the proxy reaches
  the server, and its late reply lands after the client gave up: the fault under test.
- ``drop()``: close every current connection abruptly (RST to the client); keep accepting.
- ``refuse(reset=False)``: the server is down. Current connections are dropped and the port stops
  listening (connects fail with ECONNREFUSED; the port stays reserved, so ``heal`` gets it back).
  ``reset=True`` instead keeps listening and resets each new connection as soon as it is accepted.
- ``blackhole()``: accept and read, never forward or answer, on new and current connections alike.
  A connection that lost bytes this way stays silent until it is closed: its stream is broken.
- ``slow_fraction(p, seconds)``: of the connections accepted from now on, exactly a fraction ``p``
  (every ``1/p``-th, evenly spread, no randomness) delay their server->client chunks by
  ``seconds`` on top of any ``latency``.
- ``heal()``: back to a plain proxy for new chunks on every connection, slow ones included
  (chunks already delayed keep their due time; blackholed connections stay silent).
  ``wait_idle()`` waits until no delayed chunk is left in flight, e.g. before counting what the
  server ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["FaultProxy"]

T = TypeVar("T")
CHUNK = 65536
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


def _rst_and_abort(writer: asyncio.StreamWriter) -> None:
    """Close abruptly: the peer sees ECONNRESET, not an orderly EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Wait (briefly) until ``writer``'s socket is closed, whatever the reason it closes."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 5)


@dataclass(eq=False)
class _Link:
    """One client connection and, unless blackholed from the start, its upstream connection."""

    client: asyncio.StreamWriter
    slow: float = 0.0  # extra server->client delay (slow_fraction)
    upstream: asyncio.StreamWriter | None = None
    blackholed: bool = False
    in_flight: int = 0  # chunks read but not yet written or discarded
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


class FaultProxy:
    """A TCP proxy on ``127.0.0.1:<port>`` forwarding to ``upstream_host:upstream_port``."""

    def __init__(
        self, upstream_port: int, upstream_host: str = "127.0.0.1", *, port: int = 0
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = port
        # Mode; only read and written on the proxy's loop.
        self._latency = {"up": 0.0, "down": 0.0}
        self._blackhole = False
        self._refusing: str | None = None  # None | "unlisten" | "reset"
        self._slow_p = 0.0
        self._slow_seconds = 0.0
        self._slow_count = 0  # connections accepted since slow_fraction(), for the even spread
        # Counters, for tests and diagnostics (read them through stats()).
        self._accepted = 0
        self._reset = 0
        self._dropped = 0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # one per accepted connection
        self._server: asyncio.AbstractServer | None = None
        self._reserved: socket.socket | None = None  # bound, not listening, while refusing
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        try:
            self._call(self._listen(self._bind()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                self._call(self._shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- modes (thread-safe; applied when they return) ----------------------------------------
    def latency(self, seconds: float, direction: str = "down") -> None:
        if direction not in ("up", "down", "both") or not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"bad latency {seconds!r} {direction!r}")

        def apply() -> None:
            for side in ("up", "down"):
                if direction in (side, "both"):
                    self._latency[side] = float(seconds)

        self._run(apply)

    def drop(self) -> int:
        """Reset every current connection; returns how many were dropped."""
        return self._call(self._drop_all())

    def refuse(self, *, reset: bool = False) -> None:
        self._call(self._refuse(reset))

    def blackhole(self) -> None:
        def apply() -> None:
            self._blackhole = True

        self._run(apply)

    def slow_fraction(self, p: float, seconds: float) -> None:
        if not (0.0 <= p <= 1.0) or not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"bad slow_fraction {p!r} {seconds!r}")

        def apply() -> None:
            self._slow_p, self._slow_seconds, self._slow_count = float(p), float(seconds), 0

        self._run(apply)

    def heal(self) -> None:
        self._call(self._heal())

    def wait_idle(self, timeout: float = 10.0, *, quiet: float = 0.0) -> None:
        """Wait until no chunk is in flight (delayed chunks delivered or discarded) and, with
        ``quiet``, no connection opened or closed for that many seconds: after a storm of
        connections, the proxy's own thread may still be closing hundreds of them."""
        self._call(self._wait_idle(timeout, quiet), timeout + 5)

    def stats(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            return {
                "accepted": self._accepted,
                "reset": self._reset,
                "dropped": self._dropped,
                "open": len(self._links),
                "in_flight": sum(link.in_flight for link in self._links),
            }

        return self._run(read)

    # -- plumbing: calls into the loop --------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("proxy not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run(self, function: Any) -> Any:
        async def call() -> Any:
            return function()

        return self._call(call())

    # -- listening ----------------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        # proto=IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say so, and
        # accepted sockets inherit it. Without it, Nagle holds a second small reply until the
        # client's delayed ACK (40 ms) of the first: a fault nobody asked for.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        return sock

    async def _listen(self, sock: socket.socket) -> None:
        sock.listen(128)
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._accept, sock=sock, limit=CHUNK)

    async def _unlisten(self) -> None:
        """Stop listening but keep the port: a bound socket that never listens holds it, so
        connects are refused and no other process can take the port before ``heal``."""
        if self._server is None:
            return
        self._server.close()  # closes the listening socket now (3.10+), not at wait_closed
        self._server = None
        reserved = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(200):
            try:
                reserved.bind((self.host, self.port))
                break
            except OSError:  # pragma: no cover - the old socket is not released yet
                await asyncio.sleep(0.005)
        else:  # pragma: no cover
            reserved.close()
            raise RuntimeError(f"could not keep port {self.port}")
        self._reserved = reserved

    async def _relisten(self) -> None:
        if self._server is not None:
            return
        sock, self._reserved = self._reserved, None
        if sock is None:  # pragma: no cover - never stopped listening
            sock = self._bind()
        await self._listen(sock)

    # -- modes, on the loop -------------------------------------------------------------------
    async def _drop_all(self) -> int:
        links = list(self._links)
        for link in links:
            _rst_and_abort(link.client)
            if link.upstream is not None:
                link.upstream.transport.abort()
        # abort() closes the sockets on the next loop iteration: wait for it, so the caller's
        # next connect or send already meets a dead connection.
        for link in links:
            for writer in link.writers():
                await _closed(writer)
        self._dropped += len(links)
        return len(links)

    async def _refuse(self, reset: bool) -> None:
        if reset:
            self._refusing = "reset"
            await self._relisten()
        else:
            self._refusing = "unlisten"
            await self._unlisten()
        await self._drop_all()

    async def _heal(self) -> None:
        self._latency = {"up": 0.0, "down": 0.0}
        self._blackhole = False
        self._slow_p = self._slow_seconds = 0.0
        for link in self._links:
            link.slow = 0.0
        self._refusing = None
        await self._relisten()

    async def _wait_idle(self, timeout: float, quiet: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen, since = (-1, -1), loop.time()
        while True:
            now = loop.time()
            state = (self._accepted, len(self._links))
            if state != seen:
                seen, since = state, now
            if not any(link.in_flight for link in self._links) and now - since >= quiet:
                return
            if now > deadline:
                raise TimeoutError("proxy still busy")
            await asyncio.sleep(0.005)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        await self._drop_all()
        # Every connection handler ends here, so stopping the loop leaves no task pending.
        tasks = list(self._handlers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- connections --------------------------------------------------------------------------
    def _is_slow(self) -> bool:
        """Exactly a fraction p of the connections, evenly spread: the n-th connection is slow
        when floor(n * p) moves past floor((n - 1) * p)."""
        if self._slow_p <= 0.0:
            return False
        self._slow_count += 1
        n = self._slow_count
        return math.floor(n * self._slow_p + 1e-9) > math.floor((n - 1) * self._slow_p + 1e-9)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        if self._refusing is not None:
            self._reset += 1
            _rst_and_abort(writer)
            await _closed(writer)
            return
        self._accepted += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:  # belt and braces: see _bind
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(writer, slow=self._slow_seconds if self._is_slow() else 0.0)
        self._links.add(link)
        try:
            if self._blackhole:
                link.blackholed = True
                while await reader.read(CHUNK):  # read and discard until the client goes
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=CHUNK)
            except OSError:
                _rst_and_abort(writer)
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.create_task(self._pump(link, reader, up_writer, "up")),
                asyncio.create_task(self._pump(link, up_reader, writer, "down")),
            ]
            try:
                await asyncio.gather(*link.tasks, return_exceptions=True)
            finally:
                for task in link.tasks:
                    task.cancel()
                await asyncio.gather(*link.tasks, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.discard(link)
            for w in link.writers():
                w.close()  # flushes what is buffered; a no-op after abort()
            for w in link.writers():
                await _closed(w)  # the sockets are closed when the handler ends

    def _delay(self, link: _Link, direction: str) -> float:
        extra = link.slow if direction == "down" else 0.0
        return self._latency[direction] + extra

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        """Copy one direction, each chunk after its delay, in order; then close the far side.

        One task reads (stamping each chunk with its due time) while this one writes, so a
        delay holds every chunk for its own delay, not the sum of the delays before it.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(CHUNK):
                    if self._blackhole or link.blackholed:
                        link.blackholed = True
                        continue
                    link.in_flight += 1
                    queue.put_nowait((loop.time() + self._delay(link, direction), data))
            except OSError:
                pass
            finally:
                queue.put_nowait(None)

        reading = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                try:
                    if (wait := due - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    if self._blackhole:
                        link.blackholed = True
                    if link.blackholed or writer.transport.is_closing():
                        continue  # discarded: the far side is gone or the link is mute
                    writer.write(data)
                    with contextlib.suppress(OSError):
                        await writer.drain()
                finally:
                    link.in_flight -= 1
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
            # Uncount what is left (only when cancelled), then end the far side in order (FIN
            # after the data): the server still answers what it received, and the client reads
            # every reply that was due before the server closed.
            while not queue.empty():
                if queue.get_nowait() is not None:
                    link.in_flight -= 1
            if not writer.transport.is_closing():
                if writer.can_write_eof():
                    writer.write_eof()
                else:  # pragma: no cover - TCP transports can always half-close
                    writer.close()
