"""Fixtures: real servers (standalone and a 3-master cluster) per available flavour, flushed
between tests; limiters of every kind built on them."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import ClusterNode, RedisCluster

import tokenlimit
from servers import Cluster, Server, available_binaries

FLAVOURS = sorted(available_binaries())


@dataclass
class Target:
    """A server a test can run against: its URL, flavour, and the process when we own it."""

    kind: str  # "standalone" | "cluster"
    flavour: str
    url: str
    server: Server | None = None
    cluster: Cluster | None = None

    def client(self) -> redis.Redis | RedisCluster:
        """A fresh sync client (the caller closes it)."""
        if self.kind == "cluster":
            return RedisCluster(startup_nodes=self.startup_nodes())
        return redis.Redis.from_url(self.url)

    def async_client(self) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
        """A fresh asyncio client (the caller closes it, in the loop that used it)."""
        if self.kind == "cluster":
            from redis.asyncio.cluster import ClusterNode

            nodes = [ClusterNode(h, p) for h, p in self.host_ports()]
            return redis.asyncio.cluster.RedisCluster(startup_nodes=nodes)
        return redis.asyncio.Redis.from_url(self.url)

    def host_ports(self) -> list[tuple[str, int]]:
        hosts = self.url.split("://", 1)[1].split("/", 1)[0].split(",")
        return [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts]

    def startup_nodes(self) -> list[ClusterNode]:
        return [ClusterNode(h, p) for h, p in self.host_ports()]

    def flush(self) -> None:
        if self.kind == "cluster":
            first = self.url.removeprefix("redis+cluster://").split(",")[0]
            client = RedisCluster.from_url(f"redis://{first}")
            try:
                client.flushall(target_nodes=RedisCluster.PRIMARIES)
                for node in client.get_primaries():
                    client.get_redis_connection(node).script_flush()
            finally:
                client.close()
        else:
            with redis.Redis.from_url(self.url) as client:
                client.flushall()


class TestBed:
    """Starts each server on first use and keeps it for the session."""

    def __init__(self) -> None:
        self._targets: dict[tuple[str, str], Target] = {}

    def get(self, kind: str, flavour: str) -> Target:
        found = self._targets.get((kind, flavour))
        if found is None:
            found = self._targets[(kind, flavour)] = self._start(kind, flavour)
        return found

    def _start(self, kind: str, flavour: str) -> Target:
        if kind == "standalone":
            if url := os.environ.get("TOKENLIMIT_TEST_REDIS_URL"):
                return Target(kind, "external", url)
            server = Server(available_binaries()[flavour]).start()
            return Target(kind, flavour, server.url, server=server)
        if url := os.environ.get("TOKENLIMIT_TEST_CLUSTER_URL"):
            return Target(kind, "external", url)
        cluster = Cluster(available_binaries()[flavour]).start()
        return Target(kind, flavour, cluster.url, cluster=cluster)

    def stop(self) -> None:
        for target in self._targets.values():
            if target.server is not None:
                target.server.stop()
            if target.cluster is not None:
                target.cluster.stop()


@pytest.fixture(scope="session")
def testbed() -> Iterator[TestBed]:
    bed = TestBed()
    yield bed
    bed.stop()


def _flushed(bed: TestBed, kind: str, flavour: str) -> Target:
    target = bed.get(kind, flavour)
    target.flush()
    return target


@pytest.fixture(params=FLAVOURS)
def standalone(request: pytest.FixtureRequest, testbed: TestBed) -> Target:
    """A flushed standalone server (every available flavour)."""
    return _flushed(testbed, "standalone", request.param)


@pytest.fixture(params=FLAVOURS)
def own_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A standalone server of this test's own (every available flavour), free to stop,
    restart, pause (SIGSTOP: woken before it is stopped) or demote."""
    server = Server(available_binaries()[request.param]).start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture(params=FLAVOURS)
def cluster(request: pytest.FixtureRequest, testbed: TestBed) -> Target:
    """A flushed 3-master cluster (every available flavour)."""
    return _flushed(testbed, "cluster", request.param)


TARGETS = [f"{flavour}-{kind}" for kind in ("standalone", "cluster") for flavour in FLAVOURS]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest, testbed: TestBed) -> Target:
    """Every real server: standalone and cluster, every flavour."""
    flavour, kind = request.param.split("-")
    return _flushed(testbed, kind, flavour)


@pytest.fixture(params=["memory", *TARGETS])
def url(request: pytest.FixtureRequest, testbed: TestBed) -> str:
    """A limiter URL for every backend: memory://, and each real server."""
    if request.param == "memory":
        return "memory://"
    flavour, kind = request.param.split("-")
    return _flushed(testbed, kind, flavour).url


@pytest.fixture
def limiter(url: str) -> Iterator[tokenlimit.RateLimiter]:
    """A sync limiter on every backend, with a generous deadline for a loaded 2-core machine."""
    lim = tokenlimit.RateLimiter.from_url(url, timeout=5.0)
    yield lim
    lim.close()


@pytest.fixture(autouse=True)
def _reset_default_limiter() -> Iterator[None]:
    yield
    tokenlimit.configure(None)
