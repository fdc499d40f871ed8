"""What ``tokenlimit check`` asks a server besides decisions: its name and version, its topology,
its eviction policy, the ACL rules of the limiter's user, and whether it takes the shipped scripts.

Each function takes a redis-py client that the limiter made from the URL (so the same TLS,
Sentinel and cluster options), asks, and returns plain data. A refusal that only hides an answer
(an ACL without INFO or ACL GETUSER) is an answer here (None); anything else the driver raises
passes through as it is, for the command line to say in one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis import Redis
from redis import exceptions as rx

from tokenlimit._scripts import (
    Script,
    acquire_script,
    hold_script,
    holdback_script,
    peek_script,
    release_script,
)

from .sync import address

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

__all__ = [
    "CLUSTER_NEEDED",
    "CONCURRENCY",
    "IN_SCRIPTS",
    "NEEDED",
    "OPTIONAL",
    "Acl",
    "Node",
    "Shard",
    "acl_of",
    "cluster_slots",
    "denied_command",
    "denies_keys",
    "info_of",
    "load_scripts",
    "nodes_of",
    "replicas_of",
    "shards_of",
    "shipped_scripts",
    "uncovered",
]

# What a limiter sends, with what each is for (docs/reliability.md, "Least privilege and TLS";
# tests/test_security.py shows each needed one to be needed). A script's own commands are
# checked against the caller's ACL too, so TIME, GET and SET count as much as EVALSHA.
IN_SCRIPTS = "inside the scripts"
NEEDED = (
    ("EVALSHA", "every decision"),
    ("EVAL", "decisions after the server lost its script cache"),
    ("DEL", "reset"),
    ("TIME", IN_SCRIPTS),
    ("GET", IN_SCRIPTS),
    ("SET", IN_SCRIPTS),
)
CLUSTER_NEEDED = (("ASKING", "decisions on a slot being migrated"),)
OPTIONAL = (
    ("INFO", "the eviction-policy warning, skipped without it"),
    ("HGETALL", "live overrides, which every limiter reads once a second (inside a script)"),
    ("HSET", "setting live overrides (inside a script)"),
    ("HDEL", "clearing and expiring live overrides (inside a script)"),
)
CONCURRENCY = tuple(
    (name, "limiter.concurrency()")
    for name in ("ZADD", "ZCARD", "ZRANGE", "ZREM", "ZREMRANGEBYSCORE", "ZSCORE", "PEXPIRE")
)

SLOTS = 16384
_NOT_RUN = re.compile(r"no permissions to run the '([^']+)' command", re.IGNORECASE)
# "No permissions to access a key" (a command, a script), "... to access the 'k' key" (DRYRUN).
_NO_KEY = re.compile(r"no permissions to access (?:a key|the '.*' key)", re.IGNORECASE)


@dataclass(frozen=True)
class Node:
    """One server that takes decisions (a cluster's master, or the one server) and a client
    for it alone."""

    client: Redis
    cluster_name: str | None = None  # a cluster node's ``host:port``

    @property
    def name(self) -> str:
        """``host:port``; behind Sentinel, the primary found when a connection was last made."""
        return self.cluster_name or address(self.client.connection_pool)


def nodes_of(client: Redis | RedisCluster) -> list[Node]:
    """The servers that take decisions: a cluster's masters, else the one server."""
    if isinstance(client, Redis):
        return [Node(client)]
    primaries = client.get_primaries()  # type: ignore[no-untyped-call]
    return [Node(client.get_redis_connection(node), node.name) for node in primaries]


def info_of(node: Node) -> dict[str, object] | None:
    """``INFO`` (its default sections) as redis-py parses it; None if the ACL refuses it."""
    try:
        reply: object = node.client.info()
    except rx.NoPermissionError:
        return None
    return dict(reply) if isinstance(reply, Mapping) else None


# -- topology -----------------------------------------------------------------------------------
@dataclass
class Shard:
    """A cluster master, the slot ranges it serves, and its replicas."""

    master: str
    slots: list[tuple[int, int]] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _fields(reply: object) -> dict[str, object]:
    """A reply of field names and values (a RESP3 map, or a RESP2 flat list) as a dict."""
    if isinstance(reply, Mapping):
        return {_text(name): value for name, value in reply.items()}
    items = list(reply) if isinstance(reply, list) else []
    return {_text(name): value for name, value in zip(items[::2], items[1::2], strict=False)}


def _words(value: object) -> list[str]:
    """ACL GETUSER's field as words, whether the server sent one string or a list."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [word for item in items if item for word in _text(item).split()]


def _host(entry: object) -> str:
    """``host:port`` of a node in a ``CLUSTER SLOTS`` range (``[host, port, id, ...]``)."""
    if isinstance(entry, Sequence) and len(entry) >= 2:
        return f"{_text(entry[0])}:{_text(entry[1])}"
    return "?"


def shards_of(reply: object) -> list[Shard]:
    """``CLUSTER SLOTS``' raw reply as one ``Shard`` per master, in slot order."""
    shards: dict[str, Shard] = {}
    ranges = sorted(reply if isinstance(reply, list) else [], key=lambda item: int(item[0]))
    for item in ranges:
        master = _host(item[2]) if len(item) > 2 else "?"
        shard = shards.setdefault(master, Shard(master))
        shard.slots.append((int(item[0]), int(item[1])))
        for replica in map(_host, item[3:]):
            if replica not in shard.replicas:
                shard.replicas.append(replica)
    return list(shards.values())


def uncovered(shards: Sequence[Shard]) -> list[tuple[int, int]]:
    """The slot ranges no master serves: decisions for their keys fail."""
    served = sorted(slot for shard in shards for slot in shard.slots)
    gaps, next_slot = [], 0
    for first, last in served:
        if first > next_slot:
            gaps.append((next_slot, first - 1))
        next_slot = max(next_slot, last + 1)
    if next_slot < SLOTS:
        gaps.append((next_slot, SLOTS - 1))
    return gaps


def cluster_slots(node: Node) -> object:
    """``CLUSTER SLOTS`` from ``node``, unparsed: its shape is the same on every server
    version, where redis-py's parsing of it has changed between releases."""
    return node.client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]


