"""``tokenlimit check URL``: can the limiter work with this server?

Row by row: the server (name, version), the topology (a cluster's masters, slots and replicas;
Sentinel's primary and replicas; a standalone server's role), the eviction policy, the ACL rules
the limiter's user has against those it needs, the shipped scripts, and 100 real decisions on a
scratch bucket (the key ``check:<pid>:<random>``, reset afterwards, expiring within 0.1 s
anyway).
The first thing that stops the limiter ends the check with its one line; what only weakens it
(an evicting policy, INFO refused) is a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from redis import Redis
from redis import exceptions as rx

from tokenlimit._errors import BackendError
from tokenlimit._limit import Limit
from tokenlimit._redis import survey
from tokenlimit._redis.server_check import eviction_warning
from tokenlimit._request import build_request
from tokenlimit._scripts import peek_script
from tokenlimit._url import redact

from .common import (
    EXIT_FAILED,
    Output,
    Problem,
    chain,
    client_of,
    latency,
    limiter_for,
    problem_of,
    scratch_key,
)

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

    from tokenlimit._limiter import RateLimiter

__all__ = ["DECISIONS", "SCRATCH", "run"]

DECISIONS = 100
# 100 decisions leave 0.1 s of debt: the scratch key expires within 0.1 s, reset or not.
SCRATCH = Limit(1000, 1000)

Infos = dict[str, dict[str, object] | None]  # INFO per server (None: refused)


def run(url: str, args: argparse.Namespace, out: Output) -> None:
    prefix: str = args.prefix
    key = scratch_key("check")
    with limiter_for(url, args) as limiter:
        client = client_of(limiter)
        nodes = survey.nodes_of(client)
        kind = "standalone"
        if not isinstance(client, Redis):
            kind = "cluster"
        elif getattr(client.connection_pool, "service_name", None) is not None:
            kind = "sentinel"
        infos = _server(out, nodes, kind)
        _topology(out, client, nodes, kind, infos)
        _memory(out, nodes, infos)
        bucket = build_request(prefix, key, SCRATCH).keys[0]
        user = _acl(out, nodes, bucket, kind, prefix)
        _scripts(out, nodes)
        try:
            _decisions(out, limiter, client, key, prefix)  # resets the scratch bucket last
        except (BackendError, rx.RedisError) as exc:
            with contextlib.suppress(BackendError):  # it expires within 0.1 s anyway
                limiter.reset(key, SCRATCH)
            raise _refused(exc, user, prefix) from None
    count = len(out.warnings)
    warned = f" ({count} warning{'s' * (count != 1)} above)" if count else ""
    out.row("ok", f"the limiter can work with {redact(url)}{warned}")


def _product(info: dict[str, object] | None) -> str | None:
    """``valkey 9.1.2``, ``redis 7.2.4``; a Redis server has no ``server_name``."""
    if info is None:
        return None
    name = str(info.get("server_name") or "redis")
    return f"{name} {info.get(f'{name}_version') or info.get('redis_version') or '?'}"


def _server(out: Output, nodes: Sequence[survey.Node], kind: str) -> Infos:
    infos: Infos = {}
    for node in nodes:
        info = survey.info_of(node)  # the first command: it connects, or fails to
        infos[node.name] = info  # named after it: behind Sentinel, the primary it found
    products = sorted({p for p in map(_product, infos.values()) if p is not None})
    where = {
        "standalone": f"standalone at {nodes[0].name}",
        "sentinel": f"primary {nodes[0].name} found by Sentinel",
        "cluster": f"cluster of {len(nodes)} masters",
    }[kind]
    unknown = "; version unknown (the ACL refuses INFO)"
    out.row("server", f"{', '.join(products)}, {where}" if products else f"{where}{unknown}")
    out.set(server={"kind": kind, "nodes": [n.name for n in nodes], "versions": products})
    return infos


def _ranges(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _topology(
    out: Output,
    client: Redis | RedisCluster,
    nodes: Sequence[survey.Node],
    kind: str,
    infos: Infos,
) -> None:
    if kind == "cluster":
        try:
            shards = survey.shards_of(survey.cluster_slots(nodes[0]))
        except rx.NoPermissionError:
            out.row("topology", "unknown (the ACL refuses CLUSTER SLOTS)")
            return
        lines = [
            f"{s.master}  slots {_ranges(s.slots)}"
            + (f"  replicas {', '.join(s.replicas)}" if s.replicas else "")
            for s in shards
        ]
        replicas = sum(len(s.replicas) for s in shards)
        out.row("topology", f"{len(shards)} masters, {replicas} replicas", *lines)
        gaps = survey.uncovered(shards)
        masters = [{"node": s.master, "slots": s.slots, "replicas": s.replicas} for s in shards]
        out.set(topology={"masters": masters, "uncovered": gaps})
        if gaps:
            raise Problem(
                EXIT_FAILED,
                f"cluster slots {_ranges(gaps)} have no master: decisions for their keys fail",
            )
    elif kind == "sentinel" and isinstance(client, Redis):
        found = survey.replicas_of(client) or []
        service = str(getattr(client.connection_pool, "service_name", "?"))
        out.row(
            "topology",
            f"primary {nodes[0].name} of service {service!r}, replicas: "
            f"{', '.join(found) or 'none'} (as the sentinels see it)",
        )
        out.set(topology={"primary": nodes[0].name, "service": service, "replicas": found})
    elif (info := infos.get(nodes[0].name)) is None:
        out.row("topology", "unknown (the ACL refuses INFO)")
    elif str(info.get("role")) in ("slave", "replica"):
        primary = f"{info.get('master_host', '?')}:{info.get('master_port', '?')}"
        raise Problem(
            EXIT_FAILED,
            f"{nodes[0].name} is a replica of {primary}: decisions write, so give the "
            "primary's URL",
        )
    else:
        replicas = int(str(info.get("connected_slaves", 0)))
        out.row("topology", f"primary, {replicas} replica{'s' * (replicas != 1)} connected")
        out.set(topology={"role": str(info.get("role")), "replicas": replicas})


def _memory(out: Output, nodes: Sequence[survey.Node], infos: Infos) -> None:
    """The eviction policy, judged by the rule (and in the words) of the limiter's own check."""
    found: dict[str, str] = {}
    warnings: list[str] = []
    data = {}
    for node in nodes:
        info = infos.get(node.name)
        if info is None:
            found[node.name] = "unknown (the ACL refuses INFO; the limiter skips its check too)"
            continue
        policy = str(info.get("maxmemory_policy", "?"))
        data[node.name] = {"maxmemory_policy": policy, "maxmemory": info.get("maxmemory")}
        warning = eviction_warning(info, node.name)
        if warning is not None:
            warnings.append(warning)
            found[node.name] = f"maxmemory-policy {policy} can evict buckets (see the warning)"
        elif policy == "noeviction":
            found[node.name] = "maxmemory-policy noeviction: buckets are never evicted"
        elif str(info.get("maxmemory")) == "0":
            found[node.name] = f"maxmemory 0 (no limit): nothing is evicted ({policy})"
        else:
            found[node.name] = f"maxmemory-policy {policy}"
    texts = set(found.values())
    if len(texts) == 1:
        out.row("memory", texts.pop())
    else:
        out.row("memory", "per server:", *(f"{name}: {text}" for name, text in found.items()))
    out.set(memory=data)
    for warning in warnings:
        out.warn(warning)


