"""A cluster with replicas, and the operations that change it under a running limiter:
resharding one slot (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE) and replica failovers.

The session's 3-master cluster (``servers.Cluster``) has no replicas and must stay stable for
the rest of the suite, so the cluster-change tests start this one of their own: three masters
with one replica each, all on 127.0.0.1, stopped by PID. Every helper waits until every node
agrees on the change it made, so a test starts from a settled cluster and leaves one behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from servers import Server, free_port, scratch

__all__ = ["ReplicatedCluster", "key_slot"]


def key_slot(key: str | bytes) -> int:
    """The cluster slot of ``key`` (CRC16/XMODEM of its hash tag, mod 16384)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass  # a node restarting or paused: ask again
        time.sleep(0.02)
    raise RuntimeError(f"cluster: timed out waiting for {what}")


@dataclass
class ReplicatedCluster:
    """``masters`` masters, one replica each, slots split evenly.

    ``node_timeout`` (ms) is short so that the cluster notices a paused master quickly; a
    replica syncs without the default 5 s diskless delay, so the whole thing starts in ~1 s.
    """

    binary: str
    masters: int = 3
    node_timeout: int = 1000
    nodes: list[Server] = field(default_factory=list)
    ids: dict[int, str] = field(default_factory=dict)  # port -> node id
    _admins: dict[int, redis.Redis] = field(default_factory=dict)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> ReplicatedCluster:
        workdir = scratch("replicated-")
        for _ in range(2 * self.masters):
            port = free_port(with_bus=True)
            node = Server(
                self.binary,
                port,
                (
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", str(self.node_timeout),
                    "--repl-diskless-sync-delay", "0",
                ),
                workdir,
            )  # fmt: skip
            self.nodes.append(node.start())
        try:
            self._form(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, timeout: float) -> None:
        for node in self.nodes:
            self.ids[node.port] = _text(self.admin(node.port).execute_command("CLUSTER", "MYID"))
        step = 16384 // self.masters
        for i, node in enumerate(self.nodes[: self.masters]):
            last = 16383 if i == self.masters - 1 else (i + 1) * step - 1
            self.admin(node.port).execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
        first = self.nodes[0].port
        for node in self.nodes[1:]:
            self.admin(node.port).execute_command("CLUSTER", "MEET", "127.0.0.1", first)
        _wait(lambda: all(self._knows_all(n.port) for n in self.nodes), timeout, "MEET")
        masters, replicas = self.nodes[: self.masters], self.nodes[self.masters :]
        for master, replica in zip(masters, replicas, strict=True):
            self.admin(replica.port).execute_command("CLUSTER", "REPLICATE", self.ids[master.port])
        self.wait_settled(timeout)

    def _knows_all(self, port: int) -> bool:
        info = _text(self.admin(port).execute_command("CLUSTER", "INFO"))
        return f"cluster_known_nodes:{len(self.nodes)}" in info

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGCONT)  # a paused node cannot terminate
            node.stop()
        for client in self._admins.values():
            client.close()
        self._admins.clear()

    # -- looking at it ------------------------------------------------------------------------
    def admin(self, port: int) -> redis.Redis:
        """A plain client on one node (no cluster logic): for cluster commands and inspection."""
        client = self._admins.get(port)
        if client is None:
            client = self._admins[port] = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        return client

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def server(self, port: int) -> Server:
        return next(n for n in self.nodes if n.port == port)

    def owner(self, slot: int, via: int | None = None) -> int:
        """The port of the master serving ``slot``, as node ``via`` (default: any) sees it."""
        ports = [via] if via is not None else self.ports
        for port in ports:
            try:
                for start, end, master, *_ in self.admin(port).execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        return int(master[1])
            except (redis.RedisError, OSError):
                continue
        raise RuntimeError(f"no node serves slot {slot}")

    def replica_of(self, master_port: int) -> int:
        """The port of ``master_port``'s replica."""
        master_id = self.ids[master_port]
        for port in self.ports:
            if port == master_port:
                continue
            info = self.admin(port).info("replication")
            if info.get("role") == "slave" and int(info["master_port"]) == master_port:
                return port
        raise RuntimeError(f"no replica of {master_id}")

    def masters_ports(self) -> list[int]:
        return sorted({self.owner(slot) for slot in range(0, 16384, 16384 // self.masters)})

    def wait_settled(self, timeout: float = 30.0) -> None:
        """Until every node says ``cluster_state:ok``, agrees on every slot's master, and every
        replica's link to its master is up."""

        def settled() -> bool:
            views = set()
            for port in self.ports:
                admin = self.admin(port)
                if "cluster_state:ok" not in _text(admin.execute_command("CLUSTER", "INFO")):
                    return False
                views.add(
                    tuple(
                        sorted((int(s), int(e), int(m[1])) for s, e, m, *_ in
                               admin.execute_command("CLUSTER", "SLOTS"))
                    )
                )  # fmt: skip
                info = admin.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            masters = {m for view in views for _, _, m in view}
            return len(views) == 1 and len(masters) == self.masters

        _wait(settled, timeout, "a settled cluster")

    # -- changing it --------------------------------------------------------------------------
    def failover(self, replica_port: int, *options: str, wait: float = 30.0) -> None:
        """``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on a replica; returns once it is master."""
        self.admin(replica_port).execute_command("CLUSTER", "FAILOVER", *options)
        _wait(
            lambda: self.admin(replica_port).info("replication")["role"] == "master",
            wait,
            f"{replica_port} to become master",
        )

    @contextmanager
    def paused(self, port: int) -> Iterator[None]:
        """SIGSTOP a node: it keeps its sockets open and answers nothing (a hung master)."""
        process = self.server(port).process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(process.pid, signal.SIGCONT)

    def migrate_slot(
        self, slot: int, target_port: int, *, pause: float = 0.0, batch: int = 1
    ) -> int:
        """Move ``slot`` to ``target_port`` the way ``valkey-cli --cluster reshard`` does:
        IMPORTING on the target, MIGRATING on the source, MIGRATE the keys ``batch`` at a time
        (``pause`` seconds between batches, so that calls meet the ASK and TRYAGAIN windows),
        then SETSLOT NODE on the target, the source and everyone else. Returns the keys moved.
        """
        source_port = self.owner(slot)
        assert source_port != target_port
        source, target = self.admin(source_port), self.admin(target_port)
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[source_port])
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[target_port])
        moved = 0
        while True:
            keys = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            time.sleep(pause)
            source.execute_command(
                "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "REPLACE", "KEYS", *keys
            )
            moved += len(keys)
        time.sleep(pause)
        target_id = self.ids[target_port]
        target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for master in self.masters_ports():
            if master not in (source_port, target_port):
                self.admin(master).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        _wait(
            lambda: all(self.owner(slot, via=p) == target_port for p in self.ports),
            30.0,
            f"every node to see slot {slot} on {target_port}",
        )
        return moved

    def flushall(self) -> None:
        for port in self.masters_ports():
            admin = self.admin(port)
            admin.flushall()
            admin.script_flush()