def replicas_of(client: Redis) -> list[str] | None:
    """The replicas the sentinels know for the primary of ``client``'s service (None: not
    behind Sentinel)."""
    pool = client.connection_pool
    manager = getattr(pool, "sentinel_manager", None)
    service = getattr(pool, "service_name", None)
    if manager is None or service is None:
        return None
    return [f"{_text(host)}:{_text(port)}" for host, port in manager.discover_slaves(service)]


# -- ACL ----------------------------------------------------------------------------------------
@dataclass
class Acl:
    """The ACL of the limiter's user on one server, as far as the user may see it.

    ``enabled`` False: a server without ACLs (before Redis 6), where every client may run
    everything. ``denied`` maps each command ACL DRYRUN refused to the server's reason;
    ``dry_run`` False means the server would not say (no ACL DRYRUN before Redis 7, or not
    permitted to this user): the decisions themselves are then the test.
    """

    enabled: bool = True
    user: str = "default"
    rules: str | None = None  # ACL GETUSER's commands and key patterns, if the user may ask
    dry_run: bool = False
    denied: dict[str, str] = field(default_factory=dict)


def _dry_run_args(command: str, key: str) -> tuple[str, ...]:
    """A command as the limiter sends it, for ACL DRYRUN (which checks the key patterns too)."""
    return {
        "EVALSHA": ("EVALSHA", acquire_script().sha, "1", key, "1", "1", "1"),
        "EVAL": ("EVAL", "return 1", "1", key),
        "DEL": ("DEL", key),
        "GET": ("GET", key),
        "SET": ("SET", key, "1", "PX", "1000"),
        "INFO": ("INFO", "memory"),
        "HGETALL": ("HGETALL", key),
        "HSET": ("HSET", key, "f", "1"),
        "HDEL": ("HDEL", key, "f"),
        "ZADD": ("ZADD", key, "1", "m"),
        "ZRANGE": ("ZRANGE", key, "0", "0", "WITHSCORES"),
        "ZREM": ("ZREM", key, "m"),
        "ZREMRANGEBYSCORE": ("ZREMRANGEBYSCORE", key, "-inf", "0"),
        "ZSCORE": ("ZSCORE", key, "m"),
        "PEXPIRE": ("PEXPIRE", key, "1000"),
        "ZCARD": ("ZCARD", key),
    }.get(command, (command,))


def acl_of(node: Node, key: str, commands: Sequence[str]) -> Acl:
    """What the ACL of ``node``'s user says about ``commands`` run on ``key``."""
    client = node.client
    acl = Acl()
    try:
        acl.user = _text(client.acl_whoami())
    except rx.NoPermissionError:
        acl.user = str(client.connection_pool.connection_kwargs.get("username") or "default")
    except rx.ResponseError as exc:
        if "unknown command" in str(exc).lower():  # no ACL at all: Redis < 6
            return Acl(enabled=False)
        raise
    try:  # unparsed: redis-py's parsing splits the rules apart, differently per release
        found = _fields(client.execute_command("ACL", "GETUSER", acl.user))  # type: ignore[no-untyped-call]
        acl.rules = " ".join(_words(found.get("commands")) + _words(found.get("keys")))
    except rx.ResponseError:  # NOPERM (a subclass)
        pass
    for command in commands:
        try:
            verdict = _text(client.acl_dryrun(acl.user, *_dry_run_args(command, key)))
        except rx.ResponseError as exc:  # not permitted, or no DRYRUN (before Redis 7)
            if acl.dry_run:
                acl.denied[command] = str(exc)
                continue
            return acl
        acl.dry_run = True
        if verdict != "OK":
            acl.denied[command] = verdict
    return acl


def denied_command(message: str) -> str | None:
    """The command an ACL refused, read from the server's error (``NOPERM ... no permissions to
    run the 'evalsha' command``, or the same inside a script), upper-cased; None if none."""
    found = _NOT_RUN.search(message)
    return found[1].upper() if found else None


def denies_keys(message: str) -> bool:
    """Whether the server's error says the ACL refused the keys (their pattern), not a command."""
    return _NO_KEY.search(message) is not None


# -- scripts ------------------------------------------------------------------------------------
def shipped_scripts() -> tuple[Script, ...]:
    """Every script the limiter may send: decisions, hold-backs, concurrency slots."""
    return (acquire_script(), peek_script(), holdback_script(), hold_script(), release_script())


def load_scripts(node: Node) -> list[str] | None:
    """``SCRIPT LOAD`` every shipped script on ``node`` and return their names (None: the user
    may not; the limiter never needs to, as it loads a script with EVAL when it is missing).
    A script the server refuses raises ``rx.ResponseError`` naming it; a SHA1 other than ours
    (the server would never find the script by it) a ``rx.DataError``."""
    loaded = []
    for script in shipped_scripts():
        try:
            sha = _text(node.client.script_load(script.body))
        except rx.NoPermissionError:
            return None
        except rx.ResponseError as exc:
            raise rx.ResponseError(f"the server refused the script {script.name!r}: {exc}") from exc
        if sha != script.sha:
            raise rx.DataError(f"the server gave the script {script.name!r} the SHA1 {sha}")
        loaded.append(script.name)
    return loaded