def _grant(commands: Sequence[str]) -> str:
    return " ".join(f"+{name.lower()}" for name in commands)


def _acl(
    out: Output,
    nodes: Sequence[survey.Node],
    bucket: str,
    kind: str,
    prefix: str,
) -> str:
    """Report the ACL of the limiter's user; a needed command it refuses, or the limiter's
    keys, ends the check. Returns the user's name."""
    needed = dict(survey.NEEDED + (survey.CLUSTER_NEEDED if kind == "cluster" else ()))
    optional = dict(survey.OPTIONAL)
    concurrency = [name for name, _ in survey.CONCURRENCY]
    acls = [survey.acl_of(node, bucket, [*needed, *optional, *concurrency]) for node in nodes]
    user = acls[0].user
    if not acls[0].enabled:
        out.row("acl", "none on this server (before Redis 6): every client may run everything")
        out.set(acl={"enabled": False})
        return user
    denied: dict[str, str] = {}
    for acl in acls:
        denied.update(acl.denied)
    dry_run = all(acl.dry_run for acl in acls)
    rules = [f"rules: {acls[0].rules}"] if acls[0].rules else []
    out.set(
        acl={
            "enabled": True,
            "user": user,
            "rules": acls[0].rules,
            "dry_run": dry_run,
            "needed": list(needed),
            "denied": sorted(denied),
        }
    )
    if not dry_run:
        out.row(
            "acl",
            f"user {user!r}: ACL DRYRUN refused (or before Redis 7), so the decisions below "
            "test what the limiter needs",
            *rules,
        )
        return user
    if any(survey.denies_keys(denied[name]) for name in needed if name in denied):
        out.row("acl", f"user {user!r} may not use the key {bucket} (ACL DRYRUN)", *rules)
        raise _keys_refused(user, prefix)
    missing = [name for name in needed if name in denied]
    if missing:
        out.row("acl", f"user {user!r} may not run {' '.join(missing)} (ACL DRYRUN)", *rules)
        why = ", ".join(f"{name} ({needed[name]})" for name in missing)
        raise Problem(EXIT_FAILED, f"ACL user {user!r} may not run {why}: grant {_grant(missing)}")
    direct = " ".join(name for name, why in needed.items() if why != survey.IN_SCRIPTS)
    inside = " ".join(name for name, why in needed.items() if why == survey.IN_SCRIPTS)
    out.row(
        "acl",
        f"user {user!r} may run what the limiter needs (ACL DRYRUN): {direct}, and in its "
        f"scripts {inside}",
        *rules,
    )
    for name in optional:
        if name in denied:
            out.warn(f"ACL user {user!r} may not run {name}: {optional[name]}")
    lacking = [name for name in concurrency if name in denied]
    if lacking:
        out.warn(
            f"ACL user {user!r} may not run {' '.join(lacking)}: limiter.concurrency() would "
            f"fail (grant {_grant(lacking)}); rate limits are unaffected"
        )
    return user


def _keys_refused(user: str, prefix: str) -> Problem:
    return Problem(
        EXIT_FAILED, f"ACL user {user!r} may not use the keys under {prefix!r}: grant ~{prefix}*"
    )


def _scripts(out: Output, nodes: Sequence[survey.Node]) -> None:
    loaded: list[str] | None = []
    for node in nodes:
        try:
            loaded = survey.load_scripts(node)
        except (rx.ResponseError, rx.DataError) as exc:
            raise Problem(EXIT_FAILED, str(exc)) from None
        if loaded is None:
            break
    if loaded is None:
        out.row("scripts", "SCRIPT LOAD refused (not needed: the limiter loads them with EVAL)")
    else:
        servers = f"{len(nodes)} server{'s' * (len(nodes) != 1)}"
        out.row("scripts", f"{len(loaded)} shipped scripts load on {servers}: {' '.join(loaded)}")
    out.set(scripts={"loaded": loaded})


def _decisions(
    out: Output, limiter: RateLimiter, client: Redis | RedisCluster, key: str, prefix: str
) -> None:
    samples = []
    for _ in range(DECISIONS):
        started = time.perf_counter()
        limiter.try_acquire(key, SCRATCH)
        samples.append(time.perf_counter() - started)
    limiter.peek(key, SCRATCH)
    # What a decision falls back to once the server has lost its script cache (a restart, a
    # failover): EVAL of the script's body; here the read-only one's.
    request = build_request(prefix, key, SCRATCH)
    client.eval(peek_script().body.decode(), len(request.keys), *request.keys, *request.args)
    limiter.reset(key, SCRATCH)
    times = latency(samples)
    out.row(
        "decisions",
        f"{DECISIONS} on a scratch key: p50 {times['p50_ms']:.3f} ms, p99 "
        f"{times['p99_ms']:.3f} ms (then peek, EVAL and reset)",
    )
    out.set(decisions={"count": DECISIONS, **times})


def _refused(exc: BaseException, user: str, prefix: str) -> Problem:
    """A failed decision, named by what the ACL refused if it did."""
    text = " ".join(str(item) for item in chain(exc))
    command = survey.denied_command(text)
    if command is not None:
        why = dict(survey.NEEDED + survey.CLUSTER_NEEDED).get(command, "the limiter sends it")
        return Problem(
            EXIT_FAILED,
            f"ACL user {user!r} may not run {command} ({why}): grant {_grant([command])}",
        )
    if survey.denies_keys(text):
        return _keys_refused(user, prefix)
    problem = problem_of(exc)
    return Problem(problem.code, f"decisions fail: {problem}")
